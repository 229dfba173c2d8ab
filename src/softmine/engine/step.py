"""One optimizer step on a batch, and the guard that stops a run at its first non-finite value.

:class:`TrainStep` runs forward, backward, gradient clip, optimizer and schedule steps
without waiting for the device; the loss and gradient finiteness of each step is
recorded on the device (:class:`~softmine.engine.nonfinite.StepGuard`,
:class:`~softmine.engine.nonfinite.WeightWatch`) and read by :meth:`TrainStep.check`,
which names the exact step however late it reads it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig

from softmine.engine.checkpoint import Checkpoints
from softmine.engine.components import Components
from softmine.engine.embedding import to_model_input
from softmine.engine.failures import nonfinite_step, nonfinite_weights, optimizer_overflow
from softmine.engine.nonfinite import LOSS, StepGuard, WeightWatch
from softmine.engine.state import TrainState
from softmine.engine.step_stats import EPOCH, INTERVAL, StepStats

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _off_diagonal(n: int, device: torch.device) -> torch.Tensor:
    """The (n, n) mask of pairs of two different samples (made once per batch size)."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _pair_weight_means(weights: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean mining weight over positive and negative pairs (0 where a batch has none), on the device.

    A batch without such pairs sums no weight: 0 / max(count, 1) is that 0.
    """
    same = labels[:, None] == labels[None, :]
    off = _off_diagonal(len(labels), labels.device)
    w = weights.detach()
    out = {}
    for name, mask in (("osm_weight_pos", same & off), ("osm_weight_neg", ~same)):
        out[name] = torch.where(mask, w, 0).sum() / mask.sum().clamp(min=1)
    return out


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The global 2-norm of ``params``' gradients, which are scaled to at most ``max_norm``.

    With ``max_norm`` infinite only the norm is computed (``clip_grad_norm_`` would still
    multiply every gradient by 1); torch < 2.6 lacks the two halves and clips in one call.
    """
    utils = torch.nn.utils
    if not hasattr(utils, "get_total_norm"):
        return utils.clip_grad_norm_(params, max_norm)
    norm = utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if math.isfinite(max_norm):
        utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def step_values(loss: torch.Tensor, details: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The values logged for a step, as 0-d device tensors (reading them is left to the caller)."""
    values = {"loss": loss.detach()}
    values.update(
        {k: v.detach() for k, v in details.items() if torch.is_tensor(v) and v.dim() == 0}
    )
    if "attention" in details:
        a = details["attention"].detach().float()
        values["attention"] = a.mean()
        values["attention_std"] = a.std() if a.numel() > 1 else torch.zeros((), device=a.device)
    if "weights" in details:
        values.update(_pair_weight_means(details["weights"], details["labels"]))
    return values


class TrainStep:
    """The optimizer step of a run's components, with its non-finite guard and step statistics."""

    def __init__(self, parts: Components, cfg: DictConfig, ckpts: Checkpoints) -> None:
        self.parts = parts
        self.cfg = cfg
        self.ckpts = ckpts  # where last.pt is: the stop messages name it
        self.weights = WeightWatch([parts.model, parts.loss_fn])
        self.guard = StepGuard(parts.device)
        self.stats = StepStats(parts.device)
        clip = cfg.trainer.grad_clip  # read once: a config read per step costs more than a kernel
        self.max_norm = float(clip) if clip else float("inf")
        self.skip_nonfinite = cfg.trainer.on_nonfinite == "skip"

    def stats_into(self, state: TrainState) -> None:
        """The running sums of the epoch and of the log interval into ``state`` (a checkpoint's)."""
        state.sums, state.batches_in_epoch = self.stats.sums_of(EPOCH), self.stats.steps(EPOCH)
        state.interval_sums = self.stats.sums_of(INTERVAL)
        state.interval_steps = self.stats.steps(INTERVAL)

    def stats_from(self, state: TrainState) -> None:
        """Inverse of :meth:`stats_into`, on resume."""
        self.stats.load(EPOCH, state.sums, state.batches_in_epoch)
        self.stats.load(INTERVAL, state.interval_sums, state.interval_steps)

    def run(self, x: torch.Tensor, y: torch.Tensor, state: TrainState) -> dict[str, torch.Tensor]:
        """Forward, backward and optimizer step on one batch; returns the values to log.

        The values stay 0-d device tensors and nothing here waits for the device,
        except with ``trainer.on_nonfinite=skip``: the host must then know whether the
        loss and gradient are finite before it steps (one read per step; {} when skipped).
        With ``stop`` the step's finiteness goes into :attr:`guard`, read by :meth:`check`.
        """
        p = self.parts
        x = to_model_input(x, p.device, p.device_transform)
        y = y.to(p.device, non_blocking=True)
        if p.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, details = p.objective(x, y)
        values = step_values(loss, details)
        p.optimizer.zero_grad(set_to_none=True)
        p.scaler.scale(loss).backward()
        p.scaler.unscale_(p.optimizer)
        norm = clip_gradients(p.params, self.max_norm)
        values["grad_norm"] = norm.detach()
        loss_ok = torch.isfinite(values["loss"])
        # fp16's gradient scaler skips a step with Inf gradients itself (and lowers its scale)
        step_ok = loss_ok if p.scaler.is_enabled() else loss_ok & torch.isfinite(norm)
        if self.skip_nonfinite:
            ok, loss_fine, bad_weights = torch.stack(
                [step_ok.long(), loss_ok.long(), self.weights.first_bad]
            ).tolist()
            if bad_weights >= 0:
                self.check()
            if not ok:
                return self._skip("loss" if not loss_fine else "gradient", values, state)
        else:
            self.guard.record(state.step + 1, loss_ok, step_ok, self.stats.vector(values))
        try:
            p.scaler.step(p.optimizer)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            lr = self.cfg.optimizer.get("lr")
            raise optimizer_overflow(state.step + 1, self.ckpts, lr) from None
        p.scaler.update()
        p.scheduler.step()
        self.weights.update(state.step + 1)
        return values

    def check(self) -> None:
        """Stop at the first step whose loss or gradient (``on_nonfinite=stop``), or whose update
        of the weights, was not finite; the earliest is named (one host sync for all records)."""
        bad_step, kind, bad_weights = torch.stack(
            [*self.guard.flags(), self.weights.first_bad.to(self.parts.device)]
        ).tolist()
        lr = self.cfg.optimizer.get("lr")
        if bad_step >= 0 and (bad_weights < 0 or bad_step <= bad_weights):
            assert self.guard.values is not None
            values = dict(zip(self.stats.names, self.guard.values.tolist(), strict=False))
            what = "loss" if kind == LOSS else "gradient"
            raise nonfinite_step(what, bad_step, values, self.ckpts, lr)
        if bad_weights < 0:
            return
        name = self.weights.first_bad_name() or "a parameter or buffer"
        skip = self.cfg.trainer.on_nonfinite == "skip"
        raise nonfinite_weights(bad_weights, name, self.ckpts, lr, skip)

    def _skip(
        self, what: str, values: dict[str, torch.Tensor], state: TrainState
    ) -> dict[str, torch.Tensor]:
        """``on_nonfinite=skip``: drop this step's gradients, count it, say so; {} (nothing to log)."""
        pieces = ", ".join(f"{k}={float(v):.6g}" for k, v in values.items())
        self.parts.optimizer.zero_grad(set_to_none=True)
        if self.parts.memory is not None:  # the skipped batch leaves the memory as it was
            self.parts.memory.discard_last()
        state.skipped_steps += 1
        log.warning("non-finite %s at step %d (%s); step skipped", what, state.step + 1, pieces)
        return {}
