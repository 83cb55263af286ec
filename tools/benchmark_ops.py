#!/usr/bin/env python3
"""
Benchmark the compiled ops of ``codetr._C``.

``--op ms_deform_attn`` (default): multi-scale deformable attention, the compiled kernels of ``codetr._C`` against the
pure-PyTorch path (``ms_deform_attn_pytorch``, grid_sample), forward and forward+backward, at the
encoder shape of a 512x512 image (5 levels at strides 4..64: S = Lq = 21824, N=1, H=8, C=32, P=4)
and a decoder shape (Lq = 900 queries on the same value). On a GPU the CUDA kernel is timed too.

By default sampling locations follow the model: encoder queries sample around their own pixel
(offsets of up to 4 pixels on every level), decoder queries sample inside random boxes.
``--locations uniform`` draws them uniformly in [0, 1] instead (no locality: the worst case for caches).

    python3 tools/benchmark_ops.py                 # CPU (and CUDA when a GPU is visible)
    python3 tools/benchmark_ops.py --repeats 5 --threads 2 --device cpu --locations uniform

``--op roi_align``: the CPU RoIAlign of ``codetr.layers.roi_align`` against torchvision's, through detectron2's
``ROIPooler`` as Co-DINO's Faster R-CNN branch uses it (ROIAlignV2, adaptive sampling, 7x7, canonical box 56 at
level 2) on the Co-DINO shape: 5 maps (2, 256, 96/48/24/12/6 squared) of a 2-image 384x384 batch, 512 boxes per
image (width and height log-uniform in [16, 300] px, inside the image), 1024 RoIs spread over the levels by the
pooler. The same pooler is timed with detectron2's level poolers (torchvision) and with ``codetr``'s
``ROIAlign`` swapped in (as ``RCNNBranch`` does); the backward is the input gradient of the 5 maps.

    python3 tools/benchmark_ops.py --op roi_align --threads 2 --repeats 5

``--op soft_nms``: class-aware linear soft-NMS (IoU 0.8, min score 1e-3) per image, ``codetr._C``'s kernel (through
``codetr.modeling.soft_nms.batched_soft_nms``) against the previous Python loop over the picks (kept in
``tests/test_soft_nms.py`` as the reference), alternating, on DETR-like candidates (clusters of near-duplicate
boxes, 80 classes): 900 candidates (R50: top 300 kept afterwards) and 1500 (ViT-L: top 1000); on a GPU (when
visible) the kernel's time on CUDA too, synchronised. It also checks that both give the same detections.

    python3 tools/benchmark_ops.py --op soft_nms --threads 1 --repeats 5
"""
import argparse
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from codetr.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch  # noqa: E402


def make_inputs(kind, device, dtype, image_size=512, strides=(4, 8, 16, 32, 64), N=1, H=8, C=32, P=4,
                num_queries=900, seed=0, locations="model"):
    g = torch.Generator().manual_seed(seed)
    hw = [(-(-image_size // s), -(-image_size // s)) for s in strides]
    shapes = torch.tensor(hw, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S, L = int(sizes.sum()), len(hw)
    value = torch.randn(N, S, H, C, generator=g)
    wh = shapes.flip(-1).to(torch.float32)  # (L, 2) as (w, h)
    if kind == "encoder":
        # Each query sits at the centre of its own pixel; offsets of up to 4 pixels on every level.
        ref = torch.cat([
            torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h, indexing="xy"), -1)
            .reshape(-1, 2) for h, w in hw
        ])
        Lq = S
        ref = ref.view(1, Lq, 1, 1, 1, 2).expand(N, Lq, H, L, P, 2)
        offsets = (torch.rand(N, Lq, H, L, P, 2, generator=g) * 8 - 4) / wh.view(1, 1, 1, L, 1, 2)
        loc = ref + offsets
    else:
        Lq = num_queries
        centre = torch.rand(N, Lq, 1, 1, 1, 2, generator=g)
        size = torch.rand(N, Lq, 1, 1, 1, 2, generator=g) * 0.45 + 0.05
        loc = centre + (torch.rand(N, Lq, H, L, P, 2, generator=g) - 0.5) * size
    if locations == "uniform":
        loc = torch.rand(loc.shape, generator=g)
    attn = torch.rand(N, Lq, H, L * P, generator=g).softmax(-1).view(N, Lq, H, L, P)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), shapes.to(device), starts.to(device), loc.contiguous().to(**to), attn.to(**to)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, inputs, backward, repeats, warmup, device):
    """Median wall-clock seconds and median process CPU seconds (all threads) of one call."""
    walls, cpus = [], []
    for i in range(warmup + repeats):
        args = [t.detach().requires_grad_(backward and t.is_floating_point()) for t in inputs]
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        _sync(device)
        if i >= warmup:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def make_roi_inputs(seed=0, image_size=384, batch=2, channels=256, strides=(4, 8, 16, 32, 64), boxes_per_image=512,
                    min_size=16.0, max_size=300.0, dtype=torch.float32):
    """Feature maps (list of (B, C, h, w)) and per-image Boxes as in Co-DINO's RoI branch."""
    from detectron2.structures import Boxes

    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, channels, image_size // s, image_size // s, generator=g, dtype=dtype) for s in strides]
    boxes = []
    for _ in range(batch):
        # Width and height log-uniform in [min_size, max_size] (as many boxes per octave of size).
        lo, hi = math.log(min_size), math.log(max_size)
        wh = torch.exp(torch.rand(boxes_per_image, 2, generator=g) * (hi - lo) + lo)
        xy = torch.rand(boxes_per_image, 2, generator=g) * (image_size - wh)
        boxes.append(Boxes(torch.cat([xy, xy + wh], 1).to(dtype)))
    return feats, boxes


def make_poolers(strides=(4, 8, 16, 32, 64), output_size=7, canonical_box_size=56):
    """detectron2's ROIPooler as in RCNNBranch, and a copy whose level poolers are codetr's ROIAlign."""
    from detectron2.modeling.poolers import ROIPooler

    from codetr.layers import ROIAlign

    def build():
        return ROIPooler(output_size=output_size, scales=[1.0 / s for s in strides], sampling_ratio=0,
                         pooler_type="ROIAlignV2", canonical_box_size=canonical_box_size,
                         canonical_level=int(math.log2(strides[0])))

    original, patched = build(), build()
    for i, p in enumerate(patched.level_poolers):
        patched.level_poolers[i] = ROIAlign(p.output_size, p.spatial_scale, p.sampling_ratio, p.aligned)
    return original, patched


def time_pooler(pooler, feats, boxes, repeats, warmup):
    """Median wall / process-CPU seconds of the forward and of the backward (into the maps) of one call."""
    fw, fc, bw, bc = [], [], [], []
    for i in range(warmup + repeats):
        xs = [f.detach().requires_grad_(True) for f in feats]
        t0, c0 = time.perf_counter(), time.process_time()
        out = pooler(xs, boxes)
        t1, c1 = time.perf_counter(), time.process_time()
        out.backward(torch.ones_like(out))
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            fw.append(t1 - t0)
            fc.append(c1 - c0)
            bw.append(t2 - t1)
            bc.append(c2 - c1)
    med = statistics.median
    return (med(fw), med(fc)), (med(bw), med(bc)), (med([a + b for a, b in zip(fw, bw)]), med([a + b for a, b in zip(fc, bc)]))


def main_roi_align(args):
    from detectron2.modeling.poolers import assign_boxes_to_levels

    dtype = getattr(torch, args.dtype)
    feats, boxes = make_roi_inputs(dtype=dtype)
    original, patched = make_poolers()
    levels = assign_boxes_to_levels(boxes, original.min_level, original.max_level, original.canonical_box_size,
                                    original.canonical_level)
    print(f"maps {[tuple(f.shape) for f in feats]}, {sum(len(b) for b in boxes)} RoIs, "
          f"per level {torch.bincount(levels, minlength=len(feats)).tolist()}, dtype {args.dtype}, "
          f"median of {args.repeats} runs after {args.warmup} warm-up")
    with torch.no_grad():
        same = torch.equal(original(feats, boxes), patched(feats, boxes))
    print(f"pooled features bitwise equal: {same}")
    print("wall: median wall-clock seconds; cpu: median process CPU seconds summed over threads")
    header = f"{'pass':8} {'torchvision wall':>16} {'codetr wall':>11} {'ratio':>6} {'torchvision cpu':>15} {'codetr cpu':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    tv = time_pooler(original, feats, boxes, args.repeats, args.warmup)
    ours = time_pooler(patched, feats, boxes, args.repeats, args.warmup)
    for name, (tw, tc), (ow, oc) in zip(("forward", "backward", "total"), tv, ours):
        print(f"{name:8} {tw:16.4f} {ow:11.4f} {tw / ow:5.2f}x {tc:15.4f} {oc:10.4f} {tc / max(oc, 1e-9):5.2f}x", flush=True)


def main_soft_nms(args):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_soft_nms import detr_candidates, reference_soft_nms

    from codetr.modeling.soft_nms import batched_soft_nms

    devices = ["cpu"] + (["cuda"] if args.device in ("cuda", "all") and torch.cuda.is_available() else [])
    print(f"median of {args.repeats} alternating runs after {args.warmup} warm-up; ms per image")
    print(f"{'candidates':>10} {'kept':>5} {'loop cpu':>9} {'kernel cpu':>10} {'ratio':>7}"
          + ("".join(f" {'loop ' + d:>10} {'kernel ' + d:>11}" for d in devices[1:])))
    for n, top in ((900, 300), (1500, 1000)):
        boxes, scores, labels = detr_candidates(n, 80, seed=n)
        keep, new = batched_soft_nms(boxes, scores, labels)
        ref_keep, ref_new = reference_soft_nms(boxes, scores, labels)
        if not (torch.equal(keep, ref_keep) and torch.equal(new, ref_new)):
            sys.exit(f"soft-NMS kernel and loop differ at {n} candidates")
        row = f"{n:10d} {min(top, len(keep)):5d}"
        times = {}
        for device in devices:
            b, s, l = boxes.to(device), scores.to(device), labels.to(device)

            def timed(fn):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(b, s, l)
                if device == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            loop, kernel = [], []
            for i in range(args.warmup + args.repeats):
                t_loop, t_kernel = timed(reference_soft_nms), timed(batched_soft_nms)
                if i >= args.warmup:
                    loop.append(t_loop)
                    kernel.append(t_kernel)
            times[device] = (statistics.median(loop) * 1e3, statistics.median(kernel) * 1e3)
        lc, kc = times["cpu"]
        row += f" {lc:9.2f} {kc:10.3f} {lc / kc:6.1f}x"
        for d in devices[1:]:
            row += f" {times[d][0]:10.2f} {times[d][1]:11.3f}"
        print(row, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["ms_deform_attn", "roi_align", "soft_nms"], default="ms_deform_attn",
                        help="the op to benchmark (roi_align: CPU only; --device/--shapes/--locations do not apply)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="cpu, cuda, or all available (default)")
    parser.add_argument("--shapes", choices=["encoder", "decoder", "both"], default="both")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--locations", choices=["model", "uniform"], default="model",
                        help="sampling locations: around each query as in the model (default), or uniform in [0, 1]")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    try:
        from codetr import _C
    except ImportError as e:
        sys.exit(f"codetr._C is not built ({e}); build it with `python3 setup.py build_ext --inplace`")
    single = {"soft_nms": ("soft_nms", "soft-NMS kernel", main_soft_nms),
              "roi_align": ("roi_align_forward", "RoIAlign kernels", main_roi_align)}
    if args.op in single:
        symbol, what, run = single[args.op]
        if not hasattr(_C, symbol):
            sys.exit(f"codetr._C has no {what}; rebuild it with `python3 setup.py build_ext --inplace`")
        print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs visible, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")
        if hasattr(os, "getloadavg"):
            print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
        run(args)
        if hasattr(os, "getloadavg"):
            print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
        return
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        if not _C.with_cuda():
            print("note: codetr._C was built without CUDA; skipping the CUDA timings")
        else:
            devices.append(torch.device("cuda"))
    elif args.device == "cuda":
        sys.exit("no GPU visible")

    print(f"machine: {_cpu_name()}, {os.cpu_count()} CPUs visible, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        print("load average at start: %.2f %.2f %.2f" % os.getloadavg())
    print(f"dtype {args.dtype}, locations {args.locations}, median of {args.repeats} runs after {args.warmup} warm-up")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    dtype = getattr(torch, args.dtype)
    kinds = ["encoder", "decoder"] if args.shapes == "both" else [args.shapes]
    print("wall: median wall-clock seconds; cpu: median process CPU seconds summed over threads (robust to other load)")
    header = (f"{'device':6} {'shape':8} {'Lq':>6} {'S':>6} {'pass':8} {'kernel wall':>11} {'pytorch wall':>12} {'ratio':>6}"
              f" {'kernel cpu':>10} {'pytorch cpu':>11} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for device in devices:
        for kind in kinds:
            inputs = make_inputs(kind, device, dtype, locations=args.locations)
            Lq, S = inputs[3].shape[1], inputs[0].shape[1]
            for backward in (False, True):
                t_k, c_k = time_fn(ms_deform_attn, inputs, backward, args.repeats, args.warmup, device)
                t_p, c_p = time_fn(ms_deform_attn_pytorch, inputs, backward, args.repeats, args.warmup, device)
                name = "fwd+bwd" if backward else "forward"
                print(f"{device.type:6} {kind:8} {Lq:6d} {S:6d} {name:8} {t_k:11.4f} {t_p:12.4f} {t_p / t_k:5.1f}x"
                      f" {c_k:10.4f} {c_p:11.4f} {c_p / max(c_k, 1e-9):5.1f}x", flush=True)
    if hasattr(os, "getloadavg"):
        print("load average at end: %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
