"""Tests of multi-scale deformable attention: the C++/CUDA kernels of ``codetr._C`` against float64
references (a direct bilinear formula and ``ms_deform_attn_pytorch``), gradients, input validation,
non-contiguous inputs, the fallback and the module under autocast.

The CPU-kernel tests require the built extension (``python3 setup.py build_ext --inplace`` or
``pip install -e . --no-build-isolation``): they fail, not skip, when it is missing. CUDA tests run
only where a GPU is visible.
"""
import importlib
import math
import os
import sys
import warnings

import pytest
import torch

from codetr.layers import MultiScaleDeformableAttention, ms_deform_attn, ms_deform_attn_pytorch

# The submodule (codetr.layers.ms_deform_attn the attribute is the function of the same name).
msda = importlib.import_module("codetr.layers.ms_deform_attn")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def ext():
    if msda._C is None:
        pytest.fail(
            f"codetr._C is not built ({msda._C_IMPORT_ERROR}): build it with "
            "`python3 setup.py build_ext --inplace` (the kernel tests must not silently test the fallback)"
        )
    return msda._C


def level_index(shapes):
    sizes = shapes[:, 0] * shapes[:, 1]
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def make_inputs(N=2, Lq=5, H=3, C=4, hw=((6, 4), (3, 5), (1, 1)), P=2, dtype=torch.float64, seed=0, lo=-0.3, hi=1.3):
    """Random inputs; sampling locations uniform in [lo, hi] so that some points fall (partly) outside."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw, dtype=torch.int64)
    S, L = int((shapes[:, 0] * shapes[:, 1]).sum()), len(hw)
    value = torch.randn(N, S, H, C, generator=g, dtype=torch.float64)
    loc = torch.rand(N, Lq, H, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(N, Lq, H, L, P, generator=g, dtype=torch.float64)
    return value.to(dtype), shapes, level_index(shapes), loc.to(dtype), attn.to(dtype)


def direct_reference(value, shapes, starts, loc, attn):
    """The op written out from its definition, one sample at a time (float64, tiny inputs only)."""
    value, loc, attn = value.double(), loc.double(), attn.double()
    N, S, H, C = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, H, C, dtype=torch.float64)
    for n in range(N):
        for q in range(Lq):
            for h in range(H):
                for lvl in range(L):
                    hl, wl, start = int(shapes[lvl, 0]), int(shapes[lvl, 1]), int(starts[lvl])
                    for p in range(P):
                        x = float(loc[n, q, h, lvl, p, 0]) * wl - 0.5
                        y = float(loc[n, q, h, lvl, p, 1]) * hl - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < hl and 0 <= xx < wl:
                                w = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                out[n, q, h] += attn[n, q, h, lvl, p] * w * value[n, start + yy * wl + xx, h]
    return out.view(N, Lq, H * C)


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def ref_grads(inputs, grad_out):
    """float64 reference output and gradients (value, sampling_locations, attention_weights)."""
    v, s, l, loc, a = [t.detach().double() if t.is_floating_point() else t for t in inputs]
    v, loc, a = (t.requires_grad_() for t in (v, loc, a))
    out = ms_deform_attn_pytorch(v, s, l, loc, a)
    return (out.detach(), *torch.autograd.grad(out, (v, loc, a), grad_out.double()))


def op_grads(inputs, grad_out, op=ms_deform_attn):
    v, s, l, loc, a = [t.detach().clone() if t.is_floating_point() else t for t in inputs]
    v, loc, a = (t.requires_grad_() for t in (v, loc, a))
    out = op(v, s, l, loc, a)
    return (out.detach(), *torch.autograd.grad(out, (v, loc, a), grad_out.to(out.dtype)))


# ----------------------------------------------------------------------------------------------
# References agree with each other
# ----------------------------------------------------------------------------------------------
def test_pytorch_reference_matches_direct_formula():
    inputs = make_inputs(N=2, Lq=3, H=2, C=3, hw=((4, 3), (2, 2), (1, 1)), P=2)
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs), direct_reference(*inputs), rtol=1e-12, atol=1e-12)


def test_hand_computed_single_point(ext):
    # One 2x2 map, one head, one point at the exact middle: the mean of the 4 pixels, times the weight.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    shapes = torch.tensor([[2, 2]])
    loc = torch.tensor([0.5, 0.5]).view(1, 1, 1, 1, 1, 2)
    attn = torch.tensor([0.5]).view(1, 1, 1, 1, 1)
    out = ms_deform_attn(value, shapes, level_index(shapes), loc, attn)
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx(0.5 * 2.5, abs=1e-7)
    # Centre of pixel (row 1, col 0) -> exactly value 3; far outside -> 0.
    loc = torch.tensor([[0.25, 0.75], [3.0, 0.5]]).view(1, 2, 1, 1, 1, 2)
    out = ms_deform_attn(value, shapes, level_index(shapes), loc, torch.ones(1, 2, 1, 1, 1))
    assert out.flatten().tolist() == pytest.approx([3.0, 0.0], abs=1e-7)


# ----------------------------------------------------------------------------------------------
# CPU kernel: forward
# ----------------------------------------------------------------------------------------------
def test_cpu_forward_matches_direct_formula(ext):
    inputs = make_inputs(N=2, Lq=4, H=2, C=5, hw=((5, 3), (2, 4), (1, 1)), P=3)
    torch.testing.assert_close(ms_deform_attn(*inputs), direct_reference(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [1, 30, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_forward_vs_float64_reference(ext, C, dtype):
    inputs = make_inputs(N=2, Lq=13, H=3, C=C, hw=((9, 7), (4, 5), (1, 1), (2, 3)), P=3, dtype=dtype, seed=C)
    ref = ms_deform_attn_pytorch(*[t.double() if t.is_floating_point() else t for t in inputs])
    out = ms_deform_attn(*inputs)
    assert out.dtype == dtype and out.shape == (2, 13, 3 * C)
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-12)


def test_cpu_points_outside_read_zeros(ext):
    value, shapes, starts, loc, attn = make_inputs(Lq=6)
    far = loc.clone()
    far[..., 0] = far[..., 0].sign() * 5 + 2.0  # every x far outside [0, 1]
    assert ms_deform_attn(value, shapes, starts, far, attn).abs().max().item() == 0.0
    # Points just outside a border still see the border pixels (zero padding, align_corners=False).
    edge = torch.full_like(loc, 0.5)
    edge[..., 0] = -0.25 / shapes[:, 1].double().view(1, 1, 1, -1, 1)  # x half a pixel left of the border
    out = ms_deform_attn(value, shapes, starts, edge, attn)
    torch.testing.assert_close(out, direct_reference(value, shapes, starts, edge, attn), rtol=1e-12, atol=1e-12)
    assert out.abs().max().item() > 0


# ----------------------------------------------------------------------------------------------
# CPU kernel: backward
# ----------------------------------------------------------------------------------------------
def test_cpu_gradcheck_float64(ext):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, H=2, C=3, hw=((4, 3), (2, 2), (1, 1)), P=2, seed=1)
    args = (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a), args, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("C", [1, 33, 64])
def test_cpu_float32_gradients_vs_float64_reference(ext, C):
    inputs = make_inputs(N=2, Lq=17, H=2, C=C, hw=((8, 6), (3, 5), (1, 1)), P=4, dtype=torch.float32, seed=10 + C)
    grad_out = torch.randn(2, 17, 2 * C, dtype=torch.float64, generator=torch.Generator().manual_seed(C))
    ref = ref_grads(inputs, grad_out)
    got = op_grads(inputs, grad_out)
    for name, a, r in zip(("output", "value", "sampling_locations", "attention_weights"), got, ref):
        assert a.dtype == torch.float32
        assert rel_err(a, r) < 1e-5, name


def test_cpu_backward_race_free_and_deterministic(ext):
    # Many queries hit the same pixels (a 2x2 and a 1x1 map); gradients must not depend on the thread count.
    inputs = make_inputs(N=3, Lq=64, H=4, C=8, hw=((2, 2), (1, 1)), P=4, dtype=torch.float32, seed=3)
    grad_out = torch.randn(3, 64, 32, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op_grads(inputs, grad_out)
        torch.set_num_threads(max(2, threads))
        many = op_grads(inputs, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    for name, a, r in zip(("output", "value", "loc", "attn"), many, ref_grads(inputs, grad_out)):
        assert rel_err(a, r) < 1e-5, name


# ----------------------------------------------------------------------------------------------
# Layout, dtypes, edge cases
# ----------------------------------------------------------------------------------------------
def test_non_contiguous_inputs(ext):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=7, H=2, C=6, dtype=torch.float32, seed=4)
    expected = op_grads((value, shapes, starts, loc, attn), torch.ones(2, 7, 12))
    # The same numbers behind strided views.
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_nc = torch.cat([loc, torch.zeros_like(loc)], -1)[..., :2]
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    shapes_nc = torch.stack([shapes[:, 1], shapes[:, 0]], 0).t().flip(-1)
    starts_nc = torch.stack([starts, starts], -1)[:, 0]
    for t in (value_nc, loc_nc, attn_nc, starts_nc):
        assert not t.is_contiguous()
    got = op_grads((value_nc, shapes_nc, starts_nc, loc_nc, attn_nc), torch.ones(2, 7, 12))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_types_computed_in_float32(ext, dtype):
    inputs = make_inputs(N=1, Lq=9, H=2, C=8, dtype=dtype, seed=5)
    ref = ms_deform_attn_pytorch(*[t.double() if t.is_floating_point() else t for t in inputs])
    out = ms_deform_attn(*inputs)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (2e-3 if dtype == torch.float16 else 1e-2)
    grads = op_grads(inputs, torch.ones(1, 9, 16))
    assert [g.dtype for g in grads[1:]] == [dtype] * 3


def test_empty_queries(ext):
    value, shapes, starts, loc, attn = make_inputs(Lq=0, dtype=torch.float32)
    out = ms_deform_attn(value.requires_grad_(), shapes, starts, loc, attn)
    assert out.shape == (2, 0, 12)
    out.sum().backward()
    assert value.grad.abs().sum().item() == 0


# ----------------------------------------------------------------------------------------------
# Input validation: clear errors naming the argument, before any kernel runs
# ----------------------------------------------------------------------------------------------
def _bad(case):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=5, H=3, C=4, P=2, dtype=torch.float32)
    args = dict(value=value, spatial_shapes=shapes, level_start_index=starts, sampling_locations=loc, attention_weights=attn)
    if case == "value_rank":
        args["value"] = value.flatten(2)
    elif case == "value_not_tensor":
        args["value"] = value.numpy()
    elif case == "shapes_int32":
        args["spatial_shapes"] = shapes.int()
    elif case == "starts_float":
        args["level_start_index"] = starts.float()
    elif case == "shapes_rank":
        args["spatial_shapes"] = shapes.flatten()
    elif case == "sum_hw":
        args["spatial_shapes"] = shapes + torch.tensor([[1, 0], [0, 0], [0, 0]])
    elif case == "starts_wrong":
        args["level_start_index"] = starts + 1
    elif case == "starts_len":
        args["level_start_index"] = starts[:2]
    elif case == "loc_dtype":
        args["sampling_locations"] = loc.double()
    elif case == "attn_int":
        args["attention_weights"] = attn.long()
    elif case == "loc_rank":
        args["sampling_locations"] = loc.flatten(3, 4)
    elif case == "loc_last":
        args["sampling_locations"] = torch.cat([loc, loc[..., :1]], -1)
    elif case == "loc_heads":
        args["sampling_locations"] = loc[:, :, :2]
    elif case == "loc_batch":
        args["sampling_locations"] = loc[:1]
    elif case == "loc_levels":
        args["sampling_locations"] = loc[:, :, :, :2]
    elif case == "attn_shape":
        args["attention_weights"] = attn[..., :1]
    elif case == "attn_queries":
        args["attention_weights"] = attn[:, :4]
    elif case == "shapes_zero":
        args["spatial_shapes"] = torch.tensor([[6, 4], [0, 5], [1, 1]])
    elif case == "device":
        args["attention_weights"] = attn.to("meta")
    return args


@pytest.mark.parametrize(
    "case,exc,name",
    [
        ("value_rank", ValueError, "value"),
        ("value_not_tensor", TypeError, "value"),
        ("shapes_int32", TypeError, "spatial_shapes"),
        ("starts_float", TypeError, "level_start_index"),
        ("shapes_rank", ValueError, "spatial_shapes"),
        ("sum_hw", ValueError, "spatial_shapes"),
        ("starts_wrong", ValueError, "level_start_index"),
        ("starts_len", ValueError, "level_start_index"),
        ("loc_dtype", TypeError, "sampling_locations"),
        ("attn_int", TypeError, "attention_weights"),
        ("loc_rank", ValueError, "sampling_locations"),
        ("loc_last", ValueError, "sampling_locations"),
        ("loc_heads", ValueError, "sampling_locations"),
        ("loc_batch", ValueError, "sampling_locations"),
        ("loc_levels", ValueError, "sampling_locations"),
        ("attn_shape", ValueError, "attention_weights"),
        ("attn_queries", ValueError, "attention_weights"),
        ("shapes_zero", ValueError, "spatial_shapes"),
        ("device", ValueError, "attention_weights"),
    ],
)
def test_invalid_inputs_raise_naming_the_argument(case, exc, name):
    with pytest.raises(exc, match=name):
        ms_deform_attn(**_bad(case))


def test_index_check_is_redone_after_in_place_change():
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float64)
    ms_deform_attn(value, shapes, starts, loc, attn)  # checked and remembered
    ms_deform_attn(value, shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="value has S"):  # same index tensors, other S
        ms_deform_attn(value[:, :-1], shapes, starts, loc, attn)
    starts[1] += 1  # in place: the remembered check no longer holds
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts, loc, attn)
    with torch.inference_mode():
        shapes_inf = shapes.clone()
        starts_inf = level_index(shapes_inf)
        ms_deform_attn(value, shapes_inf, starts_inf, loc, attn)
        starts_inf[1] += 1
        with pytest.raises(ValueError, match="level_start_index"):
            ms_deform_attn(value, shapes_inf, starts_inf, loc, attn)


def test_kernel_rejects_bad_direct_calls(ext):
    value, shapes, starts, loc, attn = make_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.ms_deform_attn_forward(value.transpose(1, 2).contiguous().transpose(1, 2), shapes, starts, loc, attn)
    assert isinstance(ext.with_cuda(), bool)


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("CODETR_NO_OPENMP") == "1",
                    reason="setup.py adds -fopenmp on Linux only")
def test_cpu_kernels_built_with_openmp(ext):
    """Without -fopenmp, at::parallel_for runs serially and every CPU kernel uses one thread (a silent 2x loss on
    2 cores): the build must have it."""
    assert ext.with_openmp(), "codetr._C was compiled without -fopenmp: its CPU kernels run on one thread"


def test_fallback_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(msda, "_C", None)
    monkeypatch.setattr(msda, "_warned_fallback", False)
    inputs = make_inputs(dtype=torch.float64, seed=6)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        out = ms_deform_attn(*inputs)
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)  # no second warning


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------
def _module_inputs(N=2, embed=32, hw=((8, 8), (4, 4), (2, 2), (1, 1)), Lq=10, box=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(hw)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(N, Lq, embed, generator=g)
    value = torch.randn(N, S, embed, generator=g)
    ref = torch.rand(N, Lq, len(hw), 4 if box else 2, generator=g)
    return query, ref, value, shapes, level_index(shapes)


@pytest.mark.parametrize("box", [False, True])
def test_module_kernel_matches_pytorch_path(ext, monkeypatch, box):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=3)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(m.attention_weights.weight, std=0.1)
    query, ref, value, shapes, starts = _module_inputs(box=box)
    out = m(query, ref, value, shapes, starts)
    monkeypatch.setattr(msda, "ms_deform_attn", ms_deform_attn_pytorch)
    torch.testing.assert_close(out, m(query, ref, value, shapes, starts), rtol=1e-5, atol=1e-6)


def test_module_projected_value_path(ext):
    """forward(project_value(v, mask), value_projected=True) == forward(v, value_padding_mask=mask), and the
    projection itself is value_proj with padded rows zeroed (computed here directly in float64)."""
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=2)
    torch.nn.init.normal_(m.sampling_offsets.weight, std=0.1)
    query, ref, value, shapes, starts = _module_inputs(box=True)
    mask = torch.zeros(value.shape[:2], dtype=torch.bool)
    mask[1, -30:] = True
    projected = m.project_value(value, mask)
    w, b = m.value_proj.weight.double(), m.value_proj.bias.double()
    expected = (value.double() @ w.T + b).masked_fill(mask[..., None], 0.0)
    torch.testing.assert_close(projected.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        m(query, ref, projected, shapes, starts, value_projected=True), m(query, ref, value, shapes, starts, mask)
    )
    with pytest.raises(ValueError, match="projected value"):
        m(query, ref, projected[:, :, :16], shapes, starts, value_projected=True)
    with pytest.raises(ValueError, match="value must be"):
        m.project_value(value[..., :16])


def test_module_autocast_bf16_cpu(ext):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=2)
    query, ref, value, shapes, starts = _module_inputs()
    expected = m(query, ref, value, shapes, starts)
    query.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(query, ref, value, shapes, starts)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    assert m.value_proj.weight.grad is not None
    assert rel_err(out.float(), expected.double()) < 5e-2


# ----------------------------------------------------------------------------------------------
# CUDA kernel (skipped where no GPU is visible)
# ----------------------------------------------------------------------------------------------
_CUDA_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [1, 33, 64])
def test_cuda_forward_backward_vs_float64_reference(ext, dtype, C):
    assert ext.with_cuda(), "codetr._C was built without CUDA on a machine with a GPU"
    # N = 3 (no batch-divisibility restriction), Lq != S, a 1x1 level, points outside the maps.
    inputs = make_inputs(N=3, Lq=37, H=4, C=C, hw=((9, 7), (4, 5), (1, 1)), P=4, dtype=dtype, seed=C)
    grad_out = torch.randn(3, 37, 4 * C, dtype=torch.float64).to(dtype)
    # The reference sees the same (rounded) inputs, in float64.
    ref = ref_grads(inputs, grad_out)
    got = op_grads([t.cuda() for t in inputs], grad_out.cuda())
    for name, a, r in zip(("output", "value", "sampling_locations", "attention_weights"), got, ref):
        assert a.is_cuda and a.dtype == dtype, name
        assert rel_err(a.cpu(), r) < _CUDA_TOL[dtype], name


@CUDA
def test_cuda_gradcheck_float64(ext):
    value, shapes, starts, loc, attn = [t.cuda() for t in make_inputs(N=2, Lq=3, H=2, C=3, P=2, seed=1)]
    args = (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a), args, eps=1e-6, atol=1e-7)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_autocast_cuda(ext, dtype):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=4, num_points=2).cuda()
    query, ref, value, shapes, starts = [t.cuda() for t in _module_inputs()]
    expected = m(query, ref, value, shapes, starts)
    with torch.autocast("cuda", dtype=dtype):
        out = m(query, ref, value, shapes, starts)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert rel_err(out.float(), expected.double()) < 5e-2
