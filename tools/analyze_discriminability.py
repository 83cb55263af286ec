#!/usr/bin/env python
"""The Co-DETR paper's discriminability analysis for trained checkpoints: heat-maps and IoF-IoB curves.

For every image: the encoder's discriminability score (per level the L2 norm over channels, divided by its
maximum, resized to the finest level and averaged over levels) and the same map for the last decoder layer's
cross-attention (the attention mass its sampling locations put on every position), drawn over the image with its
ground-truth boxes. Over the dataset: the IoF-IoB curves (IoF(t) / IoB(t) = fraction of foreground / background
pixels whose score is above t; foreground = inside any GT box) of every checkpoint on one plot, and their areas.
Definitions: codetr/analysis/discriminability.py.

Several checkpoints go on the same plot: repeat --checkpoint (and --config-file, once for all or once per
checkpoint; --label names them).

Examples::

    python tools/analyze_discriminability.py --config-file configs/demo/co_dino_synthetic.py \\
        --checkpoint output/demo_co_dino_synthetic/model_final.pth --dataset codetr_synthetic_val --output analysis/
    python tools/analyze_discriminability.py \\
        --config-file configs/demo/co_dino_synthetic.py --checkpoint output/compare/co_dino/model_final.pth --label Co-DINO \\
        --config-file configs/demo/dino_synthetic.py --checkpoint output/compare/dino/model_final.pth --label DINO \\
        --dataset codetr_synthetic_val --output analysis/compare
    python tools/analyze_discriminability.py --config-file cfg.py --checkpoint model.pth --input photos/ --output maps/

Writes ``<output>/iof_iob.png`` and ``<output>/summary.json`` (areas and curves; with --dataset) and
``<output>/heatmaps/*.jpg`` (the first --num-vis images). A folder of images (--input) has no boxes: heat-maps only.
"""
import argparse
import glob
import json
import os
import sys
import time

import torch

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode

import codetr.data  # noqa: F401  (registers the synthetic datasets)
from codetr.analysis.discriminability import DiscriminabilityProbe, IoFIoBCurve, discriminability_score, foreground_mask
from codetr.checkpoint import CoDETRCheckpointer
from codetr.data import get_detection_dataset_dicts

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
KINDS = (("encoder", "encoder features"), ("attention", "decoder cross-attention (last layer)"))


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("Examples::")[0], epilog="Examples::" + __doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config-file", action="append", required=True,
                   help="LazyConfig of the model (once for all checkpoints, or once per --checkpoint)")
    p.add_argument("--checkpoint", action="append", required=True, help="model weights; repeat to compare")
    p.add_argument("--label", action="append", help="legend name per checkpoint (default: its folder name)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="registered dataset name (with boxes: heat-maps and IoF-IoB curves)")
    src.add_argument("--input", help="folder of images (heat-maps only)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--num-images", type=int, default=0, help="analyse only the first N images (default: all)")
    p.add_argument("--num-vis", type=int, default=4, help="heat-map figures to write (default: 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    return p


def _load_models(args):
    ckpts = args.checkpoint
    configs = args.config_file
    if len(configs) not in (1, len(ckpts)):
        raise SystemExit(f"give one --config-file for all checkpoints or one per checkpoint ({len(configs)} for {len(ckpts)})")
    labels = args.label or [os.path.basename(os.path.dirname(os.path.abspath(c))) or c for c in ckpts]
    if len(labels) != len(ckpts):
        raise SystemExit(f"{len(labels)} --label for {len(ckpts)} --checkpoint")
    models = []
    for i, ckpt in enumerate(ckpts):
        if not os.path.isfile(ckpt):
            raise SystemExit(f"checkpoint {ckpt!r} does not exist")
        cfg = LazyConfig.load(configs[0] if len(configs) == 1 else configs[i])
        model = instantiate(cfg.model).to(args.device).eval()
        CoDETRCheckpointer(model).load(ckpt)
        models.append(dict(label=labels[i], model=model, mapper=instantiate(cfg.dataloader.test.mapper),
                           probe=DiscriminabilityProbe(model), checkpoint=ckpt))
    return models


def _inputs(args):
    if args.dataset:
        dicts = get_detection_dataset_dicts(args.dataset, filter_empty=False)
    else:
        files = sorted(f for f in glob.glob(os.path.join(args.input, "*")) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            raise SystemExit(f"no images ({', '.join(IMAGE_EXTS)}) in {args.input!r}")
        dicts = [dict(file_name=f, image_id=i) for i, f in enumerate(files)]
    return dicts[: args.num_images] if args.num_images > 0 else dicts


def _gt_boxes(d):
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d.get("annotations", [])]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _draw_heatmaps(path, image, boxes, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig, axes = plt.subplots(len(rows), 3, figsize=(3 * 2.4 * w / max(h, w) + 0.4, len(rows) * 2.4 * h / max(h, w) + 0.5),
                             squeeze=False)
    for r, (label, maps) in enumerate(rows):
        panels = [("image + GT", None)] + [(f"{label}: {name}", maps[kind]) for kind, name in (("encoder", "encoder"),
                                                                                           ("attention", "attention"))]
        for c, (title, score) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image)
            if score is not None:  # colours stretched to the map's own range (given in the title)
                lo, hi = float(score.min()), float(score.max())
                ax.imshow(score.numpy(), cmap="jet", alpha=0.55, vmin=lo, vmax=max(hi, lo + 1e-6))
                title += f" [{lo:.2f}, {hi:.2f}]"
            for x0, y0, x1, y1 in boxes.tolist():
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=0.8))
            ax.set_title(title if c or r == 0 else label, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(path, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4))
    for ax, (kind, name) in zip(axes, KINDS):
        for i, (label, res) in enumerate(results.items()):
            c = res[kind]
            ax.plot([0.0] + c["iob"][::-1] + [1.0], [0.0] + c["iof"][::-1] + [1.0], color=f"C{i}",
                    label=f"{label} (area {c['area']:.3f})")
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
        ax.set_xlabel("IoB (background pixels above t)", fontsize=8)
        ax.set_ylabel("IoF (foreground pixels above t)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def main(argv=None):
    args = build_parser().parse_args(argv)
    models = _load_models(args)
    dicts = _inputs(args)
    with_boxes = args.dataset is not None
    os.makedirs(os.path.join(args.output, "heatmaps"), exist_ok=True)
    curves = {m["label"]: {k: IoFIoBCurve() for k, _ in KINDS} for m in models}
    start = time.perf_counter()
    for n, d in enumerate(dicts):
        rows, image = [], None
        boxes = _gt_boxes(d)
        for m in models:
            mapped = m["mapper"](d)
            m["model"]([{k: v for k, v in mapped.items() if k != "instances"}])
            levels = m["probe"].pop()
            size = (mapped["height"], mapped["width"])
            maps = {k: discriminability_score(levels[k], out_size=size).cpu() for k, _ in KINDS}
            if with_boxes:
                fg = foreground_mask(boxes, *size)
                for k, _ in KINDS:
                    curves[m["label"]][k].add(maps[k], fg)
            if n < args.num_vis:
                image = image if image is not None else read_image(d["file_name"], format="RGB")
                rows.append((m["label"], maps))
        if n < args.num_vis:
            name = os.path.splitext(os.path.basename(d["file_name"]))[0]
            _draw_heatmaps(os.path.join(args.output, "heatmaps", f"{name}.jpg"), image, boxes, rows)
        if (n + 1) % 20 == 0 or n + 1 == len(dicts):
            el = time.perf_counter() - start
            print(f"[{n + 1}/{len(dicts)}] {el:.0f} s, ETA {el / (n + 1) * (len(dicts) - n - 1):.0f} s", flush=True)
    if not with_boxes:
        print(f"Wrote {min(args.num_vis, len(dicts))} heat-map figures to {os.path.join(args.output, 'heatmaps')}")
        return {}
    results = {}
    for m in models:
        res = dict(checkpoint=m["checkpoint"], num_images=len(dicts))
        for k, _ in KINDS:
            c = curves[m["label"]][k]
            res[k] = dict(area=c.area(), **c.curve())
        results[m["label"]] = res
        print(f"{m['label']}: IoF-IoB area encoder {res['encoder']['area']:.4f}, "
              f"decoder attention {res['attention']['area']:.4f} ({len(dicts)} images of {args.dataset})")
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    _plot_curves(os.path.join(args.output, "iof_iob.png"), results)
    print(f"Wrote {os.path.join(args.output, 'iof_iob.png')}, summary.json and heat-maps in "
          f"{os.path.join(args.output, 'heatmaps')}")
    return results


if __name__ == "__main__":
    main()
