"""train.teacher_cache: the cached teacher outputs equal the live teacher's, a cached run trains like a live one,
the cache is built once and shared, and the settings it cannot serve are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError
from kdsearch.methods.relations import resolve_relations
from kdsearch.run.evaluation import make_loader
from kdsearch.run.loop import WorkerContext, run_distillation
from kdsearch.run.prepare import load_teacher, prepare
from kdsearch.run.step import teacher_forward
from kdsearch.run.teacher_cache import ROW, TeacherCache, with_rows
from kdsearch.run.validate import validate

SMALL = ["task.train_size=96", "task.eval_size=64", "train.epochs=2", "finetune.epochs=1", "train.dropout=0.0",
         "train.batch_size=16", "distill.layer_map=forward", "distill.w_hidden=1.0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def small(cache: Path, *extra: str) -> Config:
    return load_config([*SMALL, f"cache_dir={cache}", *extra])


def test_cached_outputs_equal_the_live_teacher_at_every_real_token(cache: Path) -> None:
    prepared = prepare(small(cache, "train.teacher_cache=true"), device=torch.device("cpu"))
    assert prepared.teacher_outputs is not None
    stored = TeacherCache.open(prepared.teacher_outputs)
    teacher = load_teacher(prepared, torch.device("cpu"))
    train = with_rows(prepared.data["train"])
    # shuffled, a batch size the cache was not built with: other rows share each batch, other padding lengths
    for batch in make_loader(train, batch_size=7, shuffle=True, seed=3, pad_id=prepared.pad_id):
        live, cached = teacher_forward(teacher, batch, hidden=True), stored.outputs(batch, hidden=True)
        torch.testing.assert_close(cached.logits, live.logits, rtol=1e-5, atol=1e-5)
        real = batch["attention_mask"].bool()
        assert cached.hidden is not None and live.hidden is not None and len(cached.hidden) == len(live.hidden)
        for c, v in zip(cached.hidden, live.hidden, strict=True):
            torch.testing.assert_close(c[real], v[real], rtol=1e-5, atol=1e-5)
            assert not c[~real].any()  # padding is not cached: zero, and masked out of every distance
        assert stored.outputs(batch, hidden=False).hidden is None


def test_a_padded_cache_equals_the_live_teacher_at_every_position_padding_included(cache: Path) -> None:
    cfg = small(cache, "train.teacher_cache=true", "distill.mask_padding=false")
    prepared = prepare(cfg, device=torch.device("cpu"))
    assert prepared.teacher_outputs is not None
    assert prepared.teacher_outputs != prepare(small(cache, "train.teacher_cache=true")).teacher_outputs
    stored = TeacherCache.open(prepared.teacher_outputs)
    assert stored.padded_length == max(map(len, prepared.data["train"]["input_ids"]))
    teacher = load_teacher(prepared, torch.device("cpu"))
    padded_somewhere = False
    # other batch sizes and orders than the cache was built with: every row padded to other lengths
    for size, seed in ((5, 1), (16, 2)):
        for batch in make_loader(with_rows(prepared.data["train"]), batch_size=size, shuffle=True, seed=seed,
                                 pad_id=prepared.pad_id):
            live, cached = teacher_forward(teacher, batch, hidden=True), stored.outputs(batch, hidden=True)
            assert cached.hidden is not None and live.hidden is not None
            for c, v in zip(cached.hidden, live.hidden, strict=True):
                torch.testing.assert_close(c, v, rtol=1e-5, atol=1e-5)  # all positions, padding included
            padded_somewhere |= bool((batch["attention_mask"] == 0).any())
    assert padded_somewhere


def test_an_unmasked_cached_run_trains_like_a_live_one(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cfg: Config) -> list[dict]:
        reports: list[dict] = []
        run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
        return reports

    unmasked = ["distill.mask_padding=false", "distill.distance=mse"]  # TED's MSE over every position
    live = run(small(cache, "train.teacher_cache=false", *unmasked))
    prepare(small(cache, "train.teacher_cache=true", *unmasked))

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached run ran the teacher")

    monkeypatch.setattr("kdsearch.run.loop.teacher_forward", no_teacher)
    cached = run(small(cache, "train.teacher_cache=true", *unmasked))
    for a, b in zip(live, cached, strict=True):
        for key in ("train_hidden", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["eval_score"] == pytest.approx(a["eval_score"], abs=1e-6)


def test_a_cached_run_trains_like_a_live_one_and_builds_the_cache_once(cache: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cfg: Config) -> list[dict]:
        reports: list[dict] = []
        run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
        return reports

    live = run(small(cache, "train.teacher_cache=false"))
    prepare(small(cache, "train.teacher_cache=true"))  # builds the cache (a teacher forward per row, once)

    def no_teacher(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached run ran the teacher")

    monkeypatch.setattr("kdsearch.run.loop.teacher_forward", no_teacher)
    cached = run(small(cache, "train.teacher_cache=true"))
    assert [m["epoch"] for m in cached] == [1, 2]
    for a, b in zip(live, cached, strict=True):
        for key in ("train_task", "train_logit", "train_hidden", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["eval_score"] == pytest.approx(a["eval_score"], abs=1e-6)
    entries = list((cache / "teacher_outputs").iterdir())
    run(small(cache, "train.teacher_cache=true", "train.seed=1", "distill.layer_map=all_to_one"))
    assert sorted(p.name for p in (cache / "teacher_outputs").iterdir()) == sorted(p.name for p in entries)


RELATION = ["distill.w_hidden=0", "distill.w_relation=1", "relation.layers=map"]


def test_cached_projections_equal_the_live_teachers_at_every_real_token(cache: Path) -> None:
    cfg = small(cache, "train.teacher_cache=true", *RELATION)
    prepared = prepare(cfg, device=torch.device("cpu"))
    teacher = load_teacher(prepared, torch.device("cpu"))
    (spec,) = resolve_relations(cfg, teacher.config)
    assert spec.teacher.layers == (2, 4)  # forward map 4 -> 2
    assert prepared.teacher_outputs is not None and prepared.teacher_projections is not None
    stored = TeacherCache.open(prepared.teacher_outputs, prepared.teacher_projections)
    for batch in make_loader(with_rows(prepared.data["train"]), batch_size=7, shuffle=True, seed=5,
                             pad_id=prepared.pad_id):
        live = teacher_forward(teacher, batch, hidden=False, taps=[spec.teacher])
        cached = stored.outputs(batch, hidden=False, taps=[spec.teacher])
        assert cached.hidden is None and cached.projections is not None and live.projections is not None
        got, want = cached.projections["encoder"], live.projections["encoder"]
        assert sorted(got) == sorted(want)
        real = batch["attention_mask"].bool()
        for key, value in want.items():
            torch.testing.assert_close(got[key][real], value[real], rtol=1e-5, atol=1e-5)
            assert not got[key][~real].any()
    # the relation's projections are cached apart: every relation setting shares one copy of the hidden states
    last = prepare(small(cache, "train.teacher_cache=true", "distill.w_hidden=0", "distill.w_relation=1"))
    assert last.teacher_outputs == prepared.teacher_outputs and last.teacher_projections is not None
    assert last.teacher_projections != prepared.teacher_projections
    # and the projections of the teacher's last layer alone cannot serve a map over layers 2 and 4
    with pytest.raises(ValueError, match="built for another relation setting"):
        TeacherCache.open(last.teacher_outputs or "", last.teacher_projections).outputs(
            batch, hidden=False, taps=[spec.teacher])


def test_a_cached_relation_run_trains_like_a_live_one(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cfg: Config) -> list[dict]:
        reports: list[dict] = []
        run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
        return reports

    live = run(small(cache, "train.teacher_cache=false", *RELATION, "relation.kinds=qk+vv"))
    prepare(small(cache, "train.teacher_cache=true", *RELATION))
    monkeypatch.setattr("kdsearch.run.loop.teacher_forward",
                        lambda *a, **k: pytest.fail("a cached run ran the teacher"))
    cached = run(small(cache, "train.teacher_cache=true", *RELATION, "relation.kinds=qk+vv"))
    for a, b in zip(live, cached, strict=True):
        assert b["train_relation"] > 0
        for key in ("train_task", "train_logit", "train_relation", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["eval_score"] == pytest.approx(a["eval_score"], abs=1e-6)


def test_a_batch_from_other_data_is_refused(cache: Path) -> None:
    prepared = prepare(small(cache, "train.teacher_cache=true"), device=torch.device("cpu"))
    stored = TeacherCache.open(prepared.teacher_outputs or "")
    batch = next(iter(make_loader(with_rows(prepared.data["validation"]), batch_size=8, shuffle=False, seed=0,
                                  pad_id=prepared.pad_id)))
    batch[ROW] = batch[ROW].flip(0)  # rows that exist, but not these rows' tokens
    batch["attention_mask"][:, 1:] = 1
    with pytest.raises(ValueError, match="do not match the cached rows"):
        stored.outputs(batch, hidden=True)
    # the same number of tokens in all, but not row by row: two rows of different lengths, their masks swapped
    batch = next(b for b in make_loader(with_rows(prepared.data["train"]), batch_size=2, shuffle=False,
                                        seed=0, pad_id=prepared.pad_id)
                 if b["attention_mask"].sum(1).unique().numel() == 2)
    batch["attention_mask"] = batch["attention_mask"].flip(0)
    with pytest.raises(ValueError, match="do not match the cached rows"):
        stored.outputs(batch, hidden=True)


@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher=tiny-gpt2"], "encoder tasks only"),  # a causal teacher reads the task as language modelling
])
def test_settings_the_cache_cannot_serve_fail_early(cache: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(small(cache, "train.teacher_cache=true", *overrides))


def test_logit_only_runs_need_no_padding_mask(cache: Path) -> None:
    validate(small(cache, "train.teacher_cache=true", "distill.mask_padding=false", "distill.layer_map=none"))


@pytest.mark.parametrize(("overrides", "on"), [
    ([], True),  # 2 epochs x 6 steps x 16 rows read 192 >= 96 cached rows
    (["distill.mask_padding=false"], True),  # served by the cache that keeps padding (TED's MSE)
    (["distill.distance=layer_select_t5"], True),  # reads the states at padding: likewise
    (["train.epochs=1", "train.max_steps_per_epoch=3"], False),  # 48 rows read: the cache pass costs more
    (["distill.mask_padding=false", "distill.layer_map=none"], True),  # logits only: padding never read
    (["train.teacher_cache=false"], False),
])
def test_the_cache_is_on_by_default_where_it_applies_and_pays(cache: Path, overrides: list[str], on: bool) -> None:
    cfg = small(cache, *overrides)
    assert cfg.train.teacher_cache is (False if "train.teacher_cache=false" in overrides else None)
    validate(cfg)
    assert (prepare(cfg, device=torch.device("cpu")).teacher_outputs is not None) is on


def test_an_asked_for_cache_that_the_disk_cannot_hold_is_refused_with_its_size(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    full = namedtuple("usage", "total used free")(2**30, 2**30 - 4096, 4096)  # a disk with 4 KiB left
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(ConfigError, match=r"need \d+\.\d GiB and the cache folder's disk has 0\.0 GiB free"):
        # bf16: a cache no other test built (one already built is read, whatever the disk holds)
        prepare(small(cache, "train.teacher_cache=true", "distill.mask_padding=false", "train.precision=bf16"),
                device=torch.device("cpu"))
    prepare(small(cache, "train.teacher_cache=true", "train.precision=bf16"), device=torch.device("cpu"))
