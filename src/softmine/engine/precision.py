"""The numeric precisions a model may run in, as one table: config value -> autocast dtype.

``trainer.precision`` (training) and ``softmine-embed --precision`` (inference) take
the same values; ``32`` runs in float32 (no autocast).
"""

from __future__ import annotations

import torch

#: ``precision`` value -> the dtype autocast runs in (None: float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
