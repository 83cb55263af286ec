"""Random-number-generator state as a checkpointable (for bit-exact resume)."""
import logging
import random

import numpy as np
import torch
from detectron2.utils import comm

__all__ = ["RNGState"]


class RNGState:
    """``state_dict()`` captures the python, numpy and torch (CPU and CUDA) generators; with several processes it
    gathers every process's generators (``{"per_rank": [...]}``), so every process must call it (the training
    script runs its checkpointer hook on all processes; only the main one writes). ``load_state_dict`` restores
    this process's own generators, so a resumed multi-process run draws the same numbers on every rank."""

    collective = True  # CoDETRCheckpointer calls state_dict() on every process

    @staticmethod
    def _local_state():
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types and tensors only, so that torch.load(weights_only=True) accepts the checkpoint
        state = {
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def state_dict(self):
        state = self._local_state()
        if comm.get_world_size() > 1:
            return {"per_rank": comm.all_gather(state)}
        return state

    @staticmethod
    def _restore(state):
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def load_state_dict(self, state):
        if "per_rank" in state:
            states, rank, world = state["per_rank"], comm.get_rank(), comm.get_world_size()
            if len(states) != world:
                logging.getLogger(__name__).warning(
                    f"the checkpoint holds the RNG states of {len(states)} processes, this run has {world}: "
                    "the resumed run will not draw the same random numbers"
                )
            state = states[rank % len(states)]
        self._restore(state)
