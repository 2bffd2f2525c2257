"""Per-trial platform overhead of a real search, against the same loop run bare (no Ray), in one run.

    nice python bench/trial_overhead.py [--trials 5] [--train-trials 3] [--designs bare,inprocess,train]

Three designs run the same tiny trials one after another (max_concurrent_trials=1, so the gaps are clean):

  bare       validate + prepare (cached) + run_distillation in this process, trial after trial: no Ray at all
  inprocess  `kdsearch.tune.main` on a local Ray runtime, 1-worker trials: the loop runs inside the Tune trial
             process, reuse_actors=True (the design kdsearch uses for 1-worker trials)
  train      the same search with resources.num_workers=2: every trial launches a Ray Train TorchTrainer
             (the path kdsearch uses for multi-worker trials)

Timestamps (time.time(), one machine) come from hooks installed by this script only, never by editing
kdsearch: driver-side Tune callbacks (subclasses of kdsearch's MlflowTrials, patched into
kdsearch.search.driver), and in the trial process a wrapper around kdsearch.search.driver.run_trial that patches
kdsearch.run.loop.teacher_forward (its first call = the first training step, also inside Train workers via
make_trainer(loop=...)) and times each report.

Per trial k:  start -> first step  = first_step(k) - trial_start(k)   (Tune's on_trial_start, driver side)
              end -> next start    = trial_start(k+1) - trial_exit(k)  (trial function returned -> next started)
              dead time            = first_step(k+1) - trial_exit(k)  (no training between two trials)
              reports              = time spent inside the trial's report calls (bare: none)
Platform overhead per trial = dead time (design) - dead time (bare) + reports: what the platform adds to a
search per trial. The first trial also pays the trial process start; `ray.init` is paid once per search.
Target: <= 5 s per trial on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 5.0
EVENTS = ""  # JSON-lines file every process appends its timestamps to; set in main()

SPACE = """
description: trial-overhead benchmark - tiny trials of a few steps, so that the platform's share shows
base:
  teacher: tiny-bert
  student: {{layers: 2}}
  task: {{name: default, train_size: 256, eval_size: 128}}
  train: {{epochs: {epochs}, max_steps_per_epoch: {steps}, batch_size: 16}}
  finetune: {{epochs: 1}}
  resources: {{num_workers: {workers}, cpus_per_trial: {cpus}, gpus_per_trial: {gpus}}}
  cache_dir: {cache}
metric: eval_score
mode: max
budget: {{num_samples: {trials}, grace_period: 1, reduction_factor: 2, max_concurrent_trials: 1}}
params:
  distill.layer_map: {{type: categorical, choices: [forward, none, all_to_one, reverse]}}
points_to_evaluate:
  - {{distill.layer_map: forward}}
  - {{distill.layer_map: none}}
  - {{distill.layer_map: all_to_one}}
  - {{distill.layer_map: reverse}}
"""


def emit(event: str, **fields: Any) -> None:
    """Append one timestamped event; small O_APPEND writes from several processes do not interleave."""
    line = json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n"
    with open(EVENTS, "a") as handle:
        handle.write(line)


def hook_first_step(trial: str, rank: int = 0) -> None:
    """Timestamp the first call of teacher_forward in kdsearch.run.loop: the start of the first training step."""
    import kdsearch.run.loop as loop

    original = getattr(loop, "_bench_teacher_forward", loop.teacher_forward)
    loop._bench_teacher_forward = original  # type: ignore[attr-defined]  # reused actors: wrap only once
    seen = {"done": False}

    def teacher_forward(*args: Any, **kwargs: Any) -> Any:
        if not seen["done"]:
            seen["done"] = True
            emit("first_step", trial=trial, rank=rank)
        return original(*args, **kwargs)

    loop.teacher_forward = teacher_forward  # type: ignore[assignment]


def timed_run_trial(params: dict[str, Any], *, space: Any, search: str, storage: str) -> None:
    """Runs in the Tune trial process in place of kdsearch.tune.run_trial, which it calls (there unpatched)."""
    import ray.tune

    import kdsearch.search.driver as kt

    trial = ray.tune.get_context().get_trial_id()
    emit("trial_enter", trial=trial)
    hook_first_step(trial)
    report = getattr(kt, "_bench_report", kt._tune_report)
    kt._bench_report = report  # type: ignore[attr-defined]

    def timed_report(metrics: dict[str, Any], checkpoint: Path | None) -> None:
        began = time.time()
        try:  # Tune may end the trial inside its last report (max_t reached): that report does not return
            report(metrics, checkpoint)
        finally:
            emit("report", trial=trial, dt=time.time() - began)

    kt._tune_report = timed_report  # type: ignore[assignment]
    make_trainer = getattr(kt, "_bench_make_trainer", kt.make_trainer)
    kt._bench_make_trainer = make_trainer  # type: ignore[attr-defined]

    def worker_loop(loop_config: dict[str, Any]) -> None:  # runs in each Ray Train worker
        import ray.train

        import kdsearch.run.trainer as ktrain

        rank = ray.train.get_context().get_world_rank()
        emit("worker_enter", trial=trial, rank=rank)
        hook_first_step(trial, rank)
        ktrain.train_loop_per_worker(loop_config)

    def timed_make_trainer(*args: Any, **kwargs: Any) -> Any:
        emit("trainer_fit", trial=trial)
        return make_trainer(*args, **{**kwargs, "loop": worker_loop})

    kt.make_trainer = timed_make_trainer  # type: ignore[assignment]
    try:
        kt.run_trial(params, space=space, search=search, storage=storage)
    finally:
        emit("trial_exit", trial=trial)


def patch_driver() -> None:
    """Driver side: the trial function, Tune callbacks that timestamp trial start/end, and ray.init."""
    import kdsearch.search.driver as kt

    class TimedMlflowTrials(kt.MlflowTrials):  # type: ignore[misc,name-defined]
        def setup(self, *args: Any, **kwargs: Any) -> None:
            emit("fit_setup")
            super().setup(*args, **kwargs)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            emit("trial_start", trial=trial.trial_id)  # the first callback: before MLflow logs anything
            super().on_trial_start(iteration, trials, trial, **info)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            emit("trial_complete", trial=trial.trial_id)
            super().on_trial_complete(iteration, trials, trial, **info)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            emit("trial_error", trial=trial.trial_id)
            super().on_trial_error(iteration, trials, trial, **info)

    init_ray = kt.init_ray

    def timed_init_ray(**kwargs: Any) -> None:
        emit("ray_init_begin")
        init_ray(**kwargs)
        emit("ray_init_end")

    kt.MlflowTrials = TimedMlflowTrials  # type: ignore[misc]
    kt.run_trial = timed_run_trial  # type: ignore[assignment]
    kt.init_ray = timed_init_ray  # type: ignore[assignment]


def write_space(tmp: Path, name: str, args: argparse.Namespace, *, workers: int, cpus: float, trials: int) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPACE.format(epochs=args.epochs, steps=args.steps, workers=workers, cpus=cpus, trials=trials,
                                 gpus=args.gpus * workers, cache=args.cache_dir))
    return path


def run_bare(space_path: Path, trials: int) -> None:
    """The same trials as the search's first points, run back to back by the plain loop."""
    import torch

    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import prepare
    from kdsearch.run.validate import validate
    from kdsearch.search import space_model, spaces

    space = spaces.load_space(space_path)
    points = space_model.initial_points(space)
    for k in range(trials):
        trial = f"bare_{k:05d}"
        emit("trial_start", trial=trial)
        emit("trial_enter", trial=trial)
        hook_first_step(trial)
        cfg = space_model.trial_config(space, points[k % len(points)])
        validate(cfg)
        prepared = prepare(cfg)
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
        run_distillation(cfg, prepared, WorkerContext(log=lambda line: None))
        emit("trial_exit", trial=trial)


def run_search(space_path: Path, tmp: Path, name: str) -> None:
    import ray

    import kdsearch.tune as kt

    argv = [f"space={space_path}", f"name={name}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"results_dir={tmp}/results"]
    emit("main_begin")
    code = kt.main(argv)
    emit("main_end", code=code)
    ray.shutdown()
    if code != 0:
        raise SystemExit(f"search {name} failed (exit {code})")


def _empty_loop(config: dict[str, Any]) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["stamp"]).write_text(str(time.time()))


def train_floor(tmp: Path, runs: int, workers: int) -> tuple[float, float]:
    """Ray Train's own start-up: a TorchTrainer whose loop does nothing (no kdsearch import in its processes).

    Median seconds fit() -> loop entered on rank 0, and fit() -> fit() returned.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(include_dashboard=False, configure_logging=False)
    enter, total = [], []
    for k in range(runs):
        stamp = tmp / f"floor_{k}"
        began = time.time()
        TorchTrainer(_empty_loop, train_loop_config={"stamp": str(stamp)},
                     scaling_config=ScalingConfig(num_workers=workers),
                     run_config=RunConfig(name=f"floor-{k}", storage_path=str(tmp / "floor"))).fit()
        total.append(time.time() - began)
        enter.append(float(stamp.read_text()) - began)
    ray.shutdown()
    return statistics.median(enter), statistics.median(total)


def analyse(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-trial segments of one design's events (ordered by trial start)."""
    first: dict[str, dict[str, float]] = {}
    reports: dict[str, list[float]] = {}
    pids: dict[str, int] = {}
    for e in events:
        trial: str = e.get("trial", "")
        if e["event"] == "trial_enter":
            pids[trial] = e["pid"]
        if e["event"] == "report":
            reports.setdefault(trial, []).append(e["dt"])
        elif trial and not (e["event"] == "first_step" and e.get("rank", 0) != 0):
            first.setdefault(trial, {}).setdefault(e["event"], e["t"])
    order = sorted((t for t in first if "trial_start" in first[t]), key=lambda t: first[t]["trial_start"])
    rows = []
    for k, trial in enumerate(order):
        ev = first[trial]
        nxt = first[order[k + 1]] if k + 1 < len(order) else None
        rows.append({
            "trial": trial,
            "start_to_first_step": ev["first_step"] - ev["trial_start"],
            "start_to_enter": ev["trial_enter"] - ev["trial_start"],
            "enter_to_first_step": ev["first_step"] - ev["trial_enter"],
            "trial_wall": ev["trial_exit"] - ev["trial_start"],
            "reports": sum(reports.get(trial, [])),
            "n_reports": len(reports.get(trial, [])),
            "end_to_next_start": nxt["trial_start"] - ev["trial_exit"] if nxt else None,
            "dead_time": nxt["first_step"] - ev["trial_exit"] if nxt else None,
            "reused": k > 0 and pids.get(trial) == pids.get(order[k - 1]),
            "to_trainer": ev["trainer_fit"] - ev["trial_enter"] if "trainer_fit" in ev else None,
            "to_workers": ev["worker_enter"] - ev["trainer_fit"] if "worker_enter" in ev else None,
            "worker_to_step": ev["first_step"] - ev["worker_enter"] if "worker_enter" in ev else None,
        })
    out: dict[str, Any] = {"rows": rows}
    byname = {e["event"]: e["t"] for e in events if "trial" not in e}
    if "ray_init_begin" in byname:
        out["ray_init"] = byname["ray_init_end"] - byname["ray_init_begin"]
        out["fit_to_first_step"] = first[order[0]]["first_step"] - byname["fit_setup"]
    return out


def analyse_file(path: Path) -> dict[str, dict[str, Any]]:
    """Split the events by design (design_begin/design_end marks) and analyse each."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    marks = {e["design"]: e["t"] for e in events if e["event"] == "design_begin"}
    ends = {e["design"]: e["t"] for e in events if e["event"] == "design_end"}
    return {d: analyse([e for e in events if marks[d] <= e["t"] <= ends[d] and "design" not in e])
            for d in marks if d in ends}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:7.2f}"


def report(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for design, res in results.items():
        lines.append(f"\n{design}: " + (f"ray.init {res['ray_init']:.2f} s; tuner.fit -> first step of trial 1 "
                                         f"{res['fit_to_first_step']:.2f} s" if "ray_init" in res else "no Ray"))
        train = any(r["to_workers"] is not None for r in res["rows"])
        lines.append(f"  {'trial':<12}{'reused':>7}{'start->step':>12}{'= dispatch':>11}{'+ setup':>8}"
                     + (f"{'(prepare':>9}{'+ workers':>10}{'+ build)':>9}" if train else "")
                     + f"{'reports':>8}{'wall':>7}{'end->next':>10}{'dead':>7}")
        for r in res["rows"]:
            lines.append(f"  {r['trial'][-12:]:<12}{'yes' if r['reused'] else 'no':>7}"
                         f"{_fmt(r['start_to_first_step']):>12}{_fmt(r['start_to_enter']):>11}"
                         f"{_fmt(r['enter_to_first_step']):>8}"
                         + (f"{_fmt(r['to_trainer']):>9}{_fmt(r['to_workers']):>10}{_fmt(r['worker_to_step']):>9}"
                            if train else "")
                         + f"{_fmt(r['reports']):>8}{_fmt(r['trial_wall']):>7}{_fmt(r['end_to_next_start']):>10}"
                         f"{_fmt(r['dead_time']):>7}")
    bare = results.get("bare")
    bare_dead = statistics.median(r["dead_time"] for r in bare["rows"] if r["dead_time"] is not None) if bare else 0.0
    lines.append(f"\nper-trial platform overhead = dead time - bare dead time ({bare_dead:.2f} s) + reports; "
                 f"steady state = median over trials 2..n; target <= {TARGET_S:.0f} s")
    lines.append(f"  {'design':<10}{'start->first step':>18}{'end->next start':>16}{'dead time':>10}{'reports':>9}"
                 f"{'overhead':>9}{'first trial':>12}")
    for design, res in results.items():
        rows = res["rows"]
        steady = rows[1:] or rows
        dead = [r["dead_time"] for r in rows if r["dead_time"] is not None]  # gap before trials 2..n
        over = statistics.median(d - bare_dead + r["reports"] for d, r in zip(dead, rows[1:], strict=False)) \
            if dead else float("nan")
        first_trial = res.get("fit_to_first_step", rows[0]["start_to_first_step"]) + rows[0]["reports"]
        verdict = "" if design == "bare" else "PASS" if over <= TARGET_S else "FAIL"
        end_next = [r["end_to_next_start"] for r in rows[:-1]]
        lines.append(f"  {design:<10}{statistics.median(r['start_to_first_step'] for r in steady):>18.2f}"
                     f"{statistics.median(end_next) if end_next else float('nan'):>16.2f}"
                     f"{statistics.median(dead) if dead else float('nan'):>10.2f}"
                     f"{statistics.median(r['reports'] for r in steady):>9.2f}"
                     f"{(0.0 if design == 'bare' else over):>9.2f}{first_trial:>12.2f}  {verdict}")
    return "\n".join(lines)


def main() -> int:
    global EVENTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials of the bare and in-process designs")
    parser.add_argument("--train-trials", type=int, default=2, help="trials of the Ray Train design (~40 s each)")
    parser.add_argument("--gpus", type=float, default=0.0, help="GPUs per worker (resources.gpus_per_trial)")
    parser.add_argument("--designs", default="bare,inprocess,train")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="train.max_steps_per_epoch")
    parser.add_argument("--cache-dir", default="/tmp/kdsearch_bench_cache")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (events.jsonl, Tune results)")
    parser.add_argument("--analyse", metavar="EVENTS_JSONL", help="only print the tables of a kept run's events")
    args = parser.parse_args()
    if args.analyse:
        print(report(analyse_file(Path(args.analyse))))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="kdtrial", dir="/tmp"))
    EVENTS = str(tmp / "events.jsonl")
    designs = [d for d in args.designs.split(",") if d]
    spaces = {
        "bare": write_space(tmp, "bare", args, workers=1, cpus=1, trials=args.trials),
        "inprocess": write_space(tmp, "inprocess", args, workers=1, cpus=1, trials=args.trials),
        "train": write_space(tmp, "train", args, workers=2, cpus=2, trials=args.train_trials),
    }
    from kdsearch.run.prepare import prepare
    from kdsearch.search import space_model
    from kdsearch.search import spaces as kspaces

    prepare(space_model.trial_config(kspaces.load_space(spaces["bare"]), {}))  # warm the cache: no design pays it
    patch_driver()
    began = time.time()
    for design in designs:
        emit("design_begin", design=design)
        if design == "bare":
            run_bare(spaces["bare"], args.trials)
        else:
            run_search(spaces[design], tmp, f"bench-{design}")
        emit("design_end", design=design)
        print(f"[bench] {design}: done after {time.time() - began:.1f} s", flush=True)
    floor = train_floor(tmp, args.train_trials, workers=2) if "train" in designs else None
    results = analyse_file(Path(EVENTS))
    load = os.getloadavg()[0]
    print(f"\n{args.trials} trials (Ray Train: {args.train_trials}) of {args.epochs} epoch(s) x {args.steps} steps, "
          f"tiny-bert, max_concurrent_trials=1; {os.cpu_count()} CPUs, load average {load:.1f}; "
          f"total {time.time() - began:.0f} s; seconds:")
    print(report(results))
    if floor is not None:
        print(f"\nRay Train floor (TorchTrainer, 2 workers, a loop that does nothing, median of "
              f"{args.train_trials}): fit -> loop entered {floor[0]:.2f} s, fit -> returned {floor[1]:.2f} s")
    if args.keep:
        print(f"events: {EVENTS}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
