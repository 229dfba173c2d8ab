"""Watching the weights for NaN/Inf after each optimizer step, without a host sync per check.

A finite loss and gradient do not make a finite step: a huge learning rate can
push parameters, or BatchNorm running statistics (updated in the forward pass),
to Inf. :class:`WeightWatch` checks every floating-point parameter and buffer
after each step with one fused reduction (``torch._foreach_norm``) and folds the
result into a device-side record of the first bad step. The reduction must not
overflow where the values are finite: on the CPU it is the 2-norm accumulated in
float64 (a float32 square is below 2**256, so no sum of them overflows; 2.5x faster
there than the max norm), elsewhere, and for float64 tensors, the max norm. Reading that record is the only
host sync, so the caller chooses how often to pay for it (the trainer reads it
where it already syncs, and always before writing a checkpoint) and still learns
the exact step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class WeightWatch:
    """Device-side record of the first step after which a watched tensor was not finite.

    Args:
        modules: modules whose parameters and floating-point buffers are watched.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self.named: list[tuple[str, torch.Tensor]] = []
        for i, module in enumerate(modules):
            for name, t in [*module.named_parameters(), *module.named_buffers()]:
                if t.is_floating_point():
                    self.named.append((f"{name}" if i == 0 else f"loss.{name}", t))
        self.tensors = [t for _, t in self.named]
        device = self.tensors[0].device if self.tensors else torch.device("cpu")
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # (tensors, norm order, accumulation dtype) per group; one device: one stack of peaks
        wide = [t for t in self.tensors if t.device.type != "cpu" or t.dtype == torch.float64]
        narrow = [t for t in self.tensors if t.device.type == "cpu" and t.dtype != torch.float64]
        self.groups = [
            (ts, order, dtype)
            for ts, order, dtype in ((narrow, 2.0, torch.float64), (wide, float("inf"), None))
            if ts
        ]
        self.one_device = len({t.device for t in self.tensors}) <= 1

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Record ``step`` as the first bad one if any watched tensor now holds NaN or Inf."""
        if not self.tensors:
            return
        peaks = [p for ts, o, dt in self.groups for p in torch._foreach_norm(ts, o, dtype=dt)]
        if self.one_device:
            ok = torch.isfinite(torch.stack(peaks)).all()
        else:
            ok = torch.stack([torch.isfinite(p).to(self.first_bad.device) for p in peaks]).all()
        self.first_bad = torch.where(ok | (self.first_bad >= 0), self.first_bad, step)

    def bad_step(self) -> int | None:
        """The first step whose update left a non-finite value, or None (one host sync)."""
        value = int(self.first_bad)
        return None if value < 0 else value

    def first_bad_name(self) -> str | None:
        """Name of a watched tensor that is not finite now (for the error message)."""
        with torch.no_grad():
            for name, t in self.named:
                if not bool(torch.isfinite(t).all()):
                    return name
        return None

    def reset(self) -> None:
        self.first_bad.fill_(-1)


LOSS, GRADIENT = 1, 2  # StepGuard.kind: what was not finite


class StepGuard:
    """Device-side record of the first step whose loss or gradient norm was not finite.

    The trainer records every step's fused finiteness flag here (no host sync) and
    reads the record, together with :class:`WeightWatch`'s, where it syncs anyway:
    every ``trainer.interrupt_every`` steps, before a row, a checkpoint or an
    evaluation, and at the end. The step and the logged values of the first bad
    step are kept, so the error names them exactly, however late it is read.

    Args:
        device: the training device.
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.kind = torch.zeros((), dtype=torch.long, device=device)
        self.values: torch.Tensor | None = None  # the first bad step's logged values

    @torch.no_grad()
    def record(
        self, step: int, loss_ok: torch.Tensor, step_ok: torch.Tensor, values: torch.Tensor
    ) -> None:
        """Note ``step`` if ``step_ok`` is false and no earlier step was bad."""
        new = ~step_ok & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.kind = torch.where(new, torch.where(loss_ok, GRADIENT, LOSS), self.kind)
        if self.values is not None and len(self.values) < len(values):
            self.values = torch.cat([self.values, values[len(self.values) :]])
        self.values = values if self.values is None else torch.where(new, values, self.values)

    def flags(self) -> list[torch.Tensor]:
        """The record's tensors to read in one batch: first bad step, kind."""
        return [self.first_bad, self.kind]
