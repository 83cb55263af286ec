#!/usr/bin/env python
"""Export a Co-DETR / DINO model to ONNX: image -> (boxes, scores, labels) top-k, and measure ONNX Runtime against PyTorch.

Examples::

    python tools/export_onnx.py --config-file configs/demo/co_dino_synthetic.py \\
        --checkpoint output/demo_co_dino_synthetic/model_final.pth --output demo.onnx
    python tools/export_onnx.py --config-file configs/co_dino_r50.py --checkpoint co_dino_5scale_r50_1x_coco.pth \\
        --output co_dino_r50.onnx --image-size 800 1344
    python tools/export_onnx.py --config-file configs/co_dino_r50.py --checkpoint model.pth --output trt.onnx --trt-plugin

The graph (``codetr.export.DetectorForExport``): input ``images`` (B, 3, H, W) uint8 in the config's channel order
(``input_format``), already resized by the config's test resize, H and W multiples of ``size_divisibility``
(pad the image at the bottom/right: boxes are unaffected); outputs ``boxes`` (B, k, 4) XYXY pixels of the input,
``scores`` (B, k) decreasing, ``labels`` (B, k), k = ``model.postprocessor.max_per_img``, or with soft-NMS
``num_candidates`` (default: the number of queries): the top-k of the query x class scores, before soft-NMS.
Batch, height and width are dynamic unless ``--static``.

Deformable attention is exported as standard ops (``GridSample``), which ONNX Runtime and TensorRT run; with
``--trt-plugin`` each attention is one ``MultiscaleDeformableAttnPlugin_TRT`` node (domain "trt") with the five
inputs TensorRT's plugin takes, for TensorRT users (ONNX Runtime cannot run that node: no parity is measured then).

Soft-NMS (when the config uses it: every Co-DINO config) is not in the graph: run it after the graph, per image, with
the model's own ``model.postprocessor.merge(boxes[i], scores[i], labels[i])`` (``codetr.modeling.DETRPostProcessor``:
class-aware soft-NMS, then the best ``max_per_img``); the settings are stored in the ONNX metadata.
``--no-soft-nms`` skips that step here: the pure end-to-end detector (its top-k is then the final output).

Parity: ONNX Runtime (CPU) and PyTorch eager run the same images (``--parity-images`` random images, or the images
of ``--parity-input``, resized by the config's test resize); the tool prints, rank by rank, the largest absolute
difference of the boxes (pixels) and scores and the top-k agreement; then rank-free (``codetr.export.match_detections``:
each ONNX candidate paired with the eager one of the same label and mutually nearest box), the fraction matched and
the differences over the matched pairs, which near-tied scores swapping ranks do not disturb; then the same after
the post-step.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate

from codetr.checkpoint import CoDETRCheckpointer
from codetr.export import export_onnx, match_detections, onnx_parity


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file of the model")
    parser.add_argument("--checkpoint", required=True,
                        help="weights (.pth or an official Co-DETR checkpoint); '' = the config's random initialisation")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="example (and, with --static, the fixed) input size; default: the config's test size, "
                             "rounded up to size_divisibility")
    parser.add_argument("--batch", type=int, default=None, help="example batch size (default 2, or 1 with --static)")
    parser.add_argument("--static", action="store_true", help="fix batch, height and width to the example's")
    parser.add_argument("--trt-plugin", action="store_true",
                        help="one MultiscaleDeformableAttnPlugin_TRT node per attention (TensorRT) instead of GridSample")
    parser.add_argument("--no-soft-nms", action="store_true",
                        help="skip the soft-NMS post-step in the parity check (the pure end-to-end detector)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--parity-images", type=int, default=2, help="random images for the parity check (0: none)")
    parser.add_argument("--parity-input", help="a folder of images for the parity check instead of random ones")
    parser.add_argument("--json", help="also write the summary as JSON to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value")
    return parser


def _round_up(x, d):
    return (x + d - 1) // d * d


def default_size(cfg, divisor):
    """The config's test resize (short side, long-side cap) as an (H, W) landscape input, rounded up to ``divisor``."""
    aug = cfg.dataloader.test.mapper.augmentations[0]
    short = aug.short_edge_length
    short = short if isinstance(short, int) else max(short)
    long_side = aug.get("max_size", None) or int(short * 4 / 3)
    return _round_up(short, divisor), _round_up(long_side, divisor)


def parity_images(args, cfg, model, size):
    """(1, 3, H, W) uint8 batches: the --parity-input images after the config's test resize (padded to the
    divisor), or random images of ``size``."""
    d = max(1, model.size_divisibility)
    if not args.parity_input:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, 256, (1, 3) + tuple(size), dtype=torch.uint8, generator=g) for _ in range(args.parity_images)]
    import detectron2.data.transforms as T
    from detectron2.data.detection_utils import read_image

    augs = T.AugmentationList(list(instantiate(cfg.dataloader.test.mapper.augmentations)))
    files = sorted(glob.glob(os.path.join(args.parity_input, "*")))[: max(args.parity_images, 1)]
    out = []
    for f in files:
        aug_input = T.AugInput(read_image(f, format=model.input_format))
        augs(aug_input)
        img = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        h, w = img.shape[1:]
        padded = torch.zeros(3, _round_up(h, d), _round_up(w, d), dtype=torch.uint8)
        padded[:, :h, :w] = img
        out.append(padded[None])
    return out


def post_step_parity(model, outputs, soft_nms):
    """After the graph: the model's own merge step (soft-NMS when configured) on both sides, per image, on the
    ``(eager, onnx)`` candidates of :func:`codetr.export.onnx_parity`."""
    post = model.postprocessor
    saved = post.soft_nms
    post.soft_nms = soft_nms
    box_diff = score_diff = m_score = 0.0
    same_count = n_matched = total = 0
    try:
        for ref, got in outputs:
            a, b = post.merge(*[t[0] for t in ref]), post.merge(*[t[0] for t in got])
            n = min(len(a["scores"]), len(b["scores"]))
            same_count += int(len(a["scores"]) == len(b["scores"]))
            if n:
                box_diff = max(box_diff, float((a["boxes"][:n] - b["boxes"][:n]).abs().max()))
                score_diff = max(score_diff, float((a["scores"][:n] - b["scores"][:n]).abs().max()))
            m = match_detections(b["boxes"], b["scores"], b["labels"], a["boxes"], a["scores"], a["labels"])
            n_matched += int(m["matched"].sum())
            total += len(b["scores"])
            if m["matched"].any():
                m_score = max(m_score, float(m["score_diff"][m["matched"]].max()))
    finally:
        post.soft_nms = saved
    return dict(max_abs_box_px=box_diff, max_abs_score=score_diff, images_with_same_count=same_count, soft_nms=soft_nms,
                matched=n_matched / max(total, 1), matched_max_score=m_score)


@torch.no_grad()
def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.checkpoint and "://" not in args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model).eval()
    if args.checkpoint:
        CoDETRCheckpointer(model).load(args.checkpoint)
    d = max(1, model.size_divisibility)
    size = tuple(args.image_size) if args.image_size else default_size(cfg, d)
    if size[0] % d or size[1] % d:
        raise ValueError(f"--image-size {size} must be multiples of the model's size_divisibility ({d})")
    batch = args.batch or (1 if args.static else 2)
    example = torch.randint(0, 256, (batch, 3) + size, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    post = model.postprocessor
    metadata = {
        "input": f"images (B, 3, H, W) uint8, {model.input_format}, resized by the config's test resize, H and W multiples of {d}",
        "outputs": "boxes (B, k, 4) XYXY pixels of the input; scores (B, k); labels (B, k)",
        "input_format": model.input_format,
        "size_divisibility": str(d),
        "max_per_img": str(post.max_per_img),
        "soft_nms": json.dumps(dict(enabled=bool(post.soft_nms), **post.soft_nms_cfg)),
        "dynamic": "batch, height, width" if not args.static else f"none (fixed to {tuple(example.shape)})",
    }
    start = time.perf_counter()
    export_onnx(model, args.output, example, dynamic=not args.static, trt_plugin=args.trt_plugin, opset=args.opset,
                metadata=metadata)
    summary = dict(output=args.output, export_s=round(time.perf_counter() - start, 1), example=list(example.shape),
                   dynamic=not args.static, trt_plugin=args.trt_plugin, size_mb=round(os.path.getsize(args.output) / 2**20, 1))
    print(f"exported {args.output} in {summary['export_s']} s ({summary['size_mb']} MB; example input {tuple(example.shape)}, "
          f"{'dynamic batch/H/W' if not args.static else 'static shapes'})")
    if args.trt_plugin:
        print("--trt-plugin: ONNX Runtime cannot run the TensorRT plugin nodes; no parity check")
    elif args.parity_images > 0 or args.parity_input:
        images = parity_images(args, cfg, model, size)
        start = time.perf_counter()
        outputs = []
        summary["parity_candidates"] = onnx_parity(args.output, model, images, outputs=outputs)
        summary["parity_final"] = post_step_parity(model, outputs, soft_nms=post.soft_nms and not args.no_soft_nms)
        summary["parity_s"] = round(time.perf_counter() - start, 1)
        c, f = summary["parity_candidates"], summary["parity_final"]
        print(f"parity on {c['images']} image(s) of {tuple(images[0].shape[2:])}, top-k candidates rank by rank: "
              f"max |box| {c['max_abs_box_px']:.2e} px, max |score| {c['max_abs_score']:.2e}, "
              f"top-k agreement {100 * c['topk_agreement']:.2f}%")
        print(f"rank-free (same label, mutually nearest box within 1 px): {100 * c['matched']:.2f}% of the candidates "
              f"matched; over the matched: max |box| {c['matched_max_box_px']:.2e} px, max |score| "
              f"{c['matched_max_score']:.2e}, {100 * c['matched_score_within_tol']:.2f}% within {c['score_tol']:g}; "
              + (f"best unmatched score {c['unmatched_max_score']:.4f} (k-th score {c['kth_score']:.4f})"
                 if c["unmatched_max_score"] is not None else "none unmatched"))
        print(f"after the post-step ({'soft-NMS + ' if f['soft_nms'] else ''}top {post.max_per_img}): max |box| "
              f"{f['max_abs_box_px']:.2e} px, max |score| {f['max_abs_score']:.2e}, same detection count in "
              f"{f['images_with_same_count']}/{len(images)} image(s); rank-free: {100 * f['matched']:.2f}% matched, "
              f"max |score| over the matched {f['matched_max_score']:.2e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return summary


if __name__ == "__main__":
    main()  # pragma: no cover
