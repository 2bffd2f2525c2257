"""Search efficiency: the compute TPE + ASHA, random + ASHA, TPE alone and the grid (in a random order) spend
before their best is within 0.5 points of the grid's best, replayed against a full grid trained once.

    nice python bench/search_efficiency.py grid --table se/table.jsonl [key=value ...]   # train every cell once
    nice python bench/search_efficiency.py replay --table se/table.jsonl --sampler-seeds 20  # replay the searches
    python bench/search_efficiency.py space --table se/table.jsonl --out se/space.yaml  # the grid as a space file
    nice python -m kdsearch.tune space=se/space.yaml num_samples=6 ...                    # one live search on it
    python bench/search_efficiency.py live --table se/table.jsonl --search <name> tracking.uri=<uri>  # vs table

`grid` discretises a shipped space (GRID below; FIXED holds the space's other params at the paper's values, and
`key=value`s shrink the run), builds every cell's config as a search builds a trial's (`trial_config`), runs it
with `kdsearch.run.loop.run_distillation` (no Ray) and appends its per-epoch eval_score and seconds to a
JSON-lines table; cells already there are skipped. `replay` runs real Optuna studies over the same categorical
space whose objective reads the table, with Ray Tune's ASHA rule re-implemented line for line (`Asha`).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import itertools
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml

from kdsearch.config.overrides import parse_overrides
from kdsearch.config.parse import flatten
from kdsearch.run.loop import WorkerContext, run_distillation
from kdsearch.run.prepare import prepare
from kdsearch.run.validate import validate
from kdsearch.search import space_model, spaces
from kdsearch.search.space_model import Param, Space
from kdsearch.tracking.store import DEFAULT_EXPERIMENT

SPACE = "layer_select"
GRID: dict[str, tuple[Any, ...]] = {
    "distill.layer_map": ("forward", "reverse", "all_to_one", "random", "none"),  # the paper's five maps
    "student.init": ("teacher", "random"),
    "distill.w_hidden": (0.3, 3.0, 30.0),  # the paper's 3, a decade each side (inactive for layer_map none)
    "train.lr": (1e-3, 3e-3),  # the tiny models' default and 3x
}
FIXED: dict[str, Any] = {"distill.embeddings": True, "distill.distance": "layer_select_bert",
                         "distill.hidden_reduce": "mean", "distill.w_logit": 1.0, "distill.temperature": 1.0}
"""The space's other params at the paper's settings (its points_to_evaluate)."""
SEEDS = (0, 1, 2)
TARGET = 0.005  # 0.5 points of accuracy
Strategy = Literal["tpe+asha", "random+asha", "tpe", "grid"]
STRATEGIES: tuple[Strategy, ...] = ("tpe+asha", "random+asha", "tpe", "grid")


# ---------------------------------------------------------------- the discretised space and its cells


def grid_space(overrides: dict[str, Any]) -> Space:
    """SPACE with FIXED and `overrides` in its base and GRID's values as categorical params (same order, same
    conditions), no points to evaluate: every search starts from its sampler alone."""
    space = spaces.apply_overrides(spaces.load_space(SPACE), {**FIXED, **overrides})
    left = set(space.params) - set(GRID)
    if left:
        raise SystemExit(f"{SPACE}: params {sorted(left)} are neither in GRID nor in FIXED")
    params = {name: Param(name, "categorical", GRID[name], when=_within_grid(p.when)) for name, p in
              space.params.items()}
    return dataclasses.replace(space, name="search_efficiency", params=params, points_to_evaluate=[])


def _within_grid(when: Any) -> dict[str, tuple[Any, ...]]:
    """A condition on a searched param keeps only the values GRID offers (a space file checks that)."""
    return {key: tuple(v for v in allowed if key not in GRID or v in GRID[key]) for key, allowed in when.items()}


def grid_points(space: Space) -> list[dict[str, Any]]:
    """Every combination of the active params' choices (an inactive param is left out, not multiplied)."""
    points: list[dict[str, Any]] = [{}]
    for name, param in space.params.items():
        points = [{**p, name: value} for p in points
                  for value in (param.choices if space_model.is_active(space, param, p) else (None,))]
        points = [{k: v for k, v in p.items() if v is not None} for p in points]
    return points


def point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


# ---------------------------------------------------------------- the table


def read_table(path: Path) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]]]:
    """(the header: the overrides the grid ran with; the cells by (point key, seed))."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = lines[0]["header"]
    return header, {(point_key(r["point"]), r["seed"]): r for r in lines[1:]}


def start_table(path: Path, overrides: dict[str, Any]) -> None:
    if path.exists():
        header, _ = read_table(path)
        if header["overrides"] != overrides or header["grid"] != json.loads(json.dumps(GRID)):
            raise SystemExit(f"{path}: made with {header}; give the same overrides (or another --table)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"space": SPACE, "grid": GRID, "fixed": FIXED, "seeds": SEEDS, "overrides": overrides}
    path.write_text(json.dumps({"header": header}) + "\n")


def run_cell(space: Space, point: dict[str, Any], seed: int) -> dict[str, Any]:
    """One config x seed with the shared loop: every epoch's score and what the epoch cost, training +
    evaluation + checkpoint, on the wall clock and as this thread's CPU time (torch runs on this one thread;
    other processes' load does not count there)."""
    cfg = space_model.trial_config(space, {**point, "train.seed": seed})
    validate(cfg)
    began = time.perf_counter()
    prepared = prepare(cfg, device=torch.device("cpu"))
    setup_s = time.perf_counter() - began
    epochs: list[dict[str, float]] = []
    last = [time.perf_counter(), time.thread_time()]

    def report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        now = [time.perf_counter(), time.thread_time()]
        epochs.append({"epoch": metrics["epoch"], "eval_score": metrics["eval_score"],
                       "epoch_time_s": metrics["epoch_time_s"], "wall_s": now[0] - last[0],
                       "cpu_s": now[1] - last[1]})
        last[:] = now

    # the first epoch's cost also holds the model build and latency probe: a trial pays them too
    run_distillation(cfg, prepared, WorkerContext(report=report, log=lambda line: None))
    return {"point": point, "seed": seed, "setup_s": setup_s, "epochs": epochs,
            "config": {k: v for k, v in flatten(cfg).items() if k.startswith(("train.", "task.", "distill."))}}


def append(table: Path, record: dict[str, Any]) -> None:
    with open(table, "a") as handle:  # shards run side by side: one locked append per cell
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write(json.dumps(record) + "\n")


def run_grid(table: Path, overrides: dict[str, Any], *, limit: int | None, shard: tuple[int, int]) -> None:
    """The missing cells, seed by seed (a grid cut short still has whole seeds); shard (k, n) takes every n-th."""
    torch.set_num_threads(1)
    start_table(table, overrides)
    space = grid_space(overrides)
    _, done = read_table(table)
    cells = [(p, s) for s in SEEDS for p in grid_points(space)]
    todo = [(p, s) for p, s in cells if (point_key(p), s) not in done][shard[0]::shard[1]][:limit]
    print(f"{len(cells)} cells ({len(cells) // len(SEEDS)} configs x {len(SEEDS)} seeds), {len(done)} in "
          f"{table}, running {len(todo)}", flush=True)
    for i, (point, seed) in enumerate(todo, 1):
        began = time.perf_counter()
        record = run_cell(space, point, seed)
        append(table, record)
        scores = " ".join(f"{e['eval_score']:.3f}" for e in record["epochs"])
        print(f"[{i}/{len(todo)}] {time.perf_counter() - began:5.1f} s seed {seed} {point_key(point)}: {scores}",
              flush=True)


# ---------------------------------------------------------------- replay


@dataclass(frozen=True)
class Cell:
    scores: tuple[float, ...]
    seconds: tuple[float, ...]


@dataclass(frozen=True)
class Grid:
    space: Space
    cells: dict[tuple[str, int], Cell]
    means: dict[str, float]
    """Final eval_score per config, mean over SEEDS."""
    best: float
    """The grid's best: the best config's mean final score over seeds."""
    compute_s: float
    epochs: int


def load_grid(table: Path) -> Grid:
    header, records = read_table(table)
    space = grid_space(header["overrides"])
    # compute = CPU seconds: on a shared machine other processes' load would inflate wall seconds unevenly
    cells = {key: Cell(tuple(e["eval_score"] for e in r["epochs"]), tuple(e["cpu_s"] for e in r["epochs"]))
             for key, r in records.items()}
    keys = [point_key(p) for p in grid_points(space)]
    missing = [(k, s) for k in keys for s in SEEDS if (k, s) not in cells]
    if missing:
        raise SystemExit(f"{table}: {len(missing)} of {len(keys) * len(SEEDS)} cells missing; run `grid` first")
    means = {k: float(np.mean([cells[k, s].scores[-1] for s in SEEDS])) for k in keys}
    return Grid(space, cells, means, max(means.values()), sum(sum(c.seconds) for c in cells.values()),
                sum(len(c.seconds) for c in cells.values()))


class Asha:
    """Ray Tune's ASHAScheduler (one bracket, stop_last_trials) as the live search configures it: rungs at
    grace_period x rf^k below max_t; a trial reaching a rung stops when its score is below the
    (1 - 1/rf) percentile of the scores recorded there before it; at max_t every trial stops."""

    def __init__(self, *, max_t: int, grace_period: int, reduction_factor: int) -> None:
        n = int(np.log(max_t / grace_period) / np.log(reduction_factor) + 1)
        self.rf, self.max_t = reduction_factor, max_t
        self.rungs: list[tuple[int, dict[int, float]]] = [(grace_period * reduction_factor ** k, {})
                                                          for k in reversed(range(n))]

    def stops(self, trial: int, epoch: int, score: float) -> bool:
        if epoch >= self.max_t:
            return True
        for milestone, recorded in self.rungs:
            if epoch < milestone or trial in recorded:
                continue
            cutoff = np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100) if recorded else None
            recorded[trial] = score
            return cutoff is not None and score < cutoff
        return False


@dataclass(frozen=True)
class Outcome:
    reach_s: float | None
    """Compute spent when the best completed trial's final score first came within TARGET of the grid's best."""
    reach_epochs: int | None
    trust_s: float | None
    """... when the best completed trial's config first had a seed-mean within TARGET of the grid's best."""
    trace: list[tuple[dict[str, Any], int, tuple[float, ...]]]
    """(params, train.seed, the scores of the epochs it ran) per trial, in order."""


def sampler_of(strategy: Strategy, seed: int, num_samples: int) -> Any:
    """The driver's TPE settings (kdsearch.search.driver._search_alg), or random."""
    import optuna

    if strategy.startswith("random"):
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=min(8, max(2, num_samples // 3)))


def proposals(grid: Grid, strategy: Strategy, seed: int, *, num_samples: int,
              train_seed: int | None) -> Iterator[tuple[dict[str, Any], int, Callable]]:
    """(params, train.seed, tell) per trial. A sampler's trial n reads train.seed SEEDS[(seed + n) % 3] (or
    `train_seed` for all); `grid` walks every cell (config x seed) in an order shuffled by `seed`.
    `tell(score)` ends the trial."""
    import optuna

    if strategy == "grid":
        cells = [(p, s) for p in grid_points(grid.space) for s in SEEDS]
        random.Random(seed).shuffle(cells)
        for point, cell_seed in cells:
            yield point, cell_seed, lambda score: None
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler_of(strategy, seed, num_samples))
    define = space_model.define_by_run(grid.space)
    for n in itertools.count():
        trial = study.ask()
        define(trial)

        def tell(score: float, trial: optuna.Trial = trial) -> None:
            # Ray's OptunaSearch tells an ASHA-stopped trial COMPLETE with its last reported score
            study.tell(trial, score)

        yield dict(trial.params), SEEDS[(seed + n) % len(SEEDS)] if train_seed is None else train_seed, tell


def replay(grid: Grid, strategy: Strategy, seed: int, *, num_samples: int | None = None,
           train_seed: int | None = None) -> Outcome:
    """One search against the table until both targets are met or it has spent the grid's compute; with
    `num_samples`, exactly that many trials (as a live search with that budget runs them, one at a time)."""
    budget = grid.space.budget
    asha = Asha(max_t=space_model.max_epochs(grid.space), grace_period=budget.grace_period,
                reduction_factor=budget.reduction_factor) if strategy.endswith("asha") else None
    spent, epochs, best = 0.0, 0, -math.inf
    reach: tuple[float, int] | None = None
    trust: float | None = None
    trace: list[tuple[dict[str, Any], int, tuple[float, ...]]] = []
    trials = proposals(grid, strategy, seed, num_samples=num_samples or len(grid.cells), train_seed=train_seed)
    for n, (point, cell_seed, tell) in enumerate(trials):
        cell, key = grid.cells[point_key(point), cell_seed], point_key(point)
        for epoch, (score, seconds) in enumerate(zip(cell.scores, cell.seconds, strict=True), 1):
            spent, epochs = spent + seconds, epochs + 1
            if asha and asha.stops(n, epoch, score):
                break
        tell(score)
        trace.append((point, cell_seed, cell.scores[:epoch]))
        if epoch == len(cell.scores) and score > best:  # a completed trial's final score
            best = score
            if trust is None and grid.means[key] >= grid.best - TARGET:
                trust = spent
        if reach is None and best >= grid.best - TARGET:
            reach = (spent, epochs)
        if len(trace) == num_samples or (num_samples is None and (reach and trust or spent >= grid.compute_s)):
            break
    return Outcome(reach[0] if reach else None, reach[1] if reach else None, trust, trace)


def quartiles(values: list[float | None]) -> tuple[float, float, float]:
    """Median and IQR with a search that never got there counted as infinite (no interpolation past it)."""
    finite = np.array([math.inf if v is None else v for v in values])
    q1, q2, q3 = (float(np.quantile(finite, q, method="inverted_cdf")) for q in (0.25, 0.5, 0.75))
    return q2, q1, q3


def share(value: float) -> str:
    return ">100%" if math.isinf(value) else f"{100 * value:.1f}%"


def print_replay(table: Path, n_seeds: int) -> None:
    grid = load_grid(table)
    best = max(grid.means, key=grid.means.__getitem__)
    single = max(c.scores[-1] for c in grid.cells.values())
    print(f"{len(grid.means)} configs x {len(SEEDS)} seeds = {len(grid.cells)} cells, {grid.epochs} epochs, "
          f"{grid.compute_s:.0f} CPU s; grid's best (config mean over seeds) {grid.best:.4f}: {best}; best single "
          f"cell {single:.4f}; target >= {grid.best - TARGET:.4f}, met by "
          f"{sum(c.scores[-1] >= grid.best - TARGET for c in grid.cells.values())} cells and "
          f"{sum(m >= grid.best - TARGET for m in grid.means.values())} config means; {n_seeds} sampler seeds\n")
    print("| strategy | compute to reach, median | IQR | epochs to reach, median | reached | compute until the "
          "leader's mean is within 0.5, median | IQR | reached | trials run, median |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for strategy in STRATEGIES:
        outcomes = [replay(grid, strategy, seed) for seed in range(n_seeds)]
        reach = quartiles([o.reach_s and o.reach_s / grid.compute_s for o in outcomes])
        reach_epochs = quartiles([o.reach_epochs and o.reach_epochs / grid.epochs for o in outcomes])
        trust = quartiles([o.trust_s and o.trust_s / grid.compute_s for o in outcomes])
        hits, trusted = sum(o.reach_s is not None for o in outcomes), sum(o.trust_s is not None for o in outcomes)
        trials = float(np.median([len(o.trace) for o in outcomes]))
        print(f"| {strategy} | {share(reach[0])} | {share(reach[1])}-{share(reach[2])} | {share(reach_epochs[0])} "
              f"| {hits}/{n_seeds} | {share(trust[0])} | {share(trust[1])}-{share(trust[2])} | {trusted}/{n_seeds} "
              f"| {trials:.0f} |", flush=True)


# ---------------------------------------------------------------- the live check


def write_space(table: Path, out: Path) -> None:
    """The grid as a space file for `python -m kdsearch.tune space=<out>`: its base and categorical params."""
    header, _ = read_table(table)
    space = grid_space(header["overrides"])
    params = {name: {"type": "categorical", "choices": list(p.choices),
                     **({"when": {k: list(v) for k, v in p.when.items()}} if p.when else {})}
              for name, p in space.params.items()}
    raw = {"description": f"{SPACE} discretised by bench/search_efficiency.py", "base": space.base,
           "metric": space.metric, "mode": space.mode, "budget": dataclasses.asdict(space.budget),
           "params": params}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    spaces.load_space(out)  # the search will read it back: fail here, not there
    print(f"wrote {out}")


def live_trials(space: Space, uri: str, experiment: str, search: str) -> list[tuple[dict[str, Any] | None, int,
                                                                                  list[float]]]:
    """(params, train.seed, eval_score per epoch) of each trial of a search, read from its MLflow runs."""
    from kdsearch.tracking.runs import find_search, list_trials
    from kdsearch.tracking.store import open_client

    parent = find_search(uri=uri, experiment=experiment, search=search)
    client, _ = open_client(uri, experiment, create=False)
    out = []
    for run in list_trials(uri=uri, experiment=experiment, search_run_id=parent.run_id):
        # the last epoch is logged twice (its report, then the trial's final metrics): one value per step
        by_step = {m.step: m.value for m in client.get_metric_history(run.run_id, "eval_score")}
        out.append((space_model.known_point(space, run.params), int(run.params["train.seed"]),
                    [by_step[step] for step in sorted(by_step)]))
    return out


def compare_live(table: Path, uri: str, experiment: str, search: str, *, sampler_seed: int) -> None:
    """Each live trial's per-epoch scores next to the table's row for the same config and seed; then the live
    trial sequence next to TPE + ASHA replayed with the same sampler seed, budget and train.seed."""
    grid = load_grid(table)
    live = live_trials(grid.space, uri, experiment, search)
    gaps: list[float] = []
    for point, seed, scores in live:
        if point is None:
            print(f"a trial outside the grid: {scores}")
            continue
        row = grid.cells[point_key(point), seed].scores[:len(scores)]
        gaps += [abs(a - b) for a, b in zip(scores, row, strict=True)]
        print(f"seed {seed} {point_key(point)}\n  live  {' '.join(f'{v:.4f}' for v in scores)}"
              f"\n  table {' '.join(f'{v:.4f}' for v in row)}")
    if gaps:
        print(f"{len(gaps)} epochs compared: largest |live - table| {max(gaps):.4f}, mean {np.mean(gaps):.4f}\n")
    seeds = {seed for _, seed, _ in live}
    replayed = replay(grid, "tpe+asha", sampler_seed, num_samples=len(live), train_seed=min(seeds)).trace
    same = 0
    print("trial | live: config, epochs run | replay: config, epochs run")
    for n, ((point, _, scores), (r_point, _, r_scores)) in enumerate(zip(live, replayed, strict=True)):
        same += point == r_point and len(scores) == len(r_scores)
        print(f"{n} | {point_key(point or {})}, {len(scores)} | {point_key(r_point)}, {len(r_scores)}")
    print(f"{same} of {len(live)} trials drew the same config and ran as many epochs")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("grid", help="train every cell once (resumable)")
    p.add_argument("overrides", nargs="*", help="config key=value applied to every cell (sizes, epochs)")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None, help="run at most this many missing cells")
    p.add_argument("--shard", default="0/1", help="k/n: run every n-th missing cell from the k-th (n processes)")
    p = sub.add_parser("replay", help="replay the searches against the table")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--sampler-seeds", type=int, default=20)
    p = sub.add_parser("space", help="write the grid as a space file for a live search")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("live", help="compare a live search's trials with the table")
    p.add_argument("overrides", nargs="*", help="tracking.uri=<uri> [tracking.experiment=<name>]")
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--search", required=True, help="the live search's name")
    p.add_argument("--sampler-seed", type=int, default=0, help="the live search's sampler_seed")
    args = parser.parse_args(argv)
    if args.phase == "grid":
        k, n = (int(x) for x in args.shard.split("/"))
        run_grid(args.table, parse_overrides(args.overrides), limit=args.limit, shard=(k, n))
    elif args.phase == "replay":
        print_replay(args.table, args.sampler_seeds)
    elif args.phase == "space":
        write_space(args.table, args.out)
    else:
        tracking = parse_overrides(args.overrides).get("tracking", {})
        compare_live(args.table, tracking.get("uri", "sqlite:///mlflow.db"),
                     tracking.get("experiment", DEFAULT_EXPERIMENT), args.search,
                     sampler_seed=args.sampler_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
