"""Content-addressed store: fine-tuned teachers, TED stage-1 filters and Flex-KD scores, keyed by their inputs.

An entry is a directory named by the sha256 of its inputs and settings; it is built in a temporary directory
and renamed into place, under a file lock, so concurrent trials on one node build it once and never read a
half-written entry. Imports nothing from the rest of kdsearch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def content_key(**parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (sorted keys; tuples as lists)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file in a directory (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:24]


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (created if missing, never truncated) across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Store:
    """`store.get_or_build(kind, key, build)`: the directory of a finished entry, built at most once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()  # Ray workers run in other working directories

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def find(self, kind: str, key: str) -> Path | None:
        """The finished artifact, or None (never builds)."""
        final = self.path(kind, key)
        return final if (final / ".done").exists() else None

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], None],
                     *, meta: dict[str, Any] | None = None) -> Path:
        final = self.path(kind, key)
        if (final / ".done").exists():
            return final
        with file_lock(self.root / kind / f"{key}.lock"):
            if (final / ".done").exists():  # another process built it while we waited
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
            try:
                build(tmp)
                (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))
                (tmp / ".done").touch()
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return final
