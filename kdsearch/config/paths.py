"""Where a run writes: checks on its local folders before anything runs, and where relative output paths point.

A folder key that names a file, or a path under a file, fails only when the first write happens: after the
teacher's fine-tune and Ray's start-up. These checks make it one line at the front door.

Inside `ray job submit --working-dir .`, the command runs in Ray's temporary copy of that folder
(.../runtime_resources/working_dir_files/_ray_pkg_<hash>), which Ray deletes: relative *output* paths (the
MLflow store, results, students, the cache) then resolve under a durable folder on that node instead,
$KDSEARCH_HOME or ~/kdsearch; relative *input* paths (task.data_dir shipped with the job) still read the copy.
No Ray or MLflow import.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

from kdsearch.core.errors import ConfigError

if TYPE_CHECKING:
    from kdsearch.config.schema import Config

RAY_PACKAGE_PREFIX = "_ray_pkg_"
"""How Ray names the unpacked working_dir of a job (ray._private.runtime_env.packaging.RAY_PKG_PREFIX)."""


def is_remote(location: str) -> bool:
    """A URI (s3://, gs://, ...) that pyarrow's filesystems resolve; nothing local to check."""
    return "://" in location


def job_copy() -> Path | None:
    """The temporary working-dir copy this process runs in as a Ray job, or None."""
    cwd = Path.cwd()
    in_copy = any(part.startswith(RAY_PACKAGE_PREFIX) for part in cwd.parts)
    return cwd if in_copy and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ else None


def output_root() -> Path:
    """What relative output paths are relative to: the working directory, or in a Ray job's temporary copy a
    durable folder on the node ($KDSEARCH_HOME, else ~/kdsearch)."""
    if job_copy() is None:
        return Path.cwd()
    return Path(os.environ.get("KDSEARCH_HOME") or "~/kdsearch").expanduser().resolve()


def output_path(value: str) -> str:
    """An output location made absolute against `output_root()`; URIs (s3://, gs://) as given."""
    if is_remote(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (output_root() / path).resolve())


def output_uri(uri: str) -> str:
    """A tracking URI whose relative sqlite path is made absolute against `output_root()`."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):].startswith("/"):
        return uri
    path, _, query = uri[len(prefix):].partition("?")
    return prefix + output_path(path) + (f"?{query}" if query else "")


def job_note() -> str | None:
    """The log line that says where a Ray job's outputs go, or None outside one."""
    copy = job_copy()
    if copy is None:
        return None
    return (f"[kdsearch] running as a Ray job in Ray's temporary copy of the working directory ({copy}), which Ray "
            f"deletes: relative output paths (MLflow store, results, students, cache) resolve under {output_root()} "
            "on this node ($KDSEARCH_HOME sets it); relative input paths read the copy")


def claim(folder: Path) -> bool:
    """Create `folder` (its parents as needed); False when it already exists. mkdir is atomic, so of two
    processes claiming one folder exactly one gets True."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    return True


def fresh_dir(base: Path) -> Path:
    """The first of base, base-2, base-3, ... that did not exist, now created: a new output never replaces one."""
    n = 1
    while not claim(candidate := base if n == 1 else base.with_name(f"{base.name}-{n}")):
        n += 1
    return candidate


def check_writable(folder: Path | str, key: str) -> None:
    """`folder` is, or can become, a directory: it and its nearest existing ancestor are directories."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder")
    ancestor = next((p for p in path.absolute().parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise ConfigError(f"{key}: {ancestor} is a file, so no folder can be made under it")


def check_local_dirs(cfg: Config) -> None:
    """cache_dir, output_dir and a local storage_path can hold folders."""
    for key, value in (("cache_dir", cfg.cache_dir), ("output_dir", cfg.output_dir),
                       ("storage_path", cfg.storage_path)):
        if value and not is_remote(value):
            check_writable(value, f"{key}={value}")


def with_absolute_paths(cfg: Config) -> Config:
    """Resolve relative local paths now: Ray Train workers and Tune trials run in other working directories.
    Outputs resolve as `paths.output_path` says (durable inside a Ray job), inputs against the working directory."""
    from pathlib import Path

    from kdsearch.config.paths import output_path

    def absolute(value: str | None) -> str | None:
        return value if value is None or "://" in value else str(Path(value).expanduser().resolve())

    def output(value: str | None) -> str | None:
        return None if value is None else output_path(value)

    teacher = absolute(cfg.teacher) if Path(cfg.teacher).exists() else cfg.teacher
    hub = cfg.task.hub  # a local copy of a hub dataset (a folder) is an input path too; a hub id stays as given
    hub = absolute(hub) if hub is not None and Path(hub).expanduser().is_dir() else hub
    return dataclasses.replace(cfg, teacher=teacher or cfg.teacher, cache_dir=output(cfg.cache_dir) or "",
                               output_dir=output(cfg.output_dir) or "", storage_path=output(cfg.storage_path),
                               task=dataclasses.replace(cfg.task, data_dir=absolute(cfg.task.data_dir), hub=hub))
