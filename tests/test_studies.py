"""kdsearch.studies: the papers' grids with their numbers, a study as a Space of fixed points, and the seeded
study taken from a finished search (real MLflow store)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdsearch.config.overrides import load_config
from kdsearch.config.parse import flatten
from kdsearch.run.validate import validate
from kdsearch.search import space_model, spaces
from kdsearch.search.studies import GRIDS, grid_space, make_study, row_of, seeded_rows
from kdsearch.tracking import SearchTracker, flatten_params

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")


def test_layer_select_is_the_papers_grid_with_their_sst2_numbers() -> None:
    study = make_study("layer_select", d_teacher=64)
    cells = {(r.name, r.group) for r in study.rows}
    assert cells == {(m, i) for m in ("none", "forward", "reverse", "all_to_one", "random")
                     for i in ("random", "teacher")}
    paper = {r.label: r.paper for r in study.rows}
    assert paper["forward/teacher"] == 92.3 and paper["none/random"] == 81.1 and paper["random/teacher"] is None


def test_grid_space_runs_every_strategy_with_every_seed_and_rows_stay_distinguishable() -> None:
    study = make_study("ted_vs_lwd", d_teacher=64)
    space, filled = grid_space(study, cli={"student": {"layers": 2}}, seeds=[0, 1], concurrency=None)
    points = space_model.initial_points(space)
    assert len(points) == space.budget.num_samples == 5 * 2
    assert space.budget.grace_period == space_model.max_epochs(space)  # ASHA never stops a cell early
    # "logit KD only" (layer_map none) and "no KD" (layer_map none, w_logit 0) must not be confused
    seen = []
    for point in points:
        logged = flatten_params(flatten(space_model.trial_config(space, point)))
        seen.append((row_of(filled, logged).name, point["train.seed"]))
    assert sorted(seen) == sorted((r.name, s) for r in study.rows for s in (0, 1))
    narrow = make_study("flex", d_teacher=64)
    assert narrow.base["student.hidden_size"] == 32


@pytest.mark.parametrize("name", GRIDS.names())  # seeded and confirm take their rows from a search
def test_every_studys_cells_validate_and_map_back_to_their_rows(name: str) -> None:
    """Each cell is a valid run config (kdsearch.validate), and its logged params name its row and no other."""
    study = make_study(name, d_teacher=64)
    # ints typed on the command line for float keys that rows vary (w_logit: 1, not 1.0) still match: the
    # logged params are the coerced config's
    cli = {"student": {"layers": 2}, "distill": {"w_logit": 1, "w_hidden": 1, "temperature": 1}}
    space, filled = grid_space(study, cli=cli, seeds=[0], concurrency=None)
    names = []
    for point in space_model.initial_points(space):
        cfg = space_model.trial_config(space, point)
        validate(cfg)
        names.append(row_of(filled, flatten_params(flatten(cfg))).name)
    assert sorted(names) == sorted(r.name for r in study.rows)


def test_seeded_study_takes_the_best_trial_and_the_spaces_paper_points(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="s", space="layer_select", config={}, code_version="v",
                         objectives=[("eval_score", "max")])
    for trial, (lr, score) in {"a": (1e-3, 0.7), "b": (3e-4, 0.9)}.items():
        cfg = load_config([f"train.lr={lr}", "distill.layer_map=reverse", "distill.w_hidden=12.5"])
        tracker.trial_run(trial, params=flatten(cfg))
        tracker.end_trial(trial, status="FINISHED", final_metrics={"eval_score": score})
    tracker.end_search()
    base, rows = seeded_rows(uri=uri, experiment="kdsearch", search="s")
    assert base["teacher"] == "tiny-bert" and base["student.layers"] == 2
    assert rows[0].name.startswith("search best (b, eval_score 0.9000): ")
    assert "layer_map=reverse" in rows[0].name and "lr=0.0003" in rows[0].name
    assert rows[0].overrides["train.lr"] == 3e-4 and rows[0].overrides["distill.w_hidden"] == 12.5
    assert rows[0].overrides["distill.layer_map"] == "reverse"
    assert [r.overrides for r in rows[1:]] == space_model.initial_points(spaces.load_space("layer_select"))
    # a best trial that is one of the paper points becomes that point's row, not a duplicate grid cell
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="p", space="smoke", config={}, code_version="v", objectives=[("eval_score", "max")])
    for trial, (layer_map, score) in {"f": ("forward", 0.6), "n": ("none", 0.8)}.items():
        tracker.trial_run(trial, params=flatten(load_config([f"distill.layer_map={layer_map}", "task.train_size=256",
                                                             "task.eval_size=128", "train.epochs=2",
                                                             "train.max_steps_per_epoch=4", "finetune.epochs=1",
                                                             "ted.stage1_epochs=1"])))
        tracker.end_trial(trial, status="FINISHED", final_metrics={"eval_score": score})
    _, rows = seeded_rows(uri=uri, experiment="kdsearch", search="p")
    assert [r.name for r in rows] == ["paper 1: layer_map=forward, w_hidden=3",
                                      "paper 2 = search best (n, eval_score 0.8000): layer_map=none"]


def test_seeded_study_keeps_what_the_search_fixed_on_its_command_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = spaces.apply_overrides(spaces.load_space("layer_select"), {"student.init": "teacher",
                                                                        "task.train_size": 96,
                                                                        "finetune.lr": 2e-5})  # logged "2e-05"
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="t", space="layer_select", code_version="v", objectives=[("eval_score", "max")],
                         tags={"kdsearch.searched": ",".join(space.params)},
                         config={f"base.{k}": v for k, v in flatten(space_model.trial_config(space, {})).items()})
    cfg = load_config(["student.init=teacher", "distill.layer_map=reverse", "train.lr=3e-4"])
    tracker.trial_run("a", params=flatten(cfg))
    tracker.end_trial("a", status="FINISHED", final_metrics={"eval_score": 0.9})
    tracker.end_search()
    base, rows = seeded_rows(uri=uri, experiment="kdsearch", search="t")
    assert base["student.init"] == "teacher" and all("student.init" not in r.overrides for r in rows)
    assert base["task.train_size"] == 96 and base["student.hidden_size"] is None  # the search's own data keys
    assert base["finetune.lr"] == 2e-5
    assert len(rows) == 1 + 5  # the best, then the 5 teacher-init paper points (not the 10 of the shipped space)


def test_the_seq2seq_grid_is_the_papers_maps_with_the_t5_codes_loss_and_validates_on_tiny_t5() -> None:
    from kdsearch.run.validate import validate

    study = make_study("layer_select_seq2seq", d_teacher=64)
    assert {(r.name, r.group) for r in study.rows} == {(m, i) for m in ("none", "forward", "reverse", "all_to_one",
                                                                        "random") for i in ("random", "teacher")}
    assert study.base["distill.distance"] == "layer_select_t5" and study.base["distill.temperature"] == 2.0
    space, _ = grid_space(study, cli={"teacher": "tiny-t5", "task": {"name": "seq2seq_default"},
                                      "student": {"layers": 2, "decoder_layers": 2}}, seeds=[0], concurrency=1)
    for point in space_model.initial_points(space):
        assert validate(space_model.trial_config(space, point)).kind == "seq2seq"


def test_the_flex_seq2seq_grid_is_units_vs_projector_vs_none_at_half_width_ranked_by_rouge_l() -> None:
    """Flex-KD on tiny-t5: a student half as wide, every row with the same logit KD, Flex-KD's top-d_s units
    (ratio d_s/d_t) with its correlation loss, the projector with MSE (the paper's baseline) and with correlation,
    and no feature term; the table ranks ROUGE-L, which trials report every epoch."""
    from kdsearch.run.validate import validate

    study = make_study("flex_seq2seq", d_teacher=64)
    assert study.metric == "eval_rouge_l" and study.baseline == "no feature KD"
    assert {"eval_bleu", "eval_chrf", "eval_exact_match", "eval_token_accuracy"} <= set(study.beside)
    space, filled = grid_space(study, cli={"teacher": "tiny-t5", "task": {"name": "seq2seq_default"},
                                           "student": {"layers": 2, "decoder_layers": 2}},
                               seeds=[0, 1, 2], concurrency=2)
    assert space.metric == "eval_rouge_l" and space.budget.num_samples == 4 * 3
    cells = {}
    for point in space_model.initial_points(space):
        cfg = space_model.trial_config(space, point)
        assert validate(cfg).kind == "seq2seq" and cfg.eval.generate_every == 1
        assert (cfg.student.hidden_size, cfg.student.init, cfg.units.ratio) == (32, "random", None)
        assert (cfg.distill.w_task, cfg.distill.w_logit, cfg.distill.temperature) == (1.0, 1.0, 2.0)
        row = row_of(filled, flatten_params(flatten(cfg)))
        cells[row.name] = (cfg.distill.layer_map, cfg.distill.bridge, cfg.distill.distance)
    assert cells == {"Flex-KD units": ("forward", "units", "correlation"),
                     "linear projector": ("forward", "projector", "mse"),
                     "linear projector, correlation": ("forward", "projector", "correlation"),
                     "no feature KD": ("none", "auto", "mse")}
