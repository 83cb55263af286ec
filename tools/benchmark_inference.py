#!/usr/bin/env python
"""Inference latency of a Co-DETR / DINO model: PyTorch eager vs torch.compile vs ONNX Runtime (and bf16 / fp16),
measured in one run, alternating, printed as per-image latency, images/s and ratios to eager.

Examples::

    python tools/benchmark_inference.py --config-file configs/demo/co_dino_synthetic.py --size 160 224
    python tools/benchmark_inference.py --config-file configs/co_dino_r50.py --size 800 1344 --iters 3 --modes eager onnx
    python tools/benchmark_inference.py --config-file configs/co_dino_r50.py --size 800 1344 --device cuda \\
        --modes eager compile fp16 bf16 compile-fp16

What is timed: ``codetr.export.DetectorForExport(model)`` on one (1, 3, H, W) uint8 image: normalisation, backbone,
neck, encoder, decoder and the top-k candidates (what the ONNX graph computes; the soft-NMS post-step is not
included in any mode). Modes: ``eager`` (fp32), ``compile`` (torch.compile, inductor, fp32), ``onnx`` (ONNX Runtime,
CPU, the standard-ops export), ``bf16`` / ``fp16`` (autocast; fp16 on CUDA only), ``compile-bf16`` /
``compile-fp16``. Each mode is checked against eager fp32, rank-free (``codetr.export.match_detections``: the
fraction of candidates found by both, max |score| and max |box| px over those) and rank by rank (top-k label
agreement), so a fast mode that is not exact enough shows it. Compilation and export happen before the timed rounds; their times are
printed separately. Rounds alternate the modes (ABCABC...), so that load changes on a shared machine hit all modes
alike; the ``uptime`` load average is printed with the table.
"""
import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate

from codetr.checkpoint import CoDETRCheckpointer
from codetr.export import DetectorForExport, export_onnx, match_detections

MODES = ("eager", "compile", "onnx", "bf16", "fp16", "compile-bf16", "compile-fp16")


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples::")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="configs/demo/co_dino_synthetic.py", metavar="FILE")
    parser.add_argument("--checkpoint", default="", help="weights to load ('' = random initialisation: same cost)")
    parser.add_argument("--size", type=int, nargs=2, default=(160, 224), metavar=("H", "W"),
                        help="input size (multiples of the model's size_divisibility)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "onnx", "bf16"], choices=MODES)
    parser.add_argument("--iters", type=int, default=5, help="timed images per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every mode once (alternating)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images per mode before the rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value")
    return parser


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_runners(args, model, wrapper, image, device):
    """mode -> (callable image -> (boxes, scores, labels) on the CPU, setup seconds, the first call's output)."""
    runners = {}
    for mode in args.modes:
        start = time.perf_counter()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode.split("-")[-1])
        if dtype is torch.float16 and device.type != "cuda":
            print(f"skipping {mode}: fp16 autocast is for CUDA (on the CPU use bf16)")
            continue
        if mode == "onnx":
            import onnxruntime as ort

            if device.type != "cpu":
                print("skipping onnx: this benchmark runs ONNX Runtime's CPU provider only")
                continue
            path = os.path.join(tempfile.mkdtemp(prefix="codetr_bench_"), "model.onnx")
            export_onnx(model, path, image, dynamic=False)
            opts = ort.SessionOptions()
            if args.threads:
                opts.intra_op_num_threads = args.threads
            session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

            def run(img, session=session):
                return [torch.from_numpy(a) for a in session.run(None, {"images": img.numpy()})]

        else:
            fn = torch.compile(wrapper) if mode.startswith("compile") else wrapper
            ctx = (lambda d=dtype: torch.autocast(device.type, dtype=d)) if dtype is not None else contextlib.nullcontext

            def run(img, fn=fn, ctx=ctx):
                with torch.no_grad(), ctx():
                    out = fn(img.to(device))
                return [t.float().cpu() if t.is_floating_point() else t.cpu() for t in out]

        first = run(image)  # compile / first call outside the timed rounds; its output is the one compared
        runners[mode] = (run, time.perf_counter() - start, first)
    return runners


def compare(out, ref):
    """Against eager fp32, rank-free (``codetr.export.match_detections``: same label, mutually nearest box within
    1 px): max |score| and max |box| px over the matched candidates, the fraction matched; and the fraction of
    top-k ranks with the same label (rank by rank: near-tied scores swap ranks)."""
    m = match_detections(out[0][0], out[1][0], out[2][0], ref[0][0], ref[1][0], ref[2][0], box_tol=1.0)
    ok = m["matched"]
    return (
        float(m["score_diff"][ok].max()) if ok.any() else float("nan"),
        float(m["box_diff"][ok].max()) if ok.any() else float("nan"),
        float(ok.float().mean()),
        float((out[2] == ref[2]).float().mean()),
    )


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model).eval()
    if args.checkpoint:
        CoDETRCheckpointer(model).load(args.checkpoint)
    d = max(1, model.size_divisibility)
    if args.size[0] % d or args.size[1] % d:
        raise ValueError(f"--size {args.size} must be multiples of the model's size_divisibility ({d})")
    model.to(device)
    wrapper = DetectorForExport(model).eval()
    image = torch.randint(0, 256, (1, 3) + tuple(args.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = [t.cpu() for t in wrapper(image.to(device))]

    print(f"{args.config_file} at {tuple(args.size)} on {device} ({torch.get_num_threads()} threads); setting up "
          f"{', '.join(args.modes)} ...", flush=True)
    runners = build_runners(args, model, wrapper, image, device)
    errors = {mode: compare(first, reference) for mode, (_, _, first) in runners.items()}
    for mode, (run, _, _) in runners.items():
        for _ in range(args.warmup):
            run(image)
    times = {mode: [] for mode in runners}
    for r in range(args.rounds):
        for mode, (run, _, _) in runners.items():
            for _ in range(args.iters):
                _sync(device)
                start = time.perf_counter()
                run(image)
                _sync(device)
                times[mode].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {1e3 * statistics.median(t):.0f} ms" for m, t in times.items()),
              flush=True)
    load = os.getloadavg()
    eager = statistics.median(times["eager"]) if "eager" in times else None
    print(f"\nload average (1/5/15 min) after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    print("| mode | ms / image (median) | images/s | vs eager | setup s | candidates matched | max abs score diff (matched) "
          "| max abs box diff px (matched) | top-k labels equal rank by rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, t in times.items():
        med = statistics.median(t)
        ratio = f"{eager / med:.2f}x" if eager else "-"
        e = errors[mode]
        print(f"| {mode} | {1e3 * med:.1f} | {1.0 / med:.2f} | {ratio} | {runners[mode][1]:.0f} | {100 * e[2]:.1f}% | "
              f"{e[0]:.1e} | {e[1]:.1e} | {100 * e[3]:.1f}% |")
    return times, errors


if __name__ == "__main__":
    main()  # pragma: no cover
