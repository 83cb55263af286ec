#!/usr/bin/env python3
"""
Benchmark multi-scale deformable attention: the compiled kernels of ``codetr._C`` against the
pure-PyTorch path (``ms_deform_attn_pytorch``, grid_sample), forward and forward+backward, at the
encoder shape of a 512x512 image (5 levels at strides 4..64: S = Lq = 21824, N=1, H=8, C=32, P=4)
and a decoder shape (Lq = 900 queries on the same value). On a GPU the CUDA kernel is timed too.

By default sampling locations follow the model: encoder queries sample around their own pixel
(offsets of up to 4 pixels on every level), decoder queries sample inside random boxes.
``--locations uniform`` draws them uniformly in [0, 1] instead (no locality: the worst case for caches).

    python3 tools/benchmark_ops.py                 # CPU (and CUDA when a GPU is visible)
    python3 tools/benchmark_ops.py --repeats 5 --threads 2 --device cpu --locations uniform
"""
import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
