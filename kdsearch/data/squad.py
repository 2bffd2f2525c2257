"""Extractive QA rows from SQuAD files, the hub or the embedded task, all in the hub's flat layout: id, title,
context, question, answers {text: [...], answer_start: [...]}; every answer checked against its context.

Files in task.data_dir: the official JSON (data -> paragraphs -> qas nesting; train-v1.1.json, dev-v2.0.json,
...), or JSONL whose lines are flat rows or whole articles. Imports datasets; no torch, Ray, Optuna or MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, Features, Sequence, Value, load_dataset

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.qa_task import qa_default_rows
from kdsearch.data.tasks import TaskSpec

QA_FEATURES = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                        "question": Value("string"),
                        "answers": {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int32"))}})
QA_COLUMNS = ("question", "context", "answers")
"""What every extractive QA row needs (id and title are optional)."""
_STEMS = {"train": ("train", "train-v1.1", "train-v2.0"),
          "validation": ("dev", "validation", "dev-v1.1", "dev-v2.0"),
          "test": ("test",)}


def _split_file(root: Path, split: str, where: str) -> Path:
    names = [f"{stem}.{ext}" for stem in _STEMS[split] for ext in ("json", "jsonl")]
    hits = [root / n for n in names if (root / n).is_file()]
    if len(hits) != 1:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        what = f"{len(hits)} {split} files ({', '.join(p.name for p in hits)}); keep one" if hits else (
            f"no {split} file; expected one of {', '.join(names)} (found: {found})")
        raise ConfigError(f"{where}: {what}")
    return hits[0]


def _answers(value: Any) -> dict[str, list]:
    """The hub's {text: [...], answer_start: [...]} from it or from the official [{text, answer_start}, ...]."""
    if isinstance(value, list):
        return {"text": [a.get("text") for a in value], "answer_start": [a.get("answer_start") for a in value]}
    if isinstance(value, dict):
        return {"text": list(value.get("text") or []), "answer_start": list(value.get("answer_start") or [])}
    raise ValueError("answers is neither a list of {text, answer_start} nor {text: [...], answer_start: [...]}")


def _article_rows(article: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for paragraph in article.get("paragraphs", []):
        for qa in paragraph.get("qas", []):
            rows.append({"id": qa.get("id"), "title": article.get("title"), "context": paragraph.get("context"),
                         "question": qa.get("question"), "answers": qa.get("answers")})
    return rows


def _raw_rows(path: Path, where: str) -> list[dict[str, Any]]:
    """The file's questions as flat dicts (still unchecked)."""
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            articles = data.get("data") if isinstance(data, dict) else data
            if not isinstance(articles, list):
                raise ValueError("no top-level 'data' list of articles (SQuAD's layout)")
            return [row for article in articles for row in _article_rows(article)]
        rows: list[dict[str, Any]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                item = json.loads(line)
                rows += _article_rows(item) if "paragraphs" in item else [item]
        return rows
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}: cannot read {path.name}: {err}") from None


def check_rows(rows: list[dict[str, Any]], spec: TaskSpec, where: str) -> dict[str, list]:
    """Columns of checked rows: every question has its text, context and answers, and every answer_start points
    at its answer's text; SQuAD 1.1 tasks have an answer for every question."""
    cols: dict[str, list] = {name: [] for name in QA_FEATURES}
    for n, row in enumerate(rows, 1):
        name = f"question {row.get('id') or n}"
        missing = [c for c in QA_COLUMNS if row.get(c) is None]
        if missing:
            raise ConfigError(f"{where}: {name} has no '{missing[0]}' (extractive QA rows need "
                              f"{', '.join(QA_COLUMNS)}: answers as {{text, answer_start}})")
        try:
            answers = _answers(row["answers"])
        except ValueError as err:
            raise ConfigError(f"{where}: {name}: {err}") from None
        context = str(row["context"])
        for text, start in zip(answers["text"], answers["answer_start"], strict=False):
            if not isinstance(start, int) or context[start:start + len(str(text))] != text:
                found = context[start:start + len(str(text))] if isinstance(start, int) else start
                raise ConfigError(f"{where}: {name}: answer_start={start} does not point at its answer {text!r} in "
                                  f"the context (found {found!r})")
        if len(answers["text"]) != len(answers["answer_start"]):
            raise ConfigError(f"{where}: {name}: answers has {len(answers['text'])} texts but "
                              f"{len(answers['answer_start'])} answer_start values")
        if not answers["text"] and not spec.unanswerable:
            raise ConfigError(f"{where}: {name} has no answer; task.name={spec.name} answers every question "
                              "(unanswerable questions: task.name=squad_v2)")
        for key, value in (("id", row.get("id") or f"{n}"), ("title", row.get("title") or ""),
                           ("context", context), ("question", str(row["question"])), ("answers", answers)):
            cols[key].append(value)
    return cols


def load_qa_splits(cfg: TaskConfig, spec: TaskSpec, splits: tuple[str, ...],
                   cache_dir: str | None) -> dict[str, Dataset]:
    """{split: checked rows}: the embedded task, task.data_dir's files or the hub (task.hub)."""
    if spec.name in ("qa_default", "qa_default_v2"):
        if cfg.data_dir is not None or cfg.hub is not None:
            raise ConfigError(f"task.data_dir={cfg.data_dir}, task.hub={cfg.hub}: task.name={spec.name} is "
                              "generated in code; unset both, or use task.name=squad / squad_v2 for files")
        rows = qa_default_rows(unanswerable=spec.unanswerable)
        return {s: Dataset.from_dict(rows[s], features=QA_FEATURES) for s in splits}
    if cfg.data_dir is not None:
        root = Path(cfg.data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"task.data_dir={cfg.data_dir}: no such directory")
        out = {}
        for split in splits:
            path = _split_file(root, split, f"task.data_dir={cfg.data_dir}")
            where = f"task.data_dir={cfg.data_dir}: {path.name}"
            out[split] = Dataset.from_dict(check_rows(_raw_rows(path, where), spec, where), features=QA_FEATURES)
        return out
    try:
        raw = load_dataset(str(cfg.hub), cache_dir=cache_dir)
    except Exception as err:  # network, unknown repo
        raise ConfigError(f"task.hub={cfg.hub}: cannot load it: {(str(err).splitlines() or [''])[0]}") from None
    missing = [s for s in splits if s not in raw]
    if missing:
        raise ConfigError(f"task.hub={cfg.hub}: needs the {', '.join(map(repr, missing))} split(s); found: "
                          f"{', '.join(raw)}")
    where = f"task.hub={cfg.hub}"
    return {s: Dataset.from_dict(check_rows(list(raw[s]), spec, f"{where}: {s}"), features=QA_FEATURES)
            for s in splits}


def check_qa_task(cfg: TaskConfig, spec: TaskSpec, splits: tuple[str, ...]) -> None:
    """Before Ray: local files read and checked whole (the hub's are checked when they load)."""
    if spec.name in ("qa_default", "qa_default_v2") or cfg.data_dir is not None:
        load_qa_splits(cfg, spec, splits, None)
    elif cfg.hub is None:
        raise ConfigError(f"task.data_dir: task.name={spec.name} needs data; set task.data_dir=<folder with SQuAD "
                          "train and dev .json or .jsonl files> or task.hub=<a hub dataset>")
