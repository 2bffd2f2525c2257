"""Flex-KD, task-based flexible feature distillation (Saadi & Wang, 2025; papers.md section 3), as one bridge.

A unit's relevance is the first-order gradient of the task loss with respect to it (`grad`), or gradient x
activation (`grad_x_act`), aggregated over the real tokens of the task data (`mean_abs`, `abs_mean`, `rms`).
Scores are computed once, for every hidden state of the fine-tuned teacher, and cached; the bridge distils the
student's units straight onto the teacher's top-k units, with no new parameters. An encoder-decoder's units are
scored per stack, from the gradients of the one teacher-forced target loss, and selected per stack (each stack's
bridge reads its own scores). Plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file

from kdsearch.core.cache import content_key
from kdsearch.core.errors import ConfigError
from kdsearch.methods.bridges.base import (
    BRIDGES,
    Bridge,
    BridgeInputs,
    BridgeMethod,
    PrepareContext,
    Stack,
    stack_artifact,
    stacks,
)
from kdsearch.methods.inputs import model_inputs, output_logits, stack_mask, stack_states
from kdsearch.methods.losses import task_loss

if TYPE_CHECKING:
    from kdsearch.config.schema import Config, UnitAggregate, UnitsConfig
    from kdsearch.core.kinds import TaskKind


def _token_sum(g: torch.Tensor, mask: torch.Tensor, aggregate: UnitAggregate) -> torch.Tensor:
    """(B, T, D) per-token relevances -> (D,) sum over real tokens of what `aggregate` averages."""
    if aggregate == "mean_abs":
        g = g.abs()
    elif aggregate == "rms":
        g = g.pow(2)
    return (g * mask).sum(dim=(0, 1))


def score_units(teacher: Any, loader: Iterable[dict], *, kind: TaskKind, method: Literal["grad", "grad_x_act"],
                batches: int, device: torch.device, aggregate: UnitAggregate = "mean_abs") -> torch.Tensor:
    """Relevance of every unit of every hidden state: (n_t + 1, d_t), row k = hidden_states[k] (an
    encoder-decoder's encoder states; `score_stacks` gives its decoder's too).

    mean_abs = mean |r|, abs_mean = |mean r|, rms = sqrt(mean r^2), over real tokens, r = dL/dh (or dL/dh * h).
    """
    return score_stacks(teacher, loader, kind=kind, method=method, batches=batches, device=device,
                        aggregate=aggregate)["encoder"]


def score_stacks(teacher: Any, loader: Iterable[dict], *, kind: TaskKind, method: Literal["grad", "grad_x_act"],
                 batches: int, device: torch.device,
                 aggregate: UnitAggregate = "mean_abs") -> dict[Stack, torch.Tensor]:
    """`score_units` of every stack, from the same gradients: {"encoder": (n_t + 1, d_t)}, and for an
    encoder-decoder also {"decoder": (n_dec + 1, d_t)}, each over its own real tokens (source, target), of the
    one task loss (seq2seq: the teacher-forced target cross-entropy)."""
    teacher.eval()
    total: dict[Stack, torch.Tensor] = {}
    tokens: dict[Stack, float] = {}
    for step, batch in enumerate(loader):
        if step >= batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        # Gradients w.r.t. activations of a frozen model: make the embedding lookups the leaves that require grad
        # (an encoder-decoder's decoder embeds its teacher-forced input with the same shared table).
        lookup = teacher.get_input_embeddings()
        embeds = {key: lookup(batch[key]).detach().requires_grad_(True)
                  for key in ("input_ids", "decoder_input_ids") if key in batch}
        out = teacher(**model_inputs(batch, inputs_embeds=embeds["input_ids"],
                                     decoder_inputs_embeds=embeds.get("decoder_input_ids")),
                      output_hidden_states=True)
        names: tuple[Stack, ...] = ("encoder", "decoder") if kind == "seq2seq" else ("encoder",)
        states = {stack: stack_states(out, stack) for stack in names}
        for hidden in states.values():
            for h in hidden:
                h.retain_grad()
        # the loss is a mean over the batch: times its rows, every example weighs the same in the sum, also in
        # a short last batch
        (task_loss(output_logits(out), batch["labels"], kind=kind) * len(batch["labels"])).backward()
        for stack, hidden in states.items():
            mask = stack_mask(batch, stack).unsqueeze(-1).float()  # (B, T, 1)
            per_layer = []
            for h in hidden:
                assert h.grad is not None  # every state lies between the embedding leaves and the loss
                g = h.grad if method == "grad" else h.grad * h.detach()  # (B, T, D)
                per_layer.append(_token_sum(g, mask, aggregate))  # (D,)
            summed = torch.stack(per_layer)  # (n + 1, D)
            total[stack] = summed if stack not in total else total[stack] + summed
            tokens[stack] = tokens.get(stack, 0.0) + float(mask.sum())
    if not total:
        raise ValueError("no batches to score units on")
    return {stack: _finish(summed / tokens[stack], aggregate).cpu() for stack, summed in total.items()}


def _finish(mean: torch.Tensor, aggregate: UnitAggregate) -> torch.Tensor:
    return mean.abs() if aggregate == "abs_mean" else mean.sqrt() if aggregate == "rms" else mean


def select_units(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest-scoring units, in ascending index order (a fixed unit-to-unit pairing); ties go
    to the lower index, whatever the device or torch version (topk leaves them unspecified)."""
    if not 0 < k <= scores.numel():
        raise ValueError(f"cannot select {k} of {scores.numel()} units")
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


def units_to_keep(ratio: float | None, d_student: int, d_teacher: int) -> int:
    """ratio * d_t units (Flex-KD's top-d_s when ratio is None); at least 1."""
    if ratio is None:
        return d_student
    return max(1, round(ratio * d_teacher))


def prepare_units(ctx: PrepareContext) -> dict[str, str]:
    """The relevance scores of every teacher hidden state (an encoder-decoder's: of both stacks, one artifact
    each), cached by what they read."""
    cfg, units = ctx.cfg, ctx.cfg.units
    key = content_key(teacher=ctx.teacher_dir, score=units.score, aggregate=units.aggregate,
                      batches=units.score_batches, batch_size=cfg.train.batch_size, seed=cfg.train.seed)

    def build(out: Path) -> None:
        scores = score_stacks(ctx.teacher(), ctx.batches(), kind=ctx.kind, method=units.score,
                              batches=units.score_batches, device=ctx.device, aggregate=units.aggregate)
        for stack, table in scores.items():
            save_file({"scores": table}, out / f"{stack_artifact('scores', stack)}.safetensors")

    folder = ctx.cached("unit_scores", key, build)
    return {stack_artifact("unit_scores", stack): str(folder / f"{stack_artifact('scores', stack)}.safetensors")
            for stack, _ in stacks(ctx)}


def check_units(cfg: Config, d_student: int, d_teacher: int) -> None:
    k = units_to_keep(cfg.units.ratio, d_student, d_teacher)
    if k > d_student:
        raise ConfigError(f"units.ratio={cfg.units.ratio} keeps {k} teacher units but the student has only "
                          f"{d_student}: use units.ratio <= {d_student / d_teacher:.4g}")


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


def units_bridge(inputs: BridgeInputs) -> Bridge:
    """Flex-KD: distil the student's units straight onto the teacher's top ratio*d_t task-relevant units."""
    if not inputs.pairs:  # nothing to compare, and no scores were prepared
        return Bridge()
    units: UnitsConfig = inputs.settings
    k = units_to_keep(units.ratio, inputs.d_student, inputs.d_teacher)
    scores = inputs.artifact("unit_scores")["scores"]  # (n_t + 1, d_t): this stack's layers
    if units.scope == "last":
        scores = scores[-1:].expand_as(scores)
    return UnitsBridge(torch.stack([select_units(row, k) for row in scores]),
                       aligned=inputs.d_student == inputs.d_teacher)


BRIDGES.register("units")(BridgeMethod(build=units_bridge, section="units", check=check_units,
                                       prepare=prepare_units))
