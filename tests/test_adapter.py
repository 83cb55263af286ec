"""The multi-scale adapter: output shapes and strides for single- and multi-scale inputs; the identity path
returns the encoder maps themselves and, for Co-DINO's levels, the extra map as an explicit conv3x3 s2 + GN."""
import pytest
import torch
from torch import nn

from codetr.modeling.adapter import MultiScaleAdapter
from codetr.modeling.collaborative import CollaborativeBranch
from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_single_scale_pyramid_shapes_and_strides():
    ad = MultiScaleAdapter((32,), (8, 16, 32, 64, 128), embed_dim=64, num_gn_groups=8)
    assert not ad.is_identity
    H, W = 160, 224  # padded image
    c5 = torch.randn(2, 64, H // 32, W // 32, requires_grad=True)
    outs = ad([c5])
    assert outs[2] is c5
    # stride s map of an H x W image: ceil(H / s) x ceil(W / s)
    assert [tuple(o.shape[-2:]) for o in outs] == [(-(-H // s), -(-W // s)) for s in (8, 16, 32, 64, 128)]
    assert all(o.shape[:2] == (2, 64) for o in outs)
    # stride 8: two transposed convs (x4), stride 16: one, then two chained stride-2 convs
    kinds = [type(m).__name__ for m in ad.upsample["s8"]]
    assert kinds == ["ConvTranspose2d", "GroupNorm", "ReLU", "ConvTranspose2d", "GroupNorm"]
    assert [type(m).__name__ for m in ad.upsample["s16"]] == ["ConvTranspose2d", "GroupNorm"]
    assert len(ad.downsample) == 2
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in ad.parameters())


def test_odd_sizes_downsample_by_ceil():
    ad = MultiScaleAdapter((32,), (16, 32, 64, 128), embed_dim=32, num_gn_groups=8)
    outs = ad([torch.randn(1, 32, 5, 3)])
    assert [tuple(o.shape[-2:]) for o in outs] == [(10, 6), (5, 3), (3, 2), (2, 1)]


class _MapsHead:
    """Stands in for a query head: only ``encoder_maps`` is read by ``CollaborativeBranch.encoder_maps``."""

    def __init__(self, maps):
        self.maps = maps

    def encoder_maps(self, enc_ctx):
        return self.maps


def test_multi_scale_identity_path_and_extra_map():
    torch.manual_seed(0)
    C = 32
    strides = (4, 8, 16, 32, 64)
    shapes = [(24, 20), (12, 10), (6, 5), (3, 3), (2, 2)]
    maps = [torch.randn(2, C, h, w) for h, w in shapes]
    # pure identity: no parameters, the input tensors themselves
    ident = MultiScaleAdapter(strides, strides, embed_dim=C)
    assert ident.is_identity and ident.identity_levels == [0, 1, 2, 3, 4]
    assert sum(p.numel() for p in ident.parameters()) == 0
    assert all(a is b for a, b in zip(ident(maps), maps))
    # Co-DINO's adapter: the identity path on the 5 encoder levels + one stride-2 level (3x3 s2 conv + GN)
    ad = MultiScaleAdapter(strides, (4, 8, 16, 32, 64, 128), embed_dim=C, num_gn_groups=8)
    assert not ad.is_identity and ad.identity_levels == [0, 1, 2, 3, 4]
    assert sum(p.numel() for p in ad.parameters()) == C * C * 9 + C + 2 * C
    for p in ad.parameters():  # GN's default (1, 0) would hide a swapped weight / bias
        nn.init.normal_(p)
    (conv, gn), = ad.downsample
    branch = CollaborativeBranch(aux_heads=[nn.Identity()], num_classes=3, adapter=ad)
    got = branch.encoder_maps(_MapsHead(maps), {})
    assert len(got) == 6 and all(g is m for g, m in zip(got[:5], maps))
    expect = nn.functional.group_norm(
        nn.functional.conv2d(maps[4], conv.weight, conv.bias, stride=2, padding=1), 8, gn.weight, gn.bias
    )
    assert got[5].shape == (2, C, 1, 1) and torch.equal(got[5], expect)


def test_bad_strides_raise():
    with pytest.raises(ValueError, match="between the input strides"):
        MultiScaleAdapter((8, 32), (8, 16, 32))
    with pytest.raises(ValueError, match="power-of-two"):
        MultiScaleAdapter((32,), (12, 32))
    with pytest.raises(ValueError, match="needs the output stride 64"):
        MultiScaleAdapter((32,), (32, 128))
    with pytest.raises(ValueError, match="increasing"):
        MultiScaleAdapter((32,), (64, 32))
    ad = MultiScaleAdapter((16, 32), (16, 32, 64), embed_dim=32, num_gn_groups=8)
    with pytest.raises(ValueError, match="expected 2 maps"):
        ad([torch.randn(1, 32, 4, 4)])
