"""The search front door end to end: a real Ray runtime, a real Optuna study, a real MLflow store.

A search of 5 trials (2 at a time) where ASHA must stop the bad trials early and one trial diverges (NaN)
and must fail alone; an interrupted search resumed without rerunning finished trials; `ray job submit` to a
local head. Trials are tiny: 256 rows, 4 steps per epoch.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from ray import tune

from kdsearch.config.overrides import CONFIG_FILE, load_config
from kdsearch.config.parse import flatten
from kdsearch.core.errors import ConfigError
from kdsearch.tracking import SAMPLED_TAG, find_search, list_trials

REPO = Path(__file__).resolve().parents[1]

SPACE = """
description: test space
base:
  teacher: tiny-bert
  student: {layers: 2}
  task: {name: default, train_size: 256, eval_size: 128}
  train: {epochs: 3, max_steps_per_epoch: 4, batch_size: 16, warmup_ratio: 0.0}
  finetune: {epochs: 1}
  resources: {num_workers: 1, cpus_per_trial: 1, gpus_per_trial: 0}
metric: eval_loss
mode: min
budget: {num_samples: NUM, grace_period: 1, reduction_factor: 2, max_concurrent_trials: 2}
params:
  train.lr: {type: categorical, choices: [1.0e-7, 0.3, 1.0e+12]}   # 1e12 diverges at its first step
  distill.layer_map: {type: categorical, choices: [forward, none]}
points_to_evaluate:
  - {train.lr: 1.0e-7, distill.layer_map: forward}
  - {train.lr: 1.0e-7, distill.layer_map: none}
  - {train.lr: 0.3, distill.layer_map: forward}
  - {train.lr: 0.3, distill.layer_map: none}
  - {train.lr: 1.0e+12, distill.layer_map: forward}
"""


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _args(tmp: Path, num: int, name: str) -> list[str]:
    space = tmp / f"{name}.yaml"
    space.write_text(SPACE.replace("NUM", str(num)))
    return [f"space={space}", f"name={name}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"results_dir={tmp}/results", f"cache_dir={tmp.parent}/shared_cache"]


@pytest.mark.slow
def test_search_logs_every_trial_stops_bad_ones_early_and_survives_a_failing_trial(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kdsearch.tune", *_args(tmp_path, 5, "s1")], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    best_dir = tmp_path / "results" / "s1" / "best_student"
    console = proc.stdout + proc.stderr  # the trial table is not buried under library progress lines
    assert "[kdsearch.tune] best trial" in console
    assert not [m for m in ("it/s]", "examples/s]", "Checkpoint successfully created") if m in console]
    assert last == f"best student saved to {best_dir}"
    assert (best_dir / "config.json").exists() and "eval_loss" in (best_dir / "README.md").read_text()

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = find_search(uri=uri, experiment="kdsearch", search="s1")
    assert parent.status == "FINISHED" and parent.tags["kdsearch.metric"] == "eval_loss"
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert len(trials) == 5  # exactly one run per trial
    assert len({t.tags["kdsearch.trial_id"] for t in trials}) == 5
    assert {t.tags[SAMPLED_TAG] for t in trials} == {"distill.layer_map,train.lr"}
    failed = [t for t in trials if t.status == "FAILED"]
    assert len(failed) == 1 and failed[0].params["train.lr"] == str(1e12)
    assert "lower train.lr" in failed[0].tags["kdsearch.error"]
    finished = [t for t in trials if t.status == "FINISHED"]
    assert len(finished) == 4
    assert all(t.params["distill.layer_map"] in ("forward", "none") and "eval_loss" in t.metrics for t in finished)
    epochs = sorted(int(t.metrics["epoch"]) for t in finished)
    assert epochs[0] < 3 and epochs[-1] == 3  # ASHA stopped at least one trial early; the best ran to the end
    board = tmp_path / "results" / "s1" / "leaderboard"
    assert (board / "leaderboard.csv").exists() and (board / "leaderboard.md").exists()
    assert "1e-07" in (board / "leaderboard.csv").read_text().splitlines()[1]  # the rank-1 row: the good lr
    with (board / "leaderboard.csv").open() as f:  # how far each trial trained, the early-stopped ones too
        rows = list(csv.DictReader(f))
    assert sorted(int(r["epochs"]) for r in rows if r["status"] == "FINISHED") == epochs
    # the exported student's whole config: `kdsearch.train config=...` reruns the best trial's strategy
    exported = load_config([f"config={best_dir / 'kdsearch_config.yaml'}", "train.epochs=1"])
    assert exported.train.lr == float(rows[0]["train.lr"]) and exported.distill.layer_map == rows[0][
        "distill.layer_map"] and exported.train.epochs == 1
    assert f"trial {rows[0]['trial']}" in (best_dir / "README.md").read_text()
    # read back from its folder alone (weights, tokenizer, config), the best student scores what its trial reported
    from kdsearch import evaluate

    args, cfg = evaluate.parse_args([f"model={best_dir}", "split=validation", f"tracking.uri={uri}",
                                     f"cache_dir={tmp_path}/eval_cache"])
    scores, _ = evaluate.run_evaluation(args, cfg)
    best = next(t for t in trials if t.tags["kdsearch.trial_id"] == rows[0]["trial"])
    assert scores["student"]["eval_loss"] == pytest.approx(best.metrics["eval_loss"], abs=1e-5)
    # every epoch was checkpointed while the search ran; each trial keeps only its last one after it
    kept = {d.name.split("_")[2]: sorted(c.name for c in d.glob("checkpoint_*"))
            for d in (tmp_path / "results" / "ray" / "s1").glob("run_trial_*")}
    assert sorted(len(names) for names in kept.values()) == [0, 1, 1, 1, 1], kept  # the diverged trial has none
    assert sorted(names[0] for names in kept.values() if names)[-1] == "checkpoint_000002"  # epoch 3 of 3


@pytest.mark.slow
def test_a_multi_objective_search_ranks_on_its_pareto_front(tmp_path: Path) -> None:
    # also the cached teacher in a search: concurrent trials build its outputs once and read them
    args = [*_args(tmp_path, 3, "mo"), "objectives=[eval_loss:min,student_latency_ms:min]", "train.teacher_cache=true"]
    proc = subprocess.run([sys.executable, "-m", "kdsearch.tune", *args], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent = find_search(uri=uri, experiment="kdsearch", search="mo")
    assert parent.tags["kdsearch.objectives"] == "eval_loss:min,student_latency_ms:min"
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert len(trials) == 3 and all(t.metrics["student_latency_ms"] > 0 for t in trials)
    assert {t.params["train.teacher_cache"] for t in trials} == {"True"}
    built = [p for p in (tmp_path.parent / "shared_cache" / "teacher_outputs").iterdir() if p.is_dir()]
    assert len(built) == 1 and (built[0] / ".done").exists()
    with (tmp_path / "results" / "mo" / "leaderboard" / "leaderboard.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["pareto"] == "*"  # best on the first objective, ties to the second: never dominated


class _Result(NamedTuple):
    checkpoint: tune.Checkpoint | None


def test_only_each_trials_latest_checkpoint_is_kept_after_a_search(tmp_path: Path) -> None:
    from kdsearch.search.driver import drop_superseded_checkpoints

    trial, other = tmp_path / "run_trial_a", tmp_path / "run_trial_b"
    for name in ("checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "checkpoint_000003"):
        (trial / name).mkdir(parents=True)
        (trial / name / "state.json").write_text("{}")
    (other / "checkpoint_000000").mkdir(parents=True)
    (trial / "result.json").write_text("")
    # Tune registered checkpoint 2 last; 3 reached storage as the driver stopped, so a resume restores from 2
    drop_superseded_checkpoints([_Result(tune.Checkpoint.from_directory(str(trial / "checkpoint_000002"))),
                                 _Result(None)])
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000002", "checkpoint_000003", "result.json"]
    assert (trial / "checkpoint_000002" / "state.json").exists() and (other / "checkpoint_000000").exists()


def _wait_for(predicate, timeout: float, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError("condition not reached")


@pytest.mark.slow
def test_resume_finishes_an_interrupted_search_without_rerunning_finished_trials(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # 8 trials, 2 at a time: the first two finish together and 3 of the 5 fixed points end after an epoch or
    # less, so the interruption still finds the 3 sampled trials unfinished (test_cluster_faults.py's
    # driver-kill test runs 8 likewise)
    num = 8
    args = [sys.executable, "-m", "kdsearch.tune", *_args(tmp_path, num, "s2")]

    def finished_trials() -> list:
        try:
            parent = find_search(uri=uri, experiment="kdsearch", search="s2")
            return [t for t in list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
                    if t.status == "FINISHED"]
        except ConfigError:  # store, experiment or parent run not created yet; anything else is a real error
            return []

    with open(tmp_path / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
        try:
            _wait_for(lambda: len(finished_trials()) >= 1 or driver.poll() is not None, timeout=600, every=0.2)
            assert driver.poll() is None, (tmp_path / "stderr.txt").read_text()[-4000:]  # ended before Ctrl-C
            os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C in the search driver's terminal
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130
    before = {t.tags["kdsearch.trial_id"]: t for t in finished_trials()}
    assert before
    # the driver's last words say how to continue: that command, as printed, resumes the search
    hint = (tmp_path / "stderr.txt").read_text().split("this continues it: python ")[-1].splitlines()[0]
    command = [sys.executable, *shlex.split(hint)]
    assert command[-2:] == ["name=s2", "resume=true"] and command[1:-2] == [a for a in args[1:] if a != "name=s2"]

    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parent = find_search(uri=uri, experiment="kdsearch", search="s2")
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    ids = [t.tags["kdsearch.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == num
    for trial_id, old in before.items():  # finished before the interruption: untouched by the resumed search
        new = next(t for t in trials if t.tags["kdsearch.trial_id"] == trial_id)
        assert new.end_time == old.end_time and new.metrics == old.metrics
    # once the search has run to its end, resuming it again runs nothing
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran to its end: nothing to resume" in again.stdout, again.stderr[-2000:]


@pytest.mark.slow
def test_a_search_whose_time_budget_runs_out_says_how_to_continue(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "kdsearch.tune", *_args(tmp_path, 40, "tb"), "time_budget_s=12"]
    proc = subprocess.run(args, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    # not an interruption (status 130): 0, or 1 when no trial had finished in time to export
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    assert "time_budget_s=12 ran out with" in proc.stderr and "name=tb resume=true" in proc.stderr, proc.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_a_smoke_search_on_a_local_head(tmp_path: Path) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="kdr", dir="/tmp")  # Ray's socket paths must stay short
    gcs, dashboard = _free_port(), _free_port()
    env = {**_env(), "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    home = tmp_path / "home"
    try:
        _wait_for(lambda: subprocess.run([str(ray_bin), "job", "list", "--address", address], env=env,
                                         capture_output=True).returncode == 0, timeout=120)
        deadline = time.monotonic() + 180  # on a loaded machine the agent takes a minute or more
        while True:  # the dashboard answers before its job agent is up: retry until it accepts the job
            # The mission's command as a user types it: relative store and results, which must not land in
            # Ray's temporary copy of the working directory (deleted after the job) but under KDSEARCH_HOME.
            job = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
                 "--runtime-env-json", json.dumps({"env_vars": {"KDSEARCH_HOME": str(home)}}), "--",
                 sys.executable, "-m", "kdsearch.tune", "space=smoke", "name=job"],
                env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "succeeded" in (job.stdout + job.stderr).lower()
        assert "running as a Ray job in Ray's temporary copy" in job.stdout, job.stdout[-4000:]
        assert f"best student saved to {home}/outputs/search/job/best_student" in job.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)  # the head's sessions and logs
    uri = f"sqlite:///{home}/mlflow.db"
    parent = find_search(uri=uri, experiment="kdsearch", search="job")
    trials = list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
    assert len(trials) == 2 and all(t.status == "FINISHED" for t in trials)


def test_a_new_search_never_writes_into_an_earlier_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dataclasses import replace

    from kdsearch.core.errors import ConfigError
    from kdsearch.search.driver import resolve_name
    from kdsearch.search.settings import parse_search_args
    from kdsearch.tracking import SearchTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings, space = parse_search_args(["space=smoke", f"tracking.uri={uri}", f"results_dir={tmp_path}/results"])
    assert resolve_name(settings, space).search_name == "kdsearch-smoke"  # a new store: the plain name
    tracker = SearchTracker(uri=uri, experiment="kdsearch")
    for name in ("kdsearch-smoke", "kdsearch-smoke-2", "kdsearch-smoke-x", "mine"):
        tracker.start_search(name=name, space="smoke", config={}, code_version="v")
        tracker.end_search()
    # run again: the next free number, so the leaderboard and the best student are this search's alone
    assert resolve_name(settings, space).search_name == "kdsearch-smoke-3"
    assert resolve_name(replace(settings, resume=True), space).search_name == "kdsearch-smoke-2"  # the newest
    assert resolve_name(replace(settings, resume=True, name="mine"), space).search_name == "mine"
    assert resolve_name(replace(settings, name="yours"), space).search_name == "yours"
    with pytest.raises(ConfigError, match="name=mine: a search of that name exists.*resume=true continues it"):
        resolve_name(replace(settings, name="mine"), space)
    # a dry run names the search the real run would start
    from kdsearch.tune import main
    assert main(["space=smoke", f"tracking.uri={uri}", f"results_dir={tmp_path}/results", "dry_run=true"]) == 0
    assert "search_name: kdsearch-smoke-3" in capsys.readouterr().out


@pytest.mark.slow
def test_confirm_reruns_the_best_configurations_over_fresh_seeds(tmp_path: Path) -> None:
    """`confirm=2 confirm_seeds=2`: after the search, its two best distinct configurations run again at seeds
    1 and 2 (the search ran seed 0), under their own MLflow parent, into a table with intervals. Interrupted
    halfway, the confirmation continues with the command the driver prints, each of its runs made once."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [sys.executable, "-m", "kdsearch.tune", "space=smoke", "name=c", "confirm=2", "confirm_seeds=2",
            f"tracking.uri={uri}", f"results_dir={tmp_path}/results", f"cache_dir={tmp_path.parent}/shared_cache"]

    def confirmations() -> list:
        try:
            parent = find_search(uri=uri, experiment="kdsearch", search="c-confirm")
            return list_trials(uri=uri, experiment="kdsearch", search_run_id=parent.run_id)
        except ConfigError:  # the confirmation has not started yet
            return []

    with open(tmp_path / "stderr.txt", "w") as stderr:
        driver = subprocess.Popen(args, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
        try:
            _wait_for(lambda: any(t.status == "FINISHED" for t in confirmations()) or driver.poll() is not None,
                      timeout=600, every=0.2)
            assert driver.poll() is None, (tmp_path / "stderr.txt").read_text()[-4000:]
            os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C while the confirmation runs
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    said = (tmp_path / "stderr.txt").read_text()
    assert driver.returncode == 130, said[-4000:]
    before = {t.tags["kdsearch.trial_id"]: t for t in confirmations() if t.status == "FINISHED"}
    assert 1 <= len(before) < 4
    hint = said.split("the confirmation of c stopped before its end; this continues it: python ")[-1].splitlines()[0]
    command = [sys.executable, *shlex.split(hint)]
    assert command[-2:] == ["name=c", "resume=true"] and command[1:-2] == [a for a in args[1:] if a != "name=c"]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    trials = confirmations()
    assert sorted(t.params["train.seed"] for t in trials) == ["1", "1", "2", "2"]  # each run once
    assert all(t.status == "FINISHED" for t in trials)
    for trial_id, old in before.items():  # finished before the interruption: kept as they were
        new = next(t for t in trials if t.tags["kdsearch.trial_id"] == trial_id)
        assert new.end_time == old.end_time and new.metrics == old.metrics
    table = (tmp_path / "results" / "c" / "confirm" / "confirm.md").read_text()
    assert "| 95% CI of the mean | vs best (Welch, 5%) |" in table and "train.seed in [1, 2]" in table
    ranks = [line for line in table.splitlines() if line.startswith("| rank ")]
    assert [r.split(" (")[0] for r in ranks] == ["| rank 1", "| rank 2"] and "| best |" in ranks[0]
    assert proc.stdout.strip().splitlines()[-1].endswith(f"best student saved to {tmp_path}/results/c/best_student")
    # the exported student is now the best configuration by mean over the fresh seeds, and its card says so
    rows = json.loads((tmp_path / "results" / "c" / "confirm" / "confirm.json").read_text())["rows"]
    best = max((r for r in rows if r["mean"] is not None), key=lambda r: r["mean"])
    student = tmp_path / "results" / "c" / "best_student"
    card = (student / "README.md").read_text()
    assert "## Confirmed over fresh seeds" in card and f"{best['mean']:.2f} %" in card
    exported = flatten(load_config([f"config={student / CONFIG_FILE}"]))
    assert exported["train.seed"] in (1, 2)
    assert all(exported[k] == (tuple(v) if isinstance(v, list) else v) for k, v in best["overrides"].items())
    assert "replacing the search's single-seed best with the best by mean" in proc.stdout
    # the search's own parent run holds the confirmed ranking, and its leaderboard prints it
    board = subprocess.run([sys.executable, "-m", "kdsearch.leaderboard", "search=c", f"tracking.uri={uri}",
                            f"out={tmp_path}/board"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert board.returncode == 0, board.stderr[-2000:]
    confirmed = board.stdout[board.stdout.index("confirmed over fresh seeds"):].splitlines()
    assert confirmed[2].split()[0] == "1" and best["label"][:40] in confirmed[2]
    # confirmed to its end, the search has nothing left to continue
    again = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ran to its end: nothing to resume" in again.stdout, again.stderr[-2000:]
