"""Random-number-generator state as a checkpointable (for bit-exact resume)."""
import random

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """``state_dict()`` captures the python, numpy and torch (CPU and CUDA) generators of this process;
    ``load_state_dict`` restores them. Saved by the main process, so an exact resume holds for one process."""

    def state_dict(self):
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

    def load_state_dict(self, state):
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
