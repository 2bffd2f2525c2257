"""Checks on the local folders a run will write, made before anything runs.

A folder key that names a file, or a path under a file, fails only when the first write happens: after the
teacher's fine-tune and Ray's start-up. These checks make it one line at the front door. No Ray or MLflow.
"""

from __future__ import annotations

from pathlib import Path

from .config import Config, ConfigError


def is_remote(location: str) -> bool:
    """A URI (s3://, gs://, ...) that pyarrow's filesystems resolve; nothing local to check."""
    return "://" in location


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
