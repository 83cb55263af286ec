#!/usr/bin/env python
"""Co-DINO vs DINO in miniature: the paper's claim, checked on a laptop in one command.

Trains the demo model twice on the embedded synthetic data with the same budget, seed and data order -- with the
collaborative branch (configs/demo/co_dino_synthetic.py) and without it (configs/demo/dino_synthetic.py) --, each
in its own process with tools/lazyconfig_train_net.py (periodic evaluation on codetr_synthetic_val), then draws

* ``<output>/ap_curves.png``: both runs' losses and AP curves (tools/plot_metrics.py);
* ``<output>/discriminability/iof_iob.png`` and ``heatmaps/``: both final checkpoints' IoF-IoB curves and heat-maps
  on codetr_synthetic_val (tools/analyze_discriminability.py),

and prints the final AP of each run and the IoF-IoB areas (also in ``<output>/summary.json``). A run whose
``model_final.pth`` exists is not trained again (delete its folder to retrain).

Examples::

    python tools/co_dino_vs_dino.py                                  # output/co_dino_vs_dino
    python tools/co_dino_vs_dino.py --output out/cmp train.max_iter=200 train.eval_period=50   # overrides for both
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(ROOT, "projects", "CoDETR"))

RUNS = (
    ("Co-DINO", "co_dino", os.path.join(ROOT, "configs", "demo", "co_dino_synthetic.py")),
    ("DINO", "dino", os.path.join(ROOT, "configs", "demo", "dino_synthetic.py")),
)


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("Examples::")[0], epilog="Examples::" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output", default="output/co_dino_vs_dino", help="output folder (default: output/co_dino_vs_dino)")
    p.add_argument("--dataset", default="codetr_synthetic_val", help="dataset of the discriminability analysis")
    p.add_argument("--num-vis", type=int, default=4, help="heat-map figures to write (default: 4)")
    p.add_argument("--num-images", type=int, default=0, help="analyse only the first N images (default: all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY=VALUE applied to both runs")
    return p


def _train(config, out_dir, opts):
    if os.path.isfile(os.path.join(out_dir, "model_final.pth")):
        print(f"{out_dir}/model_final.pth exists: not training again", flush=True)
        return
    cmd = [sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--config-file", config,
           f"train.output_dir={out_dir}"] + list(opts)
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from codetr.analysis.metrics_plot import load_metrics, metric_series, plot_runs

    opts = [o for o in args.opts if o != "--"]
    start = time.perf_counter()
    summary = {}
    for label, name, config in RUNS:
        t0 = time.perf_counter()
        _train(config, os.path.join(args.output, name), opts)
        summary[label] = dict(config=os.path.relpath(config, ROOT), train_wall_s=round(time.perf_counter() - t0, 1))
    dirs = [os.path.join(args.output, name) for _, name, _ in RUNS]
    labels = [label for label, _, _ in RUNS]
    plot_runs(dirs, os.path.join(args.output, "ap_curves.png"), labels=labels)
    for label, d in zip(labels, dirs):
        its, ap = metric_series(load_metrics(d), "bbox/AP")
        summary[label]["ap_curve"] = dict(iteration=its, AP=ap)

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import analyze_discriminability

    disc_args = ["--dataset", args.dataset, "--output", os.path.join(args.output, "discriminability"),
                 "--num-vis", str(args.num_vis), "--num-images", str(args.num_images)]
    for (label, name, config), d in zip(RUNS, dirs):
        disc_args += ["--config-file", config, "--checkpoint", os.path.join(d, "model_final.pth"), "--label", label]
    disc = analyze_discriminability.main(disc_args)
    for label in labels:
        summary[label]["iof_iob_area"] = {k: disc[label][k]["area"] for k in ("encoder", "attention")}
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print(f"\nCo-DINO vs DINO ({time.perf_counter() - start:.0f} s in all)")
    print(f"{'run':10s} {'final AP':>9s} {'AP curve (iteration: AP)':40s} {'IoF-IoB area enc / attn':>24s}")
    for label in labels:
        s = summary[label]
        curve = ", ".join(f"{i}: {a:.1f}" for i, a in zip(s["ap_curve"]["iteration"], s["ap_curve"]["AP"]))
        final = s["ap_curve"]["AP"][-1] if s["ap_curve"]["AP"] else float("nan")
        area = s["iof_iob_area"]
        print(f"{label:10s} {final:9.2f} {curve:40s} {area['encoder']:11.3f} / {area['attention']:.3f}")
    print(f"Figures: {os.path.join(args.output, 'ap_curves.png')}, "
          f"{os.path.join(args.output, 'discriminability', 'iof_iob.png')}, "
          f"{os.path.join(args.output, 'discriminability', 'heatmaps')}/")
    return summary


if __name__ == "__main__":
    main()
