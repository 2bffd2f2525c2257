"""kdsearch.tracking on real sqlite MLflow stores in tmp_path: runs, resume, failures, concurrency, URIs."""

from __future__ import annotations

import os

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")  # nothing may try the network
os.environ.pop("MLFLOW_TRACKING_URI", None)

import http.server  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import sqlite3  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import sqlalchemy.exc  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from kdsearch.config.overrides import load_config
from kdsearch.config.parse import config_keys  # noqa: E402
from kdsearch.core.errors import ConfigError
from kdsearch.tracking import SearchTracker, check_tracking_uri, find_search, is_locked_error, list_trials, retry_locked

RACE_EXP = "race"


def _uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def _hammer(uri: str, name: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait(timeout=60)  # both processes open the fresh database at the same moment
    tracker = SearchTracker(uri=uri, experiment=RACE_EXP)
    tracker.start_search(name=name, space="kd", config={"name": name}, code_version="v")
    for i in range(20):
        trial = f"{name}-{i}"
        tracker.trial_run(trial, params={"distill": {"w_hidden": float(i)}, "train": {"lr": 1e-3}})
        for step in range(3):
            tracker.log_metrics(trial, {"eval_score": i + step / 10, "loss": 1.0 / (step + 1)}, step=step)
        tracker.end_trial(trial, status="FINISHED")
    tracker.end_search()


@pytest.fixture(scope="module")
def raced_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int | None]]:
    """A FRESH sqlite file that two processes create and fill at once (2 searches x 20 trials x 3 steps).

    Without the creation lock this reproduces "duplicate column name: step" (concurrent migrations). The
    module's other tests reuse the store, each in its own experiment: one migration per file, not per test.
    """
    uri = _uri(tmp_path_factory.mktemp("race"))
    ctx = multiprocessing.get_context("spawn")  # fork after importing mlflow/sqlalchemy is unsafe
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_hammer, args=(uri, name, barrier)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:  # one still running after 2 minutes is hung: do not leave it behind
        if p.is_alive():
            p.kill()
            p.join()
    return uri, [p.exitcode for p in procs]


@pytest.fixture()
def store(raced_store: tuple[str, list[int | None]]) -> str:
    return raced_store[0]


@pytest.fixture()
def exp(request: pytest.FixtureRequest) -> str:
    return request.node.name


def _children(client: MlflowClient, parent: str) -> list:
    exp_id = client.get_run(parent).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture()
def tracker(store: str, exp: str) -> SearchTracker:
    return SearchTracker(uri=store, experiment=exp)


def test_two_processes_share_a_fresh_sqlite_store(raced_store: tuple[str, list[int | None]]) -> None:
    uri, exitcodes = raced_store
    assert exitcodes == [0, 0]
    with sqlite3.connect(uri.removeprefix("sqlite:///")) as conn:  # created in WAL mode: readers never block
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for name in ("a", "b"):
        parent = find_search(uri=uri, experiment=RACE_EXP, search=name)
        trials = list_trials(uri=uri, experiment=RACE_EXP, search_run_id=parent.run_id)
        # none lost, none duplicated
        assert sorted(t.name for t in trials) == sorted(f"{name}-{i}" for i in range(20))
        assert {t.status for t in trials} == {"FINISHED"} and parent.status == "FINISHED"
        assert all(t.metrics["eval_score"] == int(t.name.split("-")[1]) + 0.2 for t in trials)
    client = MlflowClient(tracking_uri=uri)
    run_id = find_search(uri=uri, experiment=RACE_EXP, search="b").run_id
    one = list_trials(uri=uri, experiment=RACE_EXP, search_run_id=run_id)[7]
    assert [m.step for m in client.get_metric_history(one.run_id, "loss")] == [0, 1, 2]


def test_parent_and_child_runs_params_metrics(tracker: SearchTracker) -> None:
    cfg = load_config(["distill.layer_map=explicit", "distill.layers=[2,4]", "distill.w_hidden=0.5"])
    parent = tracker.start_search(name="s1", space="ted", config={"space": "ted", "num_samples": 4},
                                  code_version="0123abc", objectives=[("eval_score", "max")])
    run_id = tracker.trial_run("t1", params=cfg)
    for step, score in enumerate([0.5, 0.7, 0.6]):
        tracker.log_metrics("t1", {"eval_score": score, "train_loss": 1.0 / (step + 1)}, step=step)
    tracker.end_trial("t1", status="FINISHED", final_metrics={"eval_score": 0.7, "student_params": 12345})

    client = tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["kdsearch.trial_id"] == "t1"
    assert set(run.data.params) == set(config_keys())  # the YAML/CLI names, nothing else
    assert run.data.params["distill.w_hidden"] == "0.5"
    assert run.data.params["distill.layers"] == "[2, 4]"
    assert run.data.params["units.ratio"] == "None"
    history = client.get_metric_history(run_id, "eval_score")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.7), (2, 0.6), (2, 0.7)]
    assert run.data.metrics["eval_score"] == 0.7  # the final value is the one the run shows
    assert run.data.metrics["student_params"] == 12345
    tags = client.get_run(parent).data.tags
    assert tags["kdsearch.search"] == "s1" and tags["kdsearch.metric"] == "eval_score"
    assert tags["kdsearch.mode"] == "max" and tags["kdsearch.code_version"] == "0123abc"


def test_the_experiment_is_marked_as_model_training_so_mlflow_ui_opens_on_its_runs(tracker: SearchTracker,
                                                                                    store: str, exp: str) -> None:
    tracker.start_search(name="kind", space="smoke", config={}, code_version="v")
    tracker.end_search()
    experiment = MlflowClient(tracking_uri=store).get_experiment_by_name(exp)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # else: the GenAI overview


def test_resume_gives_exactly_one_run_per_trial(store: str, exp: str) -> None:
    first = SearchTracker(uri=store, experiment=exp)
    parent = first.start_search(name="s", space="kd", config={"a": 1}, code_version="v1")
    runs = {t: first.trial_run(t, params={"distill": {"w_hidden": 1.0}}) for t in ("t1", "t2")}
    first.trial_run("t1", params={"distill": {"w_hidden": 1.0}})  # a retry in the same driver
    first.end_trial("t1", status="FINISHED")

    # A restarted driver: fresh tracker, same search name; t2 is retried, t3 is new.
    second = SearchTracker(uri=store, experiment=exp)
    assert second.start_search(name="s", space="kd", config={"a": 1}, code_version="v1") == parent
    assert second.trial_run("t2", params={"distill": {"w_hidden": 1.0}}) == runs["t2"]
    with pytest.warns(UserWarning, match="distill.w_hidden"):  # params are immutable in MLflow
        assert second.trial_run("t1", params={"distill": {"w_hidden": 2.0}}) == runs["t1"]
    second.trial_run("t3", params={})
    second.log_metrics("t2", {"eval_score": 0.4}, step=0)

    children = _children(second.client, parent)
    assert sorted(r.data.tags["kdsearch.trial_id"] for r in children) == ["t1", "t2", "t3"]
    assert second.client.get_run(runs["t1"]).data.params["distill.w_hidden"] == "1.0"
    assert second.client.get_run(runs["t2"]).info.status == "RUNNING"
    searches = second.client.search_runs([second.experiment_id], "tags.`kdsearch.role` = 'search'")
    assert len(searches) == 1


def test_reopening_a_search_with_less_config_keeps_its_whole_record(store: str, exp: str, tmp_path: Path) -> None:
    import json

    first = SearchTracker(uri=store, experiment=exp)
    parent = first.start_search(name="s", space="kd", config={"space": "kd", "base.train.lr": 1e-3},
                                code_version="v")
    # the search's end (export, report) reopens the parent run naming only the space
    SearchTracker(uri=store, experiment=exp).start_search(name="s", space="kd", config={"space": "kd"},
                                                          code_version="v")
    saved = first.client.download_artifacts(parent, "search_config.json", str(tmp_path))
    assert json.loads(Path(saved).read_text()) == {"space": "kd", "base.train.lr": "0.001"}


def test_failed_trial_records_error(tracker: SearchTracker, tmp_path: Path) -> None:
    tracker.start_search(name="s", space="kd", config={}, code_version="v")
    run_id = tracker.trial_run("bad", params={"teacher": "tiny-bert"})
    error = "Traceback (most recent call last):\n" + "x" * 6000 + "\nRuntimeError: CUDA out of memory"
    tracker.end_trial("bad", status="FAILED", error=error)
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdsearch.error"] == error[:5000]
    saved = tracker.client.download_artifacts(run_id, "error.txt", str(tmp_path))
    assert Path(saved).read_text() == error  # the artifact keeps the whole text

    assert tracker.trial_run("bad", params={"teacher": "tiny-bert"}) == run_id  # Tune retries the trial
    tracker.end_trial("bad", status="FINISHED")
    tags = tracker.client.get_run(run_id).data.tags
    assert "kdsearch.error" not in tags and tags["kdsearch.previous_error"] == error[:5000]


def test_nonfinite_and_non_numeric_metrics(tracker: SearchTracker) -> None:
    tracker.start_search(name="s", space="kd", config={}, code_version="v")
    run_id = tracker.trial_run("t", params={})
    tracker.log_metrics("t", {"eval_score": math.nan, "loss": 1.5, "hostname": "n1", "done": True}, step=0)
    tracker.log_metrics("t", {"loss": math.inf}, step=1)
    run = tracker.client.get_run(run_id)
    assert run.data.metrics == {"loss": 1.5}  # MLflow's latest loss is step 0's: the tag says it is stale
    assert run.data.tags["kdsearch.nonfinite_metrics"] == "eval_score,loss"
    tracker.log_metrics("t", {"loss": 0.5}, step=2)  # finite again: the latest value is current
    assert tracker.client.get_run(run_id).data.tags["kdsearch.nonfinite_metrics"] == "eval_score"
    tracker.end_trial("t", status="FINISHED", final_metrics={"eval_score": 0.7})
    assert tracker.client.get_run(run_id).data.tags["kdsearch.nonfinite_metrics"] == ""


def test_artifacts_and_end_search(tracker: SearchTracker, tmp_path: Path) -> None:
    parent = tracker.start_search(name="s", space="kd", config={}, code_version="v")
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text("{}")
    done = tracker.trial_run("done", params={})
    dangling = tracker.trial_run("dangling", params={})  # Tune never told us it ended
    tracker.log_trial_artifacts("done", files={"config.yaml": "a: 1\n", "layer_map.json": b"[[1, 2]]"},
                                dirs={"student": student})
    tracker.end_trial("done", status="FINISHED")
    tracker.end_search(summary={"best_trial": "done", "num_trials": 2})

    client = tracker.client
    names = {a.path for a in client.list_artifacts(done)}
    assert {"config.yaml", "layer_map.json", "student"} <= names
    assert [a.path for a in client.list_artifacts(done, "student")] == ["student/config.json"]
    assert client.get_run(dangling).info.status == "KILLED"
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["num_trials"] == 2
    assert run.data.tags["kdsearch.summary.best_trial"] == "done"
    assert find_search(uri=tracker.uri, experiment=tracker.experiment).run_id == parent
    assert len(list_trials(uri=tracker.uri, experiment=tracker.experiment, search_run_id=parent)) == 2


def _locked() -> MlflowException:
    """The shape MLflow raises: MlflowException from SQLAlchemy's OperationalError from sqlite3's."""
    inner = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    try:
        raise MlflowException(str(inner)) from inner
    except MlflowException as err:
        return err


def test_retry_locked_retries_only_lock_errors() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _locked()
        return "ok"

    assert retry_locked(flaky, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9
    assert is_locked_error(_locked()) and not is_locked_error(ValueError("no such table"))

    def broken() -> None:
        calls.append(1)
        raise MlflowException("UNIQUE constraint failed")

    calls.clear()
    with pytest.raises(MlflowException, match="UNIQUE"):
        retry_locked(broken, sleep=sleeps.append)
    assert len(calls) == 1  # not a lock: no retry

    with pytest.raises(MlflowException, match="locked"):
        retry_locked(lambda: (_ for _ in ()).throw(_locked()), attempts=3, sleep=lambda s: None)


class _Handler(http.server.BaseHTTPRequestHandler):
    healthy = True

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.healthy and self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("healthy", [True, False])
def test_http_uri_checked_against_a_real_server(healthy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = type("Handler", (_Handler,), {"healthy": healthy})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    try:
        if healthy:
            check_tracking_uri(uri)
        else:
            with pytest.raises(ConfigError, match="not an MLflow tracking server"):
                check_tracking_uri(uri)
    finally:
        server.shutdown()


def test_unreachable_uris_fail_early_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="unreachable") as caught:
        SearchTracker(uri="http://127.0.0.1:9", experiment="kdsearch")
    assert "\n" not in str(caught.value)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not a writable folder"):
        check_tracking_uri(f"sqlite:///{blocker}/sub/mlflow.db")
    for uri in ("./mlruns", "mlruns", f"file://{tmp_path}/mlruns"):
        with pytest.raises(ConfigError, match="file store"):
            check_tracking_uri(uri)
    with pytest.raises(ConfigError, match="in-memory"):
        check_tracking_uri("sqlite:///:memory:")
    with pytest.raises(ConfigError, match="unsupported scheme"):
        check_tracking_uri("ftp://host/db")
    monkeypatch.chdir(tmp_path)
    check_tracking_uri("sqlite:///mlflow.db")  # the default: relative to the working directory
    check_tracking_uri(f"sqlite:///{tmp_path}/new/folder/mlflow.db")  # a folder that can be created


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_sqlite_in_read_only_folder(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="writable"):
        check_tracking_uri(f"sqlite:///{locked}/mlflow.db")
