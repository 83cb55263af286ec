#!/usr/bin/env python
"""Train and evaluate Co-DETR models (and any detectron2 LazyConfig detector).

Detectron2's LazyConfig training script plus what DETR-style training needs:

* ``train.clip_grad = dict(enabled, max_norm, norm_type)``: gradient clipping *after* the AMP unscale;
* ``train.amp = dict(enabled, precision)``: autocast in "fp16" (with a GradScaler) or "bf16", CPU or CUDA;
* ``train.grad_accum_steps``: micro-batches per optimizer step (effective batch on few GPUs);
* ``train.model_ema = dict(enabled, momentum, gamma)``: EMA of the weights; evaluation uses the EMA model;
* ``train.activation_checkpointing = dict(enabled, module_types)``: recompute the listed module classes'
  activations in the backward pass (class names or dotted paths);
* ``train.device``: "cuda" or "cpu"; ``--num-gpus N`` starts N processes (gloo when the device is cpu);
* atomic periodic checkpoints, ``--resume`` (bit-exact for one process, no loader workers, no aspect-ratio
  grouping), ``--eval-only``, ``train.eval_period``;
* ``<train.output_dir>/metrics.png``: the losses and the AP of every evaluation, drawn after training
  (tools/plot_metrics.py compares several runs);
* clear errors for unregistered dataset names, missing files and a model ``num_classes`` that does not match
  the training dataset, before the model is built.

Losses, learning rate and ETA are logged every ``train.log_period`` iterations; metrics.json and TensorBoard
events go to ``train.output_dir`` as in detectron2. Layer-wise lr decay is set in the config through
``optimizer.params.lr_factor_func`` (see detectron2's ``get_vit_lr_decay_rate``).

Examples::

    python tools/lazyconfig_train_net.py --config-file configs/demo/co_dino_synthetic.py
    python tools/lazyconfig_train_net.py --config-file configs/co_dino_r50.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file cfg.py --eval-only train.init_checkpoint=model.pth
    python tools/lazyconfig_train_net.py --config-file cfg.py --num-gpus 2 train.device=cpu
    python tools/lazyconfig_train_net.py --config-file cfg.py --resume    # continue in train.output_dir
"""
import importlib
import inspect
import logging
import os
import sys

import torch

try:
    import codetr  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects", "CoDETR"))

from detectron2.config import LazyConfig, instantiate
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.registry import locate
from torch.nn.parallel import DistributedDataParallel

from codetr.checkpoint import CoDETRCheckpointer
from codetr.data import ResumableSampler, check_dataset_registered, check_num_classes
from codetr.data.checks import check_dataset_files
from codetr.engine import CoDETRTrainer, ModelEMA, RNGState, launch

logger = logging.getLogger("detectron2")


# ----------------------------------------------------------------------------- config helpers
def _get(cfg, dotted, default=None):
    node = cfg
    for k in dotted.split("."):
        try:
            if k not in node:
                return default
            node = node[k]
        except TypeError:
            return default
    return node


def _dataset_names(loader_cfg):
    names = _get(loader_cfg, "dataset.names")
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _model_num_classes(model_cfg):
    """All values of keys named ``num_classes`` in the model config (recursively)."""
    found = set()

    def visit(node):
        if hasattr(node, "items"):
            for k, v in node.items():
                if k == "num_classes" and isinstance(v, int):
                    found.add(v)
                else:
                    visit(v)
        elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
            for v in node:
                visit(v)

    visit(model_cfg)
    return found


def check_config(cfg, eval_only=False):
    """Fail early, with the offending value named, on bad datasets / num_classes / device / AMP settings."""
    device = str(_get(cfg, "train.device", "cuda"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={device!r} but no CUDA device is visible; use train.device=cpu")
    if _get(cfg, "train.amp.enabled", False):
        from codetr.engine import parse_precision

        parse_precision(_get(cfg, "train.amp.precision", "fp16"))
    loaders = ["test"] if eval_only else ["train", "test"]
    for part in loaders:
        for name in _dataset_names(_get(cfg, f"dataloader.{part}", {})):
            check_dataset_registered(name)
            check_dataset_files(name)
    train_names = _dataset_names(_get(cfg, "dataloader.train", {}))
    if train_names and not eval_only:
        for k in _model_num_classes(_get(cfg, "model", {})):
            check_num_classes(k, train_names)


# ----------------------------------------------------------------------------- model helpers
def _resolve_type(name):
    if not isinstance(name, str):
        return name
    if "." in name:
        mod, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(mod), attr)
    return name


def apply_activation_checkpointing(model, module_types):
    """Wrap every submodule whose class is (or is named) one of ``module_types`` in a checkpoint wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as _apply,
    )

    types = [_resolve_type(t) for t in module_types]
    if not types:
        raise ValueError("train.activation_checkpointing.module_types is empty")

    def check_fn(m):
        return any((isinstance(t, str) and type(m).__name__ == t) or (isinstance(t, type) and isinstance(m, t))
                   for t in types)

    n = sum(1 for m in model.modules() if check_fn(m))
    if n == 0:
        raise ValueError(f"train.activation_checkpointing: no module of type {list(module_types)} in the model")
    _apply(model, check_fn=check_fn)
    logger.info(f"Activation checkpointing on {n} modules of type {list(module_types)}")
    return model


def create_ddp_model(model, device, fp16_compression=False, **kwargs):
    """DDP for CPU (device_ids=None) or CUDA (this process's GPU) when there are >1 processes."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        kwargs["device_ids"] = None if str(device).startswith("cpu") else [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default as comm_hooks

        ddp.register_comm_hook(state=None, hook=comm_hooks.fp16_compress_hook)
    return ddp


def build_ema(cfg, model):
    ema_cfg = _get(cfg, "train.model_ema", None)
    if not ema_cfg or not ema_cfg.get("enabled", False):
        return None
    return ModelEMA(model, momentum=ema_cfg.get("momentum", 1e-4), gamma=ema_cfg.get("gamma", 2000))


# ----------------------------------------------------------------------------- test / train
def do_test(cfg, model):
    """Run inference on ``dataloader.test`` and evaluate it with ``dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    evaluator_cfg = cfg.dataloader.evaluator
    if "output_dir" in evaluator_cfg and evaluator_cfg.output_dir is None:
        evaluator_cfg.output_dir = os.path.join(cfg.train.output_dir, "inference")
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(evaluator_cfg))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def build_train_loader(cfg):
    """Instantiate ``dataloader.train`` with its sampler wrapped in a :class:`ResumableSampler` (so that
    ``--resume`` continues the data stream): the configured sampler (e.g. LVIS's repeat-factor sampling), or
    detectron2's ``TrainingSampler`` seeded by ``train.seed`` when none is configured. Loaders whose target takes
    no ``dataset`` / ``sampler`` are built as they are. Returns (loader, ResumableSampler or None)."""
    loader_cfg = cfg.dataloader.train
    target = loader_cfg.get("_target_")
    target = locate(target) if isinstance(target, str) else target
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    if "sampler" not in params or "dataset" not in loader_cfg:
        return instantiate(loader_cfg), None
    kwargs = {k: instantiate(v) for k, v in loader_cfg.items() if k != "_target_"}
    sampler = kwargs.get("sampler")
    if sampler is None:
        seed = int(_get(cfg, "train.seed", -1))
        sampler = TrainingSampler(len(kwargs["dataset"]), shuffle=True, seed=seed if seed >= 0 else None)
    if not hasattr(sampler, "_seed"):
        logger.warning(f"{type(sampler).__name__} is not a seeded detectron2 training sampler: --resume restarts "
                       "its data stream")
        return target(**kwargs), None
    kwargs["sampler"] = ResumableSampler(sampler)
    return target(**kwargs), kwargs["sampler"]


def _checkpointer_args(cfg):
    args = dict(cfg.train.checkpointer)
    if not comm.is_main_process():
        args["max_to_keep"] = None  # only the main process writes (and deletes) checkpoint files
    return args


def do_train(args, cfg):
    device = cfg.train.device
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(device)
    ac = _get(cfg, "train.activation_checkpointing", None)
    if ac and ac.get("enabled", False):
        apply_activation_checkpointing(model, ac.get("module_types", []))
    ema = build_ema(cfg, model)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader, sampler = build_train_loader(cfg)

    model = create_ddp_model(model, device, **cfg.train.ddp)
    amp = _get(cfg, "train.amp", {}) or {}
    trainer = CoDETRTrainer(
        model,
        train_loader,
        optim,
        amp_enabled=amp.get("enabled", False),
        amp_precision=amp.get("precision", "fp16"),
        clip_grad=_get(cfg, "train.clip_grad", None),
        grad_accum_steps=_get(cfg, "train.grad_accum_steps", 1),
        ema=ema,
    )
    checkpointables = {"rng": RNGState()}  # every process's generators (gathered when saving)
    if sampler is not None:
        checkpointables["sampler"] = sampler  # the data stream's seed
    if ema is not None:
        checkpointables["model_ema"] = ema
    checkpointer = CoDETRCheckpointer(model, cfg.train.output_dir, trainer=trainer, **checkpointables)
    eval_model = ema.model if ema is not None else model
    results = {}

    def test_and_save_results():
        results.clear()
        results.update(do_test(cfg, eval_model) or {})
        return results

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # on every process: saving gathers each process's RNG state (only the main process writes)
            hooks.PeriodicCheckpointer(checkpointer, **_checkpointer_args(cfg)),
            hooks.EvalHook(cfg.train.eval_period, test_and_save_results),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                                 period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )

    # Create the data loader's iterator now: torch's DataLoader draws a base seed from the global generator when its
    # iterator is made, and that draw must come before the RNG state a resumed run restores (no data is read yet:
    # the sampler's start index below still applies).
    trainer._data_loader_iter  # noqa: B018
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if ema is not None and not ema.loaded:  # no EMA state in the checkpoint: average from the loaded weights
        ema.reset(model)
    if args.resume and checkpointer.has_checkpoint():
        # the checkpoint stores the iteration that just finished
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    if sampler is not None and start_iter > 0:
        per_rank_batch = train_loader.batch_size if getattr(train_loader, "batch_size", None) else None
        if per_rank_batch is None:
            per_rank_batch = cfg.dataloader.train.total_batch_size // comm.get_world_size()
        sampler.start_index = start_iter * trainer.grad_accum_steps * per_rank_batch
    trainer.train(start_iter, cfg.train.max_iter)
    if comm.is_main_process():
        plot_training_curves(cfg.train.output_dir)
    return results


def plot_training_curves(output_dir):
    """Draw ``<output_dir>/metrics.png`` (losses and periodic AP, tools/plot_metrics.py) and print its path."""
    if not os.path.isfile(os.path.join(output_dir, "metrics.json")):
        return None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("matplotlib is not installed: no training-curve plot (pip install matplotlib)")
        return None
    from codetr.analysis.metrics_plot import plot_runs

    path = os.path.join(output_dir, "metrics.png")
    plot_runs([output_dir], path)
    print(f"Training curves (losses, AP): {path}", flush=True)
    return path


def _print_final(results):
    if comm.is_main_process() and results:
        for task, metrics in results.items():
            if isinstance(metrics, dict) and "AP" in metrics:
                msg = f"Final evaluation: {task} AP = {metrics['AP']:.2f}"
                if "AP50" in metrics:
                    msg += f", AP50 = {metrics['AP50']:.2f}"
                logger.info(msg)
                print(msg, flush=True)


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    default_setup(cfg, args)
    check_config(cfg, eval_only=args.eval_only)

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        ema = build_ema(cfg, model)
        checkpointables = {"model_ema": ema} if ema is not None else {}
        CoDETRCheckpointer(model, **checkpointables).load(cfg.train.init_checkpoint)
        eval_model = model
        if ema is not None:
            if ema.loaded:
                logger.info(f"Evaluating the EMA weights (model_ema) of {cfg.train.init_checkpoint}")
            else:  # official / converted weights have no EMA state: the EMA copy must be the loaded model
                logger.info(f"{cfg.train.init_checkpoint} has no model_ema entry: evaluating its model weights")
                ema.reset(model)
            eval_model = ema.model
        eval_model = create_ddp_model(eval_model, cfg.train.device)
        results = do_test(cfg, eval_model)
        _print_final(results)
        return results
    results = do_train(args, cfg)
    _print_final(results)
    return results


def build_argument_parser():
    parser = default_argument_parser(epilog=__doc__.split("Examples::", 1)[1])
    parser.description = (
        "Train / evaluate a detector from a LazyConfig file. Config values can be overridden after the flags as "
        "key=value (e.g. train.max_iter=100 train.device=cpu dataloader.train.total_batch_size=4)."
    )
    return parser


def invoke_main(argv=None) -> None:
    args = build_argument_parser().parse_args(argv)
    backend = None
    if args.num_gpus * args.num_machines > 1:
        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
        if str(_get(cfg, "train.device", "cuda")).startswith("cpu"):
            backend = "gloo"
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend=backend,
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
