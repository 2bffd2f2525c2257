"""MLflow runs as plain data: param formatting, `RunRecord` queries (searches, their trials) and one-shot writes
(artifacts on any run, a finished analysis run). Imports mlflow (lazily); must not import ray.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.config.parse import flatten
from kdsearch.core.errors import ConfigError
from kdsearch.tracking.store import open_client, retry_locked

if TYPE_CHECKING:
    from mlflow import MlflowClient

_MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
BATCH = 100  # MLflow accepts at most 100 params/tags per log_batch
SEARCHED_TAG = "kdsearch.searched"
"""On a search's parent run: the space's searched params, comma-separated."""
SAMPLED_TAG = "kdsearch.sampled"
"""On a trial run: the searched params this trial drew; a conditional param left out was inactive."""
TRIAL_INDEX_TAG = "kdsearch.trial_index"
"""On a trial run: the trial's place in the order the search created its trials (1, 2, ...): list_trials' order,
which breaks the leaderboard's ties the same way however the concurrent trials' start times raced."""
UNFINISHED_TAG = "kdsearch.unfinished_trials"
"""On a search's parent run: how many trials its last driver left for `resume=true` (stopped by Ctrl-C or
time_budget_s before they ended, or not drawn yet); "0" when the search ran to its end."""
CONFIRMED_TAG = "kdsearch.confirmed"
"""On a search's parent run after `confirm=k`: its confirmed ranking as JSON, best mean first: per configuration
its label, mean, the 95% t interval's half-width, the seeds' scores and its mark against the best."""
NONFINITE_TAG = "kdsearch.nonfinite_metrics"
"""On a trial run: the metrics whose latest value was NaN or inf (MLflow then shows an earlier, stale one)."""


def format_param(value: Any) -> str:
    """One string per value, whatever container or scalar type it arrived in: (1, 2) and [1, 2] agree."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return json.dumps({str(k): format_param(v) for k, v in value.items()}, sort_keys=True)
    return str(value)


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """A Config dataclass or a (nested) dict -> {dotted key: formatted value}, the YAML's names."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = flatten(params)
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = format_param(value)[:_MAX_PARAM_CHARS]
    return out


def quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: names with both quote characters cannot be searched in MLflow")


def search_all(client: MlflowClient, experiment_id: str, query: str,
                order_by: list[str] | None = None) -> list:
    runs: list = []
    token = None
    while True:
        page = retry_locked(functools.partial(client.search_runs, [experiment_id], filter_string=query,
                                              order_by=order_by, max_results=1000, page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@dataclass(frozen=True)
class RunRecord:
    """A plain copy of one MLflow run (parent or trial) for code that must not touch mlflow types."""

    run_id: str
    name: str
    status: str
    start_time: int | None  # ms since epoch
    end_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def _record(run: Any) -> RunRecord:
    tags = dict(run.data.tags)
    name = tags.get("kdsearch.trial_id") or tags.get("kdsearch.search") or run.info.run_name or ""
    return RunRecord(run.info.run_id, name, run.info.status, run.info.start_time, run.info.end_time,
                     dict(run.data.params), dict(run.data.metrics), tags)


def find_search(*, uri: str, experiment: str, search: str | None = None) -> RunRecord:
    """The parent run named `search` (tag kdsearch.search) or with that run id; the latest search if None."""
    client, experiment_id = open_client(uri, experiment, create=False)
    query = "tags.`kdsearch.role` = 'search'"
    if search:
        runs = search_all(client, experiment_id, f"{query} AND tags.`kdsearch.search` = {quote(search)}",
                           ["attributes.start_time DESC"])
        if not runs and re.fullmatch(r"[0-9a-f]{32}", search):
            runs = [r for r in search_all(client, experiment_id, query) if r.info.run_id == search]
    else:
        runs = search_all(client, experiment_id, query, ["attributes.start_time DESC"])
    if not runs:
        which = f"named {search!r}" if search else "at all"
        names = sorted({_record(run).name for run in search_all(client, experiment_id, query)})
        known = f"; searches there: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}" if names else ""
        raise ConfigError(f"search={search or ''}: no search {which} in experiment {experiment} at {uri}{known}")
    return _record(runs[0])


def search_names(*, uri: str, experiment: str) -> list[str]:
    """The names of the searches in `experiment`; none where the store or the experiment is new."""
    try:
        client, experiment_id = open_client(uri, experiment, create=False)
    except ConfigError:
        return []
    return [_record(run).name for run in search_all(client, experiment_id, "tags.`kdsearch.role` = 'search'")]


def list_trials(*, uri: str, experiment: str, search_run_id: str) -> list[RunRecord]:
    """Every child run of a search, in the order the search created its trials (TRIAL_INDEX_TAG); runs without
    the tag after those, oldest first (trial id breaks ties of the ms start time)."""
    client, experiment_id = open_client(uri, experiment, create=False)
    runs = search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = {quote(search_run_id)}")

    def order(r: RunRecord) -> tuple[float, int, str]:
        index = r.tags.get(TRIAL_INDEX_TAG, "")
        return (int(index) if index.isdigit() else math.inf, r.start_time or 0, r.name)

    return sorted((_record(run) for run in runs), key=order)


def log_files(client: MlflowClient, run_id: str, files: Mapping[str, str | bytes] | None,
               dirs: Mapping[str, Path | str] | None) -> None:
    if files:
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
            retry_locked(lambda: client.log_artifacts(run_id, tmp))
    for name, folder in (dirs or {}).items():
        retry_locked(functools.partial(client.log_artifacts, run_id, str(folder), artifact_path=name or None))


def log_run_artifacts(*, uri: str, experiment: str, run_id: str,
                      files: Mapping[str, str | bytes] | None = None,
                      dirs: Mapping[str, Path | str] | None = None) -> None:
    """Log `files` ({artifact path: content}) and `dirs` ({artifact folder: local folder}) to any run."""
    client, _ = open_client(uri, experiment, create=False)
    log_files(client, run_id, files, dirs)


def set_run_tags(*, uri: str, experiment: str, run_id: str, tags: Mapping[str, str]) -> None:
    """Set `tags` on any run (a finished search's parent, say)."""
    client, _ = open_client(uri, experiment, create=False)
    for key, value in tags.items():
        retry_locked(functools.partial(client.set_tag, run_id, key, value))


def log_analysis_run(*, uri: str, experiment: str, name: str, params: Mapping[str, Any],
                     metrics: Mapping[str, float], tags: Mapping[str, str] | None = None,
                     dirs: Mapping[str, Path | str] | None = None) -> str:
    """One finished run outside any search (tag kdsearch.role=analysis, so leaderboards never list it):
    params, finite metrics at step 0, artifact folders. Returns its run id."""
    from mlflow.entities import Metric, Param, RunTag

    client, experiment_id = open_client(uri, experiment)
    run = retry_locked(lambda: client.create_run(experiment_id, run_name=name,
                                                 tags={"kdsearch.role": "analysis", **(tags or {})}))
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    entities: list[Any] = [Param(k, v) for k, v in flatten_params(params).items()]
    entities += [Metric(k, float(v), now, 0) for k, v in metrics.items() if is_finite(v)]
    for i in range(0, len(entities), BATCH):
        chunk = entities[i:i + BATCH]
        retry_locked(functools.partial(
            client.log_batch, run_id, params=[e for e in chunk if isinstance(e, Param)],
            metrics=[e for e in chunk if isinstance(e, Metric)], tags=[e for e in chunk if isinstance(e, RunTag)]))
    log_files(client, run_id, None, dirs)
    retry_locked(lambda: client.set_terminated(run_id, "FINISHED"))
    return run_id


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)
