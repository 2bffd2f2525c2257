"""`python -m kdsearch.report study=<name> ...`: the papers' fixed comparisons, mean +- std over seeds.

A study is a fixed grid (strategies x seeds), not a search: it becomes a `Space` whose params are the varied
config keys and whose points_to_evaluate are the whole grid, so each cell runs once as a Tune trial through the
same driver, Train loop and MLflow logging as `kdsearch.tune` (one parent run, one child run per trial). The
table, JSON and plot go to docs/results/<study>/ and to the parent run. No Ray or mlflow import here.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import models, space_model, spaces
from .config import ConfigError, build_config, flatten, merge, parse_overrides, unflatten
from .leaderboard import rank_rows, search_objectives, trial_rows
from .search import SearchSettings, absolute_paths, check_search, code_version
from .tracking import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    RunRecord,
    SearchTracker,
    find_search,
    format_param,
    list_trials,
    log_run_artifacts,
)

STUDIES = ("layer_select", "ted_vs_lwd", "flex", "seeded")
_OWN = ("study", "seeds", "out", "name", "concurrency", "search", "only", "results_dir", "tracking")


@dataclass(frozen=True)
class Row:
    """One strategy: a name, an optional group (a second axis, e.g. the student init) and its config keys."""

    name: str
    group: str
    overrides: dict[str, Any]
    paper: float | None = None
    """The published number for this cell (papers.md), where one exists."""

    @property
    def label(self) -> str:
        return f"{self.name}/{self.group}" if self.group else self.name


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    base: dict[str, Any]  # flat dotted config keys, below the command line's overrides
    rows: list[Row]
    baseline: str | None = None  # the row name every other row of its group is compared with
    notes: list[str] = field(default_factory=list)


# SST-2 dev accuracy of BERT-base -> 3-layer BERT in Yu, Wen, Mou 2025 (papers.md section 2).
_LAYER_PAPER = {("none", "random"): 81.1, ("forward", "random"): 85.1, ("reverse", "random"): 83.3,
                ("all_to_one", "random"): 85.4, ("random", "random"): 82.9, ("none", "teacher"): 88.7,
                ("forward", "teacher"): 92.3, ("reverse", "teacher"): 90.0, ("all_to_one", "teacher"): 91.4}


def make_study(name: str, *, d_teacher: int, search_rows: list[Row] | None = None,
               search_base: dict[str, Any] | None = None) -> Study:
    """The grid of one study; widths come from the real teacher (flex halves it)."""
    if name == "layer_select":
        rows = [Row(m, init, {"distill.layer_map": m, "student.init": init}, _LAYER_PAPER.get((m, init)))
                for init in ("random", "teacher") for m in ("none", "forward", "reverse", "all_to_one", "random")]
        base = {"distill.bridge": "auto", "distill.distance": "token_mse", "distill.hidden_reduce": "sum",
                "distill.embeddings": True, "distill.w_task": 1.0, "distill.w_logit": 1.0, "distill.w_hidden": 3.0,
                "distill.temperature": 1.0}
        return Study(name, "layer maps x student init (Yu, Wen, Mou 2025; papers.md section 2)", base, rows,
                     baseline="none", notes=["paper: BERT-base (93.1) -> 3-layer BERT, full SST-2, GLUE dev; "
                                             "its random/teacher cell is not in papers.md"])
    if name == "ted_vs_lwd":
        rows = [Row("TED", "", {"distill.bridge": "ted"}),
                Row("LWD projector", "", {"distill.bridge": "projector"}),
                Row("LWD identity", "", {"distill.bridge": "identity"}),
                Row("logit KD only", "", {"distill.layer_map": "none"}),
                Row("no KD", "", {"distill.layer_map": "none", "distill.w_logit": 0.0})]
        base = {"student.init": "teacher", "distill.layer_map": "forward", "distill.embeddings": False,
                "distill.hidden_reduce": "mean", "distill.distance": "mse", "distill.w_logit": 20.0,
                "distill.w_hidden": 20.0, "distill.temperature": 2.0, "ted.filter": "linear", "distill.bridge": "auto"}
        return Study(name, "TED vs plain layer-wise distillation vs logit KD vs none (Liang et al. 2023; "
                     "papers.md section 1)", base, rows, baseline="no KD",
                     notes=["TED code's SST-2 stage-2 weights: kl_alpha 20, mse_alpha 20, T 2, element-mean MSE, "
                            "uniform (forward) map without the embedding pair",
                            "paper: DeBERTaV3-base -> xsmall, TED 94.4 on SST-2 (no same-setup baseline numbers "
                            "in papers.md)"])
    if name == "flex":
        half = d_teacher // 2
        # group = the feature distance: the paper pairs units with correlation and the projector with MSE; the
        # swapped pairs tell how much of a gap is the unit selection and how much the distance.
        rows = [Row(name, distance, {"distill.bridge": bridge, "distill.distance": distance})
                for distance in ("correlation", "mse")
                for name, bridge in (("Flex-KD units", "units"), ("linear projector", "projector"))]
        rows.append(Row("no feature KD", "", {"distill.layer_map": "none"}))
        base = {"student.hidden_size": half, "student.init": "random", "distill.embeddings": False,
                "distill.layer_map": "forward", "units.score": "grad", "units.scope": "last",
                "distill.hidden_reduce": "mean", "distill.w_hidden": 1.0, "distill.w_logit": 0.0}
        return Study(name, f"Flex-KD unit selection vs a linear projector, student width {half} = d_t/2 "
                     "(Saadi & Wang 2025; papers.md section 3)", base, rows, baseline="no feature KD",
                     notes=["paper: up to +3% over the projector (third-party figures, unverified)"])
    if name == "seeded":
        assert search_rows is not None and search_base is not None
        return Study(name, "a search's best strategy vs the paper settings it was seeded with", search_base,
                     search_rows, baseline=None)
    raise ConfigError(f"study={name}: choose one of {', '.join(STUDIES)}")


def seeded_rows(*, uri: str, experiment: str, search: str) -> tuple[dict[str, Any], list[Row]]:
    """(the search's base config, rows): the best finished trial of `search` and the paper points it was seeded
    with. The base is what the search ran on (teacher, task, data, budget), so `search=` alone reproduces it."""
    parent = find_search(uri=uri, experiment=experiment, search=search)
    base = _search_base(parent)
    space = _as_searched(spaces.load_space(parent.tags.get("kdsearch.space", "")), parent, base)
    metric, mode = search_objectives(parent)[0]
    ranked = [r for r in rank_rows(trial_rows(list_trials(uri=uri, experiment=experiment,
                                                           search_run_id=parent.run_id)), metric, mode)
              if r.get("rank") and r.get("status") == "FINISHED"]
    if not ranked:
        raise ConfigError(f"search={search}: no finished trial with a {metric} to take the best from")
    logged = {k: yaml.safe_load(str(ranked[0][k])) for k in space.params if k in ranked[0]}
    typed = flatten(build_config(unflatten(logged)))  # logged strings -> the config's own types
    best = {k: typed[k] for k in logged}
    tag = f"search best ({ranked[0]['trial']}, {metric} {float(ranked[0][metric]):.4f})"
    points = space_model.initial_points(space)
    rows, found = [], False
    for i, point in enumerate(points, 1):
        same = space_model.trial_config(space, point) == space_model.trial_config(space, best)
        found |= same  # the best may be a paper point itself: one row, not two identical grid cells
        name = f"paper {i}" + (f" = {tag}" if same else "")
        rows.append(Row(f"{name}: {_describe(point, [best, *points])}", "", dict(point)))
    if not found:
        rows.insert(0, Row(f"{tag}: {_describe(best, [best, *points])}", "", best))
    return {**_flat(space.base), **base}, rows


def _describe(point: dict[str, Any], among: list[dict[str, Any]]) -> str:
    """The point's values of the keys that tell the rows apart, e.g. `layer_map=forward, w_hidden=3`."""
    varying = [k for k in point if len({format_param(p.get(k)) for p in among}) > 1]
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k in varying for v in [point[k]])


def _search_base(parent: RunRecord) -> dict[str, Any]:
    """The search's own base config (teacher, task, data, budget as its command line set them), typed; {} for a
    search that logged none."""
    logged = {k.removeprefix("base."): None if v == "None" else yaml.safe_load(v)
              for k, v in parent.params.items() if k.startswith("base.")}
    return flatten(build_config(unflatten(logged))) if logged else {}


def _as_searched(space: space_model.Space, parent: RunRecord, base: dict[str, Any]) -> space_model.Space:
    """The space as the search ran it: params fixed on its command line (`student.init=teacher`) are fixed
    here too, at the search's value, so its paper points are the ones the search was seeded with."""
    searched = parent.tags.get("kdsearch.searched")
    if searched is None or not base:  # a search logged before the tag existed: take the space as shipped
        return space
    return spaces.apply_overrides(space, {k: base[k] for k in space.params if k not in searched.split(",")})


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def grid_space(study: Study, *, cli: dict[str, Any], seeds: list[int],
               concurrency: int | None) -> tuple[space_model.Space, Study]:
    """The study as a Space: every varied key (and train.seed) a categorical, the whole grid as its points.
    Also the study with each row completed over every varied key (so rows can be told apart by their params)."""
    keys = sorted({k for r in study.rows for k in r.overrides})
    base = merge(unflatten(dict(study.base)), cli)
    probe = space_model.Space(study.name, study.description, base, "eval_score", "max", space_model.Budget(), {}, [])
    study = dataclasses.replace(study, rows=[dataclasses.replace(
        r, overrides={k: r.overrides.get(k, space_model.base_value(probe, k)) for k in keys}) for r in study.rows])
    for i, row in enumerate(study.rows):  # identical cells would be run (and matched back) as one
        twin = next((r for r in study.rows[:i] if r.overrides == row.overrides), None)
        if twin is not None:
            raise ConfigError(f"study={study.name}: rows {twin.label!r} and {row.label!r} run the same config")
    points = [{**r.overrides, "train.seed": s} for r in study.rows for s in seeds]
    params = {k: space_model.Param(k, "categorical", choices=tuple(_unique(p[k] for p in points)))
              for k in [*keys, "train.seed"]}
    epochs = int(space_model.base_value(probe, "train.epochs"))
    budget = space_model.Budget(num_samples=len(points), grace_period=epochs, max_concurrent_trials=concurrency)
    space = dataclasses.replace(probe, params=params, points_to_evaluate=points, budget=budget)
    spaces.validate(space)
    return absolute_paths(space), study


def _unique(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(space_model.same_value(v, o) for o in out):
            out.append(v)
    return out


def row_of(study: Study, params: dict[str, str]) -> Row | None:
    """The study row a trial ran (matched on its logged params)."""
    for row in study.rows:
        if all(params.get(k) == format_param(v) for k, v in row.overrides.items()):
            return row
    return None


def aggregate(study: Study, trials: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per row: per-seed scores (final epoch, in %), mean, std (sample, n-1), failures."""
    out = []
    for row in study.rows:
        mine = [t for t in trials if row_of(study, t.params) is row]
        done = sorted((int(t.params["train.seed"]), 100 * t.metrics["eval_score"]) for t in mine
                      if t.status == "FINISHED" and "eval_score" in t.metrics)
        scores = [s for _, s in done]
        out.append({"label": row.label, "name": row.name, "group": row.group, "seeds": [s for s, _ in done],
                    "scores": scores, "mean": statistics.fmean(scores) if scores else None,
                    "std": statistics.stdev(scores) if len(scores) > 1 else None,
                    "failed": len(mine) - len(done), "paper": row.paper, "overrides": row.overrides})
    return out


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def summary_lines(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """Per group: the spread of the strategies' means and each one's gain over the baseline row (the group's own,
    else the study's ungrouped one)."""
    lines = []
    shared = next((r for r in rows if r["name"] == study.baseline and r["mean"] is not None), None)
    for group in _unique(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group and r["mean"] is not None]
        base = next((r for r in mine if r["name"] == study.baseline), shared)
        others = [r for r in mine if r is not base]
        if len(others) < 1:
            continue
        means = [r["mean"] for r in others]
        parts = [f"strategies span {max(means) - min(means):.1f} points ({min(means):.1f}-{max(means):.1f})"
                 ] if len(others) > 1 else []
        if base is not None:
            gains = ", ".join(f"{r['name']} {r['mean'] - base['mean']:+.1f}" for r in others)
            parts.append(f"vs {base['name']} ({base['mean']:.1f}): {gains}")
        if not parts:
            continue
        text = "- " + (f"{group}: " if group else "") + "; ".join(parts)
        paper = [r for r in others if r["paper"] is not None]
        if len(paper) > 1:
            pm = [r["paper"] for r in paper]
            text += f". Paper: span {max(pm) - min(pm):.1f}"
            if base is not None and base["paper"] is not None:
                text += f", vs {base['name']} " + ", ".join(f"{r['name']} {r['paper'] - base['paper']:+.1f}"
                                                          for r in paper)
        lines.append(text)
    return lines


def hardware() -> str:
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


def commit() -> str:
    version = code_version()
    try:
        # the package folder only, untracked files included: a new module that ran counts as a change
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return f"{version} + uncommitted changes" if dirty else version


def render(study: Study, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    grouped = any(r["group"] for r in rows)
    paper = any(r["paper"] is not None for r in rows)
    head = ["strategy", *(["group"] if grouped else []), "eval_score % (mean ± std)", "seeds", "per seed",
            *(["paper"] if paper else [])]
    lines = [f"# {study.name}: {study.description}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- note: {n}" for n in study.notes]
    lines += ["", f"![{study.name}]({study.name}.png)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], *([r["group"]] if grouped else []), _pm(r["mean"], r["std"]),
                 f"{len(r['scores'])}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                 ", ".join(f"{s:.1f}" for s in r["scores"]),
                 *([f"{r['paper']:.1f}" if r["paper"] is not None else "-"] if paper else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *summary_lines(study, rows)]) + "\n"


def plot(study: Study, rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    names = _unique(r["name"] for r in rows)
    groups = _unique(r["group"] for r in rows)
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.3 + 1.2 * len(names) * max(1, len(groups) / 2), 3.8))
    for g, group in enumerate(groups):
        xs = [names.index(r["name"]) + (g - (len(groups) - 1) / 2) * width for r in rows if r["group"] == group]
        mine = [r for r in rows if r["group"] == group]
        ax.bar(xs, [r["mean"] or 0 for r in mine], width * 0.9, yerr=[r["std"] or 0 for r in mine],
               label=f"{group} (ours)" if group else "ours", color=f"C{g}", alpha=0.75, capsize=3)
        for x, r in zip(xs, mine, strict=True):
            ax.plot([x] * len(r["scores"]), r["scores"], "k.", ms=4)
            if r["paper"] is not None:
                ax.plot(x, r["paper"], "x", color="C3", ms=8)
    if any(r["paper"] is not None for r in rows):
        ax.plot([], [], "x", color="C3", label="paper")
    scores = [s for r in rows for s in r["scores"]] + [r["paper"] for r in rows if r["paper"] is not None]
    if scores:
        ax.set_ylim(max(0, min(scores) - 5), min(100, max(scores) + 3))
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set(ylabel="final eval_score (%)", title=textwrap.fill(study.description, int(14 * fig.get_figwidth())))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """The command line -> {own settings..., "cli": nested config overrides}; ConfigError on bad input."""
    raw = parse_overrides(list(argv))
    own = {k: raw.pop(k) for k in list(raw) if k in _OWN}
    study = own.get("study")
    if study not in STUDIES:
        raise ConfigError(f"study={study}: choose one of {', '.join(STUDIES)}")
    if study == "seeded" and not own.get("search"):
        raise ConfigError("study=seeded needs search=<name of a finished search> (see python -m kdsearch.leaderboard)")
    seeds = own.get("seeds", 3)
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds={own.get('seeds')}: a count (seeds=3 -> 0,1,2) or a list such as [0,1,2]")
    tracking = own.get("tracking") or {}
    if not isinstance(tracking, dict) or set(tracking) - {"uri", "experiment"}:
        raise ConfigError(f"tracking: known keys are tracking.uri and tracking.experiment (got {tracking})")
    build_config(raw)  # unknown keys: the did-you-mean error, before anything runs
    only = own.get("only")
    return {"study": study, "seeds": seeds, "cli": raw, "search": own.get("search"),
            "only": [only] if isinstance(only, str) else only,
            "uri": str(tracking.get("uri", os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))),
            "experiment": str(tracking.get("experiment", DEFAULT_EXPERIMENT)),
            "name": own.get("name") or f"report-{study}-{time.strftime('%Y%m%d-%H%M%S')}",
            "out": Path(own.get("out") or Path("docs", "results", study)),
            "results_dir": str(own.get("results_dir", "outputs/report")), "concurrency": own.get("concurrency")}


def build_study(args: dict[str, Any]) -> Study:
    cfg = build_config(args["cli"])
    _, d_t = models.depth_width(models.teacher_config(models.resolve_teacher(cfg.teacher)))
    base, rows = None, None
    if args["study"] == "seeded":
        base, rows = seeded_rows(uri=args["uri"], experiment=args["experiment"], search=args["search"])
    study = make_study(args["study"], d_teacher=d_t, search_rows=rows, search_base=base)
    if args["only"]:
        keep = [r for r in study.rows if {r.label, r.name, r.group} & set(args["only"])]
        if not keep:
            raise ConfigError(f"only={args['only']}: matches no row; rows: {', '.join(r.label for r in study.rows)}")
        study = dataclasses.replace(study, rows=keep)
    return study


def run_report(args: dict[str, Any], argv: Sequence[str]) -> tuple[Path, str]:
    """Run the grid through the search driver, then write and log the table. Returns (out dir, parent run id)."""
    from .tune import run_search  # Ray is imported only when a study really runs

    study = build_study(args)
    space, study = grid_space(study, cli=args["cli"], seeds=args["seeds"], concurrency=args["concurrency"])
    settings = SearchSettings(space=study.name, name=args["name"], tracking_uri=args["uri"],
                              experiment=args["experiment"], results_dir=args["results_dir"])
    check_search(settings, space)
    version, began = commit(), time.time()  # the code that runs, before anyone commits during the run
    run_search(settings, space)
    wall = time.time() - began
    parent = find_search(uri=args["uri"], experiment=args["experiment"], search=args["name"])
    trials = list_trials(uri=args["uri"], experiment=args["experiment"], search_run_id=parent.run_id)
    rows = aggregate(study, trials)
    cfg = space_model.trial_config(space, {})
    finished = [t for t in trials if "eval_score" in t.metrics]
    teacher = finished[0].metrics.get("teacher_score") if finished else None
    task = cfg.task
    meta = {"measured": f"{datetime.date.today()} on {hardware()}, {wall / 60:.1f} min wall for "
                        f"{len(trials)} trials ({cfg.resources.cpus_per_trial:g} CPU, "
                        f"{cfg.resources.gpus_per_trial:g} GPU each)",
            "commit": version, "MLflow": f"search {args['name']} (parent run {parent.run_id}) at {args['uri']}",
            "teacher": f"{cfg.teacher}" + (f", fine-tuned on the subsample: {100 * teacher:.1f}" if teacher else ""),
            "student": f"{cfg.student.layers} layers, width {cfg.student.hidden_size or 'teacher'}",
            "data": f"{task.name} ({task.data_dir or task.hub or 'embedded'}): train {task.train_size or 'all'} "
                    f"rows (seeded subsample), eval {task.eval_size or 'all'} rows, max_length {task.max_length}",
            "training": f"{cfg.train.epochs} epochs x {cfg.train.max_steps_per_epoch or 'all'} steps, batch "
                        f"{cfg.train.batch_size}, lr {cfg.train.lr}; score = final-epoch eval accuracy",
            "seeds": f"train.seed in {args['seeds']} (the teacher is shared: finetune.seed {cfg.finetune.seed})",
            "command": "`python -m kdsearch.report " + " ".join(argv) + "`"}
    out: Path = args["out"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study.name}.md").write_text(render(study, rows, meta))
    (out / f"{study.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    plot(study, rows, out / f"{study.name}.png")
    log_run_artifacts(uri=args["uri"], experiment=args["experiment"], run_id=parent.run_id, dirs={"report": out})
    tracker = SearchTracker(uri=args["uri"], experiment=args["experiment"])
    tracker.start_search(name=args["name"], space=study.name, config={"space": study.name},
                         code_version=code_version())
    summary: dict[str, Any] = {"study": study.name, "trials": len(trials)}
    for r in rows:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", r["label"])
        summary |= {f"mean.{slug}": r["mean"], f"std.{slug}": r["std"]}
    tracker.end_search(summary={k: v for k, v in summary.items() if v is not None})
    return out, parent.run_id


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        out, run_id = run_report(args, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((out / f"{args['study']}.md").read_text())
    print(f"report written to {out.resolve()} and MLflow parent run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
