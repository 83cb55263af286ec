"""Tests of the CPU RoIAlign of ``codetr._C`` (through ``codetr.layers.roi_align`` / ``ROIAlign``): forward and input
gradient against ``torchvision.ops.roi_align`` (the independent reference), ``gradcheck``, determinism across thread
counts, input validation, the fallback, and its use in ``RCNNBranch``'s pooler against detectron2's original one.

The kernel tests require the built extension (``python3 setup.py build_ext --inplace``): they fail, not skip, when it
is missing or lacks the RoIAlign kernels.
"""
import importlib
import math

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from codetr.layers import ROIAlign, roi_align

ra = importlib.import_module("codetr.layers.roi_align")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.fixture(scope="module", autouse=True)
def ext():
    if not ra._has_cpu_kernels():
        pytest.fail(
            "codetr._C is not built or has no roi_align kernels: build it with `python3 setup.py build_ext --inplace` "
            "(the kernel tests must not silently test the torchvision fallback)"
        )


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_rois(K, N, H, W, scale, dtype, seed=0):
    """
    (K, 5) RoIs in input-image coordinates (the map is H x W at ``scale``): a mix of boxes inside the map, across
    its borders, entirely outside, tiny (below a pixel), degenerate (zero width) and inverted (x2 < x1), with batch
    indices spread over the N images.
    """
    g = torch.Generator().manual_seed(seed)
    Hi, Wi = H / scale, W / scale
    x1 = torch.rand(K, generator=g, dtype=torch.float64) * Wi * 1.6 - 0.3 * Wi
    y1 = torch.rand(K, generator=g, dtype=torch.float64) * Hi * 1.6 - 0.3 * Hi
    w = torch.rand(K, generator=g, dtype=torch.float64) * Wi * 0.8
    h = torch.rand(K, generator=g, dtype=torch.float64) * Hi * 0.8
    kind = torch.arange(K) % 6
    w = torch.where(kind == 1, 0.3 / scale * torch.rand(K, generator=g, dtype=torch.float64), w)  # tiny
    h = torch.where(kind == 1, 0.2 / scale * torch.rand(K, generator=g, dtype=torch.float64), h)
    w = torch.where(kind == 2, torch.zeros_like(w), w)  # degenerate
    # Inverted in both directions (torchvision cannot take a box inverted in one direction only with aligned=True
    # and adaptive sampling: it sizes a buffer with the negative grid product).
    w = torch.where(kind == 3, -w * 0.5, w)
    h = torch.where(kind == 3, -h * 0.5, h)
    x1 = torch.where(kind == 4, x1 + 2 * Wi, x1)  # entirely outside (right)
    y1 = torch.where(kind == 5, -h - 2.0 / scale, y1)  # entirely outside (above)
    b = torch.randint(0, N, (K,), generator=g).to(torch.float64)
    return torch.stack([b, x1, y1, x1 + w, y1 + h], 1).to(dtype)


def run_both(x, rois, output_size, scale, sr, aligned, seed=1):
    """Forward outputs and input gradients (for the same random output gradient) of ours and torchvision's."""
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    out_a = roi_align(xa, rois, output_size, scale, sr, aligned)
    out_b = tv_roi_align(xb, rois, output_size, scale, sr, aligned)
    g = torch.randn(out_b.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x.dtype)
    out_a.backward(g)
    out_b.backward(g)
    return out_a, out_b, xa.grad, xb.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("output_size", [7, (3, 5)])
def test_matches_torchvision(dtype, aligned, sampling_ratio, output_size):
    N, C, H, W, scale = 3, 6, 13, 17, 0.25
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    rois = make_rois(60, N, H, W, scale, dtype)
    out, ref, grad, grad_ref = run_both(x, rois, output_size, scale, sampling_ratio, aligned)
    assert out.grad_fn is not None and "ROIAlignFunction" in type(out.grad_fn).__name__  # our kernels ran
    assert out.dtype == dtype and out.shape == ref.shape
    assert ref.abs().sum() > 0 and grad_ref.abs().sum() > 0
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_many_rois_dense_sampling(dtype):
    """Enough RoIs and samples for the backward's several chunks and cache blocks (and several threads' tasks)."""
    N, C, H, W, scale = 2, 12, 24, 20, 0.5
    x = torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    rois = make_rois(400, N, H, W, scale, dtype, seed=4)
    for sr in (4, 0):
        out, ref, grad, grad_ref = run_both(x, rois, 7, scale, sr, True)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(grad, grad_ref, **TOL[dtype])


def test_border_samples():
    """Samples exactly on -1, 0, H-1, H (and just inside / outside), where the interpolation rules switch."""
    N, C, H, W = 1, 3, 6, 5
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    # With aligned=False, scale 1, 1x1 output and sampling_ratio 1, the only sample is the RoI centre.
    centres = [-1.0001, -1.0, -0.5, 0.0, 0.3, W - 1.0, W - 0.5, float(W), W + 1e-4]
    rows = []
    for cx in centres:
        for cy in (-1.0, -0.25, H - 1.0, H - 0.75, float(H), H + 1e-3):
            rows.append([0.0, cx - 1.0, cy - 1.0, cx + 1.0, cy + 1.0])
    rois = torch.tensor(rows, dtype=torch.float64)
    out, ref, grad, grad_ref = run_both(x, rois, 1, 1.0, 1, False)
    torch.testing.assert_close(out, ref, **TOL[torch.float64])
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float64])
    assert (ref == 0).any() and (ref != 0).any()  # both regimes are covered


def test_box_inverted_in_one_direction_is_empty():
    """aligned=True, adaptive sampling, x2 < x1 but y2 > y1: no sample, a zero output and no gradient."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 6.0, 1.0, 2.0, 7.0], [0.0, 1.0, 1.0, 6.0, 7.0]])
    out = roi_align(x, rois, 2, 1.0, 0, True)
    assert (out[0] == 0).all() and (out[1] != 0).all()
    out[0].sum().backward()
    assert (x.grad == 0).all()


def test_no_rois():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5)
    out = roi_align(x, rois, (3, 5), 0.5, 0, True)
    ref = tv_roi_align(x, rois, (3, 5), 0.5, 0, True)
    assert out.shape == ref.shape == (0, 4, 3, 5)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and (x.grad == 0).all()


def test_non_contiguous_input():
    N, C, H, W, scale = 2, 5, 11, 9, 0.5
    base = torch.randn(N, W, C, H, dtype=torch.float64).float()
    x = base.permute(0, 2, 3, 1)  # (N, C, H, W), not contiguous
    assert not x.is_contiguous()
    rois_full = make_rois(24, N, H, W, scale, torch.float32, seed=5)
    rois = rois_full.t().contiguous().t()  # column-major (K, 5)
    assert not rois.is_contiguous()
    out, ref, grad, grad_ref = run_both(x, rois, 7, scale, 0, True)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float32])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_align(x_cl, rois, 7, scale, 0, True), ref, **TOL[torch.float32])


@pytest.mark.parametrize("aligned", [True, False])
def test_gradcheck(aligned):
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.6, 3.9], [1, -1.5, 2.0, 3.0, 6.5], [1, 2.2, 1.1, 2.6, 1.3], [0, 4.0, -2.0, 8.0, 2.0]],
        dtype=torch.float64,
    )
    for sr in (2, 0):
        assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, sr, aligned), (x,))


def test_backward_deterministic_across_threads(threads):
    N, C, H, W, scale = 2, 64, 40, 36, 0.25
    x = torch.randn(N, C, H, W)
    rois = make_rois(300, N, H, W, scale, torch.float32, seed=6)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        xg = x.clone().requires_grad_(True)
        out = roi_align(xg, rois, 7, scale, 0, True)
        out.backward(torch.ones_like(out) + out.detach())
        results.append((out.detach(), xg.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_bad_inputs():
    x = torch.randn(1, 2, 6, 6)
    rois = torch.tensor([[0.0, 1, 1, 4, 4]])
    with pytest.raises(ValueError, match="input must be"):
        roi_align(x[0], rois, 2, 1.0, 0, True)
    with pytest.raises(ValueError, match="rois must be"):
        roi_align(x, rois[:, 1:], 2, 1.0, 0, True)
    with pytest.raises(ValueError, match="rois must be"):
        roi_align(x, rois[0], 2, 1.0, 0, True)
    with pytest.raises(TypeError, match="rois must have the dtype of input"):
        roi_align(x, rois.double(), 2, 1.0, 0, True)
    with pytest.raises(TypeError, match="rois must be a torch.Tensor"):
        roi_align(x, [[0.0, 1, 1, 4, 4]], 2, 1.0, 0, True)
    with pytest.raises(ValueError, match="rois is on meta"):
        roi_align(x, rois.to("meta"), 2, 1.0, 0, True)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, rois, (2, 0), 1.0, 0, True)
    with pytest.raises(ValueError, match="ROIAlign: rois must be"):
        ROIAlign((2, 2), 1.0, 0)(x, rois[:, :4])
    # A batch index outside the input is an error (torchvision reads out of bounds).
    with pytest.raises(RuntimeError, match="batch index"):
        roi_align(x, torch.tensor([[1.0, 1, 1, 4, 4]]), 2, 1.0, 0, True)


def test_fallback_to_torchvision_for_other_dtypes():
    x = torch.randn(1, 3, 8, 8).half()
    rois = torch.tensor([[0.0, 1, 1, 6, 5]]).half()
    out = roi_align(x, rois, 2, 1.0, 2, True)
    assert out.dtype == torch.float16
    assert torch.equal(out, tv_roi_align(x, rois, 2, 1.0, 2, True))


def test_module_matches_detectron2():
    from detectron2.layers import ROIAlign as D2ROIAlign

    x = torch.randn(2, 4, 16, 16)
    rois = make_rois(30, 2, 16, 16, 0.125, torch.float64, seed=7)  # float64 rois are cast, as detectron2 does
    for aligned in (True, False):
        ours, theirs = ROIAlign((7, 7), 0.125, 0, aligned), D2ROIAlign((7, 7), 0.125, 0, aligned)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == [] and list(ours.parameters()) == []
        torch.testing.assert_close(ours(x, rois), theirs(x, rois), **TOL[torch.float32])


def test_rcnn_branch_pooler_matches_detectron2():
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    from codetr.modeling.rcnn import RCNNBranch

    branch = RCNNBranch(num_classes=3, in_channels=8, fc_dim=16)
    pooler = branch.roi_heads.box_pooler
    original = ROIPooler(
        output_size=7, scales=[1.0 / s for s in (4, 8, 16, 32, 64)], sampling_ratio=0, pooler_type="ROIAlignV2",
        canonical_box_size=56, canonical_level=2,
    )
    assert len(pooler.level_poolers) == len(original.level_poolers) == 5
    for mine, ref in zip(pooler.level_poolers, original.level_poolers):
        assert isinstance(mine, ROIAlign)
        assert (mine.output_size, mine.spatial_scale, mine.sampling_ratio, mine.aligned) == (
            ref.output_size, ref.spatial_scale, ref.sampling_ratio, ref.aligned,
        )
    assert not any("box_pooler" in k for k in branch.state_dict())

    g = torch.Generator().manual_seed(8)
    feats = [torch.randn(2, 8, 256 // s, 256 // s, generator=g) for s in (4, 8, 16, 32, 64)]
    boxes = []
    for _ in range(2):
        # Sizes log-uniform in [8, 1200] px (level k takes sqrt(area) in [56 * 2^k, 56 * 2^(k+1))): every level gets RoIs.
        wh = torch.exp(torch.rand(60, 2, generator=g) * (math.log(1200) - math.log(8)) + math.log(8))
        xy = torch.rand(60, 2, generator=g) * 300 - 20 - wh / 2
        big = torch.tensor([[-400.0, -300.0, 600.0, 700.0], [-500.0, -200.0, 500.0, 800.0]])  # level 4 (1000 px)
        boxes.append(Boxes(torch.cat([torch.cat([xy, xy + wh], 1), big])))
    outs, grads = [], []
    for p in (pooler, original):
        xs = [f.clone().requires_grad_(True) for f in feats]
        out = p(xs, boxes)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out))
        outs.append(out.detach())
        grads.append([x.grad for x in xs])
    torch.testing.assert_close(outs[0], outs[1], **TOL[torch.float32])
    for ga, gb in zip(*grads):
        assert gb.abs().sum() > 0  # every level received RoIs
        torch.testing.assert_close(ga, gb, **TOL[torch.float32])


def test_level_concat_pooler_is_detectron2_pooler_bit_for_bit():
    """LevelConcatROIPooler combines the levels by one row permutation instead of detectron2's per-level index_put_
    into zeros: reference detectron2's ROIPooler with the same per-level RoIAlign modules; outputs and input
    gradients equal bit for bit, for boxes on every level, levels without boxes and an image without boxes; the
    training graph has no IndexPutBackward (whose backward clones the whole output gradient once per level)."""
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    from codetr.modeling.rcnn import LevelConcatROIPooler
    from dino_utils import autograd_node_names

    kw = dict(output_size=7, scales=[1 / 8, 1 / 16, 1 / 32, 1 / 64], sampling_ratio=0, pooler_type="ROIAlignV2",
              canonical_box_size=112, canonical_level=3)
    ours, ref = LevelConcatROIPooler(**kw), ROIPooler(**kw)
    ours.level_poolers = ref.level_poolers  # the same RoIAlign modules: only the combination differs
    g = torch.Generator().manual_seed(3)
    maps = [torch.randn(2, 6, 96 // 2**i, 96 // 2**i, generator=g) for i in range(4)]

    def boxes(n, lo, hi):
        wh = torch.exp(torch.rand(n, 2, generator=g) * (math.log(hi) - math.log(lo)) + math.log(lo))
        xy = torch.rand(n, 2, generator=g) * 700 - wh / 2
        return Boxes(torch.cat([xy, xy + wh], 1))

    cases = {
        "every level": [boxes(40, 8, 1500), boxes(25, 8, 1500)],
        "all boxes on level 0": [boxes(9, 8, 200), boxes(4, 8, 200)],
        "image without boxes": [boxes(0, 8, 20), boxes(12, 8, 1500)],
    }
    for name, box_lists in cases.items():
        outs, grads = [], []
        for p in (ours, ref):
            xs = [m.clone().requires_grad_() for m in maps]
            out = p(xs, box_lists)
            w = torch.sin(torch.arange(out.numel(), dtype=torch.float32)).view_as(out)
            grads.append(torch.autograd.grad((out * w).sum(), xs, allow_unused=True))
            outs.append(out.detach())
            if p is ours:
                assert "IndexPutBackward0" not in autograd_node_names(out), name
        assert outs[0].shape == (sum(len(b) for b in box_lists), 6, 7, 7), name
        assert torch.equal(outs[0], outs[1]), name
        for a, b in zip(*grads):
            assert (a is None and b is None) or torch.equal(a, b), name
    # the reference does use index_put_ (the test would not notice a regression otherwise)
    xs = [m.clone().requires_grad_() for m in maps]
    assert "IndexPutBackward0" in autograd_node_names(ref(xs, cases["every level"]))
