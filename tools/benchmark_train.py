#!/usr/bin/env python3
"""What the collaborative hybrid assignment costs and buys: Co-DINO vs DINO, Co-Deformable-DETR vs Deformable-DETR,
Co-DAB-DETR vs DAB-DETR.

``--pair dino`` (default) compares Co-DINO with the DINO baseline (variants ``codino`` / ``dino``, config
configs/co_dino_r50.py); ``--pair deformable`` compares Co-Deformable-DETR with Deformable-DETR (variants
``codeformable`` / ``deformable``, config configs/co_deformable_detr_r50.py); ``--pair dab`` compares Co-DAB-DETR with
DAB-DETR (``codab`` / ``dab``, configs/co_dab_detr_r50.py). Co-DINO with other auxiliary heads: ``--config
configs/co_dino_r50_atss_fcos.py`` (timing, params, eval) and ``converge --aux-heads atss,fcos``. Below, "Co-DINO" / "DINO" stand for
the pair's collaborative model and its baseline.

Sub-commands (``all`` runs params, timing and eval; ``converge`` is separate because it trains):

- ``params``: parameter counts of the config's model: in training, and on the inference path (what remains
  without the collaborative branch, the positive-query projections and the denoising label embedding).
- ``timing``: one training iteration (forward + backward + AdamW step) of Co-DINO and of the same config with the
  collaborative branch removed (``model.collaborative = None``, ``num_co_heads = 0``), each in its own process:
  mean time over ``--iters`` iterations after one warm-up, and peak memory (CUDA: max allocated; CPU: the process'
  peak RSS). Printed with the Co-DINO / DINO ratios. ``--rounds R`` repeats the pair R times (alternating which
  variant goes first) and reports medians: on a shared CPU one process-to-process swing can reach 15-20%.
- ``eval``: eval forward time of Co-DINO with and without its auxiliary modules attached (same weights), and
  whether the outputs are identical.
- ``converge``: trains a small Co-DINO and the same model without the collaborative branch on the same
  synthetic images for the same iterations (same seed) and reports both COCO APs (pycocotools) on held-out
  synthetic images.

Examples::

    python tools/benchmark_train.py all --device cpu --size 512 --batch 2 --iters 2
    python tools/benchmark_train.py timing --device cpu --size 384 --batch 2 --iters 3 --rounds 3
    python tools/benchmark_train.py converge --iters 300
    python tools/benchmark_train.py timing --pair deformable --device cpu --size 384 --batch 2 --iters 2 --rounds 3
    python tools/benchmark_train.py converge --pair deformable --iters 150 --seed 1
    python tools/benchmark_train.py converge --pair dab --iters 300 --seed 0
    python tools/benchmark_train.py converge --aux-heads rcnn,atss,fcos --skip-baseline --iters 150 --seed 0
    python tools/benchmark_train.py timing --config configs/co_dino_r50_3heads.py --device cpu --size 256 --batch 1
"""
import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PAIRS = {  # pair -> (collaborative variant, baseline variant, default config)
    "dino": ("codino", "dino", os.path.join(CONFIGS, "co_dino_r50.py")),
    "deformable": ("codeformable", "deformable", os.path.join(CONFIGS, "co_deformable_detr_r50.py")),
    "dab": ("codab", "dab", os.path.join(CONFIGS, "co_dab_detr_r50.py")),
}
BASELINES = {base for _, base, _ in PAIRS.values()}
# training-only modules: the collaborative branch, the positive-query projections, DINO's denoising label embedding
INFERENCE_EXCLUDED = ("collaborative.", "query_head.transformer.aux_pos_trans", "query_head.label_embedding.",
                      "query_head.aux_pos_trans",
                      "query_head.transformer.pos_feats_", "query_head.transformer.head_pos_embed")


# ----------------------------------------------------------------------------------------------- helpers
def build_model(config, variant, device):
    cfg = LazyConfig.load(config)
    if variant in BASELINES:
        cfg.model.collaborative = None
        qh = cfg.model.query_head
        (qh if "num_co_heads" in qh else qh.transformer).num_co_heads = 0  # DAB-DETR: on the head
    model = instantiate(cfg.model).to(device)
    return model


def random_batch(batch, h, w, num_classes, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        n = 8
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.25, h * 0.25])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        out.append({"image": img, "instances": inst, "height": h, "width": w})
    return out


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_params(model):
    total = sum(p.numel() for p in model.parameters())
    inference = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(INFERENCE_EXCLUDED))
    return total, inference


# ----------------------------------------------------------------------------------------------- sub-commands
def cmd_params(args):
    co_name, base_name, _ = PAIRS[args.pair]
    model = build_model(args.config, co_name, "cpu")
    total, inference = count_params(model)
    base = build_model(args.config, base_name, "cpu")
    btotal, _ = count_params(base)
    res = {f"{co_name}_train_params": total, f"{co_name}_inference_params": inference, f"{base_name}_params": btotal}
    print(json.dumps(res))
    return res


def worker_timing(args):
    """Run in a child process: time training iterations of one variant."""
    torch.manual_seed(0)
    dev = args.device
    model = build_model(args.config, args.variant, dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    num_classes = model.query_head.num_classes
    batch = random_batch(args.batch, args.size, args.size, num_classes, seed=1)
    times = []
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with EventStorage():
        for it in range(args.iters + 1):
            _sync(dev)
            t0 = time.perf_counter()
            losses = model(batch)
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(dev)
            if it > 0:
                times.append(time.perf_counter() - t0)
            print(f"{args.variant} iteration {it}: {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    if dev.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print("RESULT " + json.dumps({"variant": args.variant, "iter_s": float(np.mean(times)), "peak_mib": peak,
                                  "num_losses": len(losses)}))


def _run_child(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "_timing_worker", "--variant", variant, "--config", args.config,
           "--device", args.device, "--size", str(args.size), "--batch", str(args.batch), "--iters", str(args.iters)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"timing worker for {variant} failed:\n{out.stderr[-4000:]}")


def cmd_timing(args):
    """``--rounds`` rounds, each timing both variants in fresh processes (alternating which goes first, so that
    drifting machine load does not favour one); reports per-variant medians and the per-round ratios."""
    co, base, _ = PAIRS[args.pair]
    rounds = []
    for r in range(args.rounds):
        order = (co, base) if r % 2 == 0 else (base, co)
        got = {v: _run_child(args, v) for v in order}
        rounds.append(got)
        print(f"round {r}: {co} {got[co]['iter_s']:.2f}s {base} {got[base]['iter_s']:.2f}s "
              f"ratio {got[co]['iter_s'] / got[base]['iter_s']:.3f} (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)
    co_t = [g[co]["iter_s"] for g in rounds]
    base_t = [g[base]["iter_s"] for g in rounds]
    ratios = [c / d for c, d in zip(co_t, base_t)]
    co_m = float(np.median([g[co]["peak_mib"] for g in rounds]))
    base_m = float(np.median([g[base]["peak_mib"] for g in rounds]))
    res = {
        "device": args.device, "size": args.size, "batch": args.batch, "iters": args.iters, "rounds": args.rounds,
        f"{co}_iter_s": float(np.median(co_t)), f"{base}_iter_s": float(np.median(base_t)),
        "iter_time_ratio": float(np.median(co_t) / np.median(base_t)),
        "round_ratios": [round(x, 3) for x in ratios],
        f"{co}_peak_mib": co_m, f"{base}_peak_mib": base_m, "peak_memory_ratio": co_m / base_m,
        "load_avg_1min_end": os.getloadavg()[0],
    }
    print(json.dumps(res))
    return res


def cmd_eval(args):
    torch.manual_seed(0)
    dev = args.device
    co = build_model(args.config, PAIRS[args.pair][0], dev).eval()
    bare = copy.deepcopy(co)
    bare.collaborative = None  # the auxiliary modules detached; positive-query projections are unused in eval
    batch = random_batch(1, args.size, args.size, co.query_head.num_classes, seed=2)
    for x in batch:
        x.pop("instances")
    res = {}
    outs = {}
    with torch.no_grad():
        for name, m in (("with_aux", co), ("without_aux", bare), ("with_aux_again", co), ("without_aux_again", bare)):
            m(batch)  # warm-up
            _sync(dev)
            t = []
            for _ in range(args.iters):
                _sync(dev)
                t0 = time.perf_counter()
                out = m(batch)
                _sync(dev)
                t.append(time.perf_counter() - t0)
            outs[name] = out[0]["instances"]
            res[name + "_s"] = float(np.median(t))
    a, b = outs["with_aux"], outs["without_aux"]
    res["identical_outputs"] = bool(
        torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
        and torch.equal(a.pred_classes, b.pred_classes)
    )
    res["eval_time_ratio"] = (res["with_aux_s"] + res["with_aux_again_s"]) / (res["without_aux_s"] + res["without_aux_again_s"])
    print(json.dumps(res))
    return res


# ----------------------------------------------------------------------------------------------- convergence
def synthetic_images(n, h, w, num_classes, seed, max_objects=6):
    """Coloured rectangles and ellipses (class = shape x colour) on noise; boxes XYXY."""
    rng = np.random.default_rng(seed)
    colors = np.array([[230, 40, 40], [40, 200, 40], [40, 80, 230], [230, 200, 40], [200, 40, 200], [40, 200, 200]])
    data = []
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        img = rng.integers(60, 120, size=(h, w, 3)).astype(np.uint8)
        boxes, classes = [], []
        for _ in range(rng.integers(1, max_objects + 1)):
            c = int(rng.integers(num_classes))
            bw, bh = rng.integers(12, w // 2), rng.integers(12, h // 2)
            x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            color = colors[c % len(colors)]
            if c // len(colors) == 0:
                img[y0 : y0 + bh, x0 : x0 + bw] = color
            else:
                cx, cy = x0 + bw / 2, y0 + bh / 2
                m = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1
                img[m] = color
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            classes.append(c)
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes, dtype=torch.long)
        data.append({"image": torch.from_numpy(img).permute(2, 0, 1).contiguous(), "instances": inst,
                     "height": h, "width": w, "image_id": len(data)})
    return data


def small_model(num_classes, collaborative, pair="dino", aux_heads=("rcnn", "atss")):
    """Co-DINO (pair "dino"), Co-Deformable-DETR ("deformable") or Co-DAB-DETR ("dab") with a small conv backbone
    (strides 8..32 + 1 extra level; DAB-DETR: its one stride-16 map, whose adapter pyramid gives the aux heads
    strides 8..128), width 128, 3+3 layers, 100 queries; ``collaborative=False``: the baseline. ``aux_heads``: the
    auxiliary heads in order, from "rcnn", "atss", "fcos", "retinanet" (Co-DINO / Co-DAB-DETR)."""
    from torch import nn

    from detectron2.modeling.backbone import Backbone

    from codetr.modeling import ChannelMapper, CoDETR, DETRCriterion, DETRPostProcessor, DINOHead, DINOTransformer
    from codetr.modeling.deformable_detr_head import DeformableDETRHead
    from codetr.modeling.deformable_transformer import DeformableDETRTransformer
    from codetr.modeling.atss import ATSSHead
    from codetr.modeling.adapter import MultiScaleAdapter
    from codetr.modeling.collaborative import CollaborativeBranch
    from codetr.modeling.dab_detr_head import DABDETRHead
    from codetr.modeling.dab_transformer import DABTransformer
    from codetr.modeling.dense_heads import FCOSAuxHead, RetinaNetAuxHead
    from codetr.modeling.neck import InputProjection
    from codetr.modeling.rcnn import RCNNBranch

    class SmallBackbone(Backbone):
        def __init__(self, width=64):
            super().__init__()
            chans, strides = [3, 32, width, width, width], [4, 2, 2, 2]
            self.stages = nn.ModuleList(
                nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, s, 1), nn.GroupNorm(8, chans[i + 1]), nn.ReLU(),
                              nn.Conv2d(chans[i + 1], chans[i + 1], 3, 1, 1), nn.GroupNorm(8, chans[i + 1]), nn.ReLU())
                if s == 2 else
                nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 4, 4), nn.GroupNorm(8, chans[i + 1]), nn.ReLU())
                for i, s in enumerate(strides)
            )

        def forward(self, x):
            out = {}
            for i, st in enumerate(self.stages):
                x = st(x)
                out[f"c{i + 2}"] = x
            return out

    C = 128
    strides = (8, 16, 32, 64)
    neck = ChannelMapper(["c3", "c4", "c5"], [64, 64, 64], C, num_extra=1, kernel_size=1, num_groups=32)
    num_co = len(aux_heads) if collaborative else 0
    if pair != "dino" and tuple(aux_heads) != ("rcnn", "atss"):
        raise ValueError(f"--aux-heads is for --pair dino and dab; {pair} uses rcnn,atss")
    dims = dict(embed_dim=C, num_heads=8, num_levels=4, num_points=4, num_encoder_layers=3, num_decoder_layers=3,
                ffn_dim=512, num_co_heads=num_co)
    if pair == "dab":
        neck = InputProjection("c4", 64, C)
        transformer = DABTransformer(embed_dim=C, num_heads=8, num_encoder_layers=3, num_decoder_layers=3, ffn_dim=512,
                                     num_queries=100)
        head = DABDETRHead(transformer=transformer, num_classes=num_classes, num_co_heads=num_co)
        post = DETRPostProcessor(max_per_img=100, soft_nms=False)
    elif pair == "dino":
        transformer = DINOTransformer(num_queries=100, **dims)
        head = DINOHead(transformer=transformer, num_classes=num_classes, num_dn_queries=30)
        post = DETRPostProcessor(max_per_img=100)
    else:
        crit = DETRCriterion(num_classes=num_classes, cls_loss="focal", loss_cls_weight=2.0, binary_encoder_labels=True)
        head = DeformableDETRHead(transformer=DeformableDETRTransformer(**dims), num_classes=num_classes,
                                  criterion=crit, num_queries=100)
        post = DETRPostProcessor(max_per_img=100, soft_nms=False)
    collab = None
    if collaborative:
        w = 3 * 2.0  # num_decoder_layers * lambda_2
        aux_strides = strides + (128,)
        feats = pair == "deformable"
        make = {
            "rcnn": lambda i: RCNNBranch(num_classes=num_classes, in_channels=C, strides=aux_strides, num_roi_levels=4,
                                         roi_finest_scale=112, fc_dim=256, loss_rpn_cls_weight=w, loss_rpn_bbox_weight=w,
                                         loss_cls_weight=w, loss_bbox_weight=10 * w, return_feats=feats, head_index=i),
            "atss": lambda i: ATSSHead(num_classes=num_classes, in_channels=C, feat_channels=C, strides=aux_strides,
                                       loss_cls_weight=w, loss_bbox_weight=2 * w, loss_centerness_weight=w,
                                       return_feats=feats, head_index=i),
            "fcos": lambda i: FCOSAuxHead(num_classes=num_classes, in_channels=C, strides=aux_strides, loss_cls_weight=w,
                                          loss_bbox_weight=w, loss_centerness_weight=w, head_index=i),
            "retinanet": lambda i: RetinaNetAuxHead(num_classes=num_classes, in_channels=C, strides=aux_strides,
                                                    loss_cls_weight=w, loss_bbox_weight=w, head_index=i),
        }
        unknown = sorted(set(aux_heads) - set(make))
        if unknown:
            raise ValueError(f"unknown auxiliary heads {unknown}; known: {sorted(make)}")
        # DAB-DETR: a pyramid from its one stride-16 map; otherwise the identity path on the encoder's strides
        # 8..64 + one stride-2 level. Built before / after the heads as the measured runs of docs/collaborative.md
        # were (the order in which the initialisation draws its random numbers).
        if pair == "dab":
            adapter = MultiScaleAdapter((16,), aux_strides, embed_dim=C)
        heads = [make[name](i) for i, name in enumerate(aux_heads)]
        if pair != "dab":
            adapter = MultiScaleAdapter(strides, aux_strides, embed_dim=C)
        collab = CollaborativeBranch(aux_heads=heads, num_classes=num_classes, adapter=adapter)
    return CoDETR(backbone=SmallBackbone(64), neck=neck, query_head=head, pixel_mean=[123.675, 116.28, 103.53],
                  pixel_std=[58.395, 57.12, 57.375], size_divisibility=32, collaborative=collab,
                  postprocessor=post)


def coco_ap(model, data):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    model.eval()
    with torch.no_grad():
        for x in data:
            inp = {k: v for k, v in x.items() if k != "instances"}
            out = model([inp])[0]["instances"]
            images.append({"id": x["image_id"], "height": x["height"], "width": x["width"]})
            for b, c in zip(x["instances"].gt_boxes.tensor.tolist(), x["instances"].gt_classes.tolist()):
                anns.append({"id": len(anns) + 1, "image_id": x["image_id"], "category_id": c, "iscrowd": 0,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
            for b, s, c in zip(out.pred_boxes.tensor.tolist(), out.scores.tolist(), out.pred_classes.tolist()):
                dets.append({"image_id": x["image_id"], "category_id": c, "score": s,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": i} for i in range(model.query_head.num_classes)]}
    gt.createIndex()
    if not dets:
        return 0.0
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]) * 100


def cmd_converge(args):
    num_classes = 6
    h, w = 160, 224
    train = synthetic_images(args.num_train, h, w, num_classes, seed=0)
    val = synthetic_images(args.num_val, h, w, num_classes, seed=1)
    aux_heads = tuple(args.aux_heads.split(","))
    res = {"iters": args.iters, "batch": args.batch, "num_train": args.num_train, "num_val": args.num_val,
           "seed": args.seed, "lr": args.lr, "aux_heads": list(aux_heads)}
    co, base, _ = PAIRS[args.pair]
    runs = ((co, True),) if args.skip_baseline else ((co, True), (base, False))
    for name, collab in runs:
        torch.manual_seed(args.seed)  # same initial weights (where shared) for both models
        model = small_model(num_classes, collab, args.pair, aux_heads).to(args.device)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=1e-4)
        rng = np.random.default_rng(args.seed)  # same batches for both models
        t0 = time.perf_counter()
        with EventStorage():
            for it in range(args.iters):
                idx = rng.choice(len(train), args.batch, replace=False)
                losses = model([train[i] for i in idx])
                loss = sum(losses.values())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                opt.step()
        res[f"{name}_train_s"] = time.perf_counter() - t0
        res[f"{name}_AP"] = coco_ap(model, val)
        res[f"{name}_AP_train"] = coco_ap(model, train[: args.num_val])
        print(json.dumps({k: v for k, v in res.items() if k.startswith(name)}), flush=True)
    print(json.dumps(res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["all", "params", "timing", "eval", "converge", "_timing_worker"])
    p.add_argument("--pair", default="dino", choices=sorted(PAIRS),
                   help="dino: Co-DINO vs DINO; deformable: Co-Deformable-DETR vs Deformable-DETR")
    p.add_argument("--config", default=None, help="config of the collaborative model (default: the pair's R50 config)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=512, help="square training image size for timing/eval")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="timing: rounds of (Co-DINO, DINO) processes; medians are reported (use 3+ on a noisy machine)")
    p.add_argument("--variant", default="codino", choices=sorted({v for a, b, _ in PAIRS.values() for v in (a, b)}))
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-val", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0, help="converge: initialisation and batch-order seed (the data is fixed)")
    p.add_argument("--aux-heads", default="rcnn,atss", help="converge: the auxiliary heads, in order (rcnn, atss, fcos, retinanet)")
    p.add_argument("--skip-baseline", action="store_true", help="converge: train only the collaborative model")
    args = p.parse_args(argv)
    if args.config is None:
        args.config = PAIRS[args.pair][2]
    if args.command == "_timing_worker":
        return worker_timing(args)
    if args.command == "converge":
        return cmd_converge(args)
    out = {}
    if args.command in ("all", "params"):
        out.update(cmd_params(args))
    if args.command in ("all", "timing"):
        out.update(cmd_timing(args))
    if args.command in ("all", "eval"):
        out.update(cmd_eval(args))
    if args.command == "all":
        print("SUMMARY " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
