"""ms_deform_attn as a PyTorch custom op: torch.library's own checks (schema, fake kernel, autograd registration),
torch.compile with fullgraph=True (no graph break) on the attention module and on an encoder layer, forward and
backward against eager and the float64 pure-PyTorch reference, and torch.export of the whole inference model
(static and dynamic image size) against eager.

The compile tests use the "aot_eager" backend: it traces the op's fake kernel and its registered autograd exactly
as inductor does, without a C++ compile per test (minutes on a loaded 2-core machine); a recording backend checks
that the custom op itself (not the fallback) is in the forward and backward graphs.
"""
import importlib

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from codetr.export import DetectorForExport
from codetr.layers import MultiScaleDeformableAttention, ms_deform_attn_pytorch
from codetr.modeling.transformer import DeformableEncoderLayer

from dino_utils import one_thread, tiny_model  # noqa: F401 (fixture)

msda = importlib.import_module("codetr.layers.ms_deform_attn")
pytestmark = pytest.mark.usefixtures("one_thread")

OP = torch.ops.codetr.ms_deform_attn.default
BACKWARD_OP = torch.ops.codetr.ms_deform_attn_backward.default
SHAPES = [(6, 5), (3, 3), (1, 2)]


@pytest.fixture(autouse=True)
def _needs_extension():
    if msda._C is None:
        pytest.fail(f"codetr._C is not built ({msda._C_IMPORT_ERROR}): the custom op runs its kernels")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _index(shapes):
    t = torch.tensor(shapes, dtype=torch.int64)
    sizes = t.prod(1)
    return t, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), int(sizes.sum())


def _op_inputs(dtype=torch.float64, N=2, Lq=4, H=2, C=3, P=2, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    shapes, starts, S = _index(SHAPES)
    L = len(SHAPES)
    value = torch.randn(N, S, H, C, generator=g, dtype=dtype)
    loc = (torch.rand(N, Lq, H, L, P, 2, generator=g, dtype=dtype) * 1.4 - 0.2)
    attn = torch.rand(N, Lq, H, L, P, generator=g, dtype=dtype)
    for t in (value, loc, attn):
        t.requires_grad_(requires_grad)
    return value, shapes, starts, loc, attn


def test_opcheck_schema_fake_kernel_and_autograd_registration():
    # torch.library's test suite for custom ops: schema, fake (meta) kernel vs real output, autograd registration,
    # and that the op is traceable by make_fx / AOTAutograd
    torch.library.opcheck(OP, _op_inputs())
    value, shapes, starts, loc, attn = _op_inputs(requires_grad=False)
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], dtype=value.dtype)
    torch.library.opcheck(BACKWARD_OP, (value, shapes, starts, loc, attn, grad))


def test_fake_kernel_shape_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _op_inputs(torch.float32, N=3, Lq=7, H=2, C=5, requires_grad=False)
    with FakeTensorMode() as mode:
        out = OP(*[mode.from_tensor(t) for t in real])
    assert out.shape == (3, 7, 10) and out.dtype == torch.float32


class _Recorder:
    """A compile backend (AOTAutograd, then run eagerly) that keeps the forward and backward graphs."""

    def __init__(self):
        self.graphs = []

    def _keep(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def backend(self):
        return aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

    def targets(self, i):
        return {n.target for n in self.graphs[i].graph.nodes if n.op == "call_function"}


def _attention_inputs(B=2, Lq=9, C=16, box=False):
    g = torch.Generator().manual_seed(1)
    shapes, starts, S = _index(SHAPES)
    query = torch.randn(B, Lq, C, generator=g, requires_grad=True)
    value = torch.randn(B, S, C, generator=g, requires_grad=True)
    ref = torch.rand(B, Lq, len(SHAPES), 4 if box else 2, generator=g) * 0.8 + 0.1
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[1, -3:] = True
    return query, ref, value, shapes, starts, mask


@pytest.mark.parametrize("box", [False, True])
def test_compile_fullgraph_attention_module(box):
    torch.manual_seed(0)
    m = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES), num_points=2)
    with torch.no_grad():  # non-trivial offsets and weights
        m.sampling_offsets.weight.normal_(0, 0.3)
        m.attention_weights.weight.normal_(0, 0.3)
    inputs = _attention_inputs(box=box)
    rec = _Recorder()
    compiled = torch.compile(m, backend=rec.backend(), fullgraph=True)  # raises on any graph break
    out = compiled(*inputs)
    out.square().sum().backward()
    got = [inputs[0].grad.clone(), inputs[2].grad.clone(), m.sampling_offsets.weight.grad.clone()]
    assert OP in rec.targets(0), "the forward graph does not call the custom op"
    assert BACKWARD_OP in rec.targets(1), "the backward graph does not call the custom op's backward"

    # reference: the same module in float64 with the pure-PyTorch formulation, eager
    ref_m = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES), num_points=2).double()
    ref_m.load_state_dict(m.state_dict())
    ref_m.impl = "pytorch"
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in inputs]
    ref_out = ref_m(*ref_in)
    ref_out.square().sum().backward()
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
    want = [ref_in[0].grad, ref_in[2].grad, ref_m.sampling_offsets.weight.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


def test_compile_fullgraph_encoder_layer():
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(16, num_heads=2, num_levels=len(SHAPES), num_points=2, ffn_dim=32)
    query, ref, _, shapes, starts, mask = _attention_inputs(Lq=_index(SHAPES)[2])
    pos = torch.randn_like(query)
    rec = _Recorder()
    compiled = torch.compile(layer, backend=rec.backend(), fullgraph=True)
    out = compiled(query, pos, ref, shapes, starts, mask)
    out.sum().backward()
    grad = query.grad.clone()
    assert OP in rec.targets(0) and BACKWARD_OP in rec.targets(1)
    query.grad = None
    eager = layer(query, pos, ref, shapes, starts, mask)
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, query.grad, rtol=1e-4, atol=1e-5)


def test_compiled_op_still_validates_shapes():
    value, shapes, starts, loc, attn = _op_inputs(requires_grad=False)
    compiled = torch.compile(msda.ms_deform_attn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(value, shapes, starts, loc, attn), msda.ms_deform_attn(value, shapes, starts, loc, attn))
    # the shape checks run while tracing: the error names the argument (with fullgraph=True dynamo reports the
    # ValueError inside its own exception)
    with pytest.raises(Exception, match="attention_weights must have shape"):
        compiled(value, shapes, starts, loc, attn[..., :1])


def test_level_shapes_pytorch_path_equals_tensor_path():
    value, shapes, starts, loc, attn = _op_inputs(requires_grad=False)
    a = ms_deform_attn_pytorch(value, shapes, starts, loc, attn)
    b = ms_deform_attn_pytorch(value, SHAPES, starts, loc, attn)
    assert torch.equal(a, b)


def _demo_sized_model():
    torch.manual_seed(0)
    model = tiny_model(num_classes=5, num_queries=30, layers=1).eval()
    with torch.no_grad():  # non-trivial attention so that a wrong sampling shows in the outputs
        for m in model.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.sampling_offsets.weight.normal_(0, 0.05)
                m.attention_weights.weight.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("soft_nms", [True, False])
def test_detector_for_export_plus_merge_equals_model_forward(soft_nms):
    model = _demo_sized_model()
    model.postprocessor.soft_nms = soft_nms
    wrapper = DetectorForExport(model).eval()
    img = torch.randint(0, 256, (2, 3, 96, 160), dtype=torch.uint8)
    with torch.no_grad():
        boxes, scores, labels = wrapper(img)
        want = model([{"image": img[0]}, {"image": img[1]}])
    # 30 queries x 5 classes; with soft-NMS the official num_query (30) candidates, else the top max_per_img
    k = min(30 if soft_nms else model.postprocessor.max_per_img, 30 * 5)
    assert boxes.shape == (2, k, 4) and scores.shape == labels.shape == (2, k)
    for i in range(2):
        got = model.postprocessor.merge(boxes[i], scores[i], labels[i])
        inst = want[i]["instances"]
        assert torch.equal(got["boxes"], inst.pred_boxes.tensor)
        assert torch.equal(got["scores"], inst.scores) and torch.equal(got["labels"], inst.pred_classes)


def test_torch_export_whole_inference_model_dynamic_size():
    model = _demo_sized_model()
    wrapper = DetectorForExport(model).eval()
    img = torch.randint(0, 256, (2, 3, 96, 160), dtype=torch.uint8)  # (batch 1 would specialise the batch size)
    h, w = torch.export.Dim("h", min=2, max=40), torch.export.Dim("w", min=2, max=40)
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        ep = torch.export.export(wrapper, (img,), dynamic_shapes={"images": {0: batch, 2: 32 * h, 3: 32 * w}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert OP in targets
    # another batch size and image size than the example: same results as eager
    img2 = torch.randint(0, 256, (3, 3, 128, 64), dtype=torch.uint8)
    with torch.no_grad():
        got = ep.module()(img2)
        want = wrapper(img2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
