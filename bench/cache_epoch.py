"""A training epoch with the teacher live vs read from train.teacher_cache, masked and unmasked, in one run.

    nice python bench/cache_epoch.py                                   # tiny-bert on the embedded task
    nice python bench/cache_epoch.py --teacher minilm --task sst2 --data-dir ../shared/data/sst2 --rows 2000

For each hidden term (masked: the layer-selection paper's; unmasked: TED's MSE over every position, which the
cache serves from a copy of every row at every position), the same one-epoch run (the shared loop, no Ray) with
`train.teacher_cache=false` and `=true`, alternated `--rounds` times; prints the median epoch time of each and
the cached/live ratio. The cache is built before the first round and not counted (it is built once per teacher
and data, then shared by every trial). Every round checks that both runs report the same hidden term.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from kdsearch.config.overrides import load_config  # noqa: E402
from kdsearch.run.loop import WorkerContext, run_distillation  # noqa: E402
from kdsearch.run.prepare import prepare  # noqa: E402
from kdsearch.run.validate import validate  # noqa: E402

TERMS = {"masked": ["distill.mask_padding=true"], "unmasked": ["distill.mask_padding=false"]}


def _epoch(overrides: list[str]) -> tuple[float, float]:
    """(seconds, train_hidden) of one epoch."""
    cfg = load_config(overrides)
    validate(cfg)
    prepared = prepare(cfg)
    reports: list[dict] = []
    began = time.perf_counter()
    run_distillation(cfg, prepared, WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    return time.perf_counter() - began, reports[-1]["train_hidden"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="tiny-bert")
    parser.add_argument("--task", default="default")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rows", type=int, default=None, help="task.train_size")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default="/tmp/kdsearch_bench_cache")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = [f"teacher={args.teacher}", f"task.name={args.task}", f"student.layers={args.student_layers}",
            "train.epochs=1", "distill.bridge=projector", "student.width_ratio=0.5", "student.init=random",
            "distill.distance=mse", "distill.hidden_reduce=mean", f"cache_dir={args.cache_dir}",
            *([f"task.data_dir={args.data_dir}"] if args.data_dir else []),
            *([f"task.train_size={args.rows}"] if args.rows else [])]
    print(f"{'hidden term':<12} {'live s':>8} {'cached s':>9} {'cached/live':>12}")
    for term, extra in TERMS.items():
        prepare(load_config([*base, *extra, "train.teacher_cache=true"]))  # the cache, built once, not timed
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            values = {}
            for cached in (False, True):
                seconds, hidden = _epoch([*base, *extra, f"train.teacher_cache={str(cached).lower()}"])
                times[cached].append(seconds)
                values[cached] = hidden
            assert abs(values[True] - values[False]) <= 1e-4 * abs(values[False]), values
        live, cached = statistics.median(times[False]), statistics.median(times[True])
        print(f"{term:<12} {live:8.1f} {cached:9.1f} {cached / live:12.2f}", flush=True)


if __name__ == "__main__":
    main()
