"""The training update: AdamW with warmup and linear decay, gradient clipping, the fp16 loss scaler.

One object per run, so that the loop calls backward/update and a checkpoint saves one state. Plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kdsearch.run.precision import loss_scaler

if TYPE_CHECKING:
    from kdsearch.config.schema import Config


@dataclass
class Optimiser:
    """AdamW, its schedule and (fp16) the loss scaler: per step backward (per micro-batch), clip, step; one state
    to checkpoint."""

    opt: torch.optim.Optimizer
    sched: Any
    params: list[nn.Parameter]
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float = 1.0

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the loss's gradients (scaled for fp16)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip(self) -> torch.Tensor:
        """Unscale (fp16) and clip the accumulated gradients; their total norm before clipping, left on the
        device (no host sync): non-finite when a gradient is."""
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not the scaled ones
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)

    def step(self) -> None:
        """Apply the clipped gradients, advance the schedule, clear the gradients.

        With fp16 the scaler skips an update whose gradients overflowed and lowers its scale; the schedule then
        stays where it is, so that it counts updates made (GradScaler.step syncs with the host anyway).
        """
        if self.scaler is None:
            self.opt.step()
            self.sched.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.scaler.get_scale() >= scale:
                self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        return state | ({"scaler": self.scaler.state_dict()} if self.scaler is not None else {})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def make_optimiser(cfg: Config, model: nn.Module, *, total_steps: int, device: torch.device) -> Optimiser:
    """AdamW with linear warmup (train.warmup_ratio) and linear decay to 0 over `total_steps`."""
    assert cfg.train.lr is not None  # Config resolved it for its teacher
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all parameters; on small models the per-tensor AdamW ops dominate the step
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    warmup = int(cfg.train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(total_steps - warmup, 1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return Optimiser(opt, sched, params, loss_scaler(device, cfg.train.precision))
