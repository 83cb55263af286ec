"""Layer-wise learning-rate decay for the ViT backbone (as the official ``LayerDecayOptimizerConstructor``).

Layer ids: 0 for the patch embedding and the position embedding, ``k + 1`` for ``backbone.blocks.k``,
``num_layers + 1`` for every other parameter (rest of the backbone, neck, heads). A parameter with id ``i`` gets the
learning rate ``base_lr * decay_rate ** (num_layers + 1 - i)``; 1-D parameters and biases (``q_bias``/``v_bias``,
norms) get weight decay 0, the rest ``weight_decay`` (``pos_embed``, being 3-D, keeps its weight decay, as official).
"""
from typing import Any, Dict, List

import torch.nn as nn

__all__ = ["vit_layer_id", "vit_layer_decay_param_groups", "vit_lr_factor"]


def vit_layer_id(name: str, num_layers: int = 24, prefix: str = "backbone.") -> int:
    """The layer id of the parameter ``name`` (a full name from ``model.named_parameters()``)."""
    if not name.startswith(prefix):
        return num_layers + 1
    rest = name[len(prefix):]
    if rest in ("pos_embed", "cls_token", "mask_token") or rest.startswith("patch_embed."):
        return 0
    if rest.startswith("blocks."):
        block = int(rest.split(".")[1])
        if not 0 <= block < num_layers:
            raise ValueError(f"parameter {name!r}: block {block} is outside num_layers={num_layers}")
        return block + 1
    return num_layers + 1


def vit_lr_factor(name: str, decay_rate: float = 0.8, num_layers: int = 24, prefix: str = "backbone.") -> float:
    """The learning-rate scale ``decay_rate ** (num_layers + 1 - layer_id)`` of parameter ``name``; usable as
    ``lr_factor_func`` of Detectron2's ``get_default_optimizer_params`` (through ``functools.partial``)."""
    return decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers, prefix))


def vit_layer_decay_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    decay_rate: float = 0.8,
    num_layers: int = 24,
    prefix: str = "backbone.",
) -> List[Dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay; one group per (layer id, decay / no decay).

    Frozen parameters (``requires_grad=False``) are left out. Each group has ``params``, ``lr``, ``weight_decay``
    and, for inspection, ``layer_id`` and ``lr_scale``. Use in a LazyConfig as
    ``optimizer.params = L(vit_layer_decay_param_groups)(base_lr=..., weight_decay=...)``; the training script sets
    ``optimizer.params.model``.
    """
    if not 0.0 < decay_rate <= 1.0:
        raise ValueError(f"decay_rate must be in (0, 1], got {decay_rate}")
    if model is None:
        raise ValueError("vit_layer_decay_param_groups: model is None (set optimizer.params.model)")
    groups: Dict[str, Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias")
        layer_id = vit_layer_id(name, num_layers, prefix)
        key = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            scale = decay_rate ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "lr": base_lr * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "layer_id": layer_id,
                "lr_scale": scale,
            }
        groups[key]["params"].append(p)
    return list(groups.values())
