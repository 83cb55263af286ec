"""tools/plot_metrics.py on the metrics.json of short real runs: the curves drawn are the file's values."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_utils as pu  # noqa: E402

from codetr.analysis.metrics_plot import load_metrics, metric_series, plot_runs  # noqa: E402


def _train(out, **overrides):
    script = pu.load_train_script()
    opts = [f"train.output_dir={out}", "train.max_iter=4", "train.eval_period=2", "train.log_period=1"]
    opts += [f"{k}={v}" for k, v in overrides.items()]
    return script.main(script.build_argument_parser().parse_args(["--config-file", pu.TINY_CONFIG] + opts))


def _read(out, key):
    """(iterations, values) of ``key`` straight from the JSON lines, independent of metrics_plot."""
    its, vals = [], []
    for line in open(os.path.join(out, "metrics.json")):
        rec = json.loads(line)
        if key in rec:
            its.append(rec["iteration"])
            vals.append(rec[key])
    return its, vals


def test_plot_of_two_short_runs(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    res_a = _train(a)
    _train(b, **{"optimizer.lr": 0.05})
    # the training script drew its own plot and said where
    assert os.path.isfile(os.path.join(a, "metrics.png"))
    assert f"Training curves (losses, AP): {os.path.join(a, 'metrics.png')}" in capsys.readouterr().out

    sys.path.insert(0, os.path.join(pu.ROOT, "tools"))
    import plot_metrics

    png = str(tmp_path / "both.png")
    result = plot_metrics.main([a, b, "--labels", "A", "B", "--output", png, "--losses", "total_loss", "loss_cls",
                                "loss_missing"])
    assert os.path.getsize(png) > 0
    panels = result["panels"]
    assert list(panels) == ["total_loss", "loss_cls", "AP"]  # a key no run has gets no panel
    for label, out in (("A", a), ("B", b)):
        for key in ("total_loss", "loss_cls"):
            its, vals = _read(out, key)
            assert len(its) == 4  # log_period=1
            assert panels[key][label] == (its, pytest.approx(vals))
        its, ap = _read(out, "bbox/AP")
        # the periodic evaluation after 2 iterations (0-based 1) and the final one (detectron2 logs it at max_iter)
        assert its == [1, 4]
        assert panels["AP"][f"{label} bbox/AP"] == (its, pytest.approx(ap))
        assert panels["AP"][f"{label} bbox/AP50"][0] == its
    assert panels["AP"]["A bbox/AP"][1][-1] == pytest.approx(res_a["bbox"]["AP"])  # the final evaluation's AP


def test_resumed_run_keeps_the_last_value_of_an_iteration(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [{"iteration": 0, "total_loss": 3.0}, {"iteration": 1, "total_loss": 2.0},
             {"iteration": 1, "total_loss": 1.5}, {"iteration": 2, "bbox/AP": 4.0}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert metric_series(load_metrics(str(tmp_path)), "total_loss") == ([0, 1], [3.0, 1.5])
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="metrics.json:1"):
        load_metrics(str(path))
    with pytest.raises(FileNotFoundError):
        plot_runs([str(tmp_path / "nothing")], str(tmp_path / "x.png"))
