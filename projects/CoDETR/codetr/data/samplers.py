"""A training-sampler wrapper that lets ``--resume`` continue the data stream where the checkpoint stopped."""
import itertools

from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler):
    """
    Wraps an infinite detectron2 training sampler (``TrainingSampler``, ``RepeatFactorTrainingSampler``,
    ``RandomSubsetTrainingSampler``, ...: the stream of one process is a function of the sampler's seed) and

    * skips the first ``start_index`` indices of this process's stream (the training script sets it on
      ``--resume`` to iterations done x micro-batches per iteration x per-process batch size, before the first
      batch is drawn);
    * is a checkpointable: ``state_dict()`` holds the sampler's seed, which detectron2 draws at random (shared by
      all processes) when the config gives none, and ``load_state_dict`` puts it back before the stream starts.

    So a resumed run sees the same images, in the same order, as an uninterrupted one (exactly so without
    aspect-ratio grouping and data-loader workers; with them the order is the same up to the grouping buffer).
    """

    def __init__(self, sampler: Sampler):
        if not hasattr(sampler, "_seed"):
            raise TypeError(
                f"ResumableSampler needs a seeded detectron2 training sampler (one with a `_seed`), got "
                f"{type(sampler).__name__}"
            )
        self.sampler = sampler
        self.start_index = 0

    def __iter__(self):
        yield from itertools.islice(iter(self.sampler), self.start_index, None)

    def state_dict(self):
        return {"seed": int(self.sampler._seed), "sampler": type(self.sampler).__name__}

    def load_state_dict(self, state):
        if state.get("sampler", type(self.sampler).__name__) != type(self.sampler).__name__:
            raise ValueError(
                f"the checkpoint's data stream came from a {state['sampler']}, this run uses a "
                f"{type(self.sampler).__name__}: --resume cannot continue it"
            )
        self.sampler._seed = int(state["seed"])
