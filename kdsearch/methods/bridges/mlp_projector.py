"""The MLP projector bridge: a trained two-layer perceptron d_s -> d_t -> d_t per student layer, GELU between.

A linear projector can only rotate and scale the student's states onto the teacher's; feature-distillation work
with non-linear projectors (Chen et al., "Improved Feature Distillation via Projector Ensemble", NeurIPS 2022)
found the extra capacity keeps the student's own features freer, at d_t x (d_s + d_t) parameters per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from kdsearch.methods.bridges.base import BRIDGES, Bridge, BridgeInputs, BridgeMethod


class MlpProjectorBridge(Bridge):
    def __init__(self, student_indices: list[int], d_s: int, d_t: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({str(k): nn.Sequential(nn.Linear(d_s, d_t), nn.GELU(), nn.Linear(d_t, d_t))
                                   for k in student_indices})

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.proj[str(index)](hidden)


def mlp_projector_bridge(inputs: BridgeInputs) -> Bridge:
    """Linear d_s -> d_t, GELU, Linear d_t -> d_t per student layer, trained with the student."""
    return MlpProjectorBridge(sorted({s for s, _ in inputs.pairs}), inputs.d_student, inputs.d_teacher)


BRIDGES.register("mlp_projector")(BridgeMethod(build=mlp_projector_bridge))
