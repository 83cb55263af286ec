#!/usr/bin/env python
"""Plot the training losses and the periodic AP of one or more detectron2 runs from their metrics.json.

One curve per run in every panel: the losses (default total_loss and the last decoder layer's
loss_cls / loss_bbox / loss_iou) and the evaluation AP (bbox/AP solid, bbox/AP50 dashed) written by
``train.eval_period`` evaluations.

Examples::

    python tools/plot_metrics.py output/demo_co_dino_synthetic
    python tools/plot_metrics.py output/demo_co_dino output/demo_dino --labels Co-DINO DINO --output curves.png
    python tools/plot_metrics.py output/run --losses total_loss loss_cls_aux0 --ap-keys bbox/AP bbox/APs
"""
import argparse
import os
import sys

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from codetr.analysis.metrics_plot import DEFAULT_AP_KEYS, DEFAULT_LOSS_KEYS, plot_runs


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("Examples::")[0], epilog="Examples::" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="training output folders (or metrics.json files)")
    p.add_argument("--labels", nargs="+", help="legend name of each run (default: the folder names)")
    p.add_argument("--output", help="PNG to write (default: <first OUTPUT_DIR>/metrics.png)")
    p.add_argument("--losses", nargs="+", default=list(DEFAULT_LOSS_KEYS), help="loss keys, one panel each")
    p.add_argument("--ap-keys", nargs="+", default=list(DEFAULT_AP_KEYS), help="evaluation keys of the AP panel")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    output = args.output or os.path.join(first, "metrics.png")
    result = plot_runs(args.runs, output, labels=args.labels, loss_keys=args.losses, ap_keys=args.ap_keys)
    for name, (its, vals) in result["panels"].get("AP", {}).items():
        print(f"{name}: " + ", ".join(f"{v:.2f} @ {i}" for i, v in zip(its, vals)))
    print(f"Wrote {output}")
    return result


if __name__ == "__main__":
    main()
