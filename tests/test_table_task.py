"""task.name=table: any labelled table of the user's (their column names, string or integer labels, their
metric), checked in one line per problem, trained, exported with its class names and scored again."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.loading import check_task, load_raw_task

TOPICS = {"billing": ["invoice", "charge", "refund", "payment"], "bug": ["crash", "error", "freeze", "broken"],
          "how-to": ["export", "setup", "configure", "install"], "account": ["password", "login", "close", "email"],
          "feature": ["idea", "request", "wish", "dark-mode"]}


def _tickets(root: Path, *, n_train: int = 80, n_dev: int = 40, fmt: str = "csv", extra_dev: str | None = None,
             labels: dict[str, str] | None = None) -> Path:
    """Support tickets: subject and body columns, a `topic` label (strings), one topic word per ticket."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            topic = list(TOPICS)[i % len(TOPICS)]
            word = rng.choice(TOPICS[topic])
            rows.append({"subject": f"ticket {i}", "body": f"hello my {word} please help",
                         "topic": (labels or {}).get(topic, topic)})
        if split == "dev" and extra_dev:
            rows.append({"subject": "odd", "body": "something else", "topic": extra_dev})
        if fmt == "jsonl":
            (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            with (root / f"{split}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    return root


def _task(root: Path, **keys: object) -> TaskConfig:
    return TaskConfig(name="table", data_dir=str(root), text_columns=("subject", "body"), label_column="topic",
                      **keys)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_string_labels_become_classes_in_a_stable_order(tmp_path: Path, fmt: str) -> None:
    spec = check_task(_task(_tickets(tmp_path, fmt=fmt), metric="macro_f1"))
    assert spec.label_names == ("account", "billing", "bug", "feature", "how-to") and spec.num_labels == 5
    assert spec.text_fields == ("subject", "body") and spec.primary_metric == "macro_f1"
    _, raw = load_raw_task(_task(tmp_path, metric="macro_f1"), cache_dir=tmp_path / "cache")
    assert raw["train"].column_names == ["subject", "body", "label"]
    assert spec.label_names[raw["train"][0]["label"]] == "billing"  # the first ticket's topic, as an id


def test_integer_labels_sort_as_numbers(tmp_path: Path) -> None:
    _tickets(tmp_path, labels={"billing": "10", "bug": "2", "how-to": "1", "account": "30", "feature": "4"})
    assert check_task(_task(tmp_path)).label_names == ("1", "2", "4", "10", "30")


@pytest.mark.parametrize(("make", "keys", "message"), [
    (lambda t: _tickets(t, extra_dev="refunds"), {},
     "dev.csv has labels the training split lacks (refunds); a model cannot predict a class it never saw"),
    (lambda t: _tickets(t, labels=dict.fromkeys(TOPICS, "bug")), {},
     "train.csv holds one class (bug) in 'topic': nothing to learn"),
    (lambda t: _tickets(t), {"text_columns": ("subject", "message")}, "no 'message' column"),
    (lambda t: _tickets(t), {"label_column": "category"}, "no 'category' column"),
    (lambda t: _tickets(t), {"kind": "regression"}, "'topic' is 'billing', not a number (task.kind=regression)"),
])
def test_a_table_that_cannot_train_is_one_line(tmp_path: Path, make, keys: dict, message: str) -> None:
    make(tmp_path)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_task(dataclasses.replace(_task(tmp_path), **keys))


@pytest.mark.parametrize(("keys", "message"), [
    (["task.name=sst2", "task.metric=macro_f1"], "task.metric: read only by task.name=table"),
    (["task.name=table", "task.metric=pearson"], "task.metric=pearson: for task.kind=classification choose one of"),
    (["task.name=table", "task.text_columns=[a,b,c]"], "one or two text columns"),
    (["task.name=table"], "task.name=table reads a folder with train and dev files"),
])
def test_table_keys_are_checked_before_anything_runs(keys: list[str], message: str) -> None:
    from kdsearch.run.validate import validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config(keys))


def test_a_score_column_is_a_regression_task(tmp_path: Path) -> None:
    rows = [("a calm day", 0.5), ("a fine film", 3.0), ("the best ever", 4.5), ("awful", 0.0)]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text("review\tstars\n" + "".join(f"{t}\t{s}\n" for t, s in rows))
    cfg = TaskConfig(name="table", data_dir=str(tmp_path), text_columns=("review",), label_column="stars",
                     kind="regression", metric="spearman")
    spec, raw = load_raw_task(cfg, cache_dir=tmp_path / "cache")
    assert spec.kind == "regression" and spec.num_labels == 1 and spec.primary_metric == "spearman"
    assert raw["validation"]["label"] == pytest.approx([0.5, 3.0, 4.5, 0.0])


@pytest.mark.slow
def test_a_table_student_trains_exports_its_class_names_and_rescores(tmp_path: Path) -> None:
    """The user's own table end to end: distilled, reported by its own metric, exported with id2label so that
    a transformers pipeline answers in the user's label names, and scored again from the folder alone."""
    from transformers import pipeline

    from kdsearch.evaluate import score_model
    from kdsearch.run.loop import WorkerContext, export_student, run_distillation
    from kdsearch.run.prepare import prepare

    data = _tickets(tmp_path / "data", n_train=120)
    cfg = load_config(["task.name=table", f"task.data_dir={data}", "task.text_columns=[subject,body]",
                       "task.label_column=topic", "task.metric=macro_f1", "finetune.epochs=3", "train.epochs=1",
                       "train.batch_size=16", f"cache_dir={tmp_path / 'cache'}"])
    prepared = prepare(cfg)
    reports: list[dict] = []
    saved = tmp_path / "checkpoint"

    def report(metrics: dict, checkpoint: Path | None) -> None:
        reports.append(metrics)
        if checkpoint is not None:
            saved.mkdir(exist_ok=True)
            for f in checkpoint.iterdir():
                (saved / f.name).write_bytes(f.read_bytes())

    run_distillation(cfg, prepared, WorkerContext(report=report, log=lambda _: None))
    assert reports[-1]["eval_score"] == reports[-1]["eval_macro_f1"] and "eval_accuracy" in reports[-1]
    out = export_student(cfg, prepared, saved, tmp_path / "student")
    names = ["account", "billing", "bug", "feature", "how-to"]
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(names)}
    answer = pipeline("text-classification", model=str(out))("ticket 3 | hello my refund please help")[0]
    assert answer["label"] in names
    scores = score_model(str(out), cfg, "validation", torch.device("cpu"))
    assert scores["eval_macro_f1"] == pytest.approx(reports[-1]["eval_macro_f1"], abs=1e-6)
