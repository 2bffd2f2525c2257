"""Mixed precision for the distillation loop: the autocast context and the fp16 loss scaler. Plain PyTorch.

bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 gradients underflow without a scaler. The
loss terms upcast to fp32 themselves (kdsearch.methods.losses), so only the models' matmuls run in lower precision.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kdsearch.config.schema import Precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """Forward passes inside run in `precision` on `device` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def loss_scaler(device: torch.device, precision: Precision) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 training; None when the precision needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
