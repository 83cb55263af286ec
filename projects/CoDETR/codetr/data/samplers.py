"""A training sampler that can continue where a checkpointed run stopped."""
import itertools

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """:class:`detectron2.data.samplers.TrainingSampler` that skips the first ``start_index`` indices of this
    process's infinite stream. The training script sets ``start_index`` on ``--resume`` (iterations done x
    micro-batches per iteration x per-process batch size) before the first batch is drawn, so that a resumed
    run sees the same images, in the same order, as an uninterrupted one (exactly so without aspect-ratio
    grouping and data-loader workers; with them the order is the same up to the grouping buffer)."""

    def __init__(self, size: int, shuffle: bool = True, seed=None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.start_index = 0

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self.start_index, None)
