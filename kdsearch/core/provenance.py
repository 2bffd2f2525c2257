"""Where a result came from: the commit of the code that ran and the machine it ran on, for MLflow runs, model
cards and docs/results. No Ray or MLflow."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def code_version() -> str:
    """The git commit of the code being run (`unknown` outside a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def commit() -> str:
    """code_version(), marked when the package folder has uncommitted changes: a table then names no commit."""
    version = code_version()
    try:
        # the package folder only, untracked files included: a new module that ran counts as a change
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"{version} + uncommitted changes" if dirty else version


def hardware() -> str:
    """CPU cores and model, and the GPUs when there are any: the wall times of a table depend on them."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return text
