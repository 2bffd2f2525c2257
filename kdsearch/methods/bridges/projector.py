"""The projector bridge: a trained bias-free Linear d_s -> d_t per student layer (the LWD baseline of TED's code
and Flex-KD's comparison)."""

from __future__ import annotations

import torch
from torch import nn

from kdsearch.methods.bridges.base import BRIDGES, Bridge, BridgeInputs, BridgeMethod


class ProjectorBridge(Bridge):
    def __init__(self, student_indices: list[int], d_s: int, d_t: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({str(k): nn.Linear(d_s, d_t, bias=False) for k in student_indices})

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.proj[str(index)](hidden)


def projector_bridge(inputs: BridgeInputs) -> Bridge:
    """Bias-free linear projector d_s -> d_t per student layer, trained with the student."""
    return ProjectorBridge(sorted({s for s, _ in inputs.pairs}), inputs.d_student, inputs.d_teacher)


BRIDGES.register("projector")(BridgeMethod(build=projector_bridge))
