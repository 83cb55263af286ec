"""ONNX export: tools/export_onnx.py on the demo config's real model (random weights), ONNX Runtime (CPU) against
PyTorch eager on the same image (boxes, scores, top-k agreement rank by rank and rank-free; printed), before and
after the soft-NMS post-step; and the TensorRT-plugin variant's graph (one MultiscaleDeformableAttnPlugin_TRT node per attention, five inputs in
the plugin's layout). Static shapes keep the export short here; dynamic shapes are tested through torch.export in
test_compile_export.py (the ONNX exporter runs the same torch.export)."""
import importlib.util
import os

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="pip install -e .[export]")
pytest.importorskip("onnxruntime", reason="pip install -e .[export]")
pytest.importorskip("onnxscript", reason="pip install -e .[export]")

from codetr.export import TRT_PLUGIN_OP, export_onnx  # noqa: E402
from codetr.layers import MultiScaleDeformableAttention  # noqa: E402

from dino_utils import one_thread, tiny_model  # noqa: E402,F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("codetr_export_onnx", os.path.join(ROOT, "tools", "export_onnx.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_export_tool_parity_demo_model(tmp_path, capsys):
    out = str(tmp_path / "demo.onnx")
    summary = _tool().main([
        "--config-file", os.path.join(ROOT, "configs", "demo", "co_dino_synthetic.py"), "--checkpoint", "",
        "--output", out, "--static", "--image-size", "128", "192", "--parity-images", "1",
    ])
    assert torch.is_grad_enabled()  # the tool must not leave autograd switched off in the caller
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    c, f = summary["parity_candidates"], summary["parity_final"]
    assert "top-k agreement" in printed and "rank-free" in printed
    assert c["max_abs_box_px"] < 0.05 and c["max_abs_score"] < 1e-4 and c["topk_agreement"] >= 0.99
    # rank-free: every candidate found by both, with the same score
    assert c["matched"] >= 0.99 and c["matched_max_box_px"] < 0.05 and c["matched_max_score"] < 1e-4
    assert c["matched_score_within_tol"] == 1.0
    assert f["soft_nms"] and f["images_with_same_count"] == 1 and f["max_abs_box_px"] < 0.05
    model = onnx.load(out)
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" in ops and TRT_PLUGIN_OP not in ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["input_format"] == "RGB" and meta["max_per_img"] == "100" and '"enabled": true' in meta["soft_nms"]
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]


def test_trt_plugin_nodes(tmp_path):
    torch.manual_seed(0)
    model = tiny_model(num_classes=5, num_queries=30, layers=1).eval()
    n_attn = sum(isinstance(m, MultiScaleDeformableAttention) for m in model.modules())
    path = export_onnx(model, str(tmp_path / "trt.onnx"), torch.zeros(1, 3, 64, 96, dtype=torch.uint8), dynamic=False,
                       trt_plugin=True)
    assert all(m.impl == "auto" for m in model.modules() if isinstance(m, MultiScaleDeformableAttention))
    graph = onnx.load(path).graph
    plugins = [n for n in graph.node if n.op_type == TRT_PLUGIN_OP]
    assert len(plugins) == n_attn == 2 and all(n.domain == "trt" and len(n.input) == 5 for n in plugins)
    assert "GridSample" not in {n.op_type for n in graph.node}
    # the index inputs are cast to int32 (what the plugin takes)
    producers = {o: n for n in graph.node for o in n.output}
    for n in plugins:
        for idx in (1, 2):
            cast = producers[n.input[idx]]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.INT32
