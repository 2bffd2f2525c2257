"""Extractive question answering: the embedded task, SQuAD files, windows over long contexts, the span loss and
its KD term against their formulas, SQuAD's EM/F1 and best-span decoding on hand-computed cases, the refusals,
and a short run whose exported student answers from its folder alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.encoding import collate, tokenize_task, train_texts
from kdsearch.data.loading import load_raw_task
from kdsearch.data.qa import (
    CLS_INDEX,
    decode_answers,
    encode_qa,
    exact_match,
    normalize_answer,
    squad_scores,
    token_f1,
)
from kdsearch.data.qa_task import qa_default_rows
from kdsearch.methods.losses import logit_kl, span_kd, span_loss, task_loss
from kdsearch.run import models
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_thread")



# --- the embedded task -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("unanswerable", [False, True])
def test_the_embedded_task_is_seeded_and_every_answer_is_where_it_says(unanswerable: bool) -> None:
    rows = qa_default_rows(60, 20, unanswerable=unanswerable)
    assert rows == qa_default_rows(60, 20, unanswerable=unanswerable)
    assert [len(rows[s]["id"]) for s in ("train", "validation", "test")] == [60, 20, 20]
    train = rows["train"]
    empty = 0
    for context, question, answers in zip(train["context"], train["question"], train["answers"], strict=True):
        if not answers["text"]:
            empty += 1
            continue
        (text,), (start,) = answers["text"], answers["answer_start"]
        assert context[start:start + len(text)] == text
        name = question.split()[2]
        assert f"{name} " in context  # the question's person is in the context, beside their answer
    assert (empty == 20) if unanswerable else (empty == 0)


def test_contexts_outgrow_one_window_so_the_stride_matters(tmp_path: Path) -> None:
    spec, raw = load_raw_task(TaskConfig(name="qa_default", train_size=40, eval_size=20), cache_dir=tmp_path)
    tok = models.train_tokenizer(train_texts(raw, spec), family="encoder")
    data = {stride: tokenize_task(raw, spec, tok, max_length=64, cache_dir=tmp_path, family="encoder",
                                  segments=True, stride=stride) for stride in (8, 24)}
    for stride, d in data.items():
        train = d["train"]
        assert len(train) > 40  # more windows than questions
        assert max(map(len, train["input_ids"])) == 64
        for feature in train:
            start, end = feature["labels"]
            if (start, end) == (CLS_INDEX, CLS_INDEX):
                continue  # this window does not hold the whole answer
            offsets = feature["offsets"]
            span = feature["context"][offsets[start][0]:offsets[end][1]]
            assert span == feature["answers"][0]
        # every answer lies whole in at least one window
        found = {f["example"] for f in train if f["labels"] != [0, 0]}
        assert found == set(range(40))
        # consecutive windows of a question overlap by `stride` context tokens
        first, second = train[0], train[1]
        assert first["example"] == second["example"] == 0
        tail = [o for o in first["offsets"] if o[0] >= 0][-stride:]
        head = [o for o in second["offsets"] if o[0] >= 0][:stride]
        assert tail == head


# --- losses --------------------------------------------------------------------------------------------------
def test_span_loss_is_the_mean_of_start_and_end_cross_entropy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 2)
    positions = torch.tensor([[1, 3], [0, 0], [6, 6]])
    expected = (F.cross_entropy(logits[..., 0], positions[:, 0]) + F.cross_entropy(logits[..., 1], positions[:, 1])) / 2
    torch.testing.assert_close(span_loss(logits, positions), expected)
    torch.testing.assert_close(task_loss(logits, positions, kind="extractive_qa"), expected)
    # a hand-computed case: uniform logits over 4 positions -> log 4 for start and end
    assert float(span_loss(torch.zeros(1, 4, 2), torch.tensor([[2, 3]]))) == pytest.approx(math.log(4))


def test_span_kd_is_the_kl_of_start_and_end_distributions_over_real_tokens_times_t_squared() -> None:
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 2), torch.randn(2, 5, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    t = 2.0
    expected = 0.0
    for b in range(2):
        n = int(mask[b].sum())
        for k in range(2):  # start, end
            p_t = F.softmax(teacher[b, :n, k] / t, dim=0)
            log_p_s = F.log_softmax(student[b, :n, k] / t, dim=0)
            expected += float((p_t * (p_t.log() - log_p_s)).sum())
    expected = expected / 4 * t**2  # the mean over 2 windows x (start, end)
    assert float(span_kd(student, teacher, temperature=t, mask=mask)) == pytest.approx(expected, rel=1e-5)
    assert float(span_kd(teacher, teacher, temperature=t, mask=mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(span_kd(student, teacher, temperature=1.0)) >= 0
    # padding holds no probability: changing the student's logits there changes nothing
    moved = student.clone()
    moved[1, 3:] += 50
    assert float(span_kd(moved, teacher, temperature=t, mask=mask)) == pytest.approx(expected, rel=1e-5)
    # the registry's other divergences plug in
    assert float(span_kd(student, teacher, temperature=t, mask=mask, logit_loss=logit_kl)) == pytest.approx(
        expected, rel=1e-5)


# --- metrics and decoding ------------------------------------------------------------------------------------
def test_squad_normalisation_exact_match_and_f1_on_hand_computed_cases() -> None:
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an Apple a day") == "apple day"
    assert exact_match("the Piano", "piano") == 1.0 and exact_match("piano", "the violin") == 0.0
    # pred "new york city" vs gold "new york": precision 2/3, recall 1 -> F1 0.8
    assert token_f1("new york city", "New York") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("paris", "") == 0.0 and token_f1("", "paris") == 0.0
    # the max over gold answers; an unanswerable question's gold is ""
    scores = squad_scores(["new york city", "", "rome", "tea"], [["paris", "new york"], [], ["paris"],
                                                                  ["green tea", "tea"]])
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx((0.8 + 1 + 0 + 1) / 4)


def _features(context: str, windows: list[list[tuple[int, int]]]) -> dict[str, list]:
    return {"example": [0] * len(windows), "offsets": [[list(o) for o in w] for w in windows],
            "context": [context] * len(windows), "answers": [["x"]] * len(windows)}


def test_decoding_takes_the_best_valid_span_over_every_window() -> None:
    context = "anna likes tea . ben plays go ."
    # window 1: [CLS] q [SEP] anna likes tea ; window 2: [CLS] q [SEP] tea . ben plays go
    w1 = [(-1, -1), (-1, -1), (-1, -1), (0, 4), (5, 10), (11, 14)]
    w2 = [(-1, -1), (-1, -1), (-1, -1), (11, 14), (15, 16), (17, 20), (21, 26), (27, 29)]
    start1, end1 = np.array([0, 9, 0, 1, 0, 2.0]), np.array([0, 0, 9, 0, 0, 2.0])  # question tokens score high
    start2, end2 = np.array([0, 0, 0, 0, 0, 0, 3.0, 0]), np.array([0, 0, 0, 0, 0, 0, 0, 3.0])
    answers = decode_answers(_features(context, [w1, w2]), [start1, start2], [end1, end2], unanswerable=False)
    assert answers == {0: "plays go"}  # score 6 in window 2 beats "tea" (4); question tokens never answer
    # an end before its start is no span: the best valid one wins
    start, end = np.array([0, 0, 0, 0, 0, 5.0]), np.array([0, 0, 0, 4.0, 0, 1.0])
    assert decode_answers(_features(context, [w1]), [start], [end], unanswerable=False) == {0: "tea"}
    # max_tokens bounds the span length
    start, end = np.array([0, 0, 0, 5.0, 0, 0]), np.array([0, 0, 0, 0, 0, 5.0])
    assert decode_answers(_features(context, [w1]), [start], [end], unanswerable=False,
                          max_tokens=2) != {0: "anna likes tea"}


def test_squad_v2_decoding_answers_empty_when_the_null_score_wins() -> None:
    context = "anna likes tea ."
    w = [(-1, -1), (-1, -1), (0, 4), (5, 10), (11, 14)]
    start, end = np.array([3.0, 0, 1, 0, 0]), np.array([3.0, 0, 0, 0, 1])  # null 6 > best span 2
    assert decode_answers(_features(context, [w]), [start], [end], unanswerable=True) == {0: ""}
    assert decode_answers(_features(context, [w]), [start], [end], unanswerable=False) == {0: "anna likes tea"}
    start[2], end[4] = 4.0, 4.0  # the span now scores 8
    assert decode_answers(_features(context, [w]), [start], [end], unanswerable=True) == {0: "anna likes tea"}


# --- SQuAD files ---------------------------------------------------------------------------------------------
def _squad_json(rows: list[tuple[str, str, list[tuple[str, int]]]]) -> dict:
    """The official layout: data -> paragraphs -> qas, one paragraph per row here."""
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": c, "qas": [{"id": f"q{i}", "question": q, "answers": [{"text": t, "answer_start": s}
                                                                           for t, s in a],
                                "is_impossible": not a}]} for i, (c, q, a) in enumerate(rows)]}]}


ROWS = [("anna likes tea .", "what does anna like ?", [("tea", 11)]),
        ("ben plays go . anna plays chess .", "what does ben play ?", [("go", 10), ("go", 10)]),
        ("carla lives in rome .", "where does dev live ?", [])]


@pytest.mark.parametrize("layout", ["json", "jsonl_flat", "jsonl_articles"])
def test_squad_files_load_in_the_official_and_the_flat_layouts(layout: str, tmp_path: Path) -> None:
    data = _squad_json(ROWS)
    for stem in ("train", "dev"):
        if layout == "json":
            (tmp_path / f"{stem}-v2.0.json").write_text(json.dumps(data))
        elif layout == "jsonl_articles":
            (tmp_path / f"{stem}.jsonl").write_text("".join(json.dumps(a) + "\n" for a in data["data"]))
        else:  # the hub's flat columns
            lines = [{"id": f"q{i}", "title": "t", "context": c, "question": q,
                      "answers": {"text": [t for t, _ in a], "answer_start": [s for _, s in a]}}
                     for i, (c, q, a) in enumerate(ROWS)]
            (tmp_path / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    spec, raw = load_raw_task(TaskConfig(name="squad_v2", data_dir=str(tmp_path)), cache_dir=tmp_path / "c")
    assert spec.unanswerable and spec.primary_metric == "f1"
    train = raw["train"]
    assert train["question"] == [q for _, q, _ in ROWS]
    assert train["answers"][1] == {"text": ["go", "go"], "answer_start": [10, 10]}
    assert train["answers"][2] == {"text": [], "answer_start": []}


@pytest.mark.parametrize(("row", "message"), [
    ({"context": "anna likes tea .", "answers": {"text": ["tea"], "answer_start": [11]}},
     r"question q0 has no 'question'"),
    ({"question": "q ?", "answers": {"text": ["tea"], "answer_start": [11]}}, r"has no 'context'"),
    ({"question": "q ?", "context": "anna likes tea ."}, r"has no 'answers'"),
    ({"question": "q ?", "context": "anna likes tea .", "answers": {"text": ["tea"], "answer_start": [5]}},
     r"answer_start=5 does not point at its answer 'tea' in the context \(found 'lik'\)"),
    ({"question": "q ?", "context": "anna likes tea .", "answers": {"text": [], "answer_start": []}},
     r"has no answer; task.name=squad answers every question .*squad_v2"),
])
def test_bad_squad_rows_are_one_config_error_before_ray(row: dict, message: str, tmp_path: Path) -> None:
    for stem in ("train", "dev"):
        (tmp_path / f"{stem}.jsonl").write_text(json.dumps({"id": "q0", **row}) + "\n")
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config(["task.name=squad", f"task.data_dir={tmp_path}"]))
    assert "\n" not in str(err.value)


def test_squad_names_read_the_hub_unless_given_files(tmp_path: Path) -> None:
    assert TaskConfig(name="squad").hub == "rajpurkar/squad"
    assert TaskConfig(name="squad_v2").hub == "rajpurkar/squad_v2"
    assert TaskConfig(name="squad", data_dir=str(tmp_path)).hub is None
    assert TaskConfig(name="qa_default").doc_stride is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["task.name=qa_default", "teacher=tiny-gpt2"], r"extractive QA task .* needs an encoder teacher .* causal LM"),
    (["task.name=qa_default", "teacher=tiny-t5"], r"extractive QA task .* needs an encoder teacher .* "
                                                  r"encoder-decoder"),
    (["task.name=qa_default", "task.doc_stride=40"], r"task.doc_stride=40: must be > 0 and < task.max_length / 2"),
    (["task.name=default", "task.doc_stride=8"], r"task.doc_stride=8: read only by extractive QA tasks"),
    (["task.name=qa_default", "train.teacher_cache=true"], r"not for extractive QA yet"),
])
def test_what_qa_cannot_run_is_one_config_error_before_ray(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config(overrides))
    assert "\n" not in str(err.value)


def test_a_slow_tokenizer_is_refused_with_one_line(tmp_path: Path) -> None:
    spec, raw = load_raw_task(TaskConfig(name="qa_default", train_size=8, eval_size=4), cache_dir=tmp_path)
    fast = models.train_tokenizer(train_texts(raw, spec), family="encoder")

    class Slow:  # what a tokenizer without offset mapping says of itself
        is_fast = False

        def __len__(self) -> int:
            return len(fast)

    with pytest.raises(ConfigError, match=r"extractive QA needs a fast tokenizer .* Slow is a slow one"):
        tokenize_task(raw, spec, Slow(), max_length=64, cache_dir=tmp_path, family="encoder",  # type: ignore
                      segments=True)


def test_a_qa_config_validates_and_collates_without_its_decoding_columns(tmp_path: Path) -> None:
    spec = validate(load_config(["task.name=qa_default_v2", "task.doc_stride=16"]))
    assert spec.kind == "extractive_qa" and spec.unanswerable
    spec, raw = load_raw_task(TaskConfig(name="qa_default", train_size=8, eval_size=4), cache_dir=tmp_path)
    tok = models.train_tokenizer(train_texts(raw, spec), family="encoder")
    data = tokenize_task(raw, spec, tok, max_length=48, cache_dir=tmp_path, family="encoder", segments=True)
    batch = collate([data["train"][i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].shape == (3, 2)


def test_raw_window_positions_score_by_span_overlap() -> None:
    from kdsearch.data.metrics import compute_metrics
    from kdsearch.data.tasks import task_spec

    gold = np.array([[3, 5], [0, 0], [4, 4], [2, 3]])
    predicted = np.array([[3, 5], [0, 0], [2, 3], [3, 6]])
    out = compute_metrics(task_spec("qa_default"), predicted, gold)
    # F1 of [3, 6] vs [2, 3]: 1 common token, precision 1/4, recall 1/2 -> 1/3
    assert out == pytest.approx({"exact_match": 0.5, "f1": (1 + 1 + 0 + 1 / 3) / 4, "score": (2 + 1 / 3) / 4})


# --- runs ----------------------------------------------------------------------------------------------------
def _answers_from_folder(folder: Path, n: int = 20) -> tuple[dict[int, str], dict]:
    """What pipeline("question-answering") did (transformers 5 removed it), from an exported folder alone:
    windows with offsets from its fast tokenizer, one forward, the best span of each context."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    model = AutoModelForQuestionAnswering.from_pretrained(folder)
    assert type(model).__name__ == "BertForQuestionAnswering"
    tok = AutoTokenizer.from_pretrained(folder)
    rows = qa_default_rows(1, n)["test"]
    features = encode_qa(rows, list(range(n)), tokenizer=tok, max_length=64, stride=21, segments=True)
    batch = collate([{k: features[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")}
                     for i in range(len(features["input_ids"]))])
    with torch.no_grad():
        logits = model.eval()(**batch)
    lengths = batch["attention_mask"].sum(-1).tolist()
    answers = decode_answers(features, [s[:k].numpy() for s, k in zip(logits.start_logits, lengths, strict=True)],
                             [e[:k].numpy() for e, k in zip(logits.end_logits, lengths, strict=True)],
                             unanswerable=False)
    return answers, rows


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["distill.bridge=ted", "distill.hidden_reduce=mean"],  # stage-1 filters with per-token span heads
    ["distill.bridge=units", "student.width_ratio=0.5", "student.init=random", "units.ratio=0.25"],
    ["distill.w_relation=1.0"],
    ["distill.logit_loss=jsd", "distill.temperature=2.0", "student.copy_head=true"],
])
def test_every_strategy_family_trains_on_qa(strategy: list[str], tmp_path: Path) -> None:
    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import prepare

    cfg = load_config(["task.name=qa_default_v2", "task.train_size=96", "task.eval_size=24", "finetune.epochs=1",
                       "ted.stage1_epochs=1", "train.epochs=2", "train.batch_size=16", f"cache_dir={tmp_path}",
                       *strategy])
    validate(cfg)
    prepared = prepare(cfg)
    if "distill.bridge=ted" in strategy:
        filters = Path(prepared.bridge_artifacts["teacher_filters"])
        accuracy = json.loads((filters.parent / "head_accuracy.json").read_text())
        assert accuracy and all(0 <= a <= 1 for a in accuracy.values())  # span heads: start and end right
    reports: list[dict] = []
    run_distillation(cfg, prepared, WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    last = reports[-1]
    assert all(math.isfinite(r["train_loss"]) for r in reports)
    own = "relation" if "distill.w_relation=1.0" in strategy else "hidden"
    assert last[f"train_{own}"] > 0 and last["train_logit"] > 0 and 0 <= last["eval_f1"] <= 1


def _official_squad_files(root: Path, rows: dict[str, dict[str, list]]) -> Path:
    """Rows written as SQuAD 1.1 ships them: one JSON per split, data -> paragraphs -> qas, answers as a list of
    {text, answer_start}."""
    root.mkdir(parents=True)
    for split, name in (("train", "train-v1.1.json"), ("validation", "dev-v1.1.json"), ("test", "test.json")):
        cols = rows[split]
        paragraphs = [{"context": context, "qas": [{"id": qid, "question": question, "answers": [
            {"text": t, "answer_start": a} for t, a in zip(answers["text"], answers["answer_start"], strict=True)]}]}
            for qid, context, question, answers in zip(cols["id"], cols["context"], cols["question"],
                                                       cols["answers"], strict=True)]
        (root / name).write_text(json.dumps({"version": "1.1", "data": [{"title": "diary",
                                                                         "paragraphs": paragraphs}]}))
    return root


@pytest.mark.slow
def test_a_two_trial_search_on_squad_files_exports_a_student_that_answers_and_evaluate_scores(tmp_path: Path) -> None:
    """space=qa end to end on SQuAD 1.1's own file format: two trials (logit KD alone, TED with span heads), the
    best student exported, answering questions from its folder alone, and scored on the test file beside its
    teacher."""
    import os
    import subprocess
    import sys

    from kdsearch.tracking import find_search, list_trials

    squad = _official_squad_files(tmp_path / "squad", qa_default_rows(2000, 300, seed=5))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "kdsearch.tune", "space=qa", "name=qa", "num_samples=2",
                           "max_concurrent_trials=1", "task.name=squad", f"task.data_dir={squad}",
                           "task.train_size=null", "task.eval_size=100",
                           "finetune.epochs=4", "finetune.batch_size=16", "train.epochs=1", "ted.stage1_epochs=1",
                           "student.finetune=false", f"tracking.uri={uri}", f"results_dir={tmp_path}/results",
                           f"cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parent = find_search(uri=uri, experiment="kdsearch", search="qa")
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert len(trials) == 2 and all({"eval_exact_match", "eval_f1", "eval_score"} <= set(t.metrics) for t in trials)
    # the teacher reads the question (a random fact's answer scores ~1/3), and so do the distilled students
    assert all(t.metrics["teacher_score"] > 0.5 and t.metrics["eval_f1"] > 0.4 for t in trials), trials
    assert all(t.metrics["train_task"] > 0 and t.metrics["train_logit"] > 0 for t in trials)
    best = tmp_path / "results" / "qa" / "best_student"
    answers, rows = _answers_from_folder(best)
    for i, context in enumerate(rows["context"]):
        assert answers[i] and answers[i] in context  # a span of the context
    right = sum(exact_match(answers[i], gold["text"][0]) for i, gold in enumerate(rows["answers"]))
    assert right >= 12, answers  # a random fact's answer gets ~1/3 of 20
    scores = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "kdsearch.evaluate", f"model={best}", "with_teacher=true",
                           f"out={scores}", f"tracking.uri={uri}", f"cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    written = json.loads(scores.read_text())
    assert written["split"] == "test" and {"student", "teacher"} == set(written["scores"])
    teacher, student = written["scores"]["teacher"], written["scores"]["student"]
    assert teacher["eval_f1"] > 0.8 and student["eval_f1"] > 0.4, written  # a random fact's answer: ~1/3
    assert teacher["rows"] > 300  # windows: more than the 300 test questions


@pytest.mark.parametrize(("argv", "message"), [
    (["task.name=qa_default", "teacher=tiny-gpt2"], "needs an encoder teacher"),
    (["task.name=squad_v2", "task.data_dir=DIR"], "answer_start=5 does not point at its answer 'tea'"),
])
def test_the_train_command_refuses_bad_qa_input_with_one_error_line_and_status_2(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.train import main

    for stem in ("train", "dev"):
        (tmp_path / f"{stem}.jsonl").write_text(json.dumps(
            {"id": "q0", "question": "q ?", "context": "anna likes tea .",
             "answers": {"text": ["tea"], "answer_start": [5]}}) + "\n")
    argv = [a.replace("DIR", str(tmp_path)) for a in argv]
    assert main([*argv, f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_two_workers_score_a_qa_split_as_one_does(tmp_path: Path) -> None:
    from kdsearch.data.tasks import task_spec
    from kdsearch.run.evaluation import evaluate

    spec, raw = load_raw_task(TaskConfig(name="qa_default_v2", train_size=8, eval_size=12), cache_dir=tmp_path)
    tok = models.train_tokenizer(train_texts(raw, spec), family="encoder")
    data = tokenize_task(raw, spec, tok, max_length=48, cache_dir=tmp_path, family="encoder", segments=True)
    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=len(tok)),
                                   task_spec("qa_default_v2"))
    torch.manual_seed(0)
    model = models.task_model_class("encoder", config).from_config(config)
    assert type(model).__name__ == "BertForQuestionAnswering"
    cpu = torch.device("cpu")
    whole = evaluate(model, data["validation"], spec=spec, pad_id=0, device=cpu, batch_size=5)
    class Shared(Exception):  # worker 1's share, caught where it would be sent
        pass

    def send(part: object) -> list:
        raise Shared(part)

    with pytest.raises(Shared) as share:
        evaluate(model, data["validation"], spec=spec, pad_id=0, device=cpu, batch_size=5, rank=1, world_size=2,
                 gather=send)
    split = evaluate(model, data["validation"], spec=spec, pad_id=0, device=cpu, batch_size=5, rank=0,
                     world_size=2, gather=lambda part: [part, share.value.args[0]])
    assert split == pytest.approx(whole)
    assert set(whole) == {"eval_exact_match", "eval_f1", "eval_score", "eval_loss"}


def test_the_hub_path_reads_flat_squad_columns(tmp_path: Path) -> None:
    hub = tmp_path / "hub"  # a datasets repository as the hub serves rajpurkar/squad: flat rows per split
    hub.mkdir()
    for split in ("train", "validation"):
        rows = [{"id": f"{split}{i}", "title": "t", "context": c, "question": q,
                 "answers": {"text": [t for t, _ in a], "answer_start": [s for _, s in a]}}
                for i, (c, q, a) in enumerate(ROWS[:2])]
        (hub / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec, raw = load_raw_task(TaskConfig(name="squad", hub=str(hub)), cache_dir=tmp_path / "c")
    assert raw["validation"]["id"] == ["validation0", "validation1"]
    assert raw["train"]["answers"][0] == {"text": ["tea"], "answer_start": [11]}
