"""The orthogonal projector bridge: a trained d_s -> d_t map kept orthogonal (W^T W = I), as V_kD (Miles et al.,
CVPR 2024, arXiv 2403.06213) projects student features. An isometry cannot shrink or stretch what the student
carries to fit the teacher, so the student itself must move; the plain projector can absorb the mismatch."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from kdsearch.methods.bridges.base import BRIDGES, Bridge, BridgeInputs, BridgeMethod


class OrthogonalBridge(Bridge):
    def __init__(self, student_indices: list[int], d_s: int, d_t: int) -> None:
        super().__init__()
        # matrix_exp: torch's Householder map (its pick for a tall matrix) collapses to zero under AdamW's
        # weight decay, which the loop applies to every trainable parameter
        self.proj = nn.ModuleDict({str(k): orthogonal(nn.Linear(d_s, d_t, bias=False), orthogonal_map="matrix_exp")
                                   for k in student_indices})

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.proj[str(index)](hidden)


def orthogonal_bridge(inputs: BridgeInputs) -> Bridge:
    """A bias-free d_s -> d_t map per student layer with orthonormal columns, trained with the student."""
    return OrthogonalBridge(sorted({s for s, _ in inputs.pairs}), inputs.d_student, inputs.d_teacher)


BRIDGES.register("orthogonal")(BridgeMethod(build=orthogonal_bridge))
