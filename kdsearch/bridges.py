"""Width bridges: how a student hidden state and a teacher hidden state are brought to one space to compare.

identity (d_s = d_t, or a width-free distance), projector (trained bias-free Linear d_s -> d_t per student
layer, the usual baseline), ted (task-aware filters on both sides, teacher side frozen from stage 1), units
(Flex-KD: the teacher's task-relevant units, no new parameters). Every bridge is an nn.Module:
`student_view` is trainable, `teacher_view` is frozen. Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Config
from .registry import Registry
from .ted import build_filters, filter_width
from .units import select_units, units_to_keep


@dataclass
class BridgeInputs:
    """What a bridge builder gets: the layer pairs, widths, and prepared artifacts (loaded tensors)."""

    cfg: Config
    pairs: list[tuple[int, int]]
    d_student: int
    d_teacher: int
    teacher_filters: dict[str, torch.Tensor] = field(default_factory=dict)  # state dict of ModuleDict
    student_filters: dict[str, torch.Tensor] = field(default_factory=dict)
    unit_scores: torch.Tensor | None = None  # (n_t + 1, d_t)


class Bridge(nn.Module):
    """Maps one matched pair's hidden states into a space where a distance can compare them; itself the identity.

    The Distiller calls `student_view(l, h_s[l], paired_with=k)` and `teacher_view(k, h_t[k])` once per layer
    pair (l, k) per step. The student view trains with the student; the teacher view runs on frozen states (its
    parameters, TED's teacher filters, never train).
    """

    def student_view(self, index: int, hidden: torch.Tensor, *,
                     paired_with: int | None = None) -> torch.Tensor:  # (B, T, d_s) -> (B, T, d)
        return hidden

    def teacher_view(self, index: int, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d_t) -> (B, T, d)
        return hidden


BRIDGES: Registry[Callable[[BridgeInputs], Bridge]] = Registry("bridge")


@BRIDGES.register("identity")
def identity_bridge(inputs: BridgeInputs) -> Bridge:
    """Compare raw states; needs d_s = d_t, unless the distance compares across widths (cka)."""
    return Bridge()


class ProjectorBridge(Bridge):
    def __init__(self, student_indices: list[int], d_s: int, d_t: int) -> None:
        super().__init__()
        self.proj = nn.ModuleDict({str(k): nn.Linear(d_s, d_t, bias=False) for k in student_indices})

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.proj[str(index)](hidden)


@BRIDGES.register("projector")
def projector_bridge(inputs: BridgeInputs) -> Bridge:
    """Bias-free linear projector d_s -> d_t per student layer, trained with the student (the LWD baseline)."""
    return ProjectorBridge(sorted({s for s, _ in inputs.pairs}), inputs.d_student, inputs.d_teacher)


class FilterBridge(Bridge):
    def __init__(self, student: nn.ModuleDict, teacher: nn.ModuleDict) -> None:
        super().__init__()
        self.student_filters = student
        self.teacher_filters = teacher.requires_grad_(False)

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.student_filters[str(index)](hidden)

    def teacher_view(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.teacher_filters[str(index)](hidden)


@BRIDGES.register("ted")
def ted_bridge(inputs: BridgeInputs) -> Bridge:
    """TED stage 2: student filters g_s^k trained to match frozen stage-1 teacher filters g_t^m(k)."""
    ted = inputs.cfg.ted
    d_f = filter_width(ted, inputs.d_teacher)
    student_idx = sorted({s for s, _ in inputs.pairs})
    teacher_idx = sorted({t for _, t in inputs.pairs})
    teacher = build_filters(teacher_idx, inputs.d_teacher, d_f, ted)
    teacher.load_state_dict(inputs.teacher_filters)
    student = build_filters(student_idx, inputs.d_student, d_f, ted)
    if ted.student_filters == "stage1":
        student.load_state_dict(inputs.student_filters)
    elif ted.student_filters == "teacher":  # same widths (validated): copy the matched teacher filter
        for s, t in inputs.pairs:
            student[str(s)].load_state_dict(teacher[str(t)].state_dict())
    return FilterBridge(student, teacher)


class UnitsBridge(Bridge):
    """A student narrower than its teacher matches a fixed subset of its units (the first k) to the teacher's
    selected ones; a student as wide as its teacher (`aligned`) matches the same units the teacher's selection
    names, so that a teacher-initialised student, whose unit i is the teacher's unit i, starts at distance 0."""

    def __init__(self, teacher_units: torch.Tensor, *, aligned: bool = False) -> None:
        super().__init__()
        # (n_t + 1, k): the chosen units of every teacher layer, so maps that re-draw layers each epoch
        # (inorder_random) find theirs.
        self.teacher_units: torch.Tensor
        self.register_buffer("teacher_units", teacher_units)
        self.k = teacher_units.shape[1]
        self.aligned = aligned

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        if self.aligned and paired_with is not None:
            return hidden.index_select(-1, self.teacher_units[paired_with])
        return hidden[..., : self.k]  # a fixed subset of student units (all of them when k = d_s)

    def teacher_view(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.index_select(-1, self.teacher_units[index])


@BRIDGES.register("units")
def units_bridge(inputs: BridgeInputs) -> Bridge:
    """Flex-KD: distil the student's units straight onto the teacher's top ratio*d_t task-relevant units."""
    if not inputs.pairs:  # nothing to compare, and no scores were prepared
        return Bridge()
    units = inputs.cfg.units
    assert inputs.unit_scores is not None, "units bridge needs Flex-KD scores (prepared)"
    k = units_to_keep(units.ratio, inputs.d_student, inputs.d_teacher)
    scores = inputs.unit_scores  # (n_t + 1, d_t)
    if units.scope == "last":
        scores = scores[-1:].expand_as(scores)
    return UnitsBridge(torch.stack([select_units(row, k) for row in scores]),
                       aligned=inputs.d_student == inputs.d_teacher)


def resolve_bridge(name: str, d_student: int, d_teacher: int) -> str:
    """`auto` = identity when widths match, otherwise the projector baseline."""
    if name != "auto":
        return name
    return "identity" if d_student == d_teacher else "projector"
