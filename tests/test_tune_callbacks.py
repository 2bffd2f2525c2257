"""kdsearch.tune_callbacks.MlflowTrials without Ray running: Tune's callback calls on stand-in trials, a real store."""

from __future__ import annotations

import os

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")  # nothing may try the network

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from kdsearch.search import spaces  # noqa: E402
from kdsearch.search.callbacks import MlflowTrials  # noqa: E402
from kdsearch.tracking import find_search, list_trials  # noqa: E402


def _trial(trial_id: str, status: str, error_file: Path | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, config={"distill.layer_map": "none"},
                           error_file=str(error_file) if error_file else None, last_result={"epoch": 1})


def test_a_trial_tune_ended_without_on_trial_error_still_gets_a_failed_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = MlflowTrials(space=spaces.load_space("smoke"), uri=uri, experiment="cb", search="s",
                            space_name="smoke", code_version="v", objectives=[("eval_score", "max")])
    callback.setup()
    done, failed = _trial("done", "TERMINATED"), _trial("failed", "ERROR", tmp_path / "failed.txt")
    (tmp_path / "failed.txt").write_text("FloatingPointError: loss is nan")
    # Tune fails a trial whose reused actor did not reset in time without calling on_trial_error
    silent = _trial("silent", "ERROR", tmp_path / "silent.txt")
    (tmp_path / "silent.txt").write_text("_AbortTrialExecution: Trainable runner reuse requires reset_config()")
    for trial in (failed, done):  # concurrent trials: the second one created may start first
        callback.on_trial_start(0, [done, failed, silent], trial)
    callback.on_trial_complete(0, [], done)
    callback.on_trial_error(0, [], failed)
    callback.on_experiment_end([done, failed, silent])

    parent = find_search(uri=uri, experiment="cb", search="s")
    listed = list_trials(uri=uri, experiment="cb", search_run_id=parent.run_id)
    assert [r.name for r in listed] == ["done", "failed", "silent"]  # the search's order, not the start race
    runs = {r.name: r for r in listed}
    assert {name: r.status for name, r in runs.items()} == {"done": "FINISHED", "failed": "FAILED",
                                                            "silent": "FAILED"}
    assert "reset_config" in runs["silent"].tags["kdsearch.error"]
    assert runs["silent"].params["distill.layer_map"] == "none"  # a complete run, params included
    assert "loss is nan" in runs["failed"].tags["kdsearch.error"]  # logged once, not overwritten


def test_trials_a_stopped_search_left_open_are_counted_for_resume(tmp_path: Path) -> None:
    from kdsearch.tracking import UNFINISHED_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    callback = MlflowTrials(space=spaces.load_space("smoke"), uri=uri, experiment="cb", search="s",
                            space_name="smoke", code_version="v", objectives=[("eval_score", "max")])
    callback.setup(total_num_samples=5)
    done, stopped, pending = (_trial(name, "TERMINATED") for name in ("done", "stopped", "pending"))
    for trial in (done, stopped):
        callback.on_trial_start(0, [done, stopped, pending], trial)
    callback.on_trial_complete(0, [done, stopped, pending], done)
    # Ctrl-C: Tune ends `stopped` (TERMINATED, as `done`) without a trial-end callback; `pending` never started;
    # 2 of the 5 samples were not drawn
    callback.on_experiment_end([done, stopped, pending])
    assert find_search(uri=uri, experiment="cb", search="s").tags[UNFINISHED_TAG] == "4"
