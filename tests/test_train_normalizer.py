"""Under a 2-process gloo group the loss normalisers (numbers of positives) are averaged over processes,
as the official ``reduce_mean`` / ``sync_cls_avg_factor`` do, so that every process divides by the same number."""
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# per rank: number of positives on this process, and per-query weights / boxes for a one-layer loss
COUNTS = {0: 3, 1: 8}


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=rank)
    try:
        from codetr.modeling.criterion import DETRCriterion
        from codetr.modeling.losses import all_reduce_normalizer

        n = COUNTS[rank]
        res = {
            "normalizer_int": float(all_reduce_normalizer(n)),
            "normalizer_tensor": float(all_reduce_normalizer(torch.tensor(n))),
            "normalizer_small": float(all_reduce_normalizer(0.2 * rank)),  # mean 0.1 -> clamped to 1
        }
        # one layer of the query-head loss: L1 term divided by the all-reduced number of positives
        g = torch.Generator().manual_seed(rank)
        B, N, K = 2, 6, 3
        boxes = torch.rand(B, N, 4, generator=g)
        target = torch.rand(B, N, 4, generator=g)
        box_w = (torch.rand(B, N, generator=g) > 0.5).float()
        labels = torch.full((B, N), K, dtype=torch.int64)
        criterion = DETRCriterion(num_classes=K, cls_loss="focal", loss_cls_weight=1.0, loss_bbox_weight=1.0, loss_giou_weight=1.0)
        _, loss_bbox, _ = criterion.loss_from_targets(
            torch.zeros(B, N, K), boxes, labels, torch.ones(B, N), target, box_w, n
        )
        res["loss_bbox"] = float(loss_bbox)
        res["l1_sum"] = float(((boxes.double() - target.double()).abs().sum(-1) * box_w.double()).sum())
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_loss_normalisers_are_all_reduced(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    mean = (COUNTS[0] + COUNTS[1]) / 2  # 5.5, not the per-process 3 or 8
    for r in range(2):
        assert res[r]["normalizer_int"] == mean
        assert res[r]["normalizer_tensor"] == mean
        assert res[r]["normalizer_small"] == 1.0
        # the process's own L1 sum over the *global* mean count (float64 reference)
        assert abs(res[r]["loss_bbox"] - res[r]["l1_sum"] / mean) < 1e-5 * max(1.0, res[r]["l1_sum"])
