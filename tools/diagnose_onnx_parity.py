#!/usr/bin/env python
"""Where ONNX Runtime and PyTorch eager part for a DINO / Co-DINO model: the outputs before any top-k, compared.

Example::

    python tools/diagnose_onnx_parity.py --config-file configs/co_dino_r50.py --size 800 1344

Exports (ONNX, standard ops, static shapes) a graph returning the intermediate results of the one-to-one head --
the encoder memory, every encoder token's proposal score (max class logit), the K selected proposals, the last
decoder layer's per-query logits and boxes -- runs it in ONNX Runtime (CPU) and the same computation eager (the
compiled deformable-attention kernels) on one random uint8 image, and prints:

- the largest differences of the memory and of the proposal scores (every token: no selection involved);
- whether both select the same K proposals in the same order, and how close the scores at adjacent ranks are;
- the per-query outputs compared query by query, then with the queries paired by the encoder token they came from;
- eager re-run with ONNX Runtime's proposal order forced: then the per-query outputs differ only by numerics.

DINO pairs the proposal of rank i with the learned content query i, so two near-tied proposal scores that swap
order between runtimes give those queries other content queries, and other outputs: a property of the model, not a
wrong op. Random weights (``--checkpoint ''``) have many near ties.
"""
import argparse
import os
import sys
import tempfile

import torch
from torch import nn

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate

from codetr.checkpoint import CoDETRCheckpointer
from codetr.export import set_deform_attn_impl


class HeadInternals(nn.Module):
    """``forward(images (1, 3, H, W) uint8)`` -> memory (1, S, C), proposal scores (1, S), selected proposals
    (1, K, 4) cxcywh, logits (1, K, num_classes), boxes (1, K, 4) normalised cxcywh; with ``order`` (K,) given,
    the proposals of those encoder tokens are taken instead of the top K."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, order=None):
        m = self.model
        head = m.query_head
        B, _, H, W = images.shape
        x = (images.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std
        masks = torch.zeros(B, H, W, dtype=torch.bool, device=x.device)
        sizes = torch.stack([torch.scalar_tensor(H), torch.scalar_tensor(W)]).to(x.device).expand(B, 2)
        enc_ctx = head.encode(m.neck(m.backbone(x)), masks, sizes)
        enc_logits, unact = head.transformer.encoder_proposals(enc_ctx, head.cls_branches[-1], head.reg_branches[-1])
        if order is None:
            query, reference, _, _ = head.transformer.select_queries(enc_ctx, head.cls_branches[-1], head.reg_branches[-1])
        else:
            reference = torch.gather(unact, 1, order[None, :, None].expand(B, -1, 4)).sigmoid()
            query = head.transformer.query_embed.weight[: order.numel()][None].expand(B, -1, -1)
        hidden, refs = head.decode(enc_ctx, query, reference)
        last = hidden.shape[0] - 1
        logits, boxes = head.predict_layer(last, hidden[last], refs[last])
        return enc_ctx["memory"], enc_logits.max(-1)[0], reference, logits, boxes


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Example::")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/co_dino_r50.py", metavar="FILE")
    parser.add_argument("--checkpoint", default="", help="weights ('' = the config's random initialisation, seed 0)")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1344), metavar=("H", "W"))
    parser.add_argument("--onnx", help="reuse / write the diagnostic graph here (default: a temporary file)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides key=value")
    return parser


@torch.no_grad()
def main(argv=None):
    import onnxruntime as ort

    args = get_parser().parse_args(argv)
    torch.manual_seed(0)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model).eval()
    if args.checkpoint:
        CoDETRCheckpointer(model).load(args.checkpoint)
    if not hasattr(model.query_head.transformer, "query_embed"):
        raise ValueError("this diagnosis is for DINO-style heads (learned content queries + selected proposals)")
    net = HeadInternals(model).eval()
    H, W = args.size
    img = torch.randint(0, 256, (1, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = args.onnx or os.path.join(tempfile.mkdtemp(prefix="codetr_diag_"), "internals.onnx")
    if not os.path.exists(path):
        set_deform_attn_impl(model, "pytorch")
        torch.onnx.export(net, (img,), None, dynamo=True, input_names=["images"], opset_version=18).save(path)
        set_deform_attn_impl(model, "auto")
    got = [torch.from_numpy(a) for a in ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": img.numpy()})]
    ref = net(img)
    for name, a, b in zip(["memory", "proposal scores", "selected proposals", "logits", "boxes"], got, ref):
        print(f"{name} {tuple(a.shape)}: max |ONNX - eager| {float((a - b).abs().max()):.2e}")
    K = got[2].shape[1]
    order_o, order_e = got[1][0].topk(K)[1], ref[1][0].topk(K)[1]
    srt = ref[1][0].sort(descending=True)[0][: K + 1]
    gaps = srt[:-1] - srt[1:]
    print(f"selected proposals: {len(set(order_o.tolist()) & set(order_e.tolist()))}/{K} the same, {int((order_o == order_e).sum())}/{K} "
          f"at the same rank; eager's adjacent-rank score gaps in the top {K + 1}: {int((gaps < 1e-4).sum())} below 1e-4, "
          f"{int((gaps == 0).sum())} exact ties")
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    print(f"query by query: max |logit| {float((got[3] - ref[3]).abs().max()):.2e}, max |sigmoid| "
          f"{float((got[3].sigmoid() - ref[3].sigmoid()).abs().max()):.2e}")
    rank_o = {int(t): j for j, t in enumerate(order_o)}
    pairs = [(i, rank_o[int(t)]) for i, t in enumerate(order_e) if int(t) in rank_o]
    ie, io = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    print(f"queries paired by encoder token ({len(pairs)}): max |logit| {float((got[3][0][io] - ref[3][0][ie]).abs().max()):.2e}, "
          f"max |sigmoid| {float((got[3][0][io].sigmoid() - ref[3][0][ie].sigmoid()).abs().max()):.2e}, "
          f"max |box| {float(((got[4][0][io] - ref[4][0][ie]) * scale).abs().max()):.2e} px")
    forced = net(img, order_o)
    print(f"eager with ONNX Runtime's proposal order: max |logit| {float((forced[3] - got[3]).abs().max()):.2e}, "
          f"max |sigmoid| {float((forced[3].sigmoid() - got[3].sigmoid()).abs().max()):.2e}, "
          f"max |box| {float(((forced[4] - got[4]) * scale).abs().max()):.2e} px")


if __name__ == "__main__":
    main()  # pragma: no cover
