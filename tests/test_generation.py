"""An encoder-decoder's generation metrics (exact match, chrF, BLEU, ROUGE-L), beam search and its schedule, each
stack's hidden loss in the logs, and the generation keys refused where nothing generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_utils import seq2seq_batch

from kdsearch.config.overrides import load_config
from kdsearch.core.errors import ConfigError
from kdsearch.data.metrics import GENERATION_METRICS, generation_metrics
from kdsearch.methods.bridges import Bridge
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.run import models
from kdsearch.run.loop import generates, step_losses
from kdsearch.run.step import Distiller, teacher_forward
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_thread")
SEQ2SEQ_TASK = ["teacher=tiny-t5", "task.name=seq2seq_default"]



# --- metrics ------------------------------------------------------------------------------------------------
def test_bleu_and_rouge_l_score_generated_outputs_on_a_0_1_scale() -> None:
    perfect = generation_metrics(["HH AH0 L OW1", "K AE1 T"], ["HH AH0 L OW1", "K AE1 T"])
    assert perfect == pytest.approx(dict.fromkeys(GENERATION_METRICS, 1.0))
    # one of two words loses its last phoneme: ROUGE-L F1 of that row is 2 x 1 x 3/4 / (1 + 3/4)
    scores = generation_metrics(["HH AH0 L OW1", "K AE1 T"], ["HH AH0 L OW1", "K AE1 T S"])
    assert scores["exact_match"] == 0.5
    assert scores["rouge_l"] == pytest.approx((1 + 2 * 0.75 / 1.75) / 2)
    assert 0 < scores["bleu"] < 1
    assert generation_metrics(["x"], ["y"]) == dict.fromkeys(GENERATION_METRICS, 0.0)


def test_short_targets_still_get_a_bleu_and_any_script_a_rouge_l() -> None:
    # one- and two-word targets have no 4-grams: BLEU over the orders they have, not 0 for every output
    assert generation_metrics(["two", "ten one"], ["two", "ten one"])["bleu"] == pytest.approx(1.0)
    # rouge-score's own tokenizer keeps only [a-z0-9]: whitespace tokens score a Cyrillic target too
    assert generation_metrics(["привет мир"], ["привет мир друг"])["rouge_l"] == pytest.approx(0.8)


# --- the schedule and beams -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "epochs", "expected"), [
    (1, 3, [True, True, True]),      # the default: every epoch, as before these keys existed
    (0, 3, [False, False, True]),    # the last epoch only
    (2, 5, [False, True, False, True, True]),
])
def test_generation_runs_every_k_epochs_and_after_the_last(every: int, epochs: int, expected: list[bool]) -> None:
    cfg = load_config([*SEQ2SEQ_TASK, f"eval.generate_every={every}", f"train.epochs={epochs}"])
    assert [generates(cfg, e) for e in range(epochs)] == expected


def test_beam_search_generates_batched_and_scores_every_metric(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kdsearch.run.evaluation import evaluate_generation
    from kdsearch.run.prepare import load_teacher, prepare

    cfg = load_config([*SEQ2SEQ_TASK, "task.train_size=64", "task.eval_size=12", "finetune.epochs=1",
                       "finetune.batch_size=32", f"cache_dir={tmp_path}"])
    prepared = prepare(cfg)
    teacher, tok = load_teacher(prepared, torch.device("cpu")), AutoTokenizer.from_pretrained(prepared.teacher_dir)
    data = prepared.data["validation"]
    calls: list[dict] = []
    generate = teacher.generate

    def spy(**kwargs: object) -> torch.Tensor:
        calls.append(kwargs)
        return generate(**kwargs)

    teacher.generate = spy  # type: ignore[method-assign]
    greedy = evaluate_generation(teacher, data, tok, family="seq2seq", pad_id=prepared.pad_id,
                                 device=torch.device("cpu"), batch_size=8)
    beams = evaluate_generation(teacher, data, tok, family="seq2seq", pad_id=prepared.pad_id,
                                device=torch.device("cpu"), batch_size=8, num_beams=3)
    assert [c["num_beams"] for c in calls] == [1, 1, 3, 3]  # 12 rows in batches of 8, greedy then beams
    assert [len(c["input_ids"]) for c in calls] == [8, 4, 8, 4]
    for scores in (greedy, beams):
        assert set(scores) == {f"eval_{m}" for m in GENERATION_METRICS}
        assert all(0 <= v <= 1 for v in scores.values())


def test_a_run_generates_where_asked_and_logs_each_stacks_hidden_loss(tmp_path: Path) -> None:
    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import prepare

    cfg = load_config([*SEQ2SEQ_TASK, "task.train_size=64", "task.eval_size=8", "finetune.epochs=1",
                       "train.epochs=3", "train.max_steps_per_epoch=2", "train.batch_size=16", "eval.generate_every=0",
                       "eval.num_beams=2", f"cache_dir={tmp_path}"])
    validate(cfg)
    reports: list[dict] = []
    run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    generated = [{f"eval_{m}" for m in GENERATION_METRICS} <= set(r) for r in reports]
    assert generated == [False, False, True]
    assert all({"eval_token_accuracy", "eval_loss", "train_hidden", "train_hidden_encoder", "train_hidden_decoder"}
               <= set(r) for r in reports)  # teacher-forced scores and the loss terms every epoch
    last = reports[-1]
    assert last["train_hidden"] == pytest.approx(last["train_hidden_encoder"] + last["train_hidden_decoder"])


# --- each stack's hidden loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_each_stacks_hidden_loss_is_logged_beside_the_total(reduce: str) -> None:
    config = models.teacher_config(models.resolve_teacher("tiny-t5"), vocab_size=50)
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class("seq2seq").from_config(config))
    student = models.build_student(teacher, layers=2, hidden_size=None, init="random", seed=3).eval()
    cfg = load_config([*SEQ2SEQ_TASK, f"distill.hidden_reduce={reduce}", "student.decoder_layers=1"])
    distiller = Distiller(student, Bridge(), kind="seq2seq", losses=step_losses(cfg.distill), decoder_bridge=Bridge())
    pairs, dec_pairs = run_pairs(cfg, 4), run_pairs(cfg, 4, stack="decoder")
    assert len(pairs) == 3 and len(dec_pairs) == 2  # embeddings + 2 layers; embeddings + 1 layer
    batch = seq2seq_batch(start=teacher.config.decoder_start_token_id)
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), pairs, dec_pairs)
    enc, dec, total = terms["hidden_encoder"], terms["hidden_decoder"], terms["hidden"]
    assert enc > 0 and dec > 0 and not enc.requires_grad and not dec.requires_grad  # logged, never trained on
    if reduce == "sum":
        torch.testing.assert_close(enc + dec, total.detach())
    else:  # the mean over all five pairs weighs each stack by its pairs
        torch.testing.assert_close((3 * enc + 2 * dec) / 5, total.detach())
    assert distiller(batch, teacher_forward(teacher, batch, hidden=True), [], []).keys().isdisjoint(
        {"hidden", "hidden_encoder", "hidden_decoder"})


# --- refusals ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.num_beams=0"], "eval.num_beams=0: must be >= 1 (1 = greedy)"),
    ([*SEQ2SEQ_TASK, "eval.generate_every=-1"], "eval.generate_every=-1: must be >= 0"),
    (["eval.num_beams=4"], "eval.num_beams=4: read only where outputs are generated (an encoder-decoder teacher"),
    (["teacher=tiny-gpt2", "student.decoder_layers=1"],
     "student.decoder_layers=1: read only with an encoder-decoder teacher"),
])
def test_generation_and_decoder_keys_where_nothing_generates_are_one_line(overrides: list[str],
                                                                          message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        validate(load_config(overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["space=smoke", "objectives=[eval_bleu:max]"], "objectives=eval_bleu:max: no trial reports eval_bleu, which "
                                                    "scores generated outputs"),
    (["space=seq2seq", "objectives=[eval_rouge_l:max]", "eval.generate_every=2"],
     "eval_rouge_l is scored only every eval.generate_every=2 epochs"),
    (["space=seq2seq", "eval.num_beams=0"], "eval.num_beams=0: must be >= 1"),
])
def test_a_search_ranking_by_what_it_cannot_score_exits_2_before_ray(argv: list[str], message: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch import tune

    assert tune.main([*argv, "dry_run=true", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                      f"cache_dir={tmp_path}/cache"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not ray.is_initialized()


def test_a_search_may_rank_by_any_generated_metric(tmp_path: Path) -> None:
    from kdsearch.search.settings import check_search, parse_search_args

    for name in GENERATION_METRICS:
        settings, space = parse_search_args(["space=seq2seq", f"objectives=[eval_{name}:max]", "dry_run=true",
                                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
        check_search(settings, space)
