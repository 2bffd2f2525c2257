"""`python -m kdsearch.train key=value ...`: one distillation run through Ray Train (`kdsearch.run.trainer`),
its student saved under output_dir.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdsearch.config.command import Command, run_command
from kdsearch.config.overrides import CONFIG_FILE, load_config, write_config_file
from kdsearch.config.paths import fresh_dir, job_note, with_absolute_paths
from kdsearch.run.loop import export_student
from kdsearch.run.prepare import check_teacher, prepare
from kdsearch.run.trainer import diverged, init_ray, make_trainer, storage_for
from kdsearch.run.validate import validate


@dataclass(frozen=True)
class TrainSettings:
    """kdsearch.train has no keys of its own: every key is a config key."""


def train(_: TrainSettings, overrides: list[str]) -> int:
    """One run through Ray Train; the student saved under output_dir/student (never over an earlier one)."""
    cfg = with_absolute_paths(load_config(overrides))
    validate(cfg)
    prepared = prepare(cfg)  # reads the data in full: label values, hub splits
    check_teacher(cfg, prepared)
    print(f"[kdsearch.train] teacher {cfg.teacher} on {prepared.spec.name}: "
          f"eval_score={prepared.teacher_metrics['eval_score']:.4f}", flush=True)
    if note := job_note():
        print(note, flush=True)
    init_ray()
    # A fresh run per command; Tune trials use stable names instead so that retries restore.
    name = f"distill-{prepared.spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = make_trainer(cfg, prepared, name=name, storage_path=storage_for(cfg)).fit()
    if result.error is not None or diverged(result):
        print(f"error: training failed: {result.error or f'FloatingPointError: {diverged(result)}'}",
              file=sys.stderr)
        return 1
    final = result.metrics or {}
    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as directory:
        out = export_student(cfg, prepared, Path(directory), fresh_dir(Path(cfg.output_dir, "student")))
    write_config_file(cfg, out / CONFIG_FILE)
    print(f"[kdsearch.train] final: eval_score={final['eval_score']:.4f} "
          f"(teacher {prepared.teacher_metrics['eval_score']:.4f}), student {final['student_params']:,} params")
    if out.name != "student":
        print(f"[kdsearch.train] {out.with_name('student')} holds an earlier student, kept: this one is {out.name}")
    print(f"student saved to {out.resolve()}")
    return 0


COMMAND = Command(
    "train", "One distillation run of the shared step through a Ray Train TorchTrainer; the student is saved with "
    "save_pretrained.\nWith no overrides: the embedded default (tiny models, built-in task), about 2 minutes on 2 "
    "CPU cores.", train, TrainSettings)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    raise SystemExit(main())
