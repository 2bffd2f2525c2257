"""A study run: a fixed grid (strategies x seeds, `kdsearch.search.studies`), not a search.

It runs as a `Space` of fixed points through the same driver, Train loop and MLflow logging as a search (one
parent run, one child run per trial). Here: the study's settings, aggregation over seeds, and the table, JSON and
plot that go to docs/results/<study>/ and to the parent run; `confirm_search`, a finished search's top
configurations rerun over fresh seeds.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shlex
import statistics
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdsearch.config.command import parse_settings
from kdsearch.config.overrides import parse_overrides
from kdsearch.config.parse import build_config
from kdsearch.config.paths import output_path, output_uri
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.core.provenance import code_version, commit, hardware
from kdsearch.run import models
from kdsearch.run.validate import validate
from kdsearch.search import space_model
from kdsearch.search.confidence import t_interval, within_noise
from kdsearch.search.settings import SearchSettings, check_search
from kdsearch.search.studies import STUDIES, Study, confirm_rows, grid_space, make_study, row_of, seeded_rows, unique
from kdsearch.tracking import (
    CONFIRMED_TAG,
    DEFAULT_EXPERIMENT,
    SearchTracker,
    default_uri,
    find_search,
    list_trials,
    log_run_artifacts,
    search_names,
    set_run_tags,
)


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """`python -m kdsearch.report`'s own keys (every other key is a config key, applied to every row)."""

    study: str = dataclasses.field(default="", metadata={"shown": "<name>"})
    """The study: layer_select, layer_select_seq2seq (its maps on an encoder-decoder teacher), ted_vs_lwd, flex,
    flex_seq2seq (Flex-KD on an encoder-decoder, ranked by ROUGE-L), relation, seeded (a search's best beside the
    paper points) or confirm (a search's top configurations over fresh seeds)."""
    seeds: Any = 3
    """A count (3 -> seeds 0, 1, 2; study=confirm: fresh seeds 1..n) or a list such as [0,1,2]."""
    only: Any = dataclasses.field(default=None, metadata={"shown": "[row,...]"})
    """Run only these rows (a row's label, name or group)."""
    search: str | None = dataclasses.field(default=None, metadata={"shown": "<name>"})
    """study=seeded: the finished search whose best trial is rerun beside its paper points; study=confirm: whose
    top configurations are rerun."""
    top: int | None = dataclasses.field(default=None, metadata={"shown": "3"})
    """study=confirm: how many of the search's best distinct configurations."""
    out: str | None = dataclasses.field(default=None, metadata={"shown": "docs/results/<study>"})
    """Where the Markdown table, JSON and plot go."""
    name: str | None = dataclasses.field(default=None, metadata={"shown": "<name>"})
    """The MLflow parent run (default report-<study>-<time>)."""
    resume: bool = False
    """Continue the interrupted study of this name=: its finished trials are kept, each (row, seed) runs once."""
    concurrency: int | None = None
    """Trials at a time (default: what the cluster's resources allow)."""
    results_dir: str = "outputs/report"
    """Tune results."""
    uri: str | None = dataclasses.field(default=None, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    experiment: str = dataclasses.field(default=DEFAULT_EXPERIMENT, metadata={"key": "tracking.experiment"})
    """MLflow experiment."""




def aggregate(study: Study, trials: Sequence[Any]) -> list[dict[str, Any]]:
    """One dict per row: per-seed scores (final epoch, in %), mean, std (sample, n-1), failures."""
    out = []
    for row in study.rows:
        mine = [t for t in trials if row_of(study, t.params) is row]
        done = sorted((int(t.params["train.seed"]), 100 * t.metrics[study.metric]) for t in mine
                      if t.status == "FINISHED" and study.metric in t.metrics)
        scores = [s for _, s in done]
        beside = {m: statistics.fmean(v) for m in study.beside
                  if (v := [100 * t.metrics[m] for t in mine if t.status == "FINISHED" and m in t.metrics])}
        out.append({"label": row.label, "name": row.name, "group": row.group, "seeds": [s for s, _ in done],
                    "scores": scores, "mean": statistics.fmean(scores) if scores else None,
                    "std": statistics.stdev(scores) if len(scores) > 1 else None, "ci95": t_interval(scores),
                    "failed": len(mine) - len(done), "paper": row.paper, "overrides": row.overrides,
                    "beside": beside})
    return _mark_noise(out)


def _mark_noise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`vs_best` per row: "best" for the group's best mean, "within noise" where Welch's test cannot tell a row
    from it at 5%, "below" where it can: a study's order is only as real as these marks."""
    for group in unique(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group and r["mean"] is not None]
        best = max(mine, key=lambda r: r["mean"], default=None)
        for r in mine:
            same = None if r is best else within_noise(best["scores"], r["scores"])  # type: ignore[index]
            r["vs_best"] = "best" if r is best else "-" if same is None else "within noise" if same else "below"
    return rows


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def summary_lines(study: Study, rows: list[dict[str, Any]]) -> list[str]:
    """Per group: the spread of the strategies' means and each one's gain over the baseline row (the group's own,
    else the study's ungrouped one)."""
    lines = []
    shared = next((r for r in rows if r["name"] == study.baseline and r["mean"] is not None), None)
    for group in unique(r["group"] for r in rows):
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


def render(study: Study, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    grouped = any(r["group"] for r in rows)
    paper = any(r["paper"] is not None for r in rows)
    head = ["strategy", *(["group"] if grouped else []), f"{study.metric} x 100 (mean ± std)", "95% CI of the mean",
            "vs best (Welch, 5%)", "seeds", "per seed", *(["paper"] if paper else []),
            *(f"{m.removeprefix('eval_')} (mean)" for m in study.beside)]
    lines = [f"# {study.name}: {study.description}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- note: {n}" for n in study.notes]
    lines += ["", f"![{study.name}]({study.name}.png)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        interval = "-" if r.get("ci95") is None else f"{r['mean'] - r['ci95']:.1f}-{r['mean'] + r['ci95']:.1f}"
        cells = [r["name"], *([r["group"]] if grouped else []), _pm(r["mean"], r["std"]), interval,
                 r.get("vs_best", "-"), f"{len(r['scores'])}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                 ", ".join(f"{s:.1f}" for s in r["scores"]),
                 *([f"{r['paper']:.1f}" if r["paper"] is not None else "-"] if paper else []),
                 *(f"{r['beside'][m]:.1f}" if m in r.get("beside", {}) else "-" for m in study.beside)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *summary_lines(study, rows)]) + "\n"


def plot(study: Study, rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    names = unique(r["name"] for r in rows)
    groups = unique(r["group"] for r in rows)
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
    if scores:  # Matthews and Pearson scores can be negative
        ax.set_ylim(min(scores) - 5 if min(scores) < 0 else max(0, min(scores) - 5), min(100, max(scores) + 3))
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set(ylabel=f"final {study.metric} x 100", title=textwrap.fill(study.description, int(14 * fig.get_figwidth())))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _scored(study: Study, primary: str) -> str:
    """What the table ranks, in words: the task's primary metric, or the study's own."""
    if study.metric == "eval_score":
        return primary.replace("_", " ")
    return f"{study.metric.removeprefix('eval_').replace('_', ' ')} ({study.metric}; eval_score is {primary})"


def _width(cfg: Config) -> str:
    if cfg.student.hidden_size:
        return str(cfg.student.hidden_size)
    return f"{cfg.student.width_ratio} x the teacher's" if cfg.student.width_ratio else "the teacher's"


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """The command line -> {own settings..., "cli": nested config overrides}; ConfigError on bad input."""
    own, rest = parse_settings(ReportSettings, argv, config_keys=True)
    raw = parse_overrides(rest)
    study = own.study
    if study not in STUDIES:
        given = "study: missing" if not study else f"study={study}: unknown"
        hint = did_you_mean(str(study), STUDIES) if study else ""
        raise ConfigError(f"{given}{hint}; choose one of {', '.join(STUDIES)}")
    if study in ("seeded", "confirm") and not own.search:
        raise ConfigError(f"study={study} needs search=<name of a finished search> (see python -m "
                          "kdsearch.leaderboard)")
    top = 3 if own.top is None else own.top
    if top < 1 or (own.top is not None and study != "confirm"):
        raise ConfigError(f"top={top}: a count >= 1 of configurations, for study=confirm only")
    seeds = own.seeds
    first = 1 if study == "confirm" else 0  # confirm: fresh seeds, not the search's own train.seed (0)
    seeds = list(range(first, first + seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds={own.seeds}: a count (seeds=3 -> 0,1,2) or a list such as [0,1,2]")
    if own.resume and not own.name:
        raise ConfigError("resume=true needs name=<the interrupted study's name> (its MLflow parent run, printed "
                          "as it stopped)")
    build_config(raw)  # unknown keys: the did-you-mean error, before anything runs
    only = own.only
    return {"study": study, "seeds": seeds, "cli": raw, "search": own.search, "top": top,
            "only": [str(only)] if isinstance(only, (str, int)) else only,
            "uri": output_uri(own.uri or default_uri()), "experiment": own.experiment,
            "name": own.name or f"report-{study}-{time.strftime('%Y%m%d-%H%M%S')}",
            "out": Path(own.out or Path("docs", "results", study)),
            "results_dir": output_path(own.results_dir), "concurrency": own.concurrency, "resume": own.resume}


def build_study(args: dict[str, Any]) -> Study:
    cfg = build_config(args["cli"])
    _, d_t = models.depth_width(models.teacher_config(models.resolve_teacher(cfg.teacher)))
    base, rows = None, None
    if args["study"] == "seeded":
        base, rows = seeded_rows(uri=args["uri"], experiment=args["experiment"], search=args["search"])
    if args["study"] == "confirm":
        base, rows = confirm_rows(uri=args["uri"], experiment=args["experiment"], search=args["search"],
                                  top=args["top"])
    study = make_study(args["study"], d_teacher=d_t, search_rows=rows, search_base=base)
    if args["only"]:
        keep = [r for r in study.rows if {r.label, r.name, r.group} & set(args["only"])]
        if not keep:
            raise ConfigError(f"only={args['only']}: matches no row; rows: {', '.join(r.label for r in study.rows)}")
        study = dataclasses.replace(study, rows=keep)
    return study


@dataclasses.dataclass(frozen=True)
class ReportRun:
    """A finished study: where its table is, its MLflow parent run, the trials' results, its grid, its rows."""

    out: Path
    run_id: str
    results: Any
    space: space_model.Space
    rows: list[dict[str, Any]]


def run_report(args: dict[str, Any], argv: Sequence[str]) -> ReportRun:
    """Run the grid through the search driver, then write and log the table."""
    from kdsearch.search.driver import run_search, unfinished_trials  # Ray is imported only when a study really runs

    study = build_study(args)
    space, study = grid_space(study, cli=args["cli"], seeds=args["seeds"], concurrency=args["concurrency"])
    settings = SearchSettings(space=study.name, name=args["name"], tracking_uri=args["uri"],
                              experiment=args["experiment"], results_dir=args["results_dir"], resume=args["resume"])
    check_search(settings, space)
    version, began = commit(), time.time()  # the code that runs, before anyone commits during the run
    results, _ = run_search(settings, space)
    stopped = unfinished_trials(settings) or 0
    if stopped:  # a table of some seeds would read as the study's result (and replace the last whole one)
        again = [*(a for a in argv if a.split("=", 1)[0] not in ("name", "resume")), f"name={args['name']}",
                 "resume=true"]
        raise KeyboardInterrupt(f"{stopped} trial(s) unfinished: no table written; this continues it: python -m "
                                f"kdsearch.report {shlex.join(again)}")
    wall = time.time() - began
    parent = find_search(uri=args["uri"], experiment=args["experiment"], search=args["name"])
    trials = list_trials(uri=args["uri"], experiment=args["experiment"], search_run_id=parent.run_id)
    rows = aggregate(study, trials)
    cfg = space_model.trial_config(space, {})
    finished = [t for t in trials if "eval_score" in t.metrics]
    teacher = finished[0].metrics.get("teacher_score") if finished else None
    task = cfg.task
    trained_on = {"always": "fine-tuned on the train rows below", "never": "as given, not fine-tuned",
                  "auto": "fine-tuned on the train rows below unless it came with a task head"}[cfg.finetune.mode]
    meta = {"measured": f"{datetime.date.today()} on {hardware()}, {wall / 60:.1f} min wall for "
                        f"{len(trials)} trials ({cfg.resources.cpus_per_trial:g} CPU, "
                        f"{cfg.resources.gpus_per_trial:g} GPU each)",
            "commit": version, "MLflow": f"search {args['name']} (parent run {parent.run_id}) at {args['uri']}",
            "teacher": f"{cfg.teacher}, {trained_on}" + (f": eval_score x 100 {100 * teacher:.1f}" if teacher else ""),
            "student": f"{cfg.student.layers}{f'+{cfg.student.decoder_layers}' if cfg.student.decoder_layers else ''}"
                       f" layers, width {_width(cfg)}, init {cfg.student.init}",
            "data": f"{task.name} ({task.data_dir or task.hub or 'embedded'}): train {task.train_size or 'all'} "
                    f"rows{' (seeded subsample)' if task.train_size else ''}, eval {task.eval_size or 'all'} rows, "
                    f"max_length {task.max_length}",
            "training": f"{cfg.train.epochs} epochs x {cfg.train.max_steps_per_epoch or 'all'} steps, batch "
                        f"{cfg.train.batch_size}, lr {cfg.train.lr}; score = final-epoch eval "
                        f"{_scored(study, validate(cfg).primary_metric)}",
            "seeds": f"train.seed in {args['seeds']} (the teacher is shared: finetune.seed {cfg.finetune.seed})",
            "command": f"`python -m kdsearch.report {shlex.join(argv)}`"}  # quoted: pastes into a shell
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
    return ReportRun(out, parent.run_id, results, space, rows)


def export_confirmed_run(run: ReportRun, *, search: str, out: Path, uri: str, experiment: str) -> Path | None:
    from kdsearch.search.export import export_confirmed  # Ray's checkpoints: only once a study ran

    path = export_confirmed(run.results, rows=run.rows, space=run.space, search=search, out=out)
    if path is not None:
        log_run_artifacts(uri=uri, experiment=experiment, run_id=run.run_id, dirs={"best_student": path})
    return path


def confirm_search(*, search: str, top: int, seeds: int, uri: str, experiment: str, results_dir: str,
                   resume: bool = False) -> Path:
    """`kdsearch.tune confirm=<top> confirm_seeds=<seeds>`: the finished search's top configurations rerun over
    fresh seeds as study=confirm, its table beside the search's leaderboard; returns the table. `resume`: continue
    the search's interrupted confirmation where there is one (its finished runs are kept), else start it."""
    name = f"{search}-confirm"
    argv = ["study=confirm", f"search={search}", f"top={top}", f"seeds={seeds}", f"tracking.uri={uri}",
            f"tracking.experiment={experiment}", f"results_dir={results_dir}", f"name={name}",
            f"out={Path(results_dir, search, 'confirm')}"]
    if resume and name in search_names(uri=uri, experiment=experiment):
        argv.append("resume=true")
    run = run_report(parse_args(argv), argv)
    export_confirmed_run(run, search=search, out=Path(results_dir, search, "best_student"), uri=uri,
                         experiment=experiment)
    keep_confirmed(run, search=search, uri=uri, experiment=experiment)
    return run.out / "confirm.md"


def keep_confirmed(run: ReportRun, *, search: str, uri: str, experiment: str) -> None:
    """The confirmed ranking on the search's own parent run too (CONFIRMED_TAG, the table under confirm/), where
    its leaderboard finds it."""
    parent = find_search(uri=uri, experiment=experiment, search=search)
    set_run_tags(uri=uri, experiment=experiment, run_id=parent.run_id,
                 tags={CONFIRMED_TAG: json.dumps(confirmed_ranking(run.rows))})
    log_run_artifacts(uri=uri, experiment=experiment, run_id=parent.run_id, dirs={"confirm": run.out})


def confirmed_ranking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A confirm study's rows as the search's parent keeps them (CONFIRMED_TAG): best mean first."""
    done = sorted((r for r in rows if r["mean"] is not None), key=lambda r: -r["mean"])
    return [{"label": r["label"], "mean": round(r["mean"], 4), "ci95": None if r["ci95"] is None else
             round(r["ci95"], 4), "scores": [round(s, 4) for s in r["scores"]], "vs_best": r.get("vs_best", "-")}
            for r in done]
