"""MLflow tracking: one parent run per search, one child run per trial, written from the search driver only.

The only module that imports mlflow; must not import ray. Every write goes through `retry_locked`; a new
sqlite store is created under a file lock so two processes never migrate the same fresh database at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import numbers
import os
import random
import re
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from kdsearch.config import ConfigError, flatten

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kdsearch"
ERROR_TAG_CHARS = 5000
_MAX_PARAM_CHARS = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_BATCH = 100  # MLflow accepts at most 100 params/tags per log_batch
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
T = TypeVar("T")
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- URIs and the store


def _sqlite_path(uri: str) -> Path:
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigError(f"tracking.uri={uri}: an in-memory sqlite store loses every run; use sqlite:///mlflow.db")
    return Path(path)


def check_tracking_uri(uri: str) -> None:
    """Raise ConfigError (one line saying how to fix it) when runs could not be written to `uri`."""
    if uri == "databricks" or uri.startswith("databricks://"):
        return  # credentials come from the Databricks profile; MLflow reports its own errors
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("", "file"):
        raise ConfigError(f"tracking.uri={uri}: the file store (./mlruns) is unsupported in MLflow 3; "
                          f"use {DEFAULT_URI} or an http(s):// tracking server")
    if scheme == "sqlite":
        _check_sqlite(uri)
    elif scheme in ("http", "https"):
        _check_http(uri.rstrip("/"))
    elif scheme.split("+", 1)[0] not in _DB_SCHEMES:
        raise ConfigError(f"tracking.uri={uri}: unsupported scheme {scheme!r}; use sqlite:///<file>.db, "
                          "http(s)://<server> or a database URI (postgresql://, mysql://)")


def _check_sqlite(uri: str) -> None:
    db = _sqlite_path(uri).absolute()
    if db.exists():
        if not (db.is_file() and os.access(db, os.R_OK | os.W_OK)):
            raise ConfigError(f"tracking.uri={uri}: {db} is not a writable file; choose another sqlite path")
        return
    folder = db.parent
    while not folder.exists():  # the nearest existing ancestor decides whether the folder can be created
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"tracking.uri={uri}: cannot create {db.parent} ({folder} is not a writable "
                          "folder); choose a writable sqlite path")


def _check_http(uri: str) -> None:
    last = ""
    for path in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            with urllib.request.urlopen(uri + path, timeout=3):
                return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise ConfigError(f"tracking.uri={uri}: the server refused us (HTTP {err.code}); set "
                                  "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD") from None
            last = f"HTTP {err.code} on {path}"
        except (urllib.error.URLError, OSError) as err:  # refused, DNS, timeout
            reason = getattr(err, "reason", err)
            raise ConfigError(f"tracking.uri={uri}: unreachable ({reason}); start `mlflow server` there or "
                              f"use {DEFAULT_URI}") from None
    raise ConfigError(f"tracking.uri={uri}: not an MLflow tracking server ({last})")


def is_locked_error(err: BaseException) -> bool:
    """True for sqlite's 'database is locked' however MLflow/SQLAlchemy wrapped it."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if "database is locked" in str(node) or "database table is locked" in str(node):
            return True
        node = node.__cause__ or node.__context__
    return False


def retry_locked(fn: Callable[[], T], *, attempts: int = 8, delay: float = 0.05, max_delay: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Call `fn`, retrying with jittered exponential backoff while sqlite says 'database is locked'.

    MLflow sets a 20 s busy timeout, but sqlite returns SQLITE_BUSY at once when a reader must upgrade to a
    writer while another process writes (it would deadlock otherwise); the failed transaction is rolled back,
    so calling `fn` again is safe. Other errors propagate immediately.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts - 1 or not is_locked_error(err):
                raise
            wait = min(max_delay, delay * 2**attempt) * (1 + random.random())
            _log.info("MLflow store busy (database is locked); retry %d in %.2f s", attempt + 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and migration across processes: `<db>.lock` next to a sqlite file."""
    if not uri.lower().startswith("sqlite:"):
        yield
        return
    db = _sqlite_path(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create_wal_database(db: Path) -> None:
    """A new sqlite file in WAL mode (persistent in the file): readers never block the writer, and each commit
    costs one fsync instead of several, so MLflow's ~60 migrations and every later write are ~3x faster here.
    WAL needs a local disk (no NFS); clusters use an MLflow server anyway."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL").fetchall()


def open_client(uri: str, experiment: str, *, create: bool = True) -> tuple[MlflowClient, str]:
    """(MlflowClient bound to `uri`, experiment id); creates the database and experiment under the lock."""
    from mlflow import MlflowClient

    check_tracking_uri(uri)
    if not create and uri.lower().startswith("sqlite:") and not _sqlite_path(uri).exists():
        raise ConfigError(f"tracking.uri={uri}: no MLflow database there; check the path or run a search")
    with _init_lock(uri):  # MlflowClient() builds the store, which creates tables / runs migrations
        if uri.lower().startswith("sqlite:") and not _sqlite_path(uri).exists():
            _create_wal_database(_sqlite_path(uri))
        client = retry_locked(lambda: MlflowClient(tracking_uri=uri))
        found = retry_locked(lambda: client.get_experiment_by_name(experiment))
        if found is not None:
            return client, found.experiment_id
        if not create:
            raise ConfigError(f"experiment={experiment}: no such experiment at {uri}; run a search first")
        location = None
        if uri.lower().startswith("sqlite:"):  # keep artifacts beside the database, not in the cwd's ./mlruns
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
            location = (_sqlite_path(uri).absolute().parent / "mlartifacts" / safe).as_uri()
        experiment_id = retry_locked(lambda: client.create_experiment(experiment, artifact_location=location))
        return client, experiment_id


# ---------------------------------------------------------------------------- params and queries


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


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: names with both quote characters cannot be searched in MLflow")


def _search_all(client: MlflowClient, experiment_id: str, query: str,
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
        runs = _search_all(client, experiment_id, f"{query} AND tags.`kdsearch.search` = {_quote(search)}",
                           ["attributes.start_time DESC"])
        if not runs and re.fullmatch(r"[0-9a-f]{32}", search):
            runs = [r for r in _search_all(client, experiment_id, query) if r.info.run_id == search]
    else:
        runs = _search_all(client, experiment_id, query, ["attributes.start_time DESC"])
    if not runs:
        which = f"named {search!r}" if search else "at all"
        raise ConfigError(f"search={search or ''}: no search {which} in experiment {experiment} at {uri}")
    return _record(runs[0])


def list_trials(*, uri: str, experiment: str, search_run_id: str) -> list[RunRecord]:
    """Every child run of a search, oldest first (trial id breaks ties of the ms start time)."""
    client, experiment_id = open_client(uri, experiment, create=False)
    runs = _search_all(client, experiment_id, f"tags.`mlflow.parentRunId` = {_quote(search_run_id)}")
    return sorted((_record(run) for run in runs), key=lambda r: (r.start_time or 0, r.name))


def _log_files(client: MlflowClient, run_id: str, files: Mapping[str, str | bytes] | None,
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
    _log_files(client, run_id, files, dirs)


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
    entities += [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
    for i in range(0, len(entities), _BATCH):
        chunk = entities[i:i + _BATCH]
        retry_locked(functools.partial(
            client.log_batch, run_id, params=[e for e in chunk if isinstance(e, Param)],
            metrics=[e for e in chunk if isinstance(e, Metric)], tags=[e for e in chunk if isinstance(e, RunTag)]))
    _log_files(client, run_id, None, dirs)
    retry_locked(lambda: client.set_terminated(run_id, "FINISHED"))
    return run_id


# ---------------------------------------------------------------------------- the driver's writer


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
        query = f"tags.`kdsearch.role` = 'search' AND tags.`kdsearch.search` = {_quote(name)}"

        def find_or_create() -> Any:
            runs = _search_all(self.client, self.experiment_id, query, ["attributes.start_time ASC"])
            if runs:
                return runs[0]
            return self.client.create_run(self.experiment_id, tags=run_tags, run_name=name)

        run = retry_locked(find_or_create)
        self.parent_run_id, self.search_name = run.info.run_id, name
        self._reopen(run)
        self._write(run.info.run_id, dict(run.data.params), flatten_params(config), run_tags)
        self._log(self.parent_run_id, files={"search_config.json": json.dumps(
            flatten_params(config), indent=2, sort_keys=True)})
        return self.parent_run_id

    def end_search(self, *, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED",
                   summary: dict[str, Any] | None = None) -> None:
        """Close the parent; trial runs still RUNNING (a trial the driver never saw end) become KILLED.

        `summary`: finite numbers become parent metrics, strings tags `kdsearch.summary.<key>`, and the whole
        dict the artifact summary.json.
        """
        parent = self._parent()
        query = f"tags.`mlflow.parentRunId` = {_quote(parent)} AND attributes.status = 'RUNNING'"
        for run in _search_all(self.client, self.experiment_id, query):
            retry_locked(functools.partial(self.client.set_terminated, run.info.run_id, "KILLED"))
        if summary:
            numbers_ = {k: float(v) for k, v in summary.items() if _finite(v)}
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

    def trial_run(self, trial_id: str, *, params: Any) -> str:
        """Run id of the trial's child run: found by tags (retry, resume) or created; logs new params only."""
        state = self._trial(trial_id, reopen=True)
        self._write(state.run_id, state.params, flatten_params(params), {})
        return state.run_id

    def log_metrics(self, trial_id: str, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log the finite numbers of `metrics` at `step`; NaN/inf are dropped and named in a tag."""
        state = self._trial(trial_id)
        finite = {k: float(v) for k, v in metrics.items() if _finite(v)}
        self._metrics(state.run_id, finite, step=step, state=state)
        bad = {k for k, v in metrics.items() if _number(v) and not math.isfinite(v)} - state.nonfinite
        if bad:
            state.nonfinite |= bad
            tag = ",".join(sorted(state.nonfinite))
            self._write(state.run_id, {}, {}, {"kdsearch.nonfinite_metrics": tag})

    def end_trial(self, trial_id: str, *, status: Literal["FINISHED", "FAILED", "KILLED"],
                  error: str | None = None, final_metrics: Mapping[str, Any] | None = None) -> None:
        """Final metrics (at each metric's last step, so they are what the run shows), error, status."""
        state = self._trial(trial_id)
        if final_metrics:
            finite = {k: float(v) for k, v in final_metrics.items() if _finite(v)}
            for key in finite.keys() - state.steps.keys():  # a resumed driver: continue the stored history
                history = retry_locked(functools.partial(self.client.get_metric_history, state.run_id, key))
                state.steps[key] = max((m.step for m in history), default=0)
            for step in sorted({state.steps[k] for k in finite}):
                self._metrics(state.run_id, {k: v for k, v in finite.items() if state.steps[k] == step},
                              step=step, state=state)
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
        query = (f"tags.`kdsearch.trial_id` = {_quote(trial_id)} "
                 f"AND tags.`mlflow.parentRunId` = {_quote(parent)}")
        tags = {"kdsearch.trial_id": trial_id, "mlflow.parentRunId": parent, "kdsearch.role": "trial",
                "kdsearch.search": self.search_name or ""}

        def find_or_create() -> Any:  # one transaction's worth: a retry re-checks before creating
            runs = _search_all(self.client, self.experiment_id, query, ["attributes.start_time ASC"])
            if runs:
                return runs[0]
            return self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)

        run = retry_locked(find_or_create)
        if reopen:
            self._reopen(run)
        old = self._trials.get(trial_id)
        nonfinite = set(filter(None, run.data.tags.get("kdsearch.nonfinite_metrics", "").split(",")))
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
        for i in range(0, len(entities), _BATCH):
            chunk = entities[i:i + _BATCH]
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
        _log_files(self.client, run_id, files, dirs)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _number(value) and math.isfinite(value)
