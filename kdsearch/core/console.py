"""Keeps the console to kdsearch's own lines: library progress bars and per-checkpoint INFO lines off; tables
printed as aligned plain text.

A search prints a compact trial table; with two trials at a time, every trial's "Loading weights" bar and every
"Checkpoint successfully created" line would bury it. Called by each command and in each trial or Train worker
process (idempotent, cheap). Errors and warnings still come through.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

_CHATTY_LOGGERS = (
    "ray.train._internal.storage",  # a Tune function trial's report with a checkpoint
    "ray.train.v2._internal.execution.storage",  # a Ray Train worker's report with a checkpoint
)

_RAY_TRAIN_REPORT = "train/v2/_internal/execution/context.py"


def quiet_libraries() -> None:
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()  # Map, Saving the dataset
    transformers.utils.logging.disable_progress_bar()  # Loading weights, Writing model shards
    huggingface_hub.utils.disable_progress_bars()  # downloads
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    ray = sys.modules.get("ray")  # a Ray process: never import Ray from here
    if ray is not None and ray.__file__:
        # Ray Train logs every report ("Reporting training result N: TrainingReport(...)", the whole metrics dict)
        # to a logger named by its file's path, not its module
        logging.getLogger(str(Path(ray.__file__).parent / _RAY_TRAIN_REPORT)).setLevel(logging.WARNING)


INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT


def render_text(columns: Sequence[str], cells: Sequence[Sequence[str]], width: int = 28) -> str:
    """Aligned plain-text table; long cells are cut to `width` characters."""
    cut = [[c if len(c) <= width else c[:width - 1] + "~" for c in line] for line in [columns, *cells]]
    widths = [max(len(line[i]) for line in cut) for i in range(len(columns))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cut)
    return "\n".join(lines)
