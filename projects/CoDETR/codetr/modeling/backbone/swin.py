"""Swin-L (Swin Transformer Large, window 12, pre-trained on ImageNet-22k at 384 px) from Detectron2's Swin."""
from detectron2.modeling.backbone.swin import SwinTransformer

__all__ = ["SwinL"]


def SwinL(
    drop_path_rate: float = 0.3,
    use_checkpoint: bool = False,
    out_indices=(0, 1, 2, 3),
    frozen_stages: int = -1,
) -> SwinTransformer:
    """Detectron2 ``SwinTransformer`` with the Swin-L shape of Co-DINO: embed 192, depths 2/2/18/2, heads
    6/12/24/48, window 12, pre-training size 384. Outputs ``p{i}`` for i in ``out_indices`` (channels 192 * 2^i,
    stride 2^(i+2)). ``drop_path_rate``: 0.3 / 0.5 / 0.6 for the official 1x / 2x / 3x schedules;
    ``use_checkpoint``: activation checkpointing of every Swin block (training memory for compute)."""
    return SwinTransformer(
        pretrain_img_size=384,
        patch_size=4,
        embed_dim=192,
        depths=(2, 2, 18, 2),
        num_heads=(6, 12, 24, 48),
        window_size=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        out_indices=tuple(out_indices),
        frozen_stages=frozen_stages,
        use_checkpoint=use_checkpoint,
    )
