"""``CoDETRTrainer``: detectron2's ``SimpleTrainer`` loop with what DETR-style training needs.

One ``run_step`` = one optimizer step:

1. ``grad_accum_steps`` micro-batches: forward under autocast (fp16 or bf16 when AMP is on), backward
   of ``loss / grad_accum_steps`` (through a ``GradScaler`` for fp16); DDP gradient all-reduce only on
   the last micro-batch (``no_sync``).
2. the GradScaler unscales the gradients, *then* they are clipped (``clip_grad``: max L2 norm 0.1 in
   Co-DETR) — clipping scaled fp16 gradients would clip at the wrong norm;
3. optimizer step (skipped by the scaler on inf/nan), then the EMA of weights is updated.

Losses (averaged over micro-batches), ``data_time`` and ``grad_norm`` go to the EventStorage as in
detectron2, so the usual writers log them (console with ETA, metrics.json, TensorBoard).
"""
import contextlib
import time

import torch
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import get_event_storage
from torch.nn.parallel import DistributedDataParallel

__all__ = ["CoDETRTrainer", "parse_precision"]

_PRECISIONS = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
               "bfloat16": torch.bfloat16}


def parse_precision(precision) -> torch.dtype:
    """"fp16"/"bf16" (or a torch dtype) -> torch dtype; anything else is a ValueError."""
    if isinstance(precision, torch.dtype) and precision in (torch.float16, torch.bfloat16):
        return precision
    key = str(precision).lower().replace("torch.", "")
    if key not in _PRECISIONS:
        raise ValueError(f"train.amp.precision must be 'fp16' or 'bf16', got {precision!r}")
    return _PRECISIONS[key]


class CoDETRTrainer(SimpleTrainer):
    """
    Args:
        model, data_loader, optimizer: as in :class:`detectron2.engine.SimpleTrainer`.
        amp_enabled: run forward passes under ``torch.autocast``.
        amp_precision: "fp16" (with a GradScaler) or "bf16" (no scaler needed).
        clip_grad: None or dict(enabled, max_norm, norm_type); clipping happens after unscaling.
        grad_accum_steps: micro-batches per optimizer step (effective batch = this x loader batch).
        ema: optional :class:`codetr.engine.ModelEMA`, updated after each optimizer step.
    """

    def __init__(
        self,
        model,
        data_loader,
        optimizer,
        *,
        amp_enabled: bool = False,
        amp_precision="fp16",
        clip_grad=None,
        grad_accum_steps: int = 1,
        ema=None,
        gather_metric_period: int = 1,
    ):
        super().__init__(model, data_loader, optimizer, gather_metric_period=gather_metric_period)
        if int(grad_accum_steps) < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.grad_accum_steps = int(grad_accum_steps)
        self.amp_enabled = bool(amp_enabled)
        self.precision = parse_precision(amp_precision) if self.amp_enabled else None
        try:
            self.device_type = next(model.parameters()).device.type
        except StopIteration:
            self.device_type = "cpu"
        use_scaler = self.amp_enabled and self.precision == torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.device_type) if use_scaler else None
        self.clip_grad = None
        if clip_grad is not None and clip_grad.get("enabled", True):
            max_norm = float(clip_grad.get("max_norm", 0.1))
            if max_norm <= 0:
                raise ValueError(f"train.clip_grad.max_norm must be > 0, got {max_norm}")
            self.clip_grad = (max_norm, float(clip_grad.get("norm_type", 2.0)))
        self.ema = ema

    def _autocast(self):
        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.precision)

    def run_step(self):
        assert self.model.training, "[CoDETRTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad(set_to_none=True)
        data_time = 0.0
        loss_sum = {}
        n = self.grad_accum_steps
        for k in range(n):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            sync_ctx = (
                self.model.no_sync()
                if isinstance(self.model, DistributedDataParallel) and k < n - 1
                else contextlib.nullcontext()
            )
            with sync_ctx:
                with self._autocast():
                    loss_dict = self.model(data)
                    if isinstance(loss_dict, torch.Tensor):
                        loss_dict = {"total_loss": loss_dict}
                    losses = sum(loss_dict.values())
                losses = losses / n
                if self.grad_scaler is not None:
                    self.grad_scaler.scale(losses).backward()
                else:
                    losses.backward()
            for key, v in loss_dict.items():
                v = v.detach().float() / n
                loss_sum[key] = loss_sum[key] + v if key in loss_sum else v

        self.after_backward()
        self._write_metrics(loss_sum, data_time)

        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad[0], norm_type=self.clip_grad[1])
            if (self.iter + 1) % self.gather_metric_period == 0:
                get_event_storage().put_scalar("grad_norm", float(norm))
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def state_dict(self):
        ret = super().state_dict()
        if self.grad_scaler is not None:
            ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
