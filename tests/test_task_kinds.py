"""Every task kind trained end to end on tiny local files: regression (STS-B), 3 classes (MNLI), a sentence-pair
task (MRPC), through the same loop a search runs (no Ray), with the metrics each task ranks by."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from data_utils import write

from kdsearch.config.overrides import load_config
from kdsearch.run.loop import WorkerContext, run_distillation
from kdsearch.run.prepare import prepare

WORDS = "red blue green cat dog bird fast slow big small warm cold".split()
CUE = {0: "surely", 1: "perhaps", 2: "never"}  # MNLI: the hypothesis' cue word decides entailment/neutral/contra


def _sentence(rng: random.Random, n: int = 5) -> list[str]:
    return rng.sample(WORDS, n)


def _rows(task: str, n: int, seed: int) -> list[dict]:
    """Rows whose label a bag of words in the second segment gives away: the tests check the task plumbing
    (kinds, heads, segment ids, metrics), not what a tiny model can infer."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        a = " ".join(_sentence(rng))
        if task == "stsb":  # the score is how often "same" appears, 0-5
            score = rng.randint(0, 5)
            b = ["same"] * score + _sentence(rng, 5 - score)
            rows.append({"sentence1": a, "sentence2": " ".join(rng.sample(b, 5)), "label": float(score)})
        elif task == "mnli":
            label = rng.randint(0, 2)
            rows.append({"premise": a, "hypothesis": f"{CUE[label]} " + " ".join(_sentence(rng, 3)), "label": label})
        else:  # mrpc: a paraphrase says "again"
            label = rng.randint(0, 1)
            rows.append({"sentence1": a, "sentence2": " ".join(_sentence(rng, 3) + ["again"] * label),
                         "label": label})
    return rows


def _task_dir(root: Path, task: str) -> Path:
    write(root / task / "train.tsv", _rows(task, 320, 0), "tsv")
    write(root / task / "dev.tsv", _rows(task, 96, 1), "tsv")
    return root / task


@pytest.mark.slow
@pytest.mark.parametrize(("task", "metric", "floor"), [
    ("stsb", "spearman", 0.5),  # no signal scores ~0
    ("mnli", "accuracy", 0.6),  # chance 1/3
    ("mrpc", "f1", 0.8),        # a majority guess of "paraphrase" gives ~0.67 f1
])
def test_each_task_kind_trains_end_to_end(task: str, metric: str, floor: float, tmp_path: Path) -> None:
    cfg = load_config([f"task.name={task}", f"task.data_dir={_task_dir(tmp_path, task)}", f"cache_dir={tmp_path}",
                       "train.epochs=3", "finetune.epochs=6", "train.batch_size=16", "train.dropout=0.0",
                       "task.max_length=24", "student.copy_head=true"])
    # copy_head: a head that starts from the teacher's learns in 3 epochs; the layer-selection code's random head
    # needs about twice that on the regression task (its first epochs score a negative correlation)
    prepared = prepare(cfg)
    assert prepared.spec.kind == ("regression" if task == "stsb" else "classification")
    assert prepared.spec.num_labels == {"stsb": 1, "mnli": 3, "mrpc": 2}[task]
    assert "token_type_ids" in prepared.data["train"].column_names  # a pair task on BERT: segment ids
    reports: list[dict] = []
    run_distillation(cfg, prepared, WorkerContext(report=lambda m, _: reports.append(m), checkpoint=None,
                                                  log=lambda _: None))
    last = reports[-1]
    assert last[f"eval_{metric}"] == last["eval_score"]  # the task's own metric is the one a search ranks
    assert prepared.teacher_metrics["eval_score"] > floor, prepared.teacher_metrics
    assert last["eval_score"] > floor, last
