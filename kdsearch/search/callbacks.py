"""Tune callbacks of the search driver: MLflow logging (one writer) and a compact progress table.

Both run in the driver process only. Trials never touch MLflow, so concurrent trials cannot race on the
store; a retried or resumed trial finds its run again by its trial id (exactly one run per trial).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from kdsearch.config.parse import flatten
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.run.models import depth_width, resolve_teacher, teacher_config
from kdsearch.search import space_model
from kdsearch.tracking import SAMPLED_TAG, SEARCHED_TAG, TRIAL_INDEX_TAG, UNFINISHED_TAG, SearchTracker, list_trials

_LOGGED = ("epoch", "student_params", "student_latency_ms", "teacher_score", "epoch_time_s", "time_total_s")


def trial_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a Tune result that belong in MLflow (the loop's metrics, not Tune's bookkeeping)."""
    return {k: v for k, v in result.items()
            if (k.startswith(("train_", "eval_")) or k in _LOGGED) and isinstance(v, (int, float))}


def layer_map_of(cfg: Any) -> list[tuple[int, int]]:
    """The epoch-0 layer pairs of a trial (student hidden index, teacher hidden index)."""
    n_t, _ = depth_width(teacher_config(resolve_teacher(cfg.teacher)))
    return run_pairs(cfg, n_t)


class MlflowTrials(tune.Callback):
    """Parent run per search, child run per trial: params, per-epoch metrics, status, error, artifacts."""

    def __init__(self, *, space: space_model.Space, uri: str, experiment: str, search: str, space_name: str,
                 code_version: str, objectives: list[tuple[str, str]]) -> None:
        self.space, self.uri, self.experiment = space, uri, experiment
        self.search, self.space_name, self.code_version, self.objectives = search, space_name, code_version, objectives
        self._tracker: SearchTracker | None = None
        self._ended: set[str] = set()
        self._samples: int | None = None

    def __getstate__(self) -> dict[str, Any]:  # pickled with the experiment for Tuner.restore
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            self._tracker = SearchTracker(uri=self.uri, experiment=self.experiment)
            base = flatten(space_model.trial_config(self.space, {}))
            self._tracker.start_search(name=self.search, space=self.space_name, code_version=self.code_version,
                                       objectives=self.objectives,
                                       tags={SEARCHED_TAG: ",".join(self.space.params)},
                                       config={"space": self.space_name, **{f"base.{k}": v for k, v in base.items()}})
        return self._tracker

    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None,
              **info: Any) -> None:
        self._samples = total_num_samples
        self.tracker  # noqa: B018  (create the store and the parent run before any trial starts)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = space_model.trial_config(self.space, trial.config)
        # The run logs the whole resolved config; the tag says which searched params this trial drew (a
        # conditional one left out is inactive: the leaderboard shows "-" there).
        tags = {SAMPLED_TAG: ",".join(sorted(trial.config)), TRIAL_INDEX_TAG: str(trials.index(trial) + 1)}
        self.tracker.trial_run(trial.trial_id, params=flatten(cfg), tags=tags)
        pairs = layer_map_of(cfg)
        self.tracker.log_trial_artifacts(trial.trial_id, files={
            "trial_config.yaml": yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in flatten(cfg).items()}, sort_keys=False),
            "layer_map.json": json.dumps({"pairs": pairs, "note": "(student, teacher) hidden_states indices"})})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.tracker.log_metrics(trial.trial_id, trial_metrics(result), step=int(result.get("epoch", 0)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.tracker.end_trial(trial.trial_id, status="FINISHED",
                               final_metrics=trial_metrics(trial.last_result or {}))
        self._ended.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).exists() \
            else "trial failed (no error file)"
        self.tracker.end_trial(trial.trial_id, status="FAILED", error=error)
        self._ended.add(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune ends some trials ERROR without calling on_trial_error (e.g. a trial actor that failed to reset
        for reuse): log those FAILED here, so that every trial has its run."""
        for trial in trials:
            if trial.status == "ERROR" and trial.trial_id not in self._ended:
                self.on_trial_start(0, trials, trial)
                self.on_trial_error(0, trials, trial)
        # Ctrl-C or time_budget_s: Tune stops the running trials without a trial-end callback (and marks them
        # TERMINATED as it does finished ones); their runs are still open. The trials of an earlier driver end
        # here too (a resumed search), so their runs are asked, not this driver's callbacks.
        parent = self.tracker.parent_run_id
        assert parent is not None
        ended = {r.name for r in list_trials(uri=self.uri, experiment=self.experiment, search_run_id=parent)
                 if r.status in ("FINISHED", "FAILED")}
        open_ = sum(1 for t in trials if t.trial_id not in ended)
        undrawn = max(0, (self._samples or 0) - len(trials))
        self.tracker.tag_search({UNFINISHED_TAG: str(open_ + undrawn)})


class ProgressTable(tune.Callback):
    """A compact trial table every `every_s` seconds, and one line per finished trial."""

    def __init__(self, *, objectives: list[tuple[str, str]], every_s: float = 20.0, best: int = 3) -> None:
        self.metric, self.mode = objectives[0]
        self.every_s, self.best = every_s, best
        self._last = 0.0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last < self.every_s or not trials:
            return
        self._last = time.monotonic()
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        print(f"[kdsearch.tune] {len(trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items()))
        shown_trials = self._shown(trials)
        if shown_trials:  # none running or scored yet (all pending): the count line says it all
            print(f"  {'trial':<14}{'status':<11}{'epoch':>6}{self.metric:>14}  params")
        for t in shown_trials:
            last = t.last_result or {}
            value = last.get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, float) else "-"
            params = " ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                              for k, v in t.config.items())
            print(f"  {t.trial_id:<14}{t.status:<11}{last.get('epoch', '-'):>6}{shown:>14}  {params}")

    def _shown(self, trials: list) -> list:
        """Running trials, then the best `best` finished ones: compact however large the search."""
        sign = 1 if self.mode == "max" else -1
        scored = [t for t in trials if t.status != "RUNNING" and isinstance((t.last_result or {}).get(self.metric),
                                                                            (int, float))]
        scored.sort(key=lambda t: -sign * t.last_result[self.metric])
        return [t for t in trials if t.status == "RUNNING"] + scored[: self.best]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        print(f"[kdsearch.tune] trial {trial.trial_id} done after epoch {last.get('epoch', '?')}: "
              f"{self.metric}={last.get(self.metric, float('nan')):.4f}", flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        print(f"[kdsearch.tune] trial {trial.trial_id} FAILED (see its MLflow run for the error)", flush=True)
