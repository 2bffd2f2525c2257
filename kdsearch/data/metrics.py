"""Evaluation metrics per task kind, computed by scikit-learn and scipy.

`score` always repeats the task's primary metric: it is the one number a search optimises and MLflow plots.
A degenerate side (a constant prediction, a constant label) scores 0 rather than nan, so an untrained student
ranks last instead of breaking the search. Imports numpy, scikit-learn, scipy, sacrebleu, rouge-score,
kdsearch.data.qa and kdsearch.data.tasks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as sk

from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.data.qa import window_span_scores
from kdsearch.data.tasks import TaskSpec


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(sk.accuracy_score(true, pred)) if true.size else 0.0


def f1_binary(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP; 0 when nothing is positive."""
    return float(sk.f1_score(true, pred, pos_label=1, average="binary", zero_division=0.0)) if true.size else 0.0


def macro_f1(pred: np.ndarray, true: np.ndarray) -> float:
    """The unweighted mean of every class's F1 (classes seen in labels or predictions): small classes count."""
    return float(sk.f1_score(true, pred, average="macro", zero_division=0.0)) if true.size else 0.0


def matthews(pred: np.ndarray, true: np.ndarray) -> float:
    """Matthews correlation (the multi-class form for more than 2 classes); 0 when either side is constant."""
    return float(sk.matthews_corrcoef(true, pred)) if true.size else 0.0


def _correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:  # rounding leaves a constant side tiny residuals
        return 0.0
    test = stats.pearsonr if kind == "pearson" else stats.spearmanr
    value = float(test(x.astype(np.float64), y.astype(np.float64)).statistic)
    return value if np.isfinite(value) else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return _correlation("pearson", x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of the ranks, ties sharing their mean rank."""
    return _correlation("spearman", x, y)


def metric_names(spec: TaskSpec) -> tuple[str, ...]:
    """The keys `compute_metrics` returns for a task, known before any data is read."""
    names: tuple[str, ...]
    if spec.kind == "regression":
        names = ("pearson", "spearman")
    elif spec.kind in ("causal_lm", "seq2seq"):
        names = ("token_accuracy",)
    elif spec.kind == "extractive_qa":  # computed by data.qa.squad_scores over decoded answers
        names = ("exact_match", "f1")
    else:
        names = ("accuracy", *(m for m in _CLASSIFICATION if m == spec.primary_metric and m != "accuracy"))
    return (*names, "score")


_CLASSIFICATION = {"accuracy": accuracy, "f1": f1_binary, "macro_f1": macro_f1, "matthews": matthews,
                   "mcc": matthews}
"""Classification metrics by the name a task gives its primary one (GLUE's f1/matthews, a table's mcc)."""


GENERATION_METRICS = ("exact_match", "chrf", "bleu", "rouge_l")
"""What a seq2seq model's generated targets, or a causal LM's responses generated from the prompts, score on the
validation split (`generation_metrics`), beside the teacher-forced token accuracy; a search ranks by any of them
as `metric=eval_<name>` or `objectives=`."""


def generation_metric_names(spec: TaskSpec) -> tuple[str, ...]:
    """GENERATION_METRICS where a task's rows have something to generate: seq2seq targets, causal responses."""
    return GENERATION_METRICS if spec.kind == "seq2seq" or (spec.kind == "causal_lm" and spec.responses) else ()


class _Whitespace:
    """rouge-score's tokenizer interface: whitespace tokens as they are (its default lowercases and drops every
    character outside [a-z0-9], which would leave a non-Latin target nothing to score)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def generation_metrics(outputs: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """Each on a 0-1 scale like every other score here (whitespace runs count as one space):

    exact_match: the share of outputs equal to their reference; chrf: corpus chrF (sacrebleu's defaults: character
    6-grams, beta 2); bleu: corpus BLEU (sacrebleu: up to 4-grams, brevity penalty, its 13a tokenizer; the n-gram
    orders that no output is long enough for are left out, which short targets such as words or phonemes need);
    rouge_l: the mean over rows of ROUGE-L F1 (longest common subsequence of whitespace tokens, rouge-score).

    A row's reference may be a list of several (DART's annotations): an output matches if it equals any; BLEU
    and chrF count n-grams against all of them (sacrebleu's multi-reference streams, a shorter list padded with
    None, so the brevity penalty reads the closest reference length); ROUGE-L takes the best reference's F1.
    """
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF

    if not references:
        return dict.fromkeys(GENERATION_METRICS, 0.0)
    refs = [[" ".join(r.split()) for r in ([row] if isinstance(row, str) else row)] or [""] for row in references]
    outputs = [" ".join(o.split()) for o in outputs]
    exact = sum(o in r for o, r in zip(outputs, refs, strict=True)) / len(refs)
    rouge = RougeScorer(["rougeL"], tokenizer=_Whitespace())
    rouge_l = sum(max(rouge.score(one, o)["rougeL"].fmeasure for one in r) for o, r in zip(outputs, refs, strict=True))
    # None: no i-th reference for this row (sacrebleu's documented padding; its type hints say str only)
    streams: Any = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    return {"exact_match": float(exact), "chrf": float(CHRF().corpus_score(outputs, streams).score) / 100,
            "bleu": min(1.0, float(BLEU(effective_order=True).corpus_score(outputs, streams).score) / 100),
            "rouge_l": float(rouge_l) / len(refs)}


def compute_metrics(spec: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one evaluation pass, plus `score` = the primary metric.

    classification: predictions are class ids (N,) or logits (N, C). regression: (N,) or (N, 1).
    causal_lm: token ids (any shape) or logits (..., V) against labels of the same shape; positions labelled
    -100 (prompt, padding) are dropped, so the already flattened and filtered arrays work as well.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if np.issubdtype(predictions.dtype, np.floating) and not np.isfinite(predictions).all():
        # a student whose outputs overflowed: no score at all (ranked last), not one of its finite rows' ranks
        return dict.fromkeys(metric_names(spec), float("nan"))
    if spec.kind == "regression":
        pred, true = predictions.reshape(-1).astype(np.float64), labels.reshape(-1).astype(np.float64)
        out = {"pearson": pearson(pred, true), "spearman": spearman(pred, true)}
    elif spec.kind == "extractive_qa":  # (N, 2) positions, or (N, T, 2) start and end logits
        out = window_span_scores(predictions.argmax(axis=1) if predictions.ndim == 3 else predictions, labels)
    else:
        if predictions.ndim == labels.ndim + 1:
            predictions = predictions.argmax(axis=-1)
        keep = labels != IGNORE_INDEX
        pred, true = predictions[keep].astype(np.int64), labels[keep].astype(np.int64)
        if spec.kind in ("causal_lm", "seq2seq"):
            out = {"token_accuracy": accuracy(pred, true)}
        else:
            out = {name: _CLASSIFICATION[name](pred, true) for name in metric_names(spec)[:-1]}
    out["score"] = out[spec.primary_metric]
    return out


def baseline_score(spec: TaskSpec, train_labels: np.ndarray, labels: np.ndarray) -> float:
    """The score of the best constant answer learnt from the training labels, on `labels`: the majority class
    (for a causal LM, the most frequent target token) or, for regression, the mean (correlation 0). A model
    that does not beat it has learnt nothing from its inputs. Extractive QA: 0 (the empty answer; its score on
    SQuAD 2.0, the share of unanswerable questions, needs the questions, not the window labels)."""
    if spec.kind == "extractive_qa":
        return 0.0
    train_labels, labels = np.asarray(train_labels).reshape(-1), np.asarray(labels).reshape(-1)
    if spec.kind == "regression":
        constant = float(train_labels.astype(np.float64).mean())
    else:
        values, counts = np.unique(train_labels[train_labels != IGNORE_INDEX], return_counts=True)
        constant = values[counts.argmax()]
    return compute_metrics(spec, np.full(labels.shape, constant), labels)["score"]
