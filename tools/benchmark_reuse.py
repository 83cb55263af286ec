#!/usr/bin/env python3
"""Where the project keeps a hand-written version of something a library has: the figure behind each choice.

- ``inbox``: ATSS's "candidate centre inside its GT" test on the candidates only (C x G x 4) vs detectron2's
  ``pairwise_point_box_distance`` over every anchor (A x G x 4), then gathered at the candidates. Same result
  (checked), time per call (single thread, alternating) and the size of the intermediate.

    OMP_NUM_THREADS=1 python tools/benchmark_reuse.py inbox --anchors 89000 --gts 50 --rounds 2

- ``convgn``: the conv + GroupNorm + ReLU block as detectron2's ``Conv2d(norm=, activation=)``
  (``codetr.modeling.neck.conv_gn``, what the neck and the ATSS towers use) vs the hand-written module it replaced
  (``nn.Conv2d`` + ``nn.GroupNorm`` submodules, written out below), same weights: outputs and gradients compared,
  forward + backward time per call (single thread, alternating rounds).

    OMP_NUM_THREADS=1 python tools/benchmark_reuse.py convgn --size 48 --batch 2 --iters 10 --rounds 3
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.structures import Boxes, pairwise_point_box_distance  # noqa: E402

from codetr.modeling.neck import conv_gn  # noqa: E402


def cmd_inbox(args):
    g = torch.Generator().manual_seed(0)
    A, G, C = args.anchors, args.gts, args.candidates
    ctr = torch.rand(A, 2, generator=g) * 1000
    xy = torch.rand(G, 2, generator=g) * 800
    gt = torch.cat([xy, xy + 10 + torch.rand(G, 2, generator=g) * 200], 1)
    cand = torch.randint(0, A, (C, G), generator=g)
    gt_idx = torch.arange(G)[None].expand(C, G)

    def candidates_only():
        c = ctr[cand]
        return torch.cat([c - gt[None, :, :2], gt[None, :, 2:] - c], -1).min(-1).values

    def library():
        return pairwise_point_box_distance(ctr, Boxes(gt))[cand, gt_idx].min(-1).values

    if not torch.equal(candidates_only(), library()):
        raise SystemExit("the two versions differ")
    times = {"candidates_only": [], "pairwise_point_box_distance": []}
    for _ in range(args.rounds):
        for name, f in (("candidates_only", candidates_only), ("pairwise_point_box_distance", library)):
            t0 = time.perf_counter()
            for _ in range(args.iters):
                f()
            times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
    for name, t in times.items():
        print(f"{name}: {min(t):.3f} ms per call (best of {args.rounds} rounds)")
    print(f"intermediate: candidates only {C * G * 4 * 4 / 2**20:.3f} MiB, all anchors {A * G * 4 * 4 / 2**20:.1f} MiB")
    print(f"load average (1, 5, 15 min): {os.getloadavg()}")


class _HandConvGN(torch.nn.Module):
    """The replaced hand-written block: Conv2d (no bias) -> GroupNorm -> activation, as submodules."""

    def __init__(self, cin, cout, k, groups, activation):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.gn = torch.nn.GroupNorm(groups, cout)
        self.activation = activation

    def forward(self, x):
        return self.activation(self.gn(self.conv(x)))


def cmd_convgn(args):
    relu = torch.nn.functional.relu
    lib = conv_gn(args.channels, args.channels, 3, num_groups=32, activation=relu)
    hand = _HandConvGN(args.channels, args.channels, 3, 32, relu)
    hand.load_state_dict({"conv.weight": lib.weight, "gn.weight": lib.norm.weight, "gn.bias": lib.norm.bias})
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(0))

    def step(m):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().sum().backward()
        return out, xi.grad

    (a, ga), (b, gb) = step(lib), step(hand)
    if not (torch.equal(a, b) and torch.equal(ga, gb)):
        raise SystemExit("the two versions differ")
    times = {"detectron2 Conv2d(norm, activation)": [], "hand-written conv + gn": []}
    for r in range(args.rounds):
        order = list(zip(times, (lib, hand)))
        for name, m in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step(m)
            times[name].append((time.perf_counter() - t0) / args.iters * 1e3)
    for name, t in times.items():
        print(f"{name}: {min(t):.2f} ms per forward + backward (best of {args.rounds} rounds; all {[round(v, 2) for v in t]})")
    print(f"input {tuple(x.shape)}, outputs and input gradients equal: True; load average (1, 5, 15 min): {os.getloadavg()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["inbox", "convgn"])
    p.add_argument("--anchors", type=int, default=89000, help="anchors (Co-DINO at 800x1333, strides 4..128: ~89k)")
    p.add_argument("--gts", type=int, default=50)
    p.add_argument("--candidates", type=int, default=54, help="candidates per GT (top 9 x 6 levels)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=48, help="convgn: map side (the stride-8 map of a 384 px image)")
    p.add_argument("--batch", type=int, default=2, help="convgn: batch")
    p.add_argument("--channels", type=int, default=256, help="convgn: channels")
    args = p.parse_args(argv)
    {"inbox": cmd_inbox, "convgn": cmd_convgn}[args.command](args)


if __name__ == "__main__":
    main()
