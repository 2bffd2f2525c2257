"""task.name=table: any labelled table of the user's (their column names, string or integer labels, their
metric), checked in one line per problem, trained, exported with its class names and scored again."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

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


REVIEWS = {"très mauvais": ["awful", "broken", "refund", "angry"], "ok": ["fine", "average", "decent", "okay"],
           "great!": ["love", "perfect", "excellent", "superb"]}


def _reviews(root: Path) -> Path:
    """A table kdsearch was not written for: a column it must ignore, text columns with a space and a hyphen in
    their names, labels with an accent, a space and punctuation, the validation split named valid.csv."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    for split, n in (("train", 400), ("valid", 90), ("test", 90)):
        with (root / f"{split}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Review ID", "Customer Message", "prod-area", "Sentiment Label"])
            for i in range(n):
                label = rng.choice(list(REVIEWS))
                writer.writerow([f"R{i}", f"the product is {rng.choice(REVIEWS[label])} and its "
                                 f"{rng.choice(['shipping', 'price', 'colour'])} was noted",
                                 rng.choice(["home", "garden", "toys"]), label])
    return root


@pytest.mark.slow
def test_a_fresh_table_goes_from_search_to_a_pipeline_that_prints_its_labels(tmp_path: Path) -> None:
    """The user's own CSV end to end through the commands a user types: a 2-trial search, the best student
    exported with the table's label names, answering through a transformers pipeline, scored on the test split
    beside its teacher, and its strategy trained again from the exported config."""
    from transformers import pipeline

    data = _reviews(tmp_path / "reviews")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cache = f"cache_dir={tmp_path}/cache"  # the teacher, fine-tuned once by the search, is read by every command

    def run(command: str, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", f"kdsearch.{command}", *args, cache], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    out = run("tune", "space=smoke", "name=reviews", f"tracking.uri={uri}", "task.name=table", f"task.data_dir={data}",
              "task.text_columns=[Customer Message,prod-area]", "task.label_column=Sentiment Label",
              "task.metric=macro_f1", "task.train_size=null", "finetune.epochs=10", f"results_dir={tmp_path}/results")
    student = tmp_path / "results" / "reviews" / "best_student"
    assert out.strip().splitlines()[-1] == f"best student saved to {student}"
    names = sorted(REVIEWS)  # the classes in a stable order: sorted, as read from the training split
    assert json.loads((student / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(names)}

    classify = pipeline("text-classification", model=str(student))
    with (data / "test.csv").open() as f:
        rows = list(csv.DictReader(f))[:30]
    answers = classify([{"text": r["Customer Message"], "text_pair": r["prod-area"]} for r in rows])
    assert {a["label"] for a in answers} <= set(names)
    right = sum(a["label"] == r["Sentiment Label"] for a, r in zip(answers, rows, strict=True))
    assert right >= 0.8 * len(rows)  # one word decides the label: a student that learnt anything reads it

    scored = run("evaluate", f"model={student}", "with_teacher=true", f"tracking.uri={uri}")
    table = {line.split()[0]: line.split() for line in scored.splitlines() if line.split()[:1] in (["student"],
                                                                                                   ["teacher"])}
    assert float(table["student"][3]) >= 0.8 and float(table["teacher"][3]) >= 0.8  # macro_f1 on the test split
    assert table["student"][5] == table["teacher"][5] == "90"  # the test split's rows

    again = run("train", f"config={student / 'kdsearch_config.yaml'}", "train.epochs=1",
                f"output_dir={tmp_path}/again")
    assert again.strip().splitlines()[-1] == f"student saved to {tmp_path}/again/student"
    assert json.loads((tmp_path / "again" / "student" / "config.json").read_text())["label2id"] == {
        n: i for i, n in enumerate(names)}