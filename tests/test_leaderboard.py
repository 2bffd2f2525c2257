"""kdsearch.leaderboard: pure ranking / Pareto / importance, then the CLI on a real sqlite MLflow store."""

from __future__ import annotations

import os

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")  # nothing may try the network
os.environ.pop("MLFLOW_TRACKING_URI", None)

import csv  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import pytest  # noqa: E402

from kdsearch.config.overrides import load_config
from kdsearch.core.errors import ConfigError  # noqa: E402
from kdsearch.leaderboard import main  # noqa: E402
from kdsearch.search.importance import param_importance, variance_importance  # noqa: E402
from kdsearch.search.ranking import Objective, pareto_front, parse_objectives, rank_rows  # noqa: E402
from kdsearch.tracking import SAMPLED_TAG, SEARCHED_TAG, SearchTracker, find_search  # noqa: E402

EXP = "kd-board"
Status = Literal["FINISHED", "FAILED"]
# trial: (layer_map, w_hidden, units.ratio, eval_score, student_params, status)
TRIALS: dict[str, tuple[str, float, float | None, float, int, Status]] = {
    "t0": ("forward", 1.0, None, 0.80, 1000, "FINISHED"),
    "t1": ("reverse", 3.0, 0.5, 0.85, 2000, "FINISHED"),
    "t2": ("all_to_one", 1.0, None, 0.70, 500, "FINISHED"),
    "t3": ("forward", 3.0, 0.5, 0.85, 3000, "FINISHED"),  # ties t1 on score, larger: dominated by t1
    "t4": ("forward", 0.5, None, 0.95, 4000, "FAILED"),  # best score but failed: never ranked
    "t5": ("reverse", 2.0, 0.25, 0.60, 800, "FINISHED"),  # dominated by t2
}


def test_rank_rows_max_and_min() -> None:
    rows: list[dict[str, Any]] = [{"trial": "a", "m": 0.5}, {"trial": "b", "m": 0.9}, {"trial": "c"},
            {"trial": "d", "m": 0.99, "status": "FAILED"}, {"trial": "e", "m": 0.5},
            {"trial": "f", "m": "nan"}]
    best_first = rank_rows(rows, "m", "max")
    assert [(r["trial"], r["rank"]) for r in best_first] == [
        ("b", 1), ("a", 2), ("e", 3), ("c", None), ("d", None), ("f", None)]
    assert [r["trial"] for r in rank_rows(rows, "m", "min")][:3] == ["a", "e", "b"]  # ties keep input order
    assert "rank" not in rows[0]  # inputs untouched


def test_ties_on_the_first_objective_go_to_the_better_later_ones() -> None:
    rows: list[dict[str, Any]] = [{"trial": "slow", "m": 0.5, "ms": 9.0}, {"trial": "none", "m": 0.5},
                                  {"trial": "fast", "m": 0.5, "ms": 2.0}, {"trial": "best", "m": 0.6, "ms": 5.0}]
    ranked = rank_rows(rows, "m", "max", then=[("ms", "min")])
    assert [r["trial"] for r in ranked] == ["best", "fast", "slow", "none"]
    assert [r["trial"] for r in rank_rows(rows, "m", "max")] == ["best", "slow", "none", "fast"]


def test_a_metric_whose_last_value_was_nan_is_not_ranked_on_its_older_value() -> None:
    from kdsearch.search.board import trial_rows
    from kdsearch.tracking import NONFINITE_TAG, RunRecord

    def trial(name: str, loss: float, tags: dict[str, str]) -> RunRecord:
        return RunRecord(name, name, "FINISHED", 0, 1000, {}, {"eval_loss": loss, "eval_score": 0.5, "epoch": 2},
                         tags)

    rows = trial_rows([trial("a", 0.30, {NONFINITE_TAG: "eval_loss"}), trial("b", 0.35, {NONFINITE_TAG: ""})])
    ranked = rank_rows(rows, "eval_loss", "min")
    assert [(r["trial"], r.get("rank")) for r in ranked] == [("b", 1), ("a", None)]  # a's epoch-2 loss was inf


def test_pareto_front_hand_example() -> None:
    rows: list[dict[str, Any]] = [
        {"acc": 0.9, "size": 100},  # 0 front
        {"acc": 0.8, "size": 50},  # 1 front
        {"acc": 0.85, "size": 120},  # 2 dominated by 0
        {"acc": 0.8, "size": 60},  # 3 dominated by 1
        {"acc": 0.7, "size": 50},  # 4 dominated by 1 (same size, lower acc)
        {"acc": 0.9, "size": 100},  # 5 equal to 0: shares the front
        {"acc": 0.99, "size": 1, "status": "FAILED"},  # 6 failed: excluded
        {"acc": 0.95},  # 7 missing an objective: excluded
        {"acc": 0.6, "size": 10},  # 8 front (smallest)
    ]
    assert pareto_front(rows, [("acc", "max"), ("size", "min")]) == {0, 1, 5, 8}
    # reversed senses: 0 is dominated by 2 (lower acc, larger size), 1 by 3 (equal acc, larger size)
    assert pareto_front(rows, [("acc", "min"), ("size", "max")]) == {2, 3, 4, 8}
    assert pareto_front(rows, [Objective("acc", "max")]) == {7}  # one objective: the best (7 has acc)


def test_parse_objectives() -> None:
    assert parse_objectives("eval_score:max,student_params:min") == [
        Objective("eval_score", "max"), Objective("student_params", "min")]
    assert parse_objectives("[loss:min]") == [Objective("loss", "min")]
    with pytest.raises(ConfigError, match="<metric>:max"):
        parse_objectives("eval_score:up")


def _importance_rows() -> list[dict]:
    rows = []
    for i in range(24):  # w decides the score, noise does not
        w, noise = [0.5, 1.0, 2.0, 4.0][i % 4], ["a", "b", "c"][i // 8]
        rows.append({"w": str(w), "noise": noise, "score": w + 0.01 * (i % 3), "status": "FINISHED"})
    return rows


def test_variance_importance_finds_the_deciding_param() -> None:
    scores = variance_importance(_importance_rows(), ["w", "noise"], "score")
    assert scores["w"] > 0.95 and scores["noise"] < 0.05
    assert sum(scores.values()) == pytest.approx(1.0)


def test_optuna_importance_on_a_rebuilt_study() -> None:
    scores = param_importance(_importance_rows(), ["w", "noise"], "score", "max")
    assert set(scores) == {"w", "noise"} and scores["w"] > scores["noise"]
    assert param_importance(_importance_rows()[:1], ["w"], "score", "max") == {}  # one trial: nothing to say


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real store with the two-objective search `multi` (TRIALS), then the one-objective `single`."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('board') / 'mlflow.db'}"
    tracker = SearchTracker(uri=uri, experiment=EXP)
    searched = ["distill.layer_map", "distill.w_hidden", "units.ratio"]
    parent = tracker.start_search(name="multi", space="all", config={}, code_version="v",
                                  objectives=[("eval_score", "max"), ("student_params", "min")],
                                  tags={SEARCHED_TAG: ",".join(searched)})
    for trial, (layer_map, w_hidden, ratio, score, size, status) in TRIALS.items():
        # units.ratio is conditional: the trials without one log the config's value but never drew it
        cfg = load_config([f"distill.layer_map={layer_map}", f"distill.w_hidden={w_hidden}",
                           f"units.ratio={ratio or 0.75}", f"output_dir=outputs/{trial}"])
        drawn = searched if ratio is not None else searched[:2]
        tracker.trial_run(trial, params=cfg, tags={SAMPLED_TAG: ",".join(drawn)})
        tracker.log_metrics(trial, {"eval_score": score - 0.1}, step=0)
        tracker.end_trial(trial, status=status, error="boom" if status == "FAILED" else None,
                          final_metrics={"eval_score": score, "student_params": size,
                                         **({"epoch": 3} if status == "FINISHED" else {})})
    tracker.end_search()
    single = SearchTracker(uri=uri, experiment=EXP)
    single.start_search(name="single", space="kd", config={}, code_version="v",
                        tags={"kdsearch.metric": "loss", "kdsearch.mode": "min"})
    for trial, loss in (("s0", 0.3), ("s1", 0.1), ("s2", 0.2)):
        single.trial_run(trial, params={"distill": {"temperature": loss * 10}})
        single.end_trial(trial, status="FINISHED", final_metrics={"loss": loss})
    single.end_search()
    return uri, parent


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_multi_objective(store: tuple[str, str], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    uri, parent = store
    assert main([f"tracking.uri={uri}", f"tracking.experiment={EXP}", "search=multi", f"out={tmp_path}", "top=3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = printed[1].split()
    assert header[:5] == ["rank", "trial", "distill.layer_map", "distill.w_hidden", "units.ratio"]
    assert printed[2].split()[:2] == ["1", "t1"] and len(printed) == 2 + 3 + 2  # top=3, a "more" line, path

    rows = _csv(tmp_path / "leaderboard.csv")
    assert [(r["rank"], r["trial"]) for r in rows] == [
        ("1", "t1"), ("2", "t3"), ("3", "t0"), ("4", "t2"), ("5", "t5"), ("-", "t4")]
    assert {r["trial"] for r in rows if r["pareto"] == "*"} == {"t1", "t0", "t2"}
    assert rows[0]["eval_score"] == "0.85" and rows[0]["student_params"] == "2000"
    assert [r["units.ratio"] for r in rows] == ["0.5", "0.5", "-", "-", "0.25", "-"]  # blank where inactive
    assert rows[-1]["status"] == "FAILED" and float(rows[0]["time (s)"]) >= 0
    assert rows[0]["epochs"] == "3" and rows[-1]["epochs"] == "-"  # the failed trial reported no epoch
    assert "output_dir" not in rows[0] and "teacher" not in rows[0]  # bookkeeping and constants hidden
    assert "| 1 | t1 | reverse |" in (tmp_path / "leaderboard.md").read_text()
    page = (tmp_path / "leaderboard.html").read_text()
    from mlflow import MlflowClient

    experiment_id = MlflowClient(tracking_uri=uri).get_experiment_by_name(EXP).experiment_id
    from kdsearch.tracking import list_trials

    t1 = next(t for t in list_trials(uri=uri, experiment=EXP, search_run_id=parent) if t.name == "t1")
    link = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{t1.run_id}"
    assert f"<tr class=best><td class=num>1</td><td><a href='{link}'>t1</a></td>" in page  # best row, its run
    assert page.count("<tr class=noise>") == 2  # t0 and t2: the rest of the Pareto front
    assert all(f"<img src='{name}'" in page for name in ["optimisation_history.png", "pareto_front.png"])
    assert "table.sortable" in page and "<th title='sort'>eval_score</th>" in page
    plots = ["optimisation_history.png", "param_importance.png", "pareto_front.png"]
    for name in plots:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"

    from mlflow import MlflowClient

    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent, "leaderboard")}
    expected = ["leaderboard.csv", "leaderboard.md", "leaderboard.html", *plots]
    assert {f"leaderboard/{name}" for name in expected} <= logged


def test_cli_single_objective_by_run_id_and_latest(store: tuple[str, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    uri, _ = store
    single = find_search(uri=uri, experiment=EXP, search="single")
    args = [f"tracking.uri={uri}", f"tracking.experiment={EXP}"]
    assert main([*args, f"search={single.run_id}", f"out={tmp_path / 'a'}"]) == 0
    rows = _csv(tmp_path / "a" / "leaderboard.csv")
    assert [r["trial"] for r in rows] == ["s1", "s2", "s0"]  # loss:min
    assert "pareto" not in rows[0] and not (tmp_path / "a" / "pareto_front.png").exists()
    assert main([*args, f"out={tmp_path / 'b'}"]) == 0  # no search named: the latest, `single`
    assert _csv(tmp_path / "b" / "leaderboard.csv") == rows
    # ranked by another objective: written and logged beside the search's own leaderboard, not over it
    assert main([*args, "search=single", "objectives=loss:max", f"out={tmp_path / 'c'}"]) == 0
    from mlflow import MlflowClient

    folders = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(single.run_id)}
    assert "leaderboard-loss_max" in folders
    capsys.readouterr()


def test_the_store_defaults_to_mlflow_tracking_uri_as_the_search_does(store: tuple[str, str], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    uri, _ = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # a cluster's nodes carry the server's address
    monkeypatch.chdir(tmp_path)  # and no ./mlflow.db to fall back on
    assert main([f"tracking.experiment={EXP}", "search=single"]) == 0
    written = Path("outputs/search/single/leaderboard")  # where the search itself writes it
    assert capsys.readouterr().out.strip().endswith(f"leaderboard written to {written}")
    assert (tmp_path / "outputs" / "search" / "single" / "leaderboard" / "leaderboard.csv").is_file()


def test_cli_errors_are_one_line(store: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    uri, _ = store
    assert main([f"tracking.uri={uri}", f"tracking.experiment={EXP}", "search=nope"]) == 2
    assert "no search named 'nope'" in (err := capsys.readouterr().err) and "searches there: multi, single" in err
    assert main(["serach=multi"]) == 2
    assert "did you mean search?" in capsys.readouterr().err
    assert main([f"tracking.uri={uri}", "tracking.experiment=missing"]) == 2
    assert "no such experiment" in capsys.readouterr().err
    assert main([f"tracking.uri={uri}", f"tracking.experiment={EXP}", "search=multi", "objectives=eval_scor:max"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("no trial of multi reports eval_scor; did you mean eval_score?") and "\n" not in err
    assert main(["tracking.uri=./mlruns"]) == 2
    assert "file store" in capsys.readouterr().err


def test_a_confirmed_search_prints_its_ranking_by_mean_after_its_trials(store: tuple[str, str], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kdsearch.search.confidence import t_interval
    from kdsearch.search.reports import confirmed_ranking
    from kdsearch.tracking import CONFIRMED_TAG, set_run_tags

    uri, parent = store
    rows = [{"label": "layer_map=reverse", "mean": 79.0, "scores": [78.0, 80.0], "ci95": t_interval([78.0, 80.0]),
             "vs_best": "within noise"},
            {"label": "layer_map=forward", "mean": 81.0, "scores": [80.0, 81.0, 82.0],
             "ci95": t_interval([80.0, 81.0, 82.0]), "vs_best": "best"}]
    set_run_tags(uri=uri, experiment=EXP, run_id=parent, tags={CONFIRMED_TAG: json.dumps(confirmed_ranking(rows))})
    try:
        assert main([f"tracking.uri={uri}", f"tracking.experiment={EXP}", "search=multi", f"out={tmp_path}"]) == 0
    finally:
        set_run_tags(uri=uri, experiment=EXP, run_id=parent, tags={CONFIRMED_TAG: ""})
    out = capsys.readouterr().out
    confirmed = out[out.index("confirmed over fresh seeds"):].splitlines()
    # t(0.975, 2) = 4.303 x sd 1 / sqrt 3 = 2.48; t(0.975, 1) = 12.706 x sd 1.414 / sqrt 2 = 12.71
    assert confirmed[2].split()[:5] == ["1", "81.00", "±", "2.48", "3"] and confirmed[2].split()[5] == "best"
    assert confirmed[3].split()[:5] == ["2", "79.00", "±", "12.71", "2"] and "within noise" in confirmed[3]
    assert out.rstrip().endswith(f"leaderboard written to {tmp_path}")
    page = (tmp_path / "leaderboard.html").read_text()  # the page shows it first, within-noise rows marked
    assert page.index("<h2>Confirmed over fresh seeds</h2>") < page.index("<h2>Trials</h2>")
    assert "<tr class=noise><td class=num>2</td><td class=num>79.00 ± 12.71</td>" in page
