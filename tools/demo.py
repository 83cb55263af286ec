#!/usr/bin/env python
"""Run a trained detector on images, a folder or a video and write the visualised predictions.

Examples::

    python tools/demo.py --config-file configs/demo/co_dino_synthetic.py \\
        --checkpoint output/demo_co_dino_synthetic/model_final.pth --input img1.jpg img2.jpg --output vis/
    python tools/demo.py --config-file configs/co_dino_r50.py --checkpoint co_dino_r50.pth \\
        --input photos/ --output vis/ --score-threshold 0.3 --device cuda
    python tools/demo.py --config-file cfg.py --checkpoint model.pth --video-input clip.mp4 --output vis/clip.mp4
    python tools/demo.py --config-file cfg.py --checkpoint model.pth --video-input clip.mp4 --output vis/ --compile

Boxes are drawn with Detectron2's Visualizer, labelled with the dataset's class names
(``dataloader.test.dataset.names`` of the config) and scores; detections below ``--score-threshold`` are
hidden (DETR-style models always return their top-k boxes, most of them with low scores). The test-time
resize of the config (``dataloader.test.mapper.augmentations``) is applied to every image: the script runs
``codetr.Predictor``; ``--compile`` runs its ``compile=True`` path (torch.compile, inductor: the same detections up
to float rounding; the first image compiles, and a few more image sizes compile again before the dynamic-shape
graph serves every size), worth it for a video or many images.
"""
import argparse
import glob
import os
import sys
import time

import cv2
import torch

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from codetr import Predictor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def draw(bgr, instances, metadata):
    vis = Visualizer(bgr[:, :, ::-1], metadata=metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()[:, :, ::-1], len(instances)


def list_inputs(inputs):
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(f for f in glob.glob(os.path.join(item, "*")) if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise ValueError(f"--input folder {item!r} holds no images ({', '.join(IMAGE_EXTS)})")
            files += found
        elif any(ch in item for ch in "*?["):
            files += sorted(glob.glob(os.path.expanduser(item)))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} does not exist")
    return files


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="LazyConfig .py file of the model")
    parser.add_argument("--checkpoint", required=True, help="trained weights (.pth, or an official Co-DETR checkpoint)")
    parser.add_argument("--input", nargs="+", help="image files, folders of images, or glob patterns")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument("--output", required=True,
                        help="output folder (images), or a file / folder for the video (.mp4)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="hide detections below this score")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (codetr.Predictor(compile=True)): slow first image, faster after")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="codetr.demo")
    if bool(args.input) == bool(args.video_input):
        raise ValueError("give exactly one of --input and --video-input")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must be in [0, 1], got {args.score_threshold}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} but no CUDA device is visible; use --device cpu")
    if not os.path.isfile(args.checkpoint) and "://" not in args.checkpoint:
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    # cv2 reads BGR; the Predictor converts to the model's channel order and applies the config's test resize
    predictor = Predictor(cfg, args.checkpoint, args.device, input_format="BGR", score_threshold=args.score_threshold,
                          compile=args.compile)
    names = cfg.dataloader.test.dataset.names if "test" in cfg.dataloader else None
    metadata = MetadataCatalog.get(names if isinstance(names, str) else names[0]) if names else None

    if args.input:
        os.makedirs(args.output, exist_ok=True)
        for path in list_inputs(args.input):
            img = cv2.imread(path, cv2.IMREAD_COLOR)
            if img is None:
                raise ValueError(f"cannot read image {path!r}")
            start = time.perf_counter()
            vis, n = draw(img, predictor(img), metadata)
            out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".jpg")
            cv2.imwrite(out, vis)
            logger.info(f"{path}: {n} detections >= {args.score_threshold} in {time.perf_counter() - start:.2f}s -> {out}")
        return

    video = cv2.VideoCapture(args.video_input)
    if not video.isOpened():
        raise ValueError(f"cannot open video {args.video_input!r}")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    out_path = args.output
    if os.path.isdir(out_path) or not os.path.splitext(out_path)[1]:
        os.makedirs(out_path, exist_ok=True)
        out_path = os.path.join(out_path, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4")
    writer, frames = None, 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        vis, _ = draw(frame, predictor(frame), metadata)
        if writer is None:
            writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (vis.shape[1], vis.shape[0]))
        writer.write(vis)
        frames += 1
    video.release()
    if writer is not None:
        writer.release()
    logger.info(f"{args.video_input}: {frames} frames -> {out_path}")


if __name__ == "__main__":
    main()  # pragma: no cover
