"""EVA-02-style ViT, its SFP neck and layer-wise lr decay, against direct float64 formulas."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from codetr.modeling.backbone import SFP, EVA02ViT, vit_layer_decay_param_groups, vit_layer_id
from codetr.modeling.backbone.vit_eva import COCO_GLOBAL_BLOCKS, LVIS_GLOBAL_BLOCKS, EVABlock, rope_sin_cos
from timm.layers.pos_embed_sincos import apply_rot_embed


def rope_reference(x, H, W, pt=16, theta=10000.0):
    """Direct 2D RoPE in float64: x (..., H*W, D); channels [0, D/2) rotate by the row position, [D/2, D) by the
    column position; pair (2j, 2j+1) of a half by angle pos * theta ** (-j / (D/4)), pos rescaled to a pt grid."""
    x = x.double()
    D = x.shape[-1]
    n = D // 4
    out = torch.empty_like(x)
    for r in range(H):
        for c in range(W):
            tok = r * W + c
            for half, pos in ((0, r / H * pt), (1, c / W * pt)):
                for j in range(n):
                    ang = pos * theta ** (-j / n)
                    i0 = half * (D // 2) + 2 * j
                    a, b = x[..., tok, i0], x[..., tok, i0 + 1]
                    out[..., tok, i0] = a * math.cos(ang) - b * math.sin(ang)
                    out[..., tok, i0 + 1] = a * math.sin(ang) + b * math.cos(ang)
    return out


@pytest.mark.parametrize("H,W", [(3, 5), (4, 4)])
def test_rope_matches_direct_formula(H, W):
    torch.manual_seed(0)
    x = torch.randn(2, 3, H * W, 16, dtype=torch.float64)
    sin, cos = rope_sin_cos(H, W, head_dim=16)
    got = apply_rot_embed(x, sin.double(), cos.double())
    torch.testing.assert_close(got, rope_reference(x, H, W), rtol=1e-5, atol=1e-5)


def block_reference(blk: EVABlock, x, num_heads):
    """One block in float64 by hand: LN, (zero-padded) windows, per-window attention with RoPE on the window grid
    (or the whole grid for a global block), residual, sub-LN SwiGLU MLP, residual."""
    p = {k: v.double() for k, v in blk.state_dict().items()}
    x = x.double()
    B, H, W, C = x.shape
    hd = C // num_heads
    ln = lambda t, pre, eps=1e-6: F.layer_norm(t, (t.shape[-1],), p[pre + ".weight"], p[pre + ".bias"], eps)
    y = ln(x, "norm1")
    ws = blk.window_size
    if ws > 0:
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        ypad = torch.zeros(B, Hp, Wp, C, dtype=torch.float64)
        ypad[:, :H, :W] = y
        wins = [(r, c) for r in range(0, Hp, ws) for c in range(0, Wp, ws)]
        size = (ws, ws)
    else:
        Hp, Wp, ypad, wins, size = H, W, y, [(0, 0)], (H, W)
    out = torch.zeros(B, Hp, Wp, C, dtype=torch.float64)
    for r0, c0 in wins:
        t = ypad[:, r0:r0 + size[0], c0:c0 + size[1]].reshape(B, -1, C)
        q = t @ p["attn.q_proj.weight"].T + p["attn.q_bias"]
        k = t @ p["attn.k_proj.weight"].T
        v = t @ p["attn.v_proj.weight"].T + p["attn.v_bias"]
        q, k, v = (z.reshape(B, -1, num_heads, hd).transpose(1, 2) for z in (q, k, v))
        q, k = rope_reference(q, *size), rope_reference(k, *size)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, -1, C) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        out[:, r0:r0 + size[0], c0:c0 + size[1]] = a.reshape(B, size[0], size[1], C)
    x = x + out[:, :H, :W]
    z = ln(x, "norm2")
    g = z @ p["mlp.fc1_g.weight"].T + p["mlp.fc1_g.bias"]
    u = z @ p["mlp.fc1_x.weight"].T + p["mlp.fc1_x.bias"]
    h = ln(g * torch.sigmoid(g) * u, "mlp.norm")
    return x + h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


@pytest.mark.parametrize("window_size", [4, 0])
def test_block_window_and_global_attention_match_direct_computation(window_size):
    torch.manual_seed(1)
    blk = EVABlock(dim=32, num_heads=2, window_size=window_size).eval()
    for prm in blk.parameters():  # non-trivial biases and norms
        nn.init.normal_(prm, std=0.3)
    x = torch.randn(2, 6, 7, 32)  # 6 x 7 is not a multiple of the window: padding is exercised
    size = (window_size, window_size) if window_size else (6, 7)
    with torch.no_grad():
        got = blk(x, rope_sin_cos(*size, head_dim=16))
    torch.testing.assert_close(got.double(), block_reference(blk, x, 2), rtol=1e-4, atol=1e-4)


def tiny_vit(**kw):
    args = dict(embed_dim=32, depth=4, num_heads=2, window_size=4, global_block_indexes=(1, 3), pretrain_img_size=64)
    args.update(kw)
    return EVA02ViT(**args)


def test_vit_forward_shapes_and_window_assignment():
    torch.manual_seed(0)
    m = tiny_vit().eval()
    assert [b.window_size for b in m.blocks] == [4, 0, 4, 0]
    out = m(torch.randn(2, 3, 96, 160))
    assert list(out) == ["last_feat"]
    assert out["last_feat"].shape == (2, 32, 6, 10)
    spec = m.output_shape()["last_feat"]
    assert (spec.channels, spec.stride) == (32, 16)
    # pretrain grid 4 x 4 (+ cls slot) is resized to the 6 x 10 grid: the official layout has 1 + 16 positions
    assert m.pos_embed.shape == (1, 17, 32)


def test_vit_official_layouts():
    assert COCO_GLOBAL_BLOCKS == (3, 7, 11, 15, 19, 23)
    assert LVIS_GLOBAL_BLOCKS == (2, 5, 8, 11, 14, 17, 20, 23)
    with pytest.raises(ValueError, match="global_block_indexes"):
        tiny_vit(global_block_indexes=(7,))
    with pytest.raises(ValueError, match="shape"):
        tiny_vit()(torch.randn(3, 32, 32))


def test_vit_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = tiny_vit().train()
    x = torch.randn(1, 3, 64, 80)
    m(x)["last_feat"].square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.use_act_checkpoint = True
    m(x)["last_feat"].square().sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("hw", [(8, 12), (7, 9)])
def test_sfp_strides_and_channels(hw):
    neck = SFP(in_channels=32, out_channels=16)
    x = torch.randn(1, 32, *hw)
    outs = neck({"last_feat": x})
    H, W = hw
    half = lambda n: (n - 1) // 2 + 1  # 3x3 s2 p1 max-pool / conv output size
    expect = [(4 * H, 4 * W), (2 * H, 2 * W), (H, W), (half(H), half(W)), (half(half(H)), half(half(W)))]
    assert [tuple(o.shape[-2:]) for o in outs] == expect
    assert all(o.shape[:2] == (1, 16) for o in outs)
    assert neck.strides == [4, 8, 16, 32, 64]
    assert {k: (v.channels, v.stride) for k, v in neck.output_shape().items()} == {
        "p2": (16, 4), "p3": (16, 8), "p4": (16, 16), "p5": (16, 32), "p6": (16, 64)}
    assert all(m.bias is None for m in neck.modules() if isinstance(m, nn.Conv2d))
    assert len(SFP(32, 16, use_p2=False)(x)) == 4


def test_sfp_p4_matches_direct_formula():
    torch.manual_seed(0)
    neck = SFP(in_channels=8, out_channels=4)
    x = torch.randn(1, 8, 5, 6, dtype=torch.float64)
    neck = neck.double()

    def ln_cf(t, mod):  # channels-first LayerNorm, eps 1e-6
        mu = t.mean(1, keepdim=True)
        var = ((t - mu) ** 2).mean(1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * mod.weight[:, None, None] + mod.bias[:, None, None]

    p4 = neck.p4
    y = ln_cf(F.conv2d(x, p4[0].weight), p4[1])
    y = ln_cf(F.conv2d(F.gelu(y), p4[3].weight, padding=1), p4[4])
    torch.testing.assert_close(neck(x)[2], y)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = EVA02ViT(embed_dim=16, depth=24, num_heads=1, window_size=2, pretrain_img_size=32)
        self.neck = SFP(16, 8)
        self.head = nn.Linear(8, 3)


def expected_layer_id(name):
    """The official rule, written out: 0 patch/pos embed, k + 1 for backbone block k, 25 for the rest."""
    parts = name.split(".")
    if parts[0] == "backbone" and parts[1] in ("patch_embed", "pos_embed"):
        return 0
    if parts[0] == "backbone" and parts[1] == "blocks":
        return int(parts[2]) + 1
    return 25


def test_layer_decay_ids_for_every_parameter():
    model = _Model()
    names = [n for n, _ in model.named_parameters()]
    assert any(".blocks.23." in n for n in names) and "backbone.pos_embed" in names
    for n in names:
        assert vit_layer_id(n, 24) == expected_layer_id(n), n
    groups = vit_layer_decay_param_groups(model, base_lr=5e-5, weight_decay=0.01, decay_rate=0.8)
    by_param = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in by_param, "parameter in two groups"
            by_param[id(p)] = g
    for n, p in model.named_parameters():
        g = by_param[id(p)]
        assert g["lr"] == pytest.approx(5e-5 * 0.8 ** (25 - expected_layer_id(n)), rel=1e-12), n
        no_decay = p.ndim == 1 or n.endswith(".bias")
        assert g["weight_decay"] == (0.0 if no_decay else 0.01), n
    # spot checks written by hand
    lr = {n: by_param[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lr["backbone.pos_embed"] == pytest.approx(5e-5 * 0.8 ** 25)
    assert lr["backbone.blocks.23.attn.q_bias"] == pytest.approx(5e-5 * 0.8)
    assert lr["neck.p2.1.weight"] == pytest.approx(5e-5)
    assert by_param[id(model.backbone.blocks[0].attn.q_bias)]["weight_decay"] == 0.0
    assert by_param[id(model.backbone.pos_embed)]["weight_decay"] == 0.01


def test_vit_lr_factor_with_detectron2_param_groups():
    from functools import partial

    from detectron2.solver import get_default_optimizer_params

    from codetr.modeling.backbone.layer_decay import vit_lr_factor

    model = _Model()
    groups = get_default_optimizer_params(model, base_lr=1.0, lr_factor_func=partial(vit_lr_factor, decay_rate=0.8))
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.8 ** (25 - expected_layer_id(n)), rel=1e-12), n
