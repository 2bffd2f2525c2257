"""warm_start=<search>: an earlier search's finished trials reach the new search's sampler before its first
trial; what this space cannot express is dropped and counted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from kdsearch.config.parse import flatten
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError
from kdsearch.search.settings import parse_search_args
from kdsearch.search.warm_start import read_warm_start
from kdsearch.tracking import SearchTracker

# (layer map, hidden weight, lr, status, final eval_score) of the earlier search's trials, on the smoke space:
# distill.layer_map in [forward, none], distill.w_hidden in [0.3, 30] (log) only with forward
EARLIER = [("forward", 3.0, 1e-3, "FINISHED", 0.81), ("none", 3.0, 1e-3, "FINISHED", 0.74),
           ("forward", 0.6, 2e-3, "FINISHED", 0.78),
           ("forward", 300.0, 1e-3, "FINISHED", 0.50),   # w_hidden outside this space's range: dropped
           ("reverse", 3.0, 1e-3, "FINISHED", 0.79),     # a map this space does not search: dropped
           ("forward", 3.0, 1e-3, "FAILED", 0.10)]       # not finished: not a known point


@pytest.fixture
def earlier(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="first", space="smoke", config={}, code_version="v")
    for i, (layer_map, w_hidden, lr, status, score) in enumerate(EARLIER):
        cfg = Config()
        cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, layer_map=layer_map, w_hidden=w_hidden),
                                  train=dataclasses.replace(cfg.train, lr=lr))
        tracker.trial_run(f"t{i}", params=flatten(cfg))
        tracker.log_metrics(f"t{i}", {"eval_score": score}, step=1)
        tracker.end_trial(f"t{i}", status=status)  # type: ignore[arg-type]
    tracker.end_search()
    return uri


def test_the_earlier_trials_this_space_can_express_become_known_points(earlier: str, tmp_path: Path) -> None:
    settings, space = parse_search_args(["space=smoke", f"tracking.uri={earlier}", "warm_start=first",
                                         f"results_dir={tmp_path}/results"])
    warm = read_warm_start("first", uri=earlier, experiment="kdsearch", space=space,
                           objectives=[("eval_score", "max")])
    assert warm.known == [({"distill.layer_map": "forward", "distill.w_hidden": 3.0}, [0.81]),
                          ({"distill.layer_map": "none"}, [0.74]),  # w_hidden inactive without a hidden map
                          ({"distill.layer_map": "forward", "distill.w_hidden": 0.6}, [0.78])]
    assert warm.dropped == 2 and "3 earlier trial(s) given to the sampler, 2 dropped" in warm.summary()


def test_the_sampler_of_the_new_search_starts_from_them(earlier: str, tmp_path: Path) -> None:
    """Ray's OptunaSearch loads the warm study by name: its first suggestion is the 4th trial of that study."""
    from ray.tune.search.optuna import OptunaSearch

    from kdsearch.search import space_model

    _, space = parse_search_args(["space=smoke", f"tracking.uri={earlier}", f"results_dir={tmp_path}/results"])
    warm = read_warm_start("first", uri=earlier, experiment="kdsearch", space=space,
                           objectives=[("eval_score", "max")])
    storage = space_model.warm_storage(space, warm.known, ["max"], "second")
    search = OptunaSearch(space=space_model.define_by_run(space), metric="eval_score", mode="max",
                          storage=storage, study_name="second")
    assert search.suggest("trial_1") is not None
    study = optuna.load_study(study_name="second", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["RUNNING"]
    assert study.best_value == 0.81 and study.best_params == {"distill.layer_map": "forward", "distill.w_hidden": 3.0}


def test_a_warm_start_from_a_search_that_does_not_exist_is_one_line(earlier: str, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from kdsearch.tune import main

    assert main(["space=smoke", f"tracking.uri={earlier}", "warm_start=nosuch", "dry_run=true",
                 f"results_dir={tmp_path}/results"]) == 2
    assert "search=nosuch: no search named 'nosuch'" in capsys.readouterr().err
    assert main(["space=smoke", f"tracking.uri={earlier}", "warm_start=first", "dry_run=true",
                 f"results_dir={tmp_path}/results"]) == 0
    assert "warm start from first: 3 earlier trial(s)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="warm_start=a b: name an earlier search"):
        parse_search_args(["space=smoke", "warm_start=a b"])


def test_a_search_on_another_task_gives_its_best_configurations_to_evaluate_first(tmp_path: Path) -> None:
    """Scores on SST-2 say nothing of the default task's: the new search evaluates the earlier search's best
    configurations first (after the space's paper points) and tells its sampler no earlier score."""
    from kdsearch.search.driver import _search_alg

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    tracker.start_search(name="on-sst2", space="smoke", config={}, code_version="v")
    for i, (layer_map, w_hidden, lr, status, score) in enumerate(EARLIER):
        cfg = Config()
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="sst2"),
                                  distill=dataclasses.replace(cfg.distill, layer_map=layer_map, w_hidden=w_hidden),
                                  train=dataclasses.replace(cfg.train, lr=lr))
        tracker.trial_run(f"t{i}", params=flatten(cfg))
        tracker.log_metrics(f"t{i}", {"eval_score": score}, step=1)
        tracker.end_trial(f"t{i}", status=status)  # type: ignore[arg-type]
    tracker.end_search()
    settings, space = parse_search_args(["space=smoke", f"tracking.uri={uri}", "warm_start=on-sst2",
                                         f"results_dir={tmp_path}/results"])
    warm = read_warm_start("on-sst2", uri=uri, experiment="kdsearch", space=space, objectives=[("eval_score", "max")])
    assert warm.known == [] and warm.other_task == "task.name=sst2"
    assert warm.points == [{"distill.layer_map": "forward", "distill.w_hidden": 3.0},  # 0.81, 0.78, 0.74
                           {"distill.layer_map": "forward", "distill.w_hidden": 0.6}, {"distill.layer_map": "none"}]
    assert "ran another task (task.name=sst2): its 3 best configuration(s) are evaluated first" in warm.summary()

    search = _search_alg(settings, space, [("eval_score", "max")], warm)
    drawn = [search.suggest(f"trial_{i}") for i in range(3)]
    wanted = [{"distill.layer_map": "forward", "distill.w_hidden": 3.0}, {"distill.layer_map": "none"},
              {"distill.layer_map": "forward", "distill.w_hidden": 0.6}]  # the papers' two, then the new one
    assert [{k: d[k] for k in w} for d, w in zip(drawn, wanted, strict=True)] == wanted
