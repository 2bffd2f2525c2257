"""The MLflow store: URI checks, store creation (sqlite in WAL mode, under a file lock) and `open_client`.

Every call into MLflow goes through `retry_locked`, defined here. Imports mlflow (lazily); must not import ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from kdsearch.core.cache import file_lock
from kdsearch.core.errors import ConfigError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "kdsearch"
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
T = TypeVar("T")
_log = logging.getLogger("kdsearch.tracking")  # the logger's name from before the package split


def _sqlite_path(uri: str) -> Path:
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ConfigError(f"tracking.uri={uri}: an in-memory sqlite store loses every run; use sqlite:///mlflow.db")
    return Path(path)


def default_uri() -> str:
    """$MLFLOW_TRACKING_URI (set on every node of a cluster), else the local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


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
    with file_lock(Path(f"{db}.lock")):
        yield


def _create_wal_database(db: Path) -> None:
    """A new sqlite file in WAL mode (persistent in the file): readers never block the writer, and each commit
    costs one fsync instead of several, so MLflow's ~60 migrations and every later write are ~3x faster here.
    WAL needs a local disk (no NFS); clusters use an MLflow server anyway."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL").fetchall()


EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's experiment kind: model training, so that `mlflow ui` opens a kdsearch experiment on its runs table
(untagged, it guesses, and with no traces shows the GenAI overview's "no data")."""


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
            if create and EXPERIMENT_KIND_TAG not in found.tags:  # one an older kdsearch made: marked now
                retry_locked(lambda: client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG,
                                                               MODEL_TRAINING))
            return client, found.experiment_id
        if not create:
            raise ConfigError(f"tracking.experiment={experiment}: no such experiment at {uri}; run a search first")
        location = None
        if uri.lower().startswith("sqlite:"):  # keep artifacts beside the database, not in the cwd's ./mlruns
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
            location = (_sqlite_path(uri).absolute().parent / "mlartifacts" / safe).as_uri()
        experiment_id = retry_locked(lambda: client.create_experiment(experiment, artifact_location=location,
                                                                      tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}))
        return client, experiment_id
