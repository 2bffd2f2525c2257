"""Flex-KD task-relevance scores of teacher hidden units and top-k unit selection (Saadi & Wang, 2025).

A unit's relevance is the first-order gradient of the task loss with respect to it (`grad`), or gradient x
activation (`grad_x_act`), aggregated over the real tokens of the task data (`mean_abs`, `abs_mean`, `rms`).
Scores are computed once, for every hidden state of the fine-tuned teacher, and cached by the caller. Plain
PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch

from .encoding import model_inputs
from .losses import task_loss

if TYPE_CHECKING:
    from .config import UnitAggregate
    from .kinds import TaskKind


def _token_sum(g: torch.Tensor, mask: torch.Tensor, aggregate: UnitAggregate) -> torch.Tensor:
    """(B, T, D) per-token relevances -> (D,) sum over real tokens of what `aggregate` averages."""
    if aggregate == "mean_abs":
        g = g.abs()
    elif aggregate == "rms":
        g = g.pow(2)
    return (g * mask).sum(dim=(0, 1))


def score_units(teacher: Any, loader: Iterable[dict], *, kind: TaskKind, method: Literal["grad", "grad_x_act"],
                batches: int, device: torch.device, aggregate: UnitAggregate = "mean_abs") -> torch.Tensor:
    """Relevance of every unit of every hidden state: (n_t + 1, d_t), row k = hidden_states[k].

    mean_abs = mean |r|, abs_mean = |mean r|, rms = sqrt(mean r^2), over real tokens, r = dL/dh (or dL/dh * h).
    """
    teacher.eval()
    total: torch.Tensor | None = None
    tokens = 0.0
    for step, batch in enumerate(loader):
        if step >= batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        # Gradients w.r.t. activations of a frozen model: make the embedding lookup the leaf that requires grad.
        lookup = teacher.get_input_embeddings()
        embeds = lookup(batch["input_ids"]).detach().requires_grad_(True)
        out = teacher(**model_inputs(batch, inputs_embeds=embeds), output_hidden_states=True)
        for h in out.hidden_states:
            h.retain_grad()
        # the loss is a mean over the batch: times its rows, every example weighs the same in the sum, also in
        # a short last batch
        (task_loss(out.logits, batch["labels"], kind=kind) * len(batch["labels"])).backward()
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        per_layer = []
        for h in out.hidden_states:
            g = h.grad if method == "grad" else h.grad * h.detach()  # (B, T, D)
            per_layer.append(_token_sum(g, mask, aggregate))  # (D,)
        summed = torch.stack(per_layer)  # (n_t + 1, D)
        total = summed if total is None else total + summed
        tokens += float(mask.sum())
    if total is None:
        raise ValueError("no batches to score units on")
    mean = total / tokens
    return (mean.abs() if aggregate == "abs_mean" else mean.sqrt() if aggregate == "rms" else mean).cpu()


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
