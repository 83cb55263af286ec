"""Random-number-generator state as a checkpointable (for bit-exact resume)."""
import random

import numpy as np
import torch

__all__ = ["RNGState"]


class RNGState:
    """``state_dict()`` captures the python, numpy and torch (CPU and CUDA) generators of this process;
    ``load_state_dict`` restores them. Saved by the main process, so an exact resume holds for one process."""

    def state_dict(self):
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state):
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
