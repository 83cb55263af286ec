#!/usr/bin/env python3
"""Convert an official Co-DETR (mmdetection) checkpoint into this project's format.

    python tools/convert_official_checkpoint.py co_dino_vit_large_coco.pth out.pth --config-file configs/co_dino_vitl.py

The model of ``--config-file`` is built (on CPU, randomly initialised) and every converted tensor is checked against
it: an official key that maps to nothing, a model key the checkpoint does not provide, or a shape mismatch is an
error (exit status 1) unless ``--allow-unmapped`` is given. The output holds ``{"model": state_dict}`` and loads with
Detectron2's checkpointer (``train.init_checkpoint=out.pth``). Our checkpointer also converts official files
directly on load, so this tool is only needed to store converted weights.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))


def build_target(config_file, opts):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, opts)
    model = instantiate(cfg.model)
    return model.state_dict()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="official checkpoint (.pth with 'state_dict' and 'meta')")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument("--config-file", help="our LazyConfig whose model the weights are checked against")
    parser.add_argument("--no-check", action="store_true",
                        help="convert without a model to check against (no --config-file); keys are only renamed")
    parser.add_argument("--allow-unmapped", action="store_true",
                        help="write the result even if keys are unmapped/missing or shapes differ (they are listed)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read a checkpoint whose metadata needs full unpickling (only for trusted files)")
    parser.add_argument("opts", nargs="*", help="config overrides, key=value (e.g. model.query_head.num_classes=1203)")
    args = parser.parse_args(argv)

    from codetr.checkpoint.official import (
        OfficialCheckpointError,
        convert_official_state_dict,
        load_official_checkpoint,
    )

    if not args.config_file and not args.no_check:
        parser.error("give --config-file (recommended: every key is checked against the model) or --no-check")
    try:
        sd, meta = load_official_checkpoint(args.input, allow_pickle=args.allow_pickle)
        target = build_target(args.config_file, args.opts) if args.config_file else None
        out, report = convert_official_state_dict(sd, target, strict=not args.allow_unmapped)
    except OfficialCheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    import torch

    torch.save({"model": out, "matching_heuristics": False, "__author__": "Sense-X/Co-DETR (converted)",
                "meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float))}}, args.output)
    print(f"wrote {len(out)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
