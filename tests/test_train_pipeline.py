"""Training pipeline: trainer step semantics, EMA, atomic checkpoints, bit-exact resume, 2-process CPU DDP."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402  (sets CODETR_SYNTHETIC_ROOT before codetr.data is imported)

from detectron2.utils.events import EventStorage  # noqa: E402

from codetr.checkpoint import CoDETRCheckpointer  # noqa: E402
from codetr.engine import CoDETRTrainer, ModelEMA  # noqa: E402


class _Quadratic(nn.Module):
    """loss = mean over the batch of ((x @ w) - y)^2 (+ a second term), a model with known gradients."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1, bias=True)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]]))
            self.lin.bias.fill_(0.1)

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        err = self.lin(x).squeeze(1) - y
        return {"loss_a": (err**2).mean(), "loss_b": 0.5 * err.abs().mean()}


def _batches(n_items=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, generator=g) * 3, "y": torch.randn((), generator=g)} for _ in range(n_items)]


def _run_one_step(trainer):
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer.iter = 0
        trainer.run_step()


def _reference_sgd_step(model, batch, lr, max_norm=None, autocast_dtype=None):
    """float64 reference: gradient of the summed losses on one batch, optional L2 clipping, SGD step."""
    ref = _Quadratic()
    ref.load_state_dict(model.state_dict())
    ref = ref.double()
    b = [{"x": d["x"].double(), "y": d["y"].double()} for d in batch]
    losses = ref(b)
    sum(losses.values()).backward()
    grads = [p.grad for p in ref.parameters()]
    if max_norm is not None:
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, max_norm / (float(norm) + 1e-6))
        grads = [g * scale for g in grads]
    return [p.detach() - lr * g for p, g in zip(ref.parameters(), grads)]


def test_clip_grad_matches_reference():
    data = _batches(2)
    model = _Quadratic()
    before = _Quadratic()
    before.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = CoDETRTrainer(model, [data] * 3, opt, clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0))
    _run_one_step(trainer)
    expected = _reference_sgd_step(before, data, 0.5, max_norm=0.1)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)


def test_clip_happens_after_fp16_unscale():
    # With a GradScaler (scale 2^4), clipping the *scaled* gradients would shrink them 16x more. The power-of-2
    # scale is exact in float32, so the step must equal the unscaled, clipped reference.
    data = [{"x": d["x"] / 3, "y": d["y"]} for d in _batches(2)]  # keep fp16 gradients finite
    model = _Quadratic()
    before = _Quadratic()
    before.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = CoDETRTrainer(model, [data] * 3, opt, amp_enabled=True, amp_precision="fp16",
                            clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0))
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    # the reference runs the same autocast forward without scaling
    ref = _Quadratic()
    ref.load_state_dict(before.state_dict())
    with torch.autocast("cpu", dtype=torch.float16):
        losses = ref(data)
        total = sum(losses.values())
    total.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    expected = [p.detach() - 0.5 * p.grad for p in ref.parameters()]
    _run_one_step(trainer)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
    # and the step was really clipped (unclipped step differs)
    unclipped = _reference_sgd_step(before, data, 0.5, max_norm=None)
    assert not torch.allclose(model.lin.weight.double(), unclipped[0], atol=1e-3)
    assert trainer.grad_scaler.get_scale() == 2.0**4  # no inf/nan: the step was taken


def test_grad_accumulation_equals_large_batch():
    data = _batches(4)
    m1, m2 = _Quadratic(), _Quadratic()
    # 2 micro-batches of 2 images == 1 batch of 4 images (loss is a mean over images)
    t1 = CoDETRTrainer(m1, [data[:2], data[2:]] * 2, torch.optim.SGD(m1.parameters(), lr=0.1), grad_accum_steps=2)
    t2 = CoDETRTrainer(m2, [data] * 2, torch.optim.SGD(m2.parameters(), lr=0.1))
    _run_one_step(t1)
    _run_one_step(t2)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        CoDETRTrainer(m1, [data], torch.optim.SGD(m1.parameters(), lr=0.1), grad_accum_steps=0)
    with pytest.raises(ValueError, match="precision"):
        CoDETRTrainer(m1, [data], torch.optim.SGD(m1.parameters(), lr=0.1), amp_enabled=True, amp_precision="fp8")


def test_ema_follows_mmdet_exp_momentum_rule():
    model = _Quadratic()
    ema = ModelEMA(model, momentum=1e-2, gamma=10.0)
    expected = model.lin.weight.detach().double().clone()
    for step in range(3):
        with torch.no_grad():
            model.lin.weight.add_(1.0)
        m = (1 - 1e-2) * np.exp(-(1 + step) / 10.0) + 1e-2
        expected = (1 - m) * expected + m * model.lin.weight.detach().double()
        ema.update(model)
    torch.testing.assert_close(ema.model.lin.weight.double(), expected, rtol=1e-6, atol=1e-6)
    state = ema.state_dict()
    ema2 = ModelEMA(_Quadratic(), momentum=1e-2, gamma=10.0)
    ema2.load_state_dict(state)
    assert ema2.num_updates == 3 and torch.equal(ema2.model.lin.weight, ema.model.lin.weight)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model = _Quadratic()
    ckpt = CoDETRCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(7)
        raise KeyboardInterrupt("killed during save")

    with torch.no_grad():
        model.lin.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")  # overwrite of the same name
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no stray temp files
    loaded = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert torch.equal(loaded["model"]["lin.weight"], torch.tensor([[0.5, -1.0, 2.0, 0.25]]))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


TINY_RFS = os.path.join(pu.TESTS, "configs", "tiny_synthetic_rfs.py")
TINY_CODETR = os.path.join(pu.TESTS, "configs", "tiny_codetr.py")


@pytest.mark.parametrize("config,total", [(pu.TINY_CONFIG, 6), (TINY_RFS, 6), (TINY_CODETR, 2)],
                         ids=["tiny-detector", "repeat-factor-sampler", "real-codetr"])
def test_resume_is_bit_exact(tmp_path, config, total):
    """An interrupted run resumed with --resume ends with the weights of an uninterrupted one, bit for bit: with
    the default sampler, with repeat-factor sampling (its seed is drawn at random: the checkpoint carries it), and
    with the real CoDETR (the demo model: denoising noise, RPN / RoI / ATSS / positive-query sampling)."""
    script = pu.load_train_script()
    parser = script.build_argument_parser()
    common = ["--config-file", config]
    half = total // 2
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    script.main(parser.parse_args(common + [f"train.output_dir={full}", f"train.max_iter={total}"]))
    script.main(parser.parse_args(common + [f"train.output_dir={part}", f"train.max_iter={half}"]))
    first_half = _weights(os.path.join(part, "model_final.pth"))
    script.main(parser.parse_args(common + ["--resume", f"train.output_dir={part}", f"train.max_iter={total}"]))
    a, b = _weights(os.path.join(full, "model_final.pth")), _weights(os.path.join(part, "model_final.pth"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run really trained further (not a reload of the first half's weights)
    assert any(not torch.equal(first_half[k], b[k]) for k in b if b[k].is_floating_point())
    # metrics.json of the resumed run continues at iteration half..total-1
    rows = [json.loads(line) for line in open(os.path.join(part, "metrics.json"))]
    assert max(r["iteration"] for r in rows if "total_loss" in r) == total - 1
    assert any("bbox/AP" in r for r in rows)  # evaluated after training


def test_resume_restores_the_repeat_factor_seed(tmp_path):
    """Without the seed in the checkpoint a resumed repeat-factor run would draw a fresh random stream."""
    ck = str(tmp_path / "rfs")
    script = pu.load_train_script()
    parser = script.build_argument_parser()
    script.main(parser.parse_args(["--config-file", TINY_RFS, f"train.output_dir={ck}", "train.max_iter=2"]))
    state = torch.load(os.path.join(ck, "model_final.pth"), map_location="cpu", weights_only=True)
    assert state["sampler"]["sampler"] == "RepeatFactorTrainingSampler" and isinstance(state["sampler"]["seed"], int)


def test_two_process_cpu_ddp_train_and_eval(tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, os.path.join(pu.ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", pu.TINY_CONFIG,
           "--num-gpus", "2", "--dist-url", "auto", "train.device=cpu", f"train.output_dir={out}", "train.max_iter=3", "train.eval_period=3",
           "dataloader.train.total_batch_size=4"]
    proc = subprocess.run(cmd, env=pu.subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "World size: 2" in log
    assert "Final evaluation: bbox AP" in proc.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert max(r["iteration"] for r in rows if "total_loss" in r) == 2
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


def _ddp_run(out, *args, timeout=300):
    cmd = [sys.executable, os.path.join(pu.ROOT, "tools", "lazyconfig_train_net.py"), *args[:-1], "--config-file",
           TINY_CODETR, "--num-gpus", "2", "--dist-url", "auto", "train.device=cpu", f"train.output_dir={out}",
           "dataloader.train.total_batch_size=2", "train.checkpointer.period=1", *args[-1]]
    proc = subprocess.run(cmd, env=pu.subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_ddp_resume_with_the_real_codetr_is_bit_exact(tmp_path):
    """2 CPU processes, the real CoDETR: 2 iterations in one go equal 1 + resume 1 (each process's RNG state is
    restored from the checkpoint: denoising noise and the auxiliary heads' sampling differ per process)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    proc = _ddp_run(full, ["train.max_iter=2", "train.eval_period=0"])
    assert "World size: 2" in open(os.path.join(full, "log.txt")).read()
    assert "Final evaluation: bbox AP" in proc.stdout
    _ddp_run(part, ["train.max_iter=1"])
    rng = torch.load(os.path.join(part, "model_final.pth"), map_location="cpu", weights_only=True)["rng"]
    assert len(rng["per_rank"]) == 2 and not torch.equal(rng["per_rank"][0]["torch"], rng["per_rank"][1]["torch"])
    _ddp_run(part, "--resume", ["train.max_iter=2"])
    a, b = _weights(os.path.join(full, "model_final.pth")), _weights(os.path.join(part, "model_final.pth"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_eval_only_with_a_damaged_checkpoint_names_the_file(tmp_path, damage):
    """A checkpoint written by the script, cut in half or with bytes overwritten: a clear error naming the file
    (not torch's advice to retry with weights_only=False)."""
    from codetr.checkpoint import CheckpointFileError

    script = pu.load_train_script()
    parser = script.build_argument_parser()
    out = str(tmp_path / "run")
    script.main(parser.parse_args(["--config-file", pu.TINY_CONFIG, f"train.output_dir={out}", "train.max_iter=1"]))
    data = open(os.path.join(out, "model_final.pth"), "rb").read()
    bad = str(tmp_path / f"{damage}.pth")
    with open(bad, "wb") as f:
        if damage == "truncated":
            f.write(data[: len(data) // 2])
        else:
            f.write(data[:64] + bytes(range(256)) * 8 + data[64 + 2048:])
    with pytest.raises(CheckpointFileError, match=f"{bad}.*not a valid checkpoint.*truncated or corrupt"):
        script.main(parser.parse_args(["--eval-only", "--config-file", pu.TINY_CONFIG,
                                       f"train.output_dir={tmp_path / 'eval'}", f"train.init_checkpoint={bad}"]))
    garbage = str(tmp_path / "garbage.pth")
    with open(garbage, "wb") as f:
        f.write(b"not a checkpoint at all\n" * 10)
    with pytest.raises(CheckpointFileError, match="garbage.pth is not a valid checkpoint"):
        script.main(parser.parse_args(["--eval-only", "--config-file", pu.TINY_CONFIG,
                                       f"train.output_dir={tmp_path / 'eval'}", f"train.init_checkpoint={garbage}"]))


def test_script_rejects_bad_config_before_training(tmp_path):
    script = pu.load_train_script()
    parser = script.build_argument_parser()
    common = ["--config-file", pu.TINY_CONFIG, f"train.output_dir={tmp_path}"]
    with pytest.raises(ValueError, match="num_classes=80.*tinysynth_train.*4 classes"):
        script.main(parser.parse_args(common + ["model.num_classes=80"]))
    with pytest.raises(ValueError, match="coco_2017_trian"):
        script.main(parser.parse_args(common + ["dataloader.train.dataset.names=coco_2017_trian"]))
    with pytest.raises(ValueError, match="precision"):
        script.main(parser.parse_args(common + ["train.amp.enabled=True", "train.amp.precision=fp8"]))
    assert not any(f.endswith(".pth") for f in os.listdir(tmp_path))


def _evaluated_state(script, parser, argv, monkeypatch):
    """Run ``--eval-only`` and return the state dict of the model that do_test was given."""
    seen = {}

    def fake_do_test(cfg, model):
        seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    monkeypatch.setattr(script, "do_test", fake_do_test)
    script.main(parser.parse_args(argv))
    return seen["state"]


def test_eval_only_with_ema_evaluates_the_loaded_weights(tmp_path, monkeypatch):
    """--eval-only with EMA on: a checkpoint with model_ema is evaluated with those weights; one without it
    (as official/converted weights) with its model weights - never the EMA copy of the fresh random model."""
    script = pu.load_train_script()
    parser = script.build_argument_parser()
    common = ["--config-file", pu.TINY_CONFIG, "train.max_iter=3"]
    with_ema, without = str(tmp_path / "ema"), str(tmp_path / "plain")
    script.main(parser.parse_args(common + [f"train.output_dir={with_ema}", "train.model_ema.enabled=True",
                                            "train.model_ema.momentum=0.3", "train.model_ema.gamma=1"]))
    script.main(parser.parse_args(common + [f"train.output_dir={without}"]))
    ck_ema = torch.load(os.path.join(with_ema, "model_final.pth"), map_location="cpu", weights_only=False)
    ck_plain = torch.load(os.path.join(without, "model_final.pth"), map_location="cpu", weights_only=False)
    assert "model_ema" in ck_ema and "model_ema" not in ck_plain
    assert not torch.equal(ck_ema["model_ema"]["model"]["cls.weight"], ck_ema["model"]["cls.weight"])
    eval_args = ["--eval-only"] + common + ["train.model_ema.enabled=True", f"train.output_dir={tmp_path / 'eval'}"]
    got = _evaluated_state(script, parser, eval_args + [f"train.init_checkpoint={with_ema}/model_final.pth"],
                           monkeypatch)
    for k, v in ck_ema["model_ema"]["model"].items():
        assert torch.equal(got[k], v), k
    got = _evaluated_state(script, parser, eval_args + [f"train.init_checkpoint={without}/model_final.pth"],
                           monkeypatch)
    for k, v in ck_plain["model"].items():
        assert torch.equal(got[k], v), k
