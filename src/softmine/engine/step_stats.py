"""Logged training values summed on the device, read only when a row is written.

``float(loss)`` after every step makes the host wait for the device, which
serialises a launch-bound step. :class:`StepStats` instead keeps the step's
scalars as 0-d tensors, adds them (as one float64 vector) to two running sums on
the device, the current ``trainer.log_every`` interval's and the epoch's, and
reads a sum (one host sync) only when its row is written. Float64 sums of the
float32 values are the same numbers the host's Python floats were, so a resumed
run, which reloads the sums from its checkpoint, logs the same rows.
"""

from __future__ import annotations

import torch

INTERVAL, EPOCH = 0, 1


class StepStats:
    """Running sums (and counts) of named per-step scalars over the log interval and the epoch.

    Args:
        device: where the sums live (the training device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []
        self.sums = torch.zeros(2, 0, dtype=torch.float64, device=device)
        self.counts = [0, 0]  # steps added per window (host integers: no sync to know them)
        # the latest vector and the values it was made of (held: their ids cannot be reused)
        self._last: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None

    def _register(self, names: list[str]) -> None:
        new = [k for k in names if k not in self.names]
        if new:
            self.names += new
            pad = torch.zeros(2, len(new), dtype=torch.float64, device=self.device)
            self.sums = torch.cat([self.sums, pad], dim=1)

    @torch.no_grad()
    def vector(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """The step's values as one float64 vector in :attr:`names` order (0 where absent).

        Asked again for the same tensors (the step's guard, then :meth:`add`), it returns
        the vector it made. Floating-point values are stacked, then widened: a float
        dtype's promotion is exact, so the numbers are those of widening each value alone.
        """
        self._register(list(values))
        if self._last is not None:
            seen, vector = self._last
            if len(vector) == len(self.names) and len(seen) == len(values):
                if all(seen.get(k) is v for k, v in values.items()):
                    return vector
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = [_scalar(values[k]) if k in values else zero for k in self.names]
        if all(p.is_floating_point() for p in parts):
            vector = torch.stack(parts).double()
        else:
            vector = torch.stack([p.double() for p in parts])
        self._last = (dict(values), vector)
        return vector

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Add one applied step's values to both windows (device work only)."""
        vector = self.vector(values)  # first: it may register new names (a wider self.sums)
        self.sums += vector
        self.counts = [n + 1 for n in self.counts]

    def steps(self, window: int) -> int:
        """Steps added to ``window`` (:data:`INTERVAL` or :data:`EPOCH`) since its last reset."""
        return self.counts[window]

    def sums_of(self, window: int) -> dict[str, float]:
        """The window's sums as Python floats (one host sync)."""
        return dict(zip(self.names, self.sums[window].tolist(), strict=True))

    def means(self, window: int) -> dict[str, float]:
        """The window's means (one host sync); {} when no step was added."""
        n = self.counts[window]
        return {k: v / n for k, v in self.sums_of(window).items()} if n else {}

    def reset(self, window: int) -> None:
        self.sums[window].zero_()
        self.counts[window] = 0

    def load(self, window: int, sums: dict[str, float], count: int) -> None:
        """Restore a window from a checkpoint's sums and step count."""
        self.reset(window)
        self._register(list(sums))
        row = [float(sums.get(k, 0.0)) for k in self.names]
        self.sums[window] = torch.tensor(row, dtype=torch.float64, device=self.device)
        self.counts[window] = int(count)


def _scalar(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor (already one: itself, no view made)."""
    return value if value.dim() == 0 else value.reshape(())
