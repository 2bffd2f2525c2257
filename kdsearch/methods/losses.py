"""Distillation loss terms as pure functions: hidden-state distances, logit KL, task losses, weighted sum.

Every function maps tensors to a scalar with an explicit reduction; softmax and reductions run in fp32.
Pure torch: imports nothing from Ray, Optuna, MLflow or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.core.registry import Registry


def _full_precision(t: Tensor) -> torch.autocast:
    """Autocast off on t's device: matmuls inside run in t's dtype (fp32 here), not in bf16/fp16."""
    return torch.autocast(t.device.type, enabled=False)


HiddenDistance = Callable[..., Tensor]
"""`(student (B,T,D), teacher (B,T,D), *, mask (B,T) | None) -> scalar`."""


@dataclass(frozen=True)
class Distance:
    """A registered hidden distance and what the rest of kdsearch must know of it."""

    fn: HiddenDistance
    reads_padding: bool = False
    """Reads the states at padded positions even with a mask, as its reference code does (so a cached teacher
    must keep them)."""
    width_free: bool = False
    """Compares states of different widths directly (no bridge needed when d_s != d_t)."""

    def __call__(self, student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
        return self.fn(student, teacher, mask=mask)


DISTANCES: Registry[Distance] = Registry("hidden distance")


def distance(name: str, *, reads_padding: bool = False,
             width_free: bool = False) -> Callable[[HiddenDistance], HiddenDistance]:
    """Register a hidden distance under `name` with its properties; the function itself stays plain."""
    def add(fn: HiddenDistance) -> HiddenDistance:
        DISTANCES.register(name)(Distance(fn, reads_padding=reads_padding, width_free=width_free))
        return fn

    return add

LogitLoss = Callable[..., Tensor]
"""`(student logits (..., C), teacher logits (..., C), *, temperature, mask (...) | None) -> scalar`."""

LOGIT_LOSSES: Registry[LogitLoss] = Registry("logit loss")


def _token_mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a per-position value over real positions (mask 1 = real); all positions when mask is None."""
    # per_token: (B, T) or any shape; mask: same shape
    if mask is None:
        return per_token.mean()
    keep = mask.to(torch.bool)
    if keep.shape != per_token.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} does not match positions {tuple(per_token.shape)}")
    # where (not multiply) so that inf/nan on padded positions cannot leak into the sum.
    total = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
    return total / keep.sum().clamp_min(1)


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ; "
                         "project the student to the teacher's width first")


@distance("mse")
def mse(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Element-mean squared error over the real tokens' elements.

    mean_{real tokens, d} (s - t)^2. Summed over pairs, the BART runs of Yu et al. 2025 (arXiv 2502.04499,
    dart/distillation.py `calc_hidden_loss`); unmasked and averaged over filter pairs, TED stage 2 (Liang et al.
    2023, arXiv 2210.01351, `F.mse_loss(..., reduction="mean")`).
    """
    _check_pair(student, teacher)
    # (B, T, D) -> (B, T): mean over D, so the token mean below is the element mean over real tokens.
    per_token = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    return _token_mean(per_token, mask)


@distance("token_mse")
def token_mse(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Squared L2 distance per token (sum over D), averaged over real tokens.

    mean_{real tokens} ||s - t||^2. The BERT runs of Yu et al. 2025 divide this once more by the batch size:
    that form is `layer_select_bert`.
    """
    _check_pair(student, teacher)
    per_token = (student.float() - teacher.float()).pow(2).sum(dim=-1)  # (B, T)
    return _token_mean(per_token, mask)


@distance("ln_mse")
def ln_mse(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Element-mean MSE after standardising each token vector over D (layer norm without affine params).

    Removes per-token scale differences. The T5 runs of Yu et al. 2025 standardise each layer's whole
    (B, T, D) tensor instead: that form is `layer_select_t5`.
    """
    _check_pair(student, teacher)
    d = student.shape[-1]
    s = F.layer_norm(student.float(), (d,))  # (B, T, D)
    t = F.layer_norm(teacher.float(), (d,))  # (B, T, D)
    return _token_mean((s - t).pow(2).mean(dim=-1), mask)


@distance("layer_select_bert")
def layer_select_bert(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """sum_{b, t} mask ||s - t||^2 / (B * N_valid): the BERT runs of Yu et al. 2025 (arXiv 2502.04499).

    classification/trainer.py `_hidden_loss`: `(diff * attention_mask).mean(dim=0).sum() / valids`, with
    `valids = attention_mask.sum()` over the whole batch, so the per-token squared L2 averaged over real tokens
    is divided once more by the batch size B (the rows of this forward pass). Averaged over pairs
    (distill.hidden_reduce=mean) at weight 3, the paper's hidden term. No mask: every position is real.
    """
    _check_pair(student, teacher)
    return token_mse(student, teacher, mask=mask) / student.shape[0]


@distance("layer_select_t5", reads_padding=True)
def layer_select_t5(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Element-mean MSE over real tokens after standardising each side's whole (B, T, D) tensor.

    The T5 runs of Yu et al. 2025 (t5mt/distillation.py `calc_hidden_loss`, `--normalize_hidden`):
    `F.layer_norm(states, states.shape[1:])` on the stacked (pairs, B, T, D) states, i.e. one mean and one
    (biased) variance per layer over every position, padding included; then the masked element-mean MSE. Summed
    over pairs (distill.hidden_reduce=sum) at weight 3.
    """
    _check_pair(student, teacher)
    s = F.layer_norm(student.float(), tuple(student.shape), eps=eps)  # (B, T, D), one mean/var for the tensor
    t = F.layer_norm(teacher.float(), tuple(teacher.shape), eps=eps)
    return _token_mean((s - t).pow(2).mean(dim=-1), mask)


@distance("layer_select_qwen3", reads_padding=True)
def layer_select_qwen3(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None,
                       eps: float = 1e-12) -> Tensor:
    """Squared L2 of unit-normalised token vectors, mean over every position, times N_valid / (B T).

    The Qwen3 runs of Yu et al. 2025 (llm/sft_trainer.py): `t / t.norm(dim=-1)`, `((t - s)**2).sum(-1).mean()
    * valids / totals`: padding positions enter the mean, which is then scaled by the share of real tokens.
    Averaged over pairs (distill.hidden_reduce=mean) at weight 3, without the embedding pair.
    """
    _check_pair(student, teacher)
    s = student.float() / student.float().norm(dim=-1, keepdim=True).clamp_min(eps)  # (B, T, D)
    t = teacher.float() / teacher.float().norm(dim=-1, keepdim=True).clamp_min(eps)
    per_token = (s - t).pow(2).sum(dim=-1)  # (B, T)
    share = 1.0 if mask is None else mask.float().sum() / mask.numel()
    return per_token.mean() * share


@distance("cosine")
def cosine(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens of 1 - cos(s, t); scale-invariant.

    DistilBERT's cosine hidden loss (Sanh et al. 2019, arXiv 1910.01108); a Flex-KD alternative (Saadi & Wang
    2025, arXiv 2507.10155).
    """
    _check_pair(student, teacher)
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)  # (B, T)
    return _token_mean(1.0 - cos, mask)


@distance("correlation")
def correlation(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Mean over real tokens of 1 - Pearson correlation across D; invariant to per-token affine maps.

    mean_{real tokens} (1 - <s - mean(s), t - mean(t)> / (||s - mean(s)|| ||t - mean(t)||)). Flex-KD's
    correlation-based feature loss (Saadi & Wang 2025, arXiv 2507.10155); the exact form is not published,
    this is the per-token Pearson variant.
    """
    _check_pair(student, teacher)
    s = student.float() - student.float().mean(dim=-1, keepdim=True)  # (B, T, D)
    t = teacher.float() - teacher.float().mean(dim=-1, keepdim=True)  # (B, T, D)
    # clamp each norm (not their product) so a constant token vector gives r = 0 and finite gradients.
    s = s / s.norm(dim=-1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    r = (s * t).sum(dim=-1)  # (B, T)
    return _token_mean(1.0 - r, mask)


@distance("pkd_cls")
def pkd_cls(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Squared L2 between the unit-normalised first-token ([CLS]) states, mean over the batch.

    Patient KD (Sun et al. 2019, arXiv 1908.09355): ||s_cls / ||s_cls|| - t_cls / ||t_cls|| ||^2 per matched
    layer, with layer_map=last (PKD-Last) or forward (PKD-Skip). Reads position 0 only, which is a real token
    in every row (padding is on the right), so `mask` changes nothing.
    """
    _check_pair(student, teacher)
    s = F.normalize(student[:, 0].float(), dim=-1, eps=eps)  # (B, D)
    t = F.normalize(teacher[:, 0].float(), dim=-1, eps=eps)  # (B, D)
    return (s - t).pow(2).sum(dim=-1).mean()


@distance("cka", width_free=True)
def cka(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """1 - linear CKA between the real tokens' student and teacher states; the widths may differ.

    With X (N, d_s) and Y (N, d_t) the column-centred states of the N real tokens of the batch:
    CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) (Kornblith et al. 2019, arXiv 1905.00414), invariant to
    rotations and isotropic scaling of either side. A distillation loss across widths without a projector
    (papers.md, "other baselines"); a batch-level similarity, not a per-token mean.
    """
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in more "
                         "than their width")
    keep = mask.to(torch.bool) if mask is not None else torch.ones(student.shape[:-1], dtype=torch.bool,
                                                                    device=student.device)
    x = student.float()[keep]  # (N, d_s)
    y = teacher.float()[keep]  # (N, d_t)
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    with _full_precision(x):  # Gram matrices of BERT-like states overflow fp16 and round to zero in bf16
        cross = (y.T @ x).pow(2).sum()  # ||Y^T X||_F^2
        norms = (x.T @ x).norm() * (y.T @ y).norm()
    return 1.0 - cross / norms.clamp_min(eps)


@LOGIT_LOSSES.register("kl")
def logit_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
             mask: Tensor | None = None) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2 (Hinton et al. 2015, arXiv 1503.02531).

    TED uses T = 2 (batchmean); Yu et al. 2025 use T = 1 (T = 2 for T5).

    Sum over the last (class / vocab) axis; mean over the other positions. For (B, C) logits without a mask
    this is `F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T**2`. For token logits
    (B, T, V) pass a (B, T) mask: the mean runs over masked-in tokens. Shape-generic: callers pass aligned
    tensors (for causal LMs, shift both the same way first).
    """
    _check_pair(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., C)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., C)
    p_t = log_p_t.exp()
    # zero-probability teacher classes contribute 0 (0 * log 0 = 0), also when teacher logits are -inf.
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    per_position = terms.sum(dim=-1)  # (B,) or (B, T)
    return _token_mean(per_position, mask) * temperature**2


def _kl_to_mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """Per-position KL(p || m), m = weight_p p + (1 - weight_p) q, from log-probabilities (..., C) -> (...)."""
    log_m = torch.logsumexp(torch.stack([log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p)]), dim=0)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(dim=-1)


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    _check_pair(student_logits, teacher_logits)
    return (F.log_softmax(student_logits.float() / temperature, dim=-1),  # (..., C)
            F.log_softmax(teacher_logits.float() / temperature, dim=-1))  # (..., C)


@LOGIT_LOSSES.register("reverse_kl")
def logit_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
                     mask: Tensor | None = None) -> Tensor:
    """KL(softmax(s/T) || softmax(t/T)) * T^2: mode-seeking, the student need not cover every teacher mode.

    MiniLLM (Gu et al. 2024, arXiv 2306.08543) for generative students. Same reductions as `logit_kl`.
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    p_s = log_p_s.exp()
    per_position = torch.where(p_s > 0, p_s * (log_p_s - log_p_t), torch.zeros_like(p_s)).sum(dim=-1)
    return _token_mean(per_position, mask) * temperature**2


@LOGIT_LOSSES.register("jsd")
def logit_jsd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
              mask: Tensor | None = None) -> Tensor:
    """Jensen-Shannon divergence (beta = 1/2) * T^2: symmetric and bounded by log 2 per position.

    (KL(t || m) + KL(s || m)) / 2 with m the mean of the two distributions; GKD's generalised JSD at beta 0.5
    (Agarwal et al. 2024, arXiv 2306.13649).
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    per_position = 0.5 * (_kl_to_mixture(log_p_t, log_p_s, 0.5) + _kl_to_mixture(log_p_s, log_p_t, 0.5))
    return _token_mean(per_position, mask) * temperature**2


SKEW = 0.1
"""DistiLLM's skew: the student side mixes in this share of the teacher (Ko et al. 2024, arXiv 2402.03898)."""


@LOGIT_LOSSES.register("skew_kl")
def logit_skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float,
                  mask: Tensor | None = None) -> Tensor:
    """KL(p_t || SKEW p_t + (1 - SKEW) p_s) * T^2: forward KL made finite where the student gives ~0.

    DistiLLM's skew KL (Ko et al. 2024, arXiv 2402.03898), alpha = 0.1; bounded by -log(SKEW) per position.
    """
    log_p_s, log_p_t = _log_probs(student_logits, teacher_logits, temperature)
    return _token_mean(_kl_to_mixture(log_p_t, log_p_s, SKEW), mask) * temperature**2


RelationLoss = Callable[..., Tensor]
"""`((x_s, y_s), (x_t, y_t), *, heads, mask (B,Tq) | None, causal, key_mask (B,Tk) | None) -> scalar`: x
projections (B, Tq, d_s) / (B, Tq, d_t), y (B, Tk, d_s) / (B, Tk, d_t); Tk = Tq except across sequences (an
encoder-decoder's cross-attention: decoder queries, encoder keys)."""

RELATION_LOSSES: Registry[RelationLoss] = Registry("relation loss")


def _allowed_keys(mask: Tensor | None, causal: bool, shape: tuple[int, int, int], device: torch.device,
                  key_mask: Tensor | None = None) -> Tensor:
    """(B, 1, Tq, Tk) bool: which keys each query may attend to (real keys; with `causal`, not later ones).

    `shape` = (B, Tq, Tk); the keys' real positions are `key_mask`, or `mask` when queries and keys are one
    sequence (key_mask None)."""
    batch, queries, keys = shape
    if causal and queries != keys:
        raise ValueError(f"a causal relation relates one sequence to itself; got {queries} queries, {keys} keys")
    allowed = torch.ones(queries, keys, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(batch, 1, queries, keys)
    keys_mask = mask if key_mask is None else key_mask
    return allowed if keys_mask is None else allowed & keys_mask.to(torch.bool)[:, None, None, :]


def relation_scores(x: Tensor, y: Tensor, *, heads: int) -> Tensor:
    """x_h y_h^T / sqrt(d/heads) per relation head h: (B, Tq, d), (B, Tk, d) -> (B, heads, Tq, Tk), fp32.

    x and y are split into `heads` chunks of d/heads units, as a model splits its attention heads. The
    1/sqrt(d/heads) is MiniLM's scaled dot product for every family: T5's own attention has no such scaling
    (and adds a relative-position bias), so there qk at R = the attention heads is a scaled relation of T5's
    projections, not T5's attention distribution.
    """
    batch, queries, width = x.shape
    if width != y.shape[-1] or width % heads:
        raise ValueError(f"a relation needs two projections of one width that {heads} heads divide; got widths "
                         f"{width} and {y.shape[-1]}")
    xh = x.float().reshape(batch, queries, heads, -1).transpose(1, 2)  # (B, R, Tq, d/R)
    yh = y.float().reshape(batch, y.shape[1], heads, -1).transpose(1, 2)  # (B, R, Tk, d/R)
    with _full_precision(xh):
        return xh @ yh.transpose(-1, -2) / math.sqrt(xh.shape[-1])  # (B, R, Tq, Tk)


def relation_log_probs(x: Tensor, y: Tensor, *, heads: int, mask: Tensor | None = None,
                       causal: bool = False, allowed: Tensor | None = None,
                       key_mask: Tensor | None = None) -> Tensor:
    """log softmax over keys of `relation_scores`: (B, heads, Tq, Tk).

    Keys at padding (`key_mask` 0, or `mask` 0 when x and y are one sequence) and, with `causal`, keys after
    the query get probability 0 (`allowed`: that key mask, precomputed).
    """
    scores = relation_scores(x, y, heads=heads)
    if allowed is None:
        allowed = _allowed_keys(mask, causal, (x.shape[0], x.shape[1], y.shape[1]), x.device, key_mask)
    return torch.log_softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)


@RELATION_LOSSES.register("kl")
def relation_kl(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], *, heads: int,
                mask: Tensor | None = None, causal: bool = False, key_mask: Tensor | None = None) -> Tensor:
    """KL(teacher relation || student relation), summed over keys, mean over relation heads and real queries.

    A relation of projections (x, y) is `relation_log_probs`. With x, y = query, key and heads = the model's
    attention heads it is the attention distribution (MiniLM, arXiv 2002.10957); query-query, key-key and
    value-value relations with any common `heads` compare models of different widths and head counts
    (MiniLMv2, arXiv 2012.15828). `mask`: the queries' real positions (and the keys', unless `key_mask` gives
    them: cross-attention's (target x source) relation).
    """
    shape = (student[0].shape[0], student[0].shape[1], student[1].shape[1])
    allowed = _allowed_keys(mask, causal, shape, student[0].device, key_mask)
    log_s = relation_log_probs(*student, heads=heads, allowed=allowed)
    log_t = relation_log_probs(*teacher, heads=heads, allowed=allowed)
    # excluded keys hold finite log-probabilities near finfo.min: exp gives exactly 0 there, so they add 0
    per_query = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(dim=-1)  # (B, R, Tq)
    return _token_mean(per_query.mean(dim=1), mask)


@RELATION_LOSSES.register("mse")
def relation_mse(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], *, heads: int,
                 mask: Tensor | None = None, causal: bool = False, key_mask: Tensor | None = None) -> Tensor:
    """Mean squared difference of the relation scores (before softmax) over real (query, key) entries and heads.

    TinyBERT's attention loss (Jiao et al. 2020, arXiv 1909.10351) with x, y = query, key and heads = the
    attention heads: MSE of the attention score matrices, padded and (with `causal`) future entries left out.
    `mask`: the queries' real positions (and the keys', unless `key_mask` gives them).
    """
    shape = (student[0].shape[0], student[0].shape[1], student[1].shape[1])
    allowed = _allowed_keys(mask, causal, shape, student[0].device, key_mask)
    if mask is not None:  # padded queries too
        allowed = allowed & mask.to(torch.bool)[:, None, :, None]
    diff = relation_scores(*student, heads=heads) - relation_scores(*teacher, heads=heads)  # (B, R, Tq, Tk)
    squared = torch.where(allowed, diff.pow(2), torch.zeros_like(diff))
    return squared.sum() / (allowed.sum() * heads).clamp_min(1)


def span_loss(logits: Tensor, positions: Tensor) -> Tensor:
    """Extractive QA's task loss: (CE(start logits, start) + CE(end logits, end)) / 2, as Hugging Face's
    *ForQuestionAnswering computes it (BERT, Devlin et al. 2019, section 4.2).

    logits (B, T, 2): start and end logits stacked on the last axis (`span_logits`); positions (B, 2) the gold
    start and end token (0, the CLS token, when the window holds no answer). Positions past T are clamped to T
    and ignored, as in transformers.
    """
    length = logits.shape[1]
    positions = positions.clamp(0, length)
    start = F.cross_entropy(logits[..., 0].float(), positions[:, 0], ignore_index=length, reduction="mean")
    end = F.cross_entropy(logits[..., 1].float(), positions[:, 1], ignore_index=length, reduction="mean")
    return (start + end) / 2


NOT_A_POSITION = -1e4
"""What a masked-out position's logit becomes before the span softmax: exp of it underflows to 0 in fp32, while
staying finite keeps 0 * log 0 terms at 0 rather than nan."""


def span_kd(student: Tensor, teacher: Tensor, *, temperature: float, mask: Tensor | None = None,
            logit_loss: LogitLoss | None = None) -> Tensor:
    """Logit KD for extractive QA: the divergence between the teacher's and the student's distributions over
    the window's positions, for the start and for the end, averaged: (D(start) + D(end)) / 2, with D = `logit_loss`
    (default `logit_kl`: KL(softmax(t/T) || softmax(s/T)) * T^2, Hinton et al. 2015; TED's QA KD, Liang et al.
    2023, arXiv 2210.01351, matches these two distributions).

    student, teacher (B, T, 2): start and end logits; mask (B, T): 1 on real tokens. Padding is taken out of
    both distributions (its logits set to NOT_A_POSITION), so it holds no probability on either side. Without a
    mask every position counts, padding included: TED's QA code (ted_qa_no_trainer.py), whose kl_div is
    `F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T**2` on the (B, T) start and end logits, averaged.
    """
    _check_pair(student, teacher)
    loss = logit_loss or logit_kl
    if mask is not None:
        keep = mask.bool().unsqueeze(-1)  # (B, T, 1)
        student = student.float().masked_fill(~keep, NOT_A_POSITION)
        teacher = teacher.float().masked_fill(~keep, NOT_A_POSITION)
    # (B, T, 2) -> (B, 2, T): each row is one distribution over positions; the mean runs over both rows
    return loss(student.transpose(1, 2), teacher.transpose(1, 2), temperature=temperature)


def task_loss(logits: Tensor, labels: Tensor, *,
              kind: Literal["classification", "regression", "causal_lm", "seq2seq", "extractive_qa"]) -> Tensor:
    """The student's own objective: cross-entropy, MSE (STS-B), next-token or target-token cross-entropy.

    classification: logits (B, C), labels (B,) ints. regression: logits (B, 1) or (B,), labels (B,) floats.
    causal_lm: logits (B, T, V), labels (B, T) = the input ids with IGNORE_INDEX on skipped tokens; the usual
    shift is applied here (logits at t predict labels at t+1). seq2seq: logits (B, T, V) of the teacher-forced
    decoder, labels (B, T) the target with IGNORE_INDEX on padding, no shift (decoder position t predicts label
    t; the layer-selection T5/BART code's `CrossEntropyLoss(ignore_index=pad)`). Means run over non-ignored labels.
    extractive_qa: logits (B, T, 2) start and end logits, labels (B, 2) their gold positions (`span_loss`).
    """
    if kind == "extractive_qa":
        return span_loss(logits, labels)
    if kind == "classification":
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="mean")
    if kind == "regression":
        pred = logits.float().reshape(labels.shape)  # (B, 1) -> (B,)
        return F.mse_loss(pred, labels.float(), reduction="mean")
    if kind in ("causal_lm", "seq2seq"):
        cut = 1 if kind == "causal_lm" else 0
        shifted = logits[:, :logits.shape[1] - cut].float().flatten(0, 1)  # (B*(T-cut), V)
        targets = labels[:, cut:].flatten()  # (B*(T-cut),)
        total = F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        # sum / count instead of reduction="mean": a batch with every label ignored gives 0, not nan.
        return total / (targets != IGNORE_INDEX).sum().clamp_min(1)
    raise ValueError(f"task loss kind {kind!r}: choose classification, regression, causal_lm, seq2seq or "
                     "extractive_qa")


def combine(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """Weighted sum of loss terms; a term with weight 0 is skipped (callers need not compute it).

    The printable form of the same sum is `describe(weights)`.
    """
    unweighted = sorted(set(terms) - set(weights))
    if unweighted:
        raise ValueError(f"loss terms {unweighted} have no weight; weights are given for {sorted(weights)}")
    total: Tensor | None = None
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name not in terms:
            raise KeyError(f"loss term {name!r} has weight {weight} but was not computed")
        part = weight * terms[name]
        total = part if total is None else total + part
    if total is None:
        raise ValueError("every loss weight is 0: nothing to optimise")
    return total


def describe(weights: dict[str, float]) -> str:
    """Printable weighted sum, e.g. `loss = 1*task + 1*logit + 3*hidden` (weight-0 terms left out; weights to 4
    significant digits, as a sampled 0.16131289742292726 is not read to the last one)."""
    parts = [f"{float(w):.4g}*{name}" for name, w in weights.items() if w != 0]
    return "loss = " + (" + ".join(parts) if parts else "0")


READS_PADDING = frozenset(n for n in DISTANCES if DISTANCES.get(n).reads_padding)
"""The registered distances that read padded positions (their entries say so)."""
WIDTH_FREE = frozenset(n for n in DISTANCES if DISTANCES.get(n).width_free)
"""The registered distances that compare across widths (their entries say so)."""
