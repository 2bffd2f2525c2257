"""Segment ids (token_type_ids) reach every forward of a model that reads them: the distillation step, the
teacher (live and cached), evaluation, latency, fine-tuning, TED stage 1, Flex-KD unit scores and the
analysis. Tiny BERT on the CPU, with rows whose second segment has type 1."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from kdsearch.analyze import collect
from kdsearch.config.overrides import load_config
from kdsearch.data.encoding import collate
from kdsearch.data.tasks import task_spec
from kdsearch.methods.bridges import BRIDGES, BridgeInputs
from kdsearch.methods.bridges.ted import build_filters, filter_spec, train_stage1
from kdsearch.methods.bridges.units import score_units
from kdsearch.run import models, teacher_cache
from kdsearch.run.evaluation import evaluate, forward_latency_ms, make_loader
from kdsearch.run.loop import step_losses
from kdsearch.run.prepare import Prepared, fit_task
from kdsearch.run.step import Distiller, teacher_forward

SPEC = task_spec("default")
CPU = torch.device("cpu")


@pytest.fixture
def teacher() -> torch.nn.Module:
    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=50), SPEC)
    assert models.uses_segments(config)
    torch.manual_seed(0)
    model = models.task_model_class("encoder").from_config(config)
    with torch.no_grad():  # segment embeddings large enough that dropping them shows in the logits
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 1)
    return models.freeze(model)


@pytest.fixture
def rows() -> datasets.Dataset:
    """Pair rows of 6-9 tokens, the second segment (its last 3 tokens) of type 1."""
    g = torch.Generator().manual_seed(0)
    lengths = [6, 9, 7, 8, 6, 9, 8, 7]
    return datasets.Dataset.from_dict({
        "input_ids": [torch.randint(5, 50, (n,), generator=g).tolist() for n in lengths],
        "attention_mask": [[1] * n for n in lengths],
        "token_type_ids": [[0] * (n - 3) + [1] * 3 for n in lengths],
        "labels": [i % 2 for i in range(len(lengths))]})


def _batch(rows: datasets.Dataset) -> dict[str, torch.Tensor]:
    batch = collate(list(rows), pad_id=0)
    return {**batch, "row": torch.arange(len(rows))}  # batches carry more than the model reads


def _direct(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, segments: bool) -> torch.Tensor:
    with torch.no_grad():
        extra = {"token_type_ids": batch["token_type_ids"]} if segments else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits


def _spy(model: torch.nn.Module) -> list[torch.Tensor | None]:
    """The token_type_ids every forward of `model` is called with (None where a call leaves them out)."""
    seen: list[torch.Tensor | None] = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(kwargs.get("token_type_ids")),
                                    with_kwargs=True)
    return seen


def _all_given(seen: list[torch.Tensor | None]) -> bool:
    return bool(seen) and all(t is not None and bool(t.any()) for t in seen)


def test_segment_ids_change_the_logits(teacher: torch.nn.Module, rows: datasets.Dataset) -> None:
    batch = _batch(rows)
    assert not torch.allclose(_direct(teacher, batch, segments=True), _direct(teacher, batch, segments=False))


def test_the_teacher_forward_and_the_step_pass_segment_ids(teacher: torch.nn.Module, rows: datasets.Dataset) -> None:
    batch = _batch(rows)
    outputs = teacher_forward(teacher, batch, hidden=True)
    torch.testing.assert_close(outputs.logits, _direct(teacher, batch, segments=True))
    student = models.build_student(teacher, layers=2, hidden_size=None, init="teacher", seed=0).eval()
    cfg = load_config(["distill.bridge=identity"])
    bridge = BRIDGES.get("identity").build(BridgeInputs(pairs=[(1, 2), (2, 4)], d_student=64, d_teacher=64))
    distiller = Distiller(student, bridge, kind="classification", losses=step_losses(cfg.distill))
    terms = distiller(batch, outputs, [(1, 2), (2, 4)])
    torch.testing.assert_close(terms["logits"], _direct(student, batch, segments=True))
    assert not torch.allclose(terms["logits"], _direct(student, batch, segments=False))


def test_the_teacher_cache_stores_the_outputs_with_segment_ids(teacher: torch.nn.Module, rows: datasets.Dataset,
                                                               tmp_path: Path) -> None:
    teacher_cache.build(teacher, rows, tmp_path, pad_id=0, precision="fp32", device=CPU)
    cached = teacher_cache.TeacherCache.open(tmp_path).logits
    torch.testing.assert_close(cached, _direct(teacher, _batch(rows), segments=True))


def test_evaluation_and_latency_pass_segment_ids(teacher: torch.nn.Module, rows: datasets.Dataset) -> None:
    logits = _direct(teacher, _batch(rows), segments=True)
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(rows["labels"]))
    seen = _spy(teacher)
    metrics = evaluate(teacher, rows, spec=SPEC, batch_size=len(rows), pad_id=0, device=CPU)
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    forward_latency_ms(teacher, rows, rows=4, pad_id=0, device=CPU, repeats=1)
    assert _all_given(seen) and len(seen) == 1 + 3  # evaluation, then latency: 2 untimed passes + 1


def test_fine_tuning_stage1_unit_scores_and_analysis_pass_segment_ids(teacher: torch.nn.Module,
                                                                      rows: datasets.Dataset) -> None:
    seen = _spy(teacher)
    loader = make_loader(rows, batch_size=4, shuffle=True, seed=0, pad_id=0)
    cfg = load_config(["finetune.epochs=1", "finetune.batch_size=4"])
    teacher.requires_grad_(True)  # fine-tuned, then frozen again as a teacher
    fit_task(teacher, {"train": rows, "validation": rows}, spec=SPEC, cfg=cfg, pad_id=0, device=CPU)
    models.freeze(teacher)
    train_stage1(teacher, build_filters([1, 4], 64, 16, filter_spec(cfg.ted)), d_f=16, loader=loader,
                 kind="classification", n_out=2, epochs=1, lr=1e-3, device=CPU)
    score_units(teacher, loader, kind="classification", method="grad", batches=2, device=CPU)
    student = models.build_student(teacher, layers=2, hidden_size=None, init="teacher", seed=0).eval()
    seen_student = _spy(student)
    prepared = Prepared(spec=SPEC, family="encoder", teacher_dir="", data={"validation": rows}, pad_id=0,
                        n_teacher=4, d_teacher=64, teacher_metrics={})
    collect(teacher, student, prepared, student_layers=[1, 2], n_teacher=4, max_batches=None)
    # fine-tune 2 batches + evaluation 1, stage 1 2, unit scores 2, analysis 1
    assert _all_given(seen) and len(seen) == 8
    assert _all_given(seen_student)
