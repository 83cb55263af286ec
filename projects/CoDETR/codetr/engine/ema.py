"""Exponential moving average of model weights (mmdet's ``ExpMomentumEMAHook`` rule).

After every optimizer step: ``m = (1 - momentum) * exp(-(1 + step) / gamma) + momentum`` and
``ema = (1 - m) * ema + m * weight`` for every floating-point entry of the state dict (parameters and
buffers); integer buffers are copied. Co-DETR's ViT-L configs use ``momentum=1e-4`` (``gamma=2000``,
mmdet's default), so the average starts close to the live weights and slows down over training.
"""
import copy
import math

import torch
from torch import nn

from ..checkpoint.checkpointer import rename_legacy_keys

__all__ = ["ModelEMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class ModelEMA:
    """Holds an eval-mode copy of a model whose weights track an exponential moving average.

    Args:
        model: the trained model (a DDP wrapper is unwrapped).
        momentum: the final per-step weight of the live model (1e-4 in Co-DETR).
        gamma: iterations of the exponential warm-up of the momentum (mmdet's ``total_iter``).
    Implements ``state_dict``/``load_state_dict`` so a checkpointer can save it; ``loaded`` tells whether
    ``load_state_dict`` ran (a checkpoint had an EMA state). After loading a checkpoint without one (official or
    converted weights, an ``init_checkpoint``), call ``reset(model)`` so that the copy holds the loaded weights,
    not the ones the model had when the EMA was built.
    """

    def __init__(self, model: nn.Module, momentum: float = 1e-4, gamma: float = 2000.0):
        if not (0.0 < momentum < 1.0):
            raise ValueError(f"model_ema.momentum must be in (0, 1), got {momentum}")
        if gamma <= 0:
            raise ValueError(f"model_ema.gamma must be > 0, got {gamma}")
        self.momentum = float(momentum)
        self.gamma = float(gamma)
        self.model = copy.deepcopy(_unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_updates = 0
        self.loaded = False

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current weights (all state-dict entries copied)."""
        self.model.load_state_dict(_unwrap(model).state_dict())
        self.num_updates = 0

    def current_momentum(self) -> float:
        return (1 - self.momentum) * math.exp(-(1 + self.num_updates) / self.gamma) + self.momentum

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        m = self.current_momentum()
        live = _unwrap(model).state_dict()
        ema_floats, live_floats = [], []
        for k, v in self.model.state_dict().items():
            src = live[k]
            if v.dtype.is_floating_point:
                ema_floats.append(v)
                live_floats.append(src.detach().to(v.dtype))
            else:
                v.copy_(src)
        if ema_floats:
            torch._foreach_mul_(ema_floats, 1.0 - m)
            torch._foreach_add_(ema_floats, live_floats, alpha=m)
        self.num_updates += 1

    def state_dict(self):
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        model_state = dict(state["model"])
        rename_legacy_keys(model_state, self.model.state_dict().keys())  # older checkpoints' parameter names
        self.model.load_state_dict(model_state)
        self.num_updates = int(state["num_updates"])
        self.loaded = True
