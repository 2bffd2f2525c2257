"""Task table: what each task name means (kind, text columns, labels, primary metric) and the embedded
`default` task, generated in code so that a run needs no download.

Imports no torch, datasets, Ray, Optuna or MLflow; `kdsearch.data.loading` turns these specs into data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Literal

from kdsearch.config.schema import TABLE_METRICS, TaskConfig
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.core.kinds import TaskKind


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """`default`, a GLUE task name (sst2, cola, ...) or `text`."""
    kind: TaskKind
    num_labels: int
    """Classes; 1 for regression, 0 for causal_lm."""
    text_fields: tuple[str, ...]
    """Input text columns, in order (a pair task has two)."""
    primary_metric: str
    """The key of `compute_metrics` that `score` repeats (what the search optimises)."""
    label_words: tuple[str, ...] = ()
    """Word for class i when a causal model reads the task as `<text> =>` + ` <word>`."""
    label_names: tuple[str, ...] = ()
    """Name of class i (the hub's ClassLabel names): every saved model's id2label, so a pipeline prints them."""
    unanswerable: bool = False
    """extractive_qa: some questions have no answer in their context (SQuAD 2.0), so decoding may answer ""."""
    responses: bool = False
    """causal_lm: every row is prompt -> response (a classification task as a causal LM reads it, or `text` rows
    with prompt+response or instruction+output columns), so a response generated from the prompt can be scored;
    raw text (a `text` column: every token a target) has none."""


_YES_NO = ("no", "yes")
_NLI = ("yes", "no")  # GLUE: 0 = entailment, 1 = not_entailment (qnli, rte)
_ENTAILMENT = ("entailment", "not_entailment")

# Label ids, columns and metrics follow the hub's `glue` configs, so that local TSVs and the hub agree.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("default", "classification", 2, ("sentence",), "accuracy", ("negative", "positive"),
                 ("negative", "positive")),
        TaskSpec("cola", "classification", 2, ("sentence",), "matthews", _YES_NO, ("unacceptable", "acceptable")),
        TaskSpec("sst2", "classification", 2, ("sentence",), "accuracy", ("negative", "positive"),
                 ("negative", "positive")),
        TaskSpec("mrpc", "classification", 2, ("sentence1", "sentence2"), "f1", _YES_NO,
                 ("not_equivalent", "equivalent")),
        TaskSpec("qqp", "classification", 2, ("question1", "question2"), "f1", _YES_NO, ("not_duplicate", "duplicate")),
        TaskSpec("stsb", "regression", 1, ("sentence1", "sentence2"), "spearman"),
        TaskSpec("mnli", "classification", 3, ("premise", "hypothesis"), "accuracy", ("yes", "maybe", "no"),
                 ("entailment", "neutral", "contradiction")),
        TaskSpec("qnli", "classification", 2, ("question", "sentence"), "accuracy", _NLI, _ENTAILMENT),
        TaskSpec("rte", "classification", 2, ("sentence1", "sentence2"), "accuracy", _NLI, _ENTAILMENT),
        TaskSpec("wnli", "classification", 2, ("sentence1", "sentence2"), "accuracy", _YES_NO,
                 ("not_entailment", "entailment")),
        TaskSpec("text", "causal_lm", 0, ("prompt", "response"), "token_accuracy"),
        TaskSpec("table", "classification", 0, ("text",), "accuracy"),  # completed from the files: table_spec
        # encoder-decoder tasks: text_fields are (source, target), the columns every seq2seq split holds
        TaskSpec("seq2seq_default", "seq2seq", 0, ("source", "target"), "token_accuracy"),
        TaskSpec("seq2seq", "seq2seq", 0, ("source", "target"), "token_accuracy"),
        # extractive QA: text_fields are (question, context); rows also hold id and answers {text, answer_start}
        TaskSpec("qa_default", "extractive_qa", 2, ("question", "context"), "f1"),
        TaskSpec("qa_default_v2", "extractive_qa", 2, ("question", "context"), "f1", unanswerable=True),
        TaskSpec("squad", "extractive_qa", 2, ("question", "context"), "f1"),
        TaskSpec("squad_v2", "extractive_qa", 2, ("question", "context"), "f1", unanswerable=True),
    )
}


def table_spec(cfg: TaskConfig, label_names: tuple[str, ...]) -> TaskSpec:
    """task.name=table: the user's columns, kind and metric, and the classes its training split holds."""
    columns = cfg.text_columns or ("text",)
    metric = cfg.metric or TABLE_METRICS[cfg.kind][0]
    if cfg.kind == "regression":
        return TaskSpec("table", "regression", 1, columns, metric)
    return TaskSpec("table", "classification", len(label_names), columns, metric, label_names, label_names)


@dataclass(frozen=True)
class ReleaseLayout:
    """How the original GLUE release (gluebenchmark.com's zips, download_glue_data.py) writes a task's TSVs,
    where that differs from the hub's columns; local files in either layout load alike."""

    columns: tuple[tuple[str, str], ...] = ()
    """(release column, hub column) pairs; a pair applies only when the hub's name is absent."""
    classes: tuple[str, ...] = ()
    """String labels in class-id order (the hub's ClassLabel names)."""
    headerless: tuple[str, ...] = ()
    """Column names of release files that have no header row."""


RELEASE_LAYOUTS: dict[str, ReleaseLayout] = {
    "cola": ReleaseLayout(headerless=("source", "label", "original_label", "sentence")),
    "mrpc": ReleaseLayout(columns=(("Quality", "label"), ("#1 String", "sentence1"), ("#2 String", "sentence2"))),
    "qqp": ReleaseLayout(columns=(("is_duplicate", "label"),)),
    "stsb": ReleaseLayout(columns=(("score", "label"),)),
    "mnli": ReleaseLayout(columns=(("sentence1", "premise"), ("sentence2", "hypothesis"), ("gold_label", "label")),
                          classes=("entailment", "neutral", "contradiction")),
    "qnli": ReleaseLayout(classes=_ENTAILMENT),
    "rte": ReleaseLayout(classes=_ENTAILMENT),
}


def task_spec(name: str) -> TaskSpec:
    """The spec of a task name; an unknown name raises ConfigError listing the choices."""
    if name not in TASKS:
        raise ConfigError(f"task.name={name}: unknown task{did_you_mean(name, list(TASKS))}; "
                          f"choose one of: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def read_by(spec: TaskSpec, family: Literal["encoder", "causal", "seq2seq"]) -> TaskSpec:
    """The task as a teacher family reads it: a causal LM reads any classification task as prompt -> answer
    tokens (a seq2seq task is an encoder-decoder's only; `validate` refuses the other pairings)."""
    if family == "causal" and spec.kind in ("classification", "regression"):
        return replace(spec, kind="causal_lm", num_labels=0, primary_metric="token_accuracy", responses=True)
    return spec


# --- the embedded `default` task ------------------------------------------------------------------------
# Movie-review sentiment with composition, so that depth matters. Rules (`default_score`): a sentiment word
# counts +-1, doubled by an intensifier and flipped by a negator before it (modifiers wait for the next
# sentiment word); `but` discards everything before it; the label is the sign of the total, ties dropped.
# A bag of words reads 64% of it; "not very good" needs each word to see its neighbours before the sum:
# two hops of attention. Validation accuracy of tiny-bert (width 64, 4 heads, AdamW 1e-3 with linear decay,
# batch 32, 10 epochs, two seeds): 1 layer 74-76%, 2 layers 75-91%, 4 layers 83-87%; after only 4 epochs
# 64-66%, 67-71%, 71-73%. A 2-layer model has the capacity but often misses it alone: room for a teacher.
POSITIVE = ("good", "great", "fun", "charming", "clever", "lovely",
            "brilliant", "funny", "moving", "fresh", "smart", "gripping")
NEGATIVE = ("bad", "dull", "awful", "boring", "weak", "clumsy",
            "bland", "tedious", "messy", "silly", "stale", "flat")
NEGATORS = ("not", "never")
INTENSIFIERS = ("very", "really")
NEUTRAL = ("the", "a", "movie", "film", "plot", "story", "cast", "ending", "acting", "script", "music",
           "was", "is", "felt", "seemed", "and", "it", "this", "with", "overall", "at", "times", "of",
           "characters", "scenes")
DEFAULT_TASK_VOCAB: tuple[str, ...] = POSITIVE + NEGATIVE + NEGATORS + INTENSIFIERS + ("but",) + NEUTRAL
DEFAULT_TRAIN_SIZE = 4000
DEFAULT_EVAL_SIZE = 500
_POLARITY = {**dict.fromkeys(POSITIVE, 1), **dict.fromkeys(NEGATIVE, -1)}


def default_score(words: list[str]) -> int:
    """Signed sentiment of a `default` task sentence under the rules above."""
    total, sign, scale = 0, 1, 1
    for word in words:
        if word == "but":
            total, sign, scale = 0, 1, 1
        elif word in NEGATORS:
            sign = -sign
        elif word in INTENSIFIERS:
            scale = 2
        elif word in _POLARITY:
            total += sign * scale * _POLARITY[word]
            sign, scale = 1, 1
    return total


def default_label(sentence: str) -> int | None:
    """1 positive, 0 negative, None for a tie (such sentences are not in the task)."""
    score = default_score(sentence.split())
    return None if score == 0 else int(score > 0)


def _clause(rng: random.Random) -> list[str]:
    words: list[str] = []
    for _ in range(rng.randint(1, 3)):
        words += rng.sample(NEUTRAL, rng.randint(0, 1))
        if rng.random() < 0.25:
            words.append(rng.choice(NEGATORS))
        if rng.random() < 0.2:
            words.append(rng.choice(INTENSIFIERS))
        words.append(rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE))
    return words + rng.sample(NEUTRAL, rng.randint(0, 1))


def _sentence(rng: random.Random) -> list[str]:
    while True:
        words = _clause(rng)
        if rng.random() < 0.2:
            words += ["but", *_clause(rng)]
        if 6 <= len(words) <= 20:
            return words


def default_rows(n_train: int = DEFAULT_TRAIN_SIZE, n_eval: int = DEFAULT_EVAL_SIZE,
                 *, seed: int = 0) -> dict[str, dict[str, list]]:
    """{split: {"sentence": [...], "label": [...]}}: unique sentences, balanced classes; fixed by `seed`.

    Splits train, validation and a held-out test of `n_eval` rows, drawn in that order from one stream, so
    the test rows leave the other two as they were before it existed (and every cache keyed on them).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, dict[str, list]] = {}
    for split, size in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        quota = [size // 2, size - size // 2]
        rows: list[tuple[str, int]] = []
        while len(rows) < size:
            sentence = " ".join(_sentence(rng))
            label = default_label(sentence)
            if label is None or sentence in seen or quota[label] == 0:
                continue
            seen.add(sentence)
            quota[label] -= 1
            rows.append((sentence, label))
        out[split] = {"sentence": [s for s, _ in rows], "label": [y for _, y in rows]}
    return out


# --- the embedded `seq2seq_default` task ----------------------------------------------------------------
# A number written in spaced digits -> its English words ("3 0 1 7" -> "three thousand seventeen"). Depth
# matters: a digit's word depends on how many digits follow it (thousand / hundred / -ty), a 1 in the tens
# joins the next digit into a teen ("1 3" -> thirteen, "3 1" -> thirty one) and zeros are silent. The
# vocabulary is 10 digits and 30 words; 0..9999 gives 10,000 distinct rows, of which train, validation and test
# draw disjoint ones, so the validation numbers are unseen and only the rules carry over.
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
SEQ2SEQ_LIMIT = 10_000
"""Numbers 0..SEQ2SEQ_LIMIT - 1."""


def number_words(n: int) -> str:
    """English words of 0 <= n < 10,000 without `and` or hyphens: 3017 -> `three thousand seventeen`."""
    if n == 0:
        return "zero"
    words: list[str] = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        words += [ONES[thousands], "thousand"]
    if hundreds:
        words += [ONES[hundreds], "hundred"]
    if rest >= 20:
        words += [TENS[rest // 10], *([ONES[rest % 10]] if rest % 10 else [])]
    elif rest:
        words.append(ONES[rest])
    return " ".join(words)


def seq2seq_default_rows(n_train: int = DEFAULT_TRAIN_SIZE, n_eval: int = DEFAULT_EVAL_SIZE,
                         *, seed: int = 0) -> dict[str, dict[str, list]]:
    """{split: {"source": [...], "target": [...]}}: distinct numbers, train, validation then test drawn from one
    seeded permutation (so the splits are disjoint and fixed by `seed`)."""
    if n_train + 2 * n_eval > SEQ2SEQ_LIMIT:
        raise ValueError(f"seq2seq_default holds {SEQ2SEQ_LIMIT} rows; asked for {n_train} + 2 x {n_eval}")
    numbers = list(range(SEQ2SEQ_LIMIT))
    random.Random(seed).shuffle(numbers)
    out: dict[str, dict[str, list]] = {}
    start = 0
    for split, size in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        chosen = numbers[start:start + size]
        start += size
        out[split] = {"source": [" ".join(str(n)) for n in chosen], "target": [number_words(n) for n in chosen]}
    return out
