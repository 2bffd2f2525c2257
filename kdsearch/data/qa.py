"""Extractive question answering: question + context -> overlapping windows with the answer's token span
(`encode_qa`), the best answer span of each question over all of its windows (`decode_answers`), and SQuAD's
exact match and F1 (`squad_scores`, the official evaluation script's normalisation).

Pure Python and numpy (the tokenizer is passed in): imports no torch, datasets, Ray, Optuna or MLflow.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any

import numpy as np

CLS_INDEX = 0
"""The window position a feature without the answer points at (start = end = 0: BERT's [CLS])."""
QA_META = ("example", "offsets", "context", "answers")
"""Columns a tokenised QA feature carries for decoding, which no model reads (collate leaves them out)."""
N_BEST = 20
"""Start and end candidates per window that decoding pairs up (Hugging Face's run_qa default)."""
MAX_ANSWER_TOKENS = 30
"""The longest answer span decoding considers, in tokens (run_qa's max_answer_length)."""
NO_CONTEXT = (-1, -1)
"""The offsets of a question or special token: not a place an answer can start or end."""


def doc_stride(stride: int | None, max_length: int) -> int:
    """task.doc_stride, its null meaning max_length // 3 (128 at BERT's SQuAD max_length 384)."""
    return stride if stride is not None else max_length // 3


def _span(offsets: list[tuple[int, int]], start_char: int, end_char: int) -> tuple[int, int]:
    """Token positions of [start_char, end_char) among the window's context tokens; CLS when it is not whole in
    the window."""
    context = [i for i, o in enumerate(offsets) if o != NO_CONTEXT]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return CLS_INDEX, CLS_INDEX
    start = next(i for i in context if offsets[i][1] > start_char)
    end = next(i for i in reversed(context) if offsets[i][0] < end_char)
    return start, max(start, end)


def encode_qa(batch: dict[str, list], indices: list[int], *, tokenizer: Any, max_length: int, stride: int,
              segments: bool) -> dict[str, list]:
    """A batch of SQuAD rows -> one feature per window: input_ids, attention_mask (token_type_ids with
    `segments`), labels = [start, end] of the first gold answer (CLS for a window without it, or an unanswerable
    question) and QA_META: the row's index, the context-only offsets, the context and the gold texts.

    truncation="only_second" keeps the whole question in every window; windows overlap by `stride` tokens.
    """
    questions = [q.lstrip() for q in batch["question"]]  # SQuAD has questions with leading spaces
    room = max_length - max(len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions) - 4
    enc = tokenizer(questions, batch["context"], truncation="only_second", max_length=max_length,
                    stride=max(0, min(stride, room - 1)), return_overflowing_tokens=True,
                    return_offsets_mapping=True, return_token_type_ids=segments)
    out: dict[str, list] = {key: [] for key in ("input_ids", "attention_mask", "labels", *QA_META)}
    if segments:
        out["token_type_ids"] = []
    for i, row in enumerate(enc["overflow_to_sample_mapping"]):
        sequence = enc.sequence_ids(i)
        offsets = [tuple(o) if sequence[k] == 1 else NO_CONTEXT for k, o in enumerate(enc["offset_mapping"][i])]
        answers = batch["answers"][row]
        if answers["text"]:
            first = answers["answer_start"][0]
            span = _span(offsets, first, first + len(answers["text"][0]))
        else:
            span = (CLS_INDEX, CLS_INDEX)
        for key in ("input_ids", "attention_mask", *(("token_type_ids",) if segments else ())):
            out[key].append(enc[key][i])
        out["labels"].append(list(span))
        out["example"].append(indices[row])
        out["offsets"].append([list(o) for o in offsets])
        out["context"].append(batch["context"][row])
        out["answers"].append(list(answers["text"]))
    return out


def _best_span(start: np.ndarray, end: np.ndarray, offsets: list[list[int]], n_best: int,
               max_tokens: int) -> tuple[float, int, int] | None:
    """(score, start char, end char) of the window's best valid span: start and end on context tokens,
    end >= start, at most `max_tokens` long; None when it has none."""
    best: tuple[float, int, int] | None = None
    for s in np.argsort(start)[::-1][:n_best]:
        for e in np.argsort(end)[::-1][:n_best]:
            if offsets[s][0] < 0 or offsets[e][0] < 0 or e < s or e - s + 1 > max_tokens:
                continue
            score = float(start[s] + end[e])
            if best is None or score > best[0]:
                best = (score, offsets[s][0], offsets[e][1])
    return best


def decode_answers(features: dict[str, list], start_logits: list[np.ndarray], end_logits: list[np.ndarray], *,
                   unanswerable: bool, n_best: int = N_BEST, max_tokens: int = MAX_ANSWER_TOKENS
                   ) -> dict[int, str]:
    """{example index: predicted answer} from every window's start and end logits (each window's own length).

    The best span over all windows of a question; with `unanswerable` (SQuAD 2.0) the answer is "" when the
    null score start[CLS] + end[CLS] (its lowest over the windows, as run_qa takes it) beats that span.
    """
    windows: dict[int, list[int]] = collections.defaultdict(list)
    for i, example in enumerate(features["example"]):
        windows[example].append(i)
    answers: dict[int, str] = {}
    for example, ids in windows.items():
        spans = [(span, i) for i in ids if (span := _best_span(start_logits[i], end_logits[i],
                                                                features["offsets"][i], n_best, max_tokens))]
        null = min(float(start_logits[i][CLS_INDEX] + end_logits[i][CLS_INDEX]) for i in ids)
        if not spans or (unanswerable and null > max(s[0] for s, _ in spans)):
            answers[example] = ""
            continue
        (_, first, last), i = max(spans, key=lambda si: si[0][0])
        answers[example] = features["context"][i][first:last]
    return answers


def window_span_scores(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """exact_match and f1 of (start, end) token spans per window, (N, 2) each: the spans equal, and the F1 of
    their token overlap (SQuAD's F1 in token positions; (0, 0) is the empty answer). What `compute_metrics`
    gives for raw positions; an evaluation scores decoded answers with `squad_scores` instead."""
    predicted, gold = predicted.reshape(-1, 2).astype(np.int64), gold.reshape(-1, 2).astype(np.int64)
    if not len(gold):
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for (ps, pe), (gs, ge) in zip(predicted, gold, strict=True):
        p_empty, g_empty = (ps, pe) == (CLS_INDEX, CLS_INDEX) or pe < ps, (gs, ge) == (CLS_INDEX, CLS_INDEX)
        em += float((ps, pe) == (gs, ge))
        if p_empty or g_empty:
            f1 += float(p_empty and g_empty)
            continue
        common = max(0, min(pe, ge) - max(ps, gs) + 1)
        if common:
            precision, recall = common / (pe - ps + 1), common / (ge - gs + 1)
            f1 += 2 * precision * recall / (precision + recall)
    return {"exact_match": em / len(gold), "f1": f1 / len(gold)}


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Bag-of-tokens F1 of the normalised answers; an empty side scores 1 only against another empty one (the
    SQuAD 2.0 script's rule for unanswerable questions)."""
    pred, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not true:
        return float(pred == true)
    common = sum((collections.Counter(pred) & collections.Counter(true)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact_match and f1 on a 0-1 scale, each the max over a question's gold answers; a question without
    any (SQuAD 2.0's unanswerable) has the one gold answer ""."""
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for prediction, answers in zip(predictions, golds, strict=True):
        answers = answers or [""]
        em += max(exact_match(prediction, a) for a in answers)
        f1 += max(token_f1(prediction, a) for a in answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}
