"""Training curves from detectron2's ``metrics.json``: losses and the periodic AP of one or more runs.

``metrics.json`` (written by detectron2's ``JSONWriter``) holds one JSON object per line: the scalars of the
event storage at an iteration (``"iteration"``, ``"total_loss"``, ``"loss_cls"``, ..., and after an evaluation
``"bbox/AP"``, ``"bbox/AP50"``, ...). A resumed run appends to the same file, so an iteration can appear more
than once; the last value written for an iteration wins.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["DEFAULT_LOSS_KEYS", "DEFAULT_AP_KEYS", "load_metrics", "metric_series", "plot_runs"]

DEFAULT_LOSS_KEYS = ("total_loss", "loss_cls", "loss_bbox", "loss_iou")
DEFAULT_AP_KEYS = ("bbox/AP", "bbox/AP50")


def load_metrics(path: str) -> List[Dict]:
    """The records of a ``metrics.json`` file (or of ``<path>/metrics.json`` when ``path`` is a folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file {path!r} (detectron2 writes it to train.output_dir)")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None
    return records


def metric_series(records: Sequence[Dict], key: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of one scalar, sorted by iteration; the last record of an iteration wins."""
    by_iter = {}
    for r in records:
        if key in r and "iteration" in r:
            by_iter[int(r["iteration"])] = float(r[key])
    iters = sorted(by_iter)
    return iters, [by_iter[i] for i in iters]


def plot_runs(
    run_dirs: Sequence[str],
    output: str,
    labels: Optional[Sequence[str]] = None,
    loss_keys: Sequence[str] = DEFAULT_LOSS_KEYS,
    ap_keys: Sequence[str] = DEFAULT_AP_KEYS,
) -> Dict:
    """
    Draw one panel per loss key and one AP panel, one curve per run, and save the PNG ``output``.

    Args:
        run_dirs: training output folders (or metrics.json files).
        labels: legend names, default the folder names.
        loss_keys: scalars drawn as losses; a key missing from every run is left out.
        ap_keys: evaluation scalars drawn together in the AP panel (first solid, the others dashed).

    Returns:
        dict with ``output`` and ``panels``: panel title -> {curve label -> (iterations, values)}, read back from
        the lines of the figure (the data drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_metrics(d) for d in run_dirs]
    colors = {lab: f"C{i}" for i, lab in enumerate(labels)}

    panels = {}
    for key in loss_keys:
        curves = {lab: metric_series(rec, key) for lab, rec in zip(labels, runs)}
        curves = {lab: c for lab, c in curves.items() if c[0]}
        if curves:
            panels[key] = curves
    ap_curves, ap_style = {}, {}
    for key in ap_keys:
        for lab, rec in zip(labels, runs):
            its, vals = metric_series(rec, key)
            if its:
                ap_curves[f"{lab} {key}"] = (its, vals)
                ap_style[f"{lab} {key}"] = (colors[lab], "-" if key == ap_keys[0] else "--")
    if ap_curves:
        panels["AP"] = ap_curves
    if not panels:
        raise ValueError(f"none of {list(loss_keys) + list(ap_keys)} is in the metrics of {list(run_dirs)}")

    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for name, (its, vals) in curves.items():
            if title == "AP":
                color, style = ap_style[name]
                ax.plot(its, vals, style, marker="o", ms=3, color=color, label=name)
                ax.annotate(f"{vals[-1]:.1f}", (its[-1], vals[-1]), textcoords="offset points", xytext=(3, 3),
                            fontsize=7, color=color)
            else:
                ax.plot(its, vals, color=colors[name], label=name, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    drawn = {
        ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        for ax in list(axes.flat)[: len(panels)]
    }
    plt.close(fig)
    return dict(output=output, panels=drawn)
