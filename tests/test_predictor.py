"""codetr.Predictor on the demo config's real model (random weights saved as a checkpoint): boxes come back in the
original image's pixels for a non-square image (checked against a hand-computed resize factor applied to the
model's detections on the resized image), channel order, score threshold, lists, and bad input; the compile=True
path (real inductor on a 1-encoder / 1-decoder-layer demo model) against the eager Predictor, its recompiles over
image sizes (a counting backend), and its errors."""
import os

import numpy as np
import pytest
import torch

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling.backbone import ResNet

import codetr
from codetr import Predictor
from codetr.export import match_detections
from codetr.modeling import tta

from dino_utils import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "co_dino_synthetic.py")  # test resize: short side 224, long <= 352


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(DEMO).model)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 5 : w // 2] = (250, 40, 40)  # a red block, RGB
    img[h // 2 : 4 * h // 5, w // 2 : 9 * w // 10] = (30, 220, 60)
    return img


def test_boxes_in_original_pixels_of_non_square_image(checkpoint):
    predictor = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB")
    h, w = 150, 230
    rgb = _image(h, w)
    got = predictor(rgb)
    assert got.image_size == (h, w)
    assert len(got) > 0

    # by hand: short side 150 -> 224, so the long side 230 -> round(230 * 224 / 150) = round(343.5) = 343 (<= 352)
    new_h, new_w = 224, 343
    resized = T.ResizeTransform(h, w, new_h, new_w).apply_image(rgb)
    x = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    with torch.no_grad():
        ref = predictor.model([{"image": x}])[0]["instances"]  # no height/width: boxes in the resized image
    assert ref.image_size == (new_h, new_w)
    scale = torch.tensor([w / new_w, h / new_h, w / new_w, h / new_h])
    torch.testing.assert_close(got.pred_boxes.tensor, ref.pred_boxes.tensor * scale, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got.scores, ref.scores)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    assert got.pred_boxes.tensor[:, 0::2].max() <= w and got.pred_boxes.tensor[:, 1::2].max() <= h
    assert (got.pred_boxes.tensor >= 0).all()


def test_channel_order_and_threshold_and_lists(checkpoint):
    rgb = _image(120, 200, seed=1)
    p_rgb = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB")
    a = p_rgb(rgb)
    b = p_rgb(np.ascontiguousarray(rgb[:, :, ::-1]), input_format="BGR")
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    # a BGR image read as RGB is a different input
    c = p_rgb(np.ascontiguousarray(rgb[:, :, ::-1]))
    assert not torch.equal(a.scores, c.scores)

    thr = float(a.scores.median())
    p_thr = Predictor(DEMO, checkpoint, device="cpu", input_format="RGB", score_threshold=thr)
    d = p_thr(torch.from_numpy(rgb))  # a torch HWC tensor works too
    keep = a.scores >= thr
    assert 0 < len(d) < len(a)
    assert torch.equal(d.scores, a.scores[keep]) and torch.equal(d.pred_boxes.tensor, a.pred_boxes.tensor[keep])

    many = p_rgb([rgb, _image(90, 60, seed=2)])
    assert isinstance(many, list) and [m.image_size for m in many] == [(120, 200), (90, 60)]


def test_model_zoo_name_and_top_level_import(checkpoint):
    assert codetr.Predictor is Predictor
    p = Predictor("demo/co_dino_synthetic.py", checkpoint, device="cpu")
    assert p.input_format == "RGB" and p.checkpoint == checkpoint


@pytest.mark.parametrize(
    "image, exc, match",
    [
        (np.zeros((20, 30), np.uint8), ValueError, "HWC"),
        (np.zeros((20, 30, 4), np.uint8), ValueError, "3 channels"),
        (np.zeros((20, 30, 3), np.float32), ValueError, "uint8"),
        ([[1, 2, 3]], TypeError, "numpy array"),
    ],
)
def test_bad_images_raise_clear_errors(checkpoint, image, exc, match):
    p = Predictor(DEMO, checkpoint, device="cpu")
    with pytest.raises(exc, match=match):
        p([image] if not isinstance(image, list) else image)


def test_bad_arguments(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Predictor(DEMO, str(tmp_path / "missing.pth"), device="cpu")
    with pytest.raises(ValueError, match="score_threshold"):
        Predictor(DEMO, checkpoint, device="cpu", score_threshold=1.5)
    with pytest.raises(ValueError, match="input_format"):
        Predictor(DEMO, checkpoint, device="cpu", input_format="YUV")
    with pytest.raises(RuntimeError, match="not found in the model zoo"):
        Predictor("no_such_config.py", checkpoint, device="cpu")


# ----------------------------------------------------------------------------------------------- compile=True
# every part of the demo model (ResNet, neck, deformable encoder, two-stage query selection, decoder with box
# refinement, soft-NMS post-processing, rescaling) with one encoder and one decoder layer and one block per ResNet
# stage: inductor's compile (mostly its C++ kernel builds) is the test's cost
SMALL = ["model.query_head.transformer.num_encoder_layers=1", "model.query_head.transformer.num_decoder_layers=1"] + [
    f"model.backbone.stages.{i}.{kv}" for i in range(4) for kv in ("num_blocks=1", f"stride_per_block=[{min(i, 1) + 1}]")
]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = instantiate(LazyConfig.apply_overrides(LazyConfig.load(DEMO), SMALL).model)
    path = str(tmp_path_factory.mktemp("ckpt_small") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_same_detections(got, want, box_tol, score_tol):
    """Same image size and count, every detection of each side matched rank-free to one of the other
    (same label, mutually nearest box within 1 px), matched boxes / scores within the tolerances."""
    assert got.image_size == want.image_size
    assert len(got) == len(want) > 0
    m = match_detections(got.pred_boxes.tensor, got.scores, got.pred_classes,
                         want.pred_boxes.tensor, want.scores, want.pred_classes, box_tol=1.0)
    assert bool(m["matched"].all()) and bool(m["ref_matched"].all()), f"{int((~m['matched']).sum())} unmatched"
    assert float(m["box_diff"].max()) <= box_tol
    assert float(m["score_diff"].max()) <= score_tol


def test_compiled_predictor_inductor_equals_eager(small_checkpoint, fresh_dynamo):
    from torch._dynamo.utils import counters

    counters.clear()
    eager = Predictor(DEMO, small_checkpoint, device="cpu", input_format="RGB", overrides=SMALL)
    compiled = Predictor(DEMO, small_checkpoint, device="cpu", input_format="RGB", overrides=SMALL, compile=True)
    rgb = _image(150, 230)  # non-square: resized to 224 x 343, padded to 224 x 352 (padding masks in the encoder)
    want = eager(rgb)
    got = compiled(rgb)
    # inductor compiled the graph (or loaded it from its on-disk cache of an earlier run)
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] == 1
    # float32 with inductor's fused / reordered arithmetic: scores (sigmoid, <= 1) differ by float32 rounding
    # (eps 1.2e-7) accumulated over the layers, boxes by that relative error times the image size (<= 230 px)
    _assert_same_detections(got, want, box_tol=1e-3, score_tol=1e-5)
    assert torch.equal(got.pred_classes.sort().values, want.pred_classes.sort().values)
    again = compiled(rgb)  # the compiled graph again: the same detections
    assert torch.equal(again.scores, got.scores) and torch.equal(again.pred_boxes.tensor, got.pred_boxes.tensor)


class _CountingBackend:
    """A torch.compile backend that runs the traced graph as is and records each compile's example inputs."""

    def __init__(self):
        self.inputs = []

    def __call__(self, gm, example_inputs):
        self.inputs.append(example_inputs)
        return gm.forward


def test_compiled_predictor_recompiles_once_for_a_second_size_then_reuses(small_checkpoint, fresh_dynamo):
    backend = _CountingBackend()
    eager = Predictor(DEMO, small_checkpoint, device="cpu", input_format="RGB", overrides=SMALL)
    compiled = Predictor(DEMO, small_checkpoint, device="cpu", input_format="RGB", overrides=SMALL, compile=True,
                         compile_options={"backend": backend})
    # padded sizes 224 x 352, 224 x 320, then 224 x 288: a static graph, a recompile with a dynamic width, reused
    for i, (h, w) in enumerate([(150, 230), (150, 200), (150, 180)]):
        rgb = _image(h, w, seed=i)
        _assert_same_detections(compiled(rgb), eager(rgb), box_tol=1e-4, score_tol=1e-6)
    assert len(backend.inputs) == 2
    symbolic = [x for x in backend.inputs[1] if isinstance(x, torch.SymInt)]
    assert symbolic, "the second compile has a dynamic size"


class _GraphBreakingResNet(ResNet):
    def forward(self, x):
        torch._dynamo.graph_break()
        return super().forward(x)


def test_compile_bad_configs_raise_clear_errors(checkpoint, fresh_dynamo):
    with pytest.raises(ValueError, match="eval_module='atss'"):
        Predictor(DEMO, checkpoint, device="cpu", overrides=["model.eval_module=atss"], compile=True)
    cfg = LazyConfig.load(DEMO)
    cfg.model.test_time_aug = L(tta.TestTimeAugmentation)(min_sizes=[160, 192], max_size=352)
    with pytest.raises(ValueError, match="test_time_aug"):
        Predictor(cfg, checkpoint, device="cpu", compile=True)
    with pytest.raises(ValueError, match="need compile=True"):
        Predictor(DEMO, checkpoint, device="cpu", compile_options={"backend": "eager"})
    # a model part that does not trace as one graph: a clear error at the first call, naming the parts
    cfg = LazyConfig.load(DEMO)
    cfg.model.backbone._target_ = _GraphBreakingResNet
    p = Predictor(cfg, checkpoint, device="cpu", compile=True, compile_options={"backend": "eager"})
    with pytest.raises(RuntimeError, match="could not compile the model's inference path .*_GraphBreakingResNet"):
        p(_image(64, 96))
