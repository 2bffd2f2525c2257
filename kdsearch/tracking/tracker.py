"""`SearchTracker`, the search driver's only MLflow writer: one parent run per search, one child run per trial.

Resumable: runs are found again by their tags. Imports mlflow (lazily); must not import ray.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdsearch.tracking.runs import (
    BATCH,
    NONFINITE_TAG,
    flatten_params,
    is_finite,
    is_number,
    log_files,
    quote,
    search_all,
)
from kdsearch.tracking.store import DEFAULT_EXPERIMENT, DEFAULT_URI, open_client, retry_locked

ERROR_TAG_CHARS = 5000


@dataclass
class _Trial:
    run_id: str
    params: dict[str, str]
    steps: dict[str, int] = field(default_factory=dict)
    last_ms: int = 0
    nonfinite: set[str] = field(default_factory=set)


class SearchTracker:
    """Writes one search to MLflow. Created once in the search driver; trials never write to MLflow.

    Call order: `start_search` once (again after a restart: it reuses the parent run), then per trial
    `trial_run` when it starts (idempotent), `log_metrics` per report, `end_trial` when it ends;
    `end_search` last.
    """

    def __init__(self, *, uri: str = DEFAULT_URI, experiment: str = DEFAULT_EXPERIMENT) -> None:
        self.uri, self.experiment = uri, experiment
        self.client, self.experiment_id = open_client(uri, experiment)
        self.parent_run_id: str | None = None
        self.search_name: str | None = None
        self._trials: dict[str, _Trial] = {}

    # -- search (parent run)

    def start_search(self, *, name: str, space: str, config: Any, code_version: str,
                     objectives: list[tuple[str, str]] | None = None,
                     tags: dict[str, str] | None = None) -> str:
        """Parent run id; a parent run tagged kdsearch.search=`name` is reused (resume), not duplicated.

        `objectives` [(metric, "max"|"min"), ...] is stored as tags kdsearch.metric/mode (the first) and
        kdsearch.objectives ("a:max,b:min") for the leaderboard.
        """
        run_tags = {"kdsearch.search": name, "kdsearch.role": "search", "kdsearch.space": space,
                    "kdsearch.code_version": code_version, **(tags or {})}
        if re.fullmatch(r"[0-9a-f]{7,40}", code_version):
            run_tags["mlflow.source.git.commit"] = code_version
        if objectives:
            run_tags |= {"kdsearch.metric": objectives[0][0], "kdsearch.mode": objectives[0][1],
                         "kdsearch.objectives": ",".join(f"{m}:{d}" for m, d in objectives)}
        query = f"tags.`kdsearch.role` = 'search' AND tags.`kdsearch.search` = {quote(name)}"

        def find_or_create() -> Any:
            runs = search_all(self.client, self.experiment_id, query, ["attributes.start_time ASC"])
            if runs:
                return runs[0]
            return self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)

        run = retry_locked(find_or_create)
        self.parent_run_id, self.search_name = run.info.run_id, name
        self._reopen(run)
        logged, given = dict(run.data.params), flatten_params(config)
        self._write(run.info.run_id, logged, given, run_tags)
        # Reopened at the end of a search (export) with less than it was started with: keep the whole record.
        self._log(self.parent_run_id, files={"search_config.json": json.dumps(
            {**logged, **given}, indent=2, sort_keys=True)})
        return self.parent_run_id

    def tag_search(self, tags: Mapping[str, str]) -> None:
        """Set tags on the parent run (they may change: a resumed search updates them)."""
        self._write(self._parent(), {}, {}, dict(tags))

    def end_search(self, *, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED",
                   summary: dict[str, Any] | None = None) -> None:
        """Close the parent; trial runs still RUNNING (a trial the driver never saw end) become KILLED.

        `summary`: finite numbers become parent metrics, strings tags `kdsearch.summary.<key>`, and the whole
        dict the artifact summary.json.
        """
        parent = self._parent()
        query = f"tags.`mlflow.parentRunId` = {quote(parent)} AND attributes.status = 'RUNNING'"
        for run in search_all(self.client, self.experiment_id, query):
            retry_locked(functools.partial(self.client.set_terminated, run.info.run_id, "KILLED"))
        if summary:
            numbers_ = {k: float(v) for k, v in summary.items() if is_finite(v)}
            strings = {f"kdsearch.summary.{k}": v for k, v in summary.items() if isinstance(v, str)}
            self._metrics(parent, numbers_, step=0)
            self._write(parent, {}, {}, strings)
            text = json.dumps(summary, indent=2, sort_keys=True, default=str)
            self._log(parent, files={"summary.json": text})
        retry_locked(lambda: self.client.set_terminated(parent, status))

    def log_search_artifacts(self, *, files: Mapping[str, str | bytes] | None = None,
                             dirs: Mapping[str, Path | str] | None = None) -> None:
        """Artifacts of the whole search (leaderboard, plots, the best student) on the parent run."""
        self._log(self._parent(), files=files, dirs=dirs)

    # -- trials (child runs)

    def trial_run(self, trial_id: str, *, params: Any, tags: Mapping[str, str] | None = None) -> str:
        """Run id of the trial's child run: found by tags (retry, resume) or created; logs new params only."""
        state = self._trial(trial_id, reopen=True)
        self._write(state.run_id, state.params, flatten_params(params), dict(tags or {}))
        return state.run_id

    def log_metrics(self, trial_id: str, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log the finite numbers of `metrics` at `step`; NaN/inf are dropped and named in a tag."""
        state = self._trial(trial_id)
        finite = {k: float(v) for k, v in metrics.items() if is_finite(v)}
        self._metrics(state.run_id, finite, step=step, state=state)
        self._note_nonfinite(state, metrics, finite)

    def _note_nonfinite(self, state: _Trial, metrics: Mapping[str, Any], finite: Mapping[str, float]) -> None:
        """NONFINITE_TAG names the metrics whose latest value was dropped as NaN/inf: the leaderboard must not
        rank on the earlier value MLflow still shows."""
        bad = {k for k, v in metrics.items() if is_number(v) and not math.isfinite(v)}
        current = (state.nonfinite | bad) - finite.keys()
        if current != state.nonfinite:
            state.nonfinite = current
            self._write(state.run_id, {}, {}, {NONFINITE_TAG: ",".join(sorted(current))})

    def end_trial(self, trial_id: str, *, status: Literal["FINISHED", "FAILED", "KILLED"],
                  error: str | None = None, final_metrics: Mapping[str, Any] | None = None) -> None:
        """Final metrics (at each metric's last step, so they are what the run shows), error, status."""
        state = self._trial(trial_id)
        if final_metrics:
            finite = {k: float(v) for k, v in final_metrics.items() if is_finite(v)}
            for key in finite.keys() - state.steps.keys():  # a resumed driver: continue the stored history
                history = retry_locked(functools.partial(self.client.get_metric_history, state.run_id, key))
                state.steps[key] = max((m.step for m in history), default=0)
            for step in sorted({state.steps[k] for k in finite}):
                self._metrics(state.run_id, {k: v for k, v in finite.items() if state.steps[k] == step},
                              step=step, state=state)
            self._note_nonfinite(state, final_metrics, finite)
        if error:
            self._write(state.run_id, {}, {}, {"kdsearch.error": error[:ERROR_TAG_CHARS]})
            self._log(state.run_id, files={"error.txt": error})
        retry_locked(lambda: self.client.set_terminated(state.run_id, status))

    def log_trial_artifacts(self, trial_id: str, *, files: Mapping[str, str | bytes] | None = None,
                            dirs: Mapping[str, Path | str] | None = None) -> None:
        """`files`: {artifact path: text or bytes} (config.yaml, layer_map.json); `dirs`: {folder: dir}."""
        self._log(self._trial(trial_id).run_id, files=files, dirs=dirs)

    # -- helpers

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("SearchTracker.start_search must be called before logging trials")
        return self.parent_run_id

    def _trial(self, trial_id: str, *, reopen: bool = False) -> _Trial:
        if trial_id in self._trials and not reopen:
            return self._trials[trial_id]
        parent = self._parent()
        query = (f"tags.`kdsearch.trial_id` = {quote(trial_id)} "
                 f"AND tags.`mlflow.parentRunId` = {quote(parent)}")
        tags = {"kdsearch.trial_id": trial_id, "mlflow.parentRunId": parent, "kdsearch.role": "trial",
                "kdsearch.search": self.search_name or ""}

        def find_or_create() -> Any:  # one transaction's worth: a retry re-checks before creating
            runs = search_all(self.client, self.experiment_id, query, ["attributes.start_time ASC"])
            if runs:
                return runs[0]
            return self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)

        run = retry_locked(find_or_create)
        if reopen:
            self._reopen(run)
        old = self._trials.get(trial_id)
        nonfinite = set(filter(None, run.data.tags.get(NONFINITE_TAG, "").split(",")))
        state = _Trial(run.info.run_id, dict(run.data.params), nonfinite=nonfinite)
        if old is not None:
            state.steps, state.last_ms = old.steps, old.last_ms
        self._trials[trial_id] = state
        return state

    def _reopen(self, run: Any) -> None:
        """A retried trial or resumed search runs again: RUNNING, and an old error is kept as history only."""
        run_id = run.info.run_id
        if run.info.status != "RUNNING":
            retry_locked(lambda: self.client.update_run(run_id, status="RUNNING"))
        if "kdsearch.error" in run.data.tags:
            self._write(run_id, {}, {}, {"kdsearch.previous_error": run.data.tags["kdsearch.error"]})
            retry_locked(lambda: self.client.delete_tag(run_id, "kdsearch.error"))

    def _write(self, run_id: str, logged: dict[str, str], params: dict[str, str],
               tags: dict[str, str]) -> None:
        """Log tags and the params not yet on the run (MLflow params are immutable: changes are skipped)."""
        from mlflow.entities import Param, RunTag

        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            warnings.warn(f"run {run_id}: params {changed} were logged with other values; kept the old ones",
                          stacklevel=3)
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        entities: list[Any] = new + [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(entities), BATCH):
            chunk = entities[i:i + BATCH]
            params_ = [e for e in chunk if isinstance(e, Param)]
            tags_ = [e for e in chunk if isinstance(e, RunTag)]
            retry_locked(functools.partial(self.client.log_batch, run_id, params=params_, tags=tags_))
        logged.update({p.key: p.value for p in new})

    def _metrics(self, run_id: str, values: dict[str, float], *, step: int,
                 state: _Trial | None = None) -> None:
        from mlflow.entities import Metric

        if not values:
            return
        now = int(time.time() * 1000)
        if state is not None:  # strictly later timestamps: the last write at a step is the one MLflow shows
            now = state.last_ms = max(now, state.last_ms + 1)
            state.steps.update({k: max(step, state.steps.get(k, step)) for k in values})
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        retry_locked(lambda: self.client.log_batch(run_id, metrics=batch))

    def _log(self, run_id: str, *, files: Mapping[str, str | bytes] | None = None,
             dirs: Mapping[str, Path | str] | None = None) -> None:
        log_files(self.client, run_id, files, dirs)
