"""Run a study's grid (kdsearch.report's rows x seeds) with the shared loop alone: no Ray, Tune or MLflow.

For a lent GPU machine that has torch and transformers but cannot install Ray or MLflow (no network, a size cap
on what travels). Four phases, each a subcommand:

    python bench/study_grid.py plan study=layer_select only=teacher <report overrides> --out grid.json   # here
    python bench/study_grid.py prepare grid.json              # there: the shared artifacts (teacher fine-tune), once
    seq 0 14 | xargs -P 15 -I{} python bench/study_grid.py cell grid.json {} --results results.jsonl   # there
    python bench/study_grid.py table grid.json results.jsonl --out docs/results/gpu/layer_select          # here

`plan` resolves every cell's config exactly as `python -m kdsearch.report` would (same study rows, same
overrides, same validation); `cell` runs one of them with `kdsearch.run.loop.run_distillation` on the local device
and appends its per-epoch metrics to a JSON-lines file; `table` renders kdsearch.report's Markdown table, JSON
and plot from those lines. Cells share the content-addressed cache, which is safe to build concurrently.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kdsearch.config.parse import build_config, flatten, unflatten
from kdsearch.run.loop import WorkerContext, run_distillation
from kdsearch.run.prepare import prepare
from kdsearch.run.validate import validate


def plan(argv: list[str], out: Path) -> None:
    from kdsearch.search import space_model
    from kdsearch.search.reports import build_study, parse_args
    from kdsearch.search.studies import grid_space

    args = parse_args(argv)
    study = build_study(args)
    space, study = grid_space(study, cli=args["cli"], seeds=args["seeds"], concurrency=None)
    cells = []
    for point in space.points_to_evaluate:
        row = next(r for r in study.rows if all(point[k] == v for k, v in r.overrides.items()))
        cfg = space_model.trial_config(space, point)
        validate(cfg)
        cells.append({"label": row.label, "seed": point["train.seed"], "point": point, "config": flatten(cfg)})
    study_fields = {f.name: getattr(study, f.name) for f in dataclasses.fields(study) if f.name != "rows"}
    rows = [dataclasses.asdict(r) for r in study.rows]
    out.write_text(json.dumps({"argv": argv, "root": os.getcwd(), "seeds": args["seeds"], "study": study_fields,
                               "rows": rows, "cells": cells}, indent=1, default=str))
    print(f"{len(cells)} cells -> {out}")


def _config(grid: dict[str, Any], index: int) -> Any:
    """The cell's config, its paths (absolute where it was planned) moved under this checkout's root."""
    root = grid["root"].rstrip("/") + "/"
    flat = {k: os.path.join(os.getcwd(), v.removeprefix(root)) if isinstance(v, str) and v.startswith(root) else v
            for k, v in grid["cells"][index]["config"].items()}
    return build_config(unflatten(flat))


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:  # cells run concurrently: one locked append per record
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record, default=float) + "\n")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_shared(grid: dict[str, Any]) -> None:
    """The first cell's artifacts (tokenised data, fine-tuned teacher): every cell of a study shares them."""
    began = time.perf_counter()
    prepared = prepare(_config(grid, 0), device=_device())
    print(f"prepared in {time.perf_counter() - began:.1f} s; teacher {prepared.teacher_metrics}", flush=True)


def run_cell(grid: dict[str, Any], index: int, results: Path) -> None:
    torch.set_num_threads(1)  # many cells share the machine's cores; the GPU does the work
    cell, cfg, device = grid["cells"][index], _config(grid, index), _device()
    began = time.perf_counter()
    prepared = prepare(cfg, device=device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor()

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        # every epoch as it ends: a grid cut off by a time limit still leaves its earlier epochs
        _append(results, {"index": index, "label": cell["label"], "seed": cell["seed"], "metrics": metrics,
                          "wall_s": time.perf_counter() - began, "device": where, "torch": torch.__version__})

    ctx = WorkerContext(device=device, report=report,
                        log=lambda line: print(f"[cell {index} {cell['label']} seed {cell['seed']}] {line}",
                                               flush=True))
    run_distillation(cfg, prepared, ctx)


def table(grid: dict[str, Any], results: Path, out: Path, *, hardware: str, epoch: int | None,
          notes: list[str]) -> None:
    from kdsearch.search.reports import aggregate, plot, render
    from kdsearch.search.studies import Row, Study
    from kdsearch.tracking import format_param

    study = Study(**grid["study"], rows=[Row(**r) for r in grid["rows"]])
    cfg = _config(grid, 0)
    epoch = epoch or cfg.train.epochs
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    done = {r["index"]: r for r in records if r["metrics"]["epoch"] == epoch}
    trials = [SimpleNamespace(params={k: format_param(v) for k, v in cell["point"].items()},
                              status="FINISHED" if i in done else "FAILED", metrics=done[i]["metrics"] if i in done
                              else {}) for i, cell in enumerate(grid["cells"])]
    rows = aggregate(study, trials)
    teacher = next(iter(done.values()))["metrics"].get("teacher_score") if done else None
    walls = [r["wall_s"] for r in done.values()]
    meta = {"measured": f"{time.strftime('%Y-%m-%d')} on {hardware}; {len(done)} of {len(grid['cells'])} cells "
                        f"reached epoch {epoch}, "
                        f"{min(walls, default=0) / 60:.1f}-{max(walls, default=0) / 60:.1f} min each, the cells "
                        "run side by side (bench/study_grid.py)",
            "teacher": f"{Path(cfg.teacher).name}" + (f", fine-tuned on {cfg.task.train_size or 'all'} train rows: "
                                                      f"{100 * teacher:.1f}" if teacher else ""),
            "student": f"{cfg.student.layers} layers, width {cfg.student.hidden_size or 'teacher'}",
            "data": f"{cfg.task.name} ({cfg.task.data_dir and os.path.relpath(cfg.task.data_dir)}): train "
                    f"{cfg.task.train_size or 'all'} rows, eval {cfg.task.eval_size or 'all'} rows, max_length "
                    f"{cfg.task.max_length}",
            "training": f"{cfg.train.epochs} epochs x {cfg.train.max_steps_per_epoch or 'all'} steps, batch "
                        f"{cfg.train.batch_size}, lr {cfg.train.lr}, {cfg.train.precision}; score = eval accuracy "
                        + ("at the final epoch" if epoch == cfg.train.epochs else f"after epoch {epoch}"),
            "seeds": f"train.seed in {grid['seeds']} (the teacher is shared: finetune.seed {cfg.finetune.seed})",
            "command": "`python bench/study_grid.py plan " + " ".join(grid["argv"]) + "`, then prepare/cell/table",
            **{f"note {i}": note for i, note in enumerate(notes, 1)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}.md").write_text(render(study, rows, meta))
    (out / f"{study.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "records": records}, indent=2,
                                                       default=str))
    plot(study, rows, out / f"{study.name}.png")
    print((out / f"{study.name}.md").read_text())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("plan", help="resolve the grid's configs (needs the full kdsearch install)")
    p.add_argument("overrides", nargs="+", help="kdsearch.report's key=value arguments")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("prepare", help="build the shared artifacts once, before the cells start")
    p.add_argument("grid", type=Path)
    p = sub.add_parser("cell", help="run one cell of the grid")
    p.add_argument("grid", type=Path)
    p.add_argument("index", type=int)
    p.add_argument("--results", type=Path, required=True)
    p = sub.add_parser("table", help="the Markdown table, JSON and plot of the finished cells")
    p.add_argument("grid", type=Path)
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hardware", default=f"{os.cpu_count()} CPU cores", help="where the cells ran, for the table")
    p.add_argument("--epoch", type=int, default=None, help="tabulate this epoch (default: the last)")
    p.add_argument("--note", action="append", default=[], help="a line for the table's header (repeatable)")
    args = parser.parse_args(argv)
    if args.phase == "plan":
        plan(args.overrides, args.out)
        return 0
    grid = json.loads(args.grid.read_text())
    if args.phase == "prepare":
        prepare_shared(grid)
    elif args.phase == "cell":
        run_cell(grid, args.index, args.results)
    else:
        table(grid, args.results, args.out, hardware=args.hardware, epoch=args.epoch,
              notes=args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
