"""Evaluation metrics per task kind, in plain numpy (no scipy or sklearn needed at run time).

`score` always repeats the task's primary metric: it is the one number a search optimises and MLflow plots.
Imports numpy and kdsearch.tasks only.
"""

from __future__ import annotations

import numpy as np

from kdsearch.kinds import IGNORE_INDEX
from kdsearch.tasks import TaskSpec


def accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true)) if true.size else 0.0


def f1_binary(pred: np.ndarray, true: np.ndarray) -> float:
    """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP; 0 when nothing is positive."""
    tp = np.sum((pred == 1) & (true == 1))
    denom = 2 * tp + np.sum((pred == 1) & (true != 1)) + np.sum((pred != 1) & (true == 1))
    return float(2 * tp / denom) if denom else 0.0


def matthews(pred: np.ndarray, true: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multi-class form; equals the binary formula for 2 classes).

    0 when either side is constant, as sklearn does: a degenerate classifier carries no correlation.
    """
    classes, idx = np.unique(np.concatenate([true, pred]), return_inverse=True)
    t, p = idx[: true.size], idx[true.size:]
    conf = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(conf, (t, p), 1)
    s, c = conf.sum(), np.trace(conf)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)
    denom = np.sqrt((s * s - p_k @ p_k) * (s * s - t_k @ t_k))
    return float((c * s - t_k @ p_k) / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0 (not nan) for a constant input, so an untrained regressor does not break the search."""
    if x.size == 0 or np.ptp(x) == 0 or np.ptp(y) == 0:  # rounding leaves a constant side tiny residuals
        return 0.0
    x, y = x.astype(np.float64) - x.mean(), y.astype(np.float64) - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom else 0.0


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of their ranks (scipy.stats.rankdata's `average`)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank_average(x), rank_average(y))


def metric_names(spec: TaskSpec) -> tuple[str, ...]:
    """The keys `compute_metrics` returns for a task, known before any data is read."""
    names: tuple[str, ...]
    if spec.kind == "regression":
        names = ("pearson", "spearman")
    elif spec.kind == "causal_lm":
        names = ("token_accuracy",)
    else:
        names = ("accuracy", *(m for m in ("f1", "matthews") if spec.primary_metric == m))
    return (*names, "score")


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
    else:
        if predictions.ndim == labels.ndim + 1:
            predictions = predictions.argmax(axis=-1)
        keep = labels != IGNORE_INDEX
        pred, true = predictions[keep].astype(np.int64), labels[keep].astype(np.int64)
        if spec.kind == "causal_lm":
            out = {"token_accuracy": accuracy(pred, true)}
        else:
            out = {"accuracy": accuracy(pred, true)}
            if spec.primary_metric == "f1":
                out["f1"] = f1_binary(pred, true)
            if spec.primary_metric == "matthews":
                out["matthews"] = matthews(pred, true)
    out["score"] = out[spec.primary_metric]
    return out


def baseline_score(spec: TaskSpec, train_labels: np.ndarray, labels: np.ndarray) -> float:
    """The score of the best constant answer learnt from the training labels, on `labels`: the majority class
    (for a causal LM, the most frequent target token) or, for regression, the mean (correlation 0). A model
    that does not beat it has learnt nothing from its inputs."""
    train_labels, labels = np.asarray(train_labels).reshape(-1), np.asarray(labels).reshape(-1)
    if spec.kind == "regression":
        constant = float(train_labels.astype(np.float64).mean())
    else:
        values, counts = np.unique(train_labels[train_labels != IGNORE_INDEX], return_counts=True)
        constant = values[counts.argmax()]
    return compute_metrics(spec, np.full(labels.shape, constant), labels)["score"]
