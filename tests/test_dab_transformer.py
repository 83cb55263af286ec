"""DAB-DETR transformer: conditional cross-attention vs a per-head float64 formula, the width/height-modulated
positional attention vs the paper's formula written out with sin/cos, anchor refinement vs hand-computed
anchors, padding invariance."""
import math

import pytest
import torch
from torch import nn

from codetr.modeling.dab_transformer import MLP, ConditionalCrossAttention, DABDecoder, DABTransformer
from dino_utils import one_thread  # noqa: F401,E402 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def ref_conditional_attention(m, query, query_pos, query_sine, memory, key_pos, padding_mask):
    """Per head, per image, in float64: logit = (qc.kc + qs.kp) / sqrt(2 d), masked softmax, values, out_proj."""
    B, N, C = query.shape
    H = m.num_heads
    d = C // H
    qc = _lin(m.query_content_proj, query)
    kc = _lin(m.key_content_proj, memory)
    kp = _lin(m.key_pos_proj, key_pos)
    qs = _lin(m.query_sine_proj, query_sine)
    if m.query_pos_proj is not None:
        qc = qc + _lin(m.query_pos_proj, query_pos)
        kc = kc + kp
    v = _lin(m.value_proj, memory)
    out = torch.zeros(B, N, C, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            logits = (qc[b, :, sl] @ kc[b, :, sl].T + qs[b, :, sl] @ kp[b, :, sl].T) / math.sqrt(2 * d)
            logits[:, padding_mask[b]] = -math.inf
            out[b, :, sl] = torch.softmax(logits, -1) @ v[b, :, sl]
    return _lin(m.out_proj, out)


@pytest.mark.parametrize("first", [True, False])
def test_conditional_cross_attention_matches_float64_formula(first):
    g = torch.Generator().manual_seed(0)
    m = ConditionalCrossAttention(32, 4, with_query_pos=first).double()
    for p in m.parameters():
        nn.init.normal_(p, std=0.3, generator=g)
    B, N, S, C = 2, 5, 11, 32
    args = [torch.randn(B, N, C, generator=g, dtype=torch.float64) for _ in range(3)]
    memory, key_pos = (torch.randn(B, S, C, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, 7:] = True
    out = m(*args, memory, key_pos, mask)
    ref = ref_conditional_attention(m, *args, memory, key_pos, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # the padded keys do not matter
    memory2 = memory.clone()
    memory2[1, 7:] = 100.0
    torch.testing.assert_close(m(*args, memory2, key_pos, mask), out, rtol=1e-10, atol=1e-10)


def _pe(coord, num_feats, temperature):
    """Sine embedding of one float64 coordinate: sin at even, cos at odd features, freq temperature^(2 floor(i/2)/F)."""
    i = torch.arange(num_feats, dtype=torch.float64)
    f = coord / temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)
    return torch.where(i % 2 == 0, torch.sin(f), torch.cos(f))


def test_modulated_positional_attention_matches_paper_formula():
    """DAB-DETR eq. (6): with identity positional projections the positional logit (summed over heads) is
    (PE(x_ref) . PE(x) * w_ref / w + PE(y_ref) . PE(y) * h_ref / h), where (w_ref, h_ref) are predicted from the
    content and (w, h) is the anchor's size."""
    C = 64
    F_ = C // 2
    dec = DABDecoder(num_layers=2, embed_dim=C, num_heads=4, ffn_dim=64)
    w_ref, h_ref = 0.3, 0.6
    last = dec.ref_anchor_head.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([math.log(w_ref / (1 - w_ref)), math.log(h_ref / (1 - h_ref))]))
    anchors = torch.tensor([[[0.4, 0.7, 0.25, 0.1], [0.9, 0.2, 0.5, 0.8]]])
    query = torch.randn(1, 2, C)
    _, qsine = dec.positional_queries(query, anchors, 0)

    # key position of pixel (row r, col c) of an unpadded h x w map: DETR's normalised sine embedding, T = 20
    from codetr.modeling import PositionEmbeddingSine

    H, W = 3, 5
    kpos = PositionEmbeddingSine(F_, temperature=20.0, normalize=True)(torch.zeros(1, H, W, dtype=torch.bool))
    kpos = kpos[0].permute(1, 2, 0).double()  # (H, W, C): y features then x features
    two_pi = 2 * math.pi
    for n in range(2):
        x, y, w, h = anchors[0, n].double().tolist()
        for r in range(H):
            for c in range(W):
                ky = _pe((r + 1) / (H + 1e-6) * two_pi, F_, 20.0)
                kx = _pe((c + 1) / (W + 1e-6) * two_pi, F_, 20.0)
                torch.testing.assert_close(kpos[r, c], torch.cat([ky, kx]), rtol=1e-5, atol=1e-5)
                expect = _pe(x * two_pi, F_, 1e4) @ kx * (w_ref / w) + _pe(y * two_pi, F_, 1e4) @ ky * (h_ref / h)
                got = qsine[0, n].double() @ torch.cat([ky, kx])
                assert abs(got.item() - expect.item()) < 1e-4 * max(1.0, abs(expect.item())), (n, r, c)

    # later layers also scale the positional query by query_scale(content), elementwise
    _, qsine1 = dec.positional_queries(query, anchors, 1)
    torch.testing.assert_close(qsine1, qsine * dec.query_scale(query))


class _ConstantDeltas(nn.Module):
    """bbox_embed stand-in: the same deltas for every query."""

    def __init__(self, deltas):
        super().__init__()
        self.bias = nn.Parameter(torch.tensor(deltas))

    def forward(self, x):
        return x[..., :4] * 0 + self.bias


def test_anchor_refinement_by_hand():
    C = 32
    dec = DABDecoder(num_layers=3, embed_dim=C, num_heads=4, ffn_dim=32)
    bbox = _ConstantDeltas([math.log(3.0), 0.0, math.log(2.0), 0.0])
    seen = []
    orig = dec.positional_queries

    def spy(query, anchors, lid):
        seen.append(anchors.detach().clone())
        return orig(query, anchors, lid)

    dec.positional_queries = spy
    anchors = torch.tensor([0.5, 0.25, 0.2, 0.5]).expand(2, 3, 4).contiguous().requires_grad_()
    memory, key_pos = torch.randn(2, 6, C), torch.randn(2, 6, C)
    hidden, refs = dec(torch.zeros(2, 3, C), anchors, memory, key_pos, None, bbox)
    assert hidden.shape == (3, 2, 3, C) and len(refs) == 3
    # by hand: sigmoid(logit(a) + delta): cx 0.5 -> 0.75 -> 0.9, w 0.2 -> 1/3 -> 1/2, cy and h unchanged
    expect = [[0.5, 0.25, 0.2, 0.5], [0.75, 0.25, 1 / 3, 0.5], [0.9, 0.25, 0.5, 0.5]]
    for r, e, s in zip(refs, expect, seen):
        torch.testing.assert_close(r, torch.tensor(e).expand(2, 3, 4), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, torch.tensor(e).expand(2, 3, 4), rtol=1e-5, atol=1e-6)
    # the anchor entering a layer is detached: d refs[2] / d bias = s (1 - s) of the last step only (cx: 0.09)
    refs[2][..., 0].sum().backward()
    assert bbox.bias.grad[0].item() == pytest.approx(6 * 0.9 * 0.1, rel=1e-4)
    assert anchors.grad is None or anchors.grad.abs().sum() == 0


def test_refpoints_and_padding_invariance():
    torch.manual_seed(0)
    t = DABTransformer(embed_dim=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, ffn_dim=64, num_queries=7).eval()
    anchors = t.refpoint_embed.weight.sigmoid()
    assert anchors.shape == (7, 4) and t.refpoint_embed.weight.requires_grad
    bbox = MLP(32, 32, 4, 3)
    img = torch.randn(1, 32, 4, 5)
    ctx = t.encode(img, torch.zeros(1, 4, 5, dtype=torch.bool))
    h1, r1 = t.decode(ctx, *t.queries(1), bbox)
    # the same image padded (garbage in the padding) next to another image
    padded = torch.randn(2, 32, 6, 8) * 10
    padded[0, :, :4, :5] = img[0]
    mask = torch.ones(2, 6, 8, dtype=torch.bool)
    mask[0, :4, :5] = False
    mask[1] = False
    ctx2 = t.encode(padded, mask)
    assert ctx2["spatial_shapes"].tolist() == [[6, 8]]
    torch.testing.assert_close(ctx2["valid_ratios"][0, 0], torch.tensor([5 / 8, 4 / 6]))
    h2, r2 = t.decode(ctx2, *t.queries(2), bbox)
    torch.testing.assert_close(h2[:, :1], h1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r2[-1][:1], r1[-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        t.encode(torch.randn(1, 16, 4, 5), torch.zeros(1, 4, 5, dtype=torch.bool))
