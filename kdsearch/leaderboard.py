"""Leaderboard of one search: ranked table, Pareto front and plots, logged to the search's parent run.

`python -m kdsearch.leaderboard [search=<name or run id>] [tracking.uri=...] [experiment=kdsearch] [top=20]
[out=<dir>] [objectives=eval_score:max,student_params:min]`. Ranking, Pareto front and importance are pure
functions over plain row dicts; MLflow is reached only through kdsearch.tracking. Must not import ray.
"""

from __future__ import annotations

import csv
import difflib
import html
import io
import math
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kdsearch.config import ConfigError, config_keys
from kdsearch.tracking import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    SAMPLED_TAG,
    SEARCHED_TAG,
    RunRecord,
    find_search,
    list_trials,
    log_run_artifacts,
)

Row = dict[str, Any]
# Params that differ per trial without being a strategy choice: never leaderboard columns.
_BOOKKEEPING = ("output_dir", "storage_path", "cache_dir", "resources.")
_CLI_KEYS = ("search", "tracking.uri", "experiment", "top", "out", "objectives")


class Objective(NamedTuple):
    name: str
    mode: Literal["max", "min"]


def parse_objectives(text: str) -> list[Objective]:
    """`"eval_score:max,student_params:min"` -> objectives; the first ranks the table, the next break its ties."""
    out = []
    for item in filter(None, (part.strip() for part in text.strip("[]").split(","))):
        name, _, mode = item.partition(":")
        if mode not in ("max", "min") or not name:
            raise ConfigError(f"objectives={text}: write each objective as <metric>:max or <metric>:min")
        out.append(Objective(name, "max" if mode == "max" else "min"))
    if not out:
        raise ConfigError(f"objectives={text}: name at least one <metric>:max|min")
    return out


def search_objectives(search: RunRecord) -> list[Objective]:
    """The objectives SearchTracker.start_search stored on the parent run (tags, else params)."""
    stored = {**search.params, **search.tags}
    if stored.get("kdsearch.objectives"):
        return parse_objectives(stored["kdsearch.objectives"])
    if stored.get("kdsearch.metric"):
        return parse_objectives(f"{stored['kdsearch.metric']}:{stored.get('kdsearch.mode', 'max')}")
    raise ConfigError(f"search={search.name}: its run stores no kdsearch.metric; "
                      "pass objectives=<metric>:max")


def value(row: Mapping[str, Any], key: str) -> float | None:
    """The row's finite number under `key` (a metric, or a param string that parses), else None."""
    return _number(row.get(key))


def _number(raw: Any) -> float | None:
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _rankable(row: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return row.get("status") != "FAILED" and all(value(row, k) is not None for k in keys)


def _score(row: Mapping[str, Any], key: str) -> float:
    """`value` for a row already known to be `_rankable`."""
    number = value(row, key)
    if number is None:
        raise ValueError(f"row {row.get('trial')} has no finite {key}")
    return number


def rank_rows(rows: Sequence[Mapping[str, Any]], metric: str, mode: Literal["max", "min"], *,
              then: Sequence[tuple[str, str]] = ()) -> list[Row]:
    """Copies of `rows`, best first, with `rank` 1..k; then failed trials and rows without the metric, in
    input order, with rank None. Ties on `metric` go to the better value of each `then` objective in turn (a
    row without it last), then keep the input (trial start) order."""
    order = [(metric, mode), *then]

    def key(row: Row) -> tuple[float, ...]:
        numbers = [value(row, name) for name, _ in order]
        return tuple(math.inf if x is None else -x if m == "max" else x
                     for x, (_, m) in zip(numbers, order, strict=True))

    good = [dict(r) for r in rows if _rankable(r, [metric])]
    good.sort(key=key)
    rest = [dict(r, rank=None) for r in rows if not _rankable(r, [metric])]
    return [dict(r, rank=i) for i, r in enumerate(good, 1)] + rest


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> set[int]:
    """Indices of the non-dominated rows. Row a dominates b when it is no worse on every objective and better
    on one; failed rows and rows missing an objective are never on the front. Equal rows share the front."""
    names = [name for name, _ in objectives]
    signs = [1.0 if mode == "max" else -1.0 for _, mode in objectives]
    points = {i: [s * _score(r, n) for n, s in zip(names, signs, strict=True)]
              for i, r in enumerate(rows) if _rankable(r, names)}

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return {i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)}


def trial_rows(trials: Sequence[RunRecord], searched: Collection[str] = ()) -> list[Row]:
    """One flat row per trial run: params, metrics (they win a clash), trial, status, time_s, start_ms.

    A `searched` param that a trial did not draw (a conditional one, inactive there) is left out of its row,
    although the run logs the whole config: ted.filter means nothing for a projector trial.
    """
    rows = []
    for t in trials:
        sampled = t.tags.get(SAMPLED_TAG)
        inactive = set(searched) - set(sampled.split(",")) if sampled is not None else set()
        time_s = (t.end_time - t.start_time) / 1000 if t.end_time and t.start_time else None
        rows.append({**{k: v for k, v in t.params.items() if k not in inactive}, **t.metrics, "trial": t.name,
                     "status": t.status, "time_s": time_s, "start_ms": t.start_time or 0})
    return rows


def varying_params(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> list[str]:
    """Params with more than one value across rows, in config order: the strategy columns."""
    order = {key: i for i, key in enumerate(config_keys())}
    keys = [p for p in params if not p.startswith(_BOOKKEEPING) and len({str(r.get(p)) for r in rows}) > 1]
    return sorted(keys, key=lambda k: (order.get(k, len(order)), k))


def table(ranked: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], params: Sequence[str],
          front: set[int] | None) -> tuple[list[str], list[list[str]]]:
    """Column names and string cells of the leaderboard, in `ranked` order (front indexes `ranked`)."""
    metrics = [o.name for o in objectives] + (["student_params"] if "student_params" not in
                                             {o.name for o in objectives} else [])
    columns = ["rank", "trial", *params, *metrics, "time (s)", "status"]
    columns += ["pareto"] if front is not None else []
    cells = []
    for i, row in enumerate(ranked):
        line = [str(row.get("rank") or "-"), str(row["trial"]), *(_param(row.get(p, "-")) for p in params)]
        line += [_fmt(value(row, m)) for m in metrics]
        time_s = row.get("time_s")
        line += ["" if time_s is None else f"{time_s:.1f}", str(row.get("status", ""))]
        if front is not None:
            line.append("*" if i in front else "")
        cells.append(line)
    return columns, cells


def _param(raw: Any) -> str:
    """A logged param for the table: floats to 4 significant digits, everything else as logged."""
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return str(raw)
    return str(raw) if str(raw).lstrip("-").isdigit() else _fmt(number)


def _fmt(number: float | None, digits: int = 4) -> str:
    if number is None:
        return ""
    return str(int(number)) if float(number).is_integer() and abs(number) >= 1000 else f"{number:.{digits}g}"


def render_text(columns: Sequence[str], cells: Sequence[Sequence[str]], width: int = 28) -> str:
    """Aligned plain-text table; long cells are cut to `width` characters."""
    cut = [[c if len(c) <= width else c[:width - 1] + "~" for c in line] for line in [columns, *cells]]
    widths = [max(len(line[i]) for line in cut) for i in range(len(columns))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cut)
    return "\n".join(lines)


def write_tables(columns: Sequence[str], cells: Sequence[Sequence[str]], out: Path, title: str) -> list[Path]:
    """leaderboard.csv, leaderboard.md and leaderboard.html under `out` (all rows)."""
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([columns, *cells])
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>\n" for line in cells)
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>table{{"
            "border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;padding:3px 6px}"
            "</style>"
            f"<h1>{html.escape(title)}</h1><table><tr>{head}</tr>\n{body}</table>\n")
    paths = [out / "leaderboard.csv", out / "leaderboard.md", out / "leaderboard.html"]
    for path, text in zip(paths, [buffer.getvalue(), "\n".join(md) + "\n", page], strict=True):
        path.write_text(text)
    return paths


def variance_importance(rows: Sequence[Mapping[str, Any]], params: Sequence[str],
                        metric: str) -> dict[str, float]:
    """Share of the metric's variance explained by each param's groups (correlation ratio eta^2), normalised
    to sum 1. Numeric params with more than 4 values are cut into 4 quantile bins. The fallback when Optuna's
    fANOVA cannot run (too few trials, no sklearn)."""
    ys = [(r, _score(r, metric)) for r in rows if _rankable(r, [metric])]
    mean = sum(y for _, y in ys) / max(len(ys), 1)
    total = sum((y - mean) ** 2 for _, y in ys)
    scores = {}
    for p in params:
        numbers = sorted({v for r, _ in ys if (v := value(r, p)) is not None})
        cuts = [numbers[len(numbers) * q // 4] for q in (1, 2, 3)] if len(numbers) > 4 else []
        groups: dict[str, list[float]] = {}
        for r, y in ys:
            v = value(r, p)
            key = str(sum(v >= c for c in cuts)) if cuts and v is not None else str(r.get(p))
            groups.setdefault(key, []).append(y)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        scores[p] = between / total if total > 0 else 0.0
    norm = sum(scores.values())
    return {p: s / norm if norm > 0 else 0.0 for p, s in scores.items()}


def param_importance(rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str,
                     mode: Literal["max", "min"]) -> dict[str, float]:
    """Optuna's fANOVA importance over an in-memory study rebuilt from the runs (distributions inferred from
    the logged values: numeric ranges, else categorical); `variance_importance` if that cannot run."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [r for r in rows if _rankable(r, [metric])]
    dists: dict[str, Any] = {}
    for p in params:
        raw = sorted({str(r.get(p)) for r in done})
        nums = [n for x in raw if (n := _number(x)) is not None]
        if len(raw) < 2:
            continue
        if len(nums) == len(raw):
            lo, hi = min(nums), max(nums)
            ints = all(re.fullmatch(r"-?\d+", x) for x in raw)
            dists[p] = IntDistribution(int(lo), int(hi)) if ints else FloatDistribution(lo, hi)
        else:
            dists[p] = CategoricalDistribution(raw)
    if len(done) < 2 or not dists:
        return {}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for r in done:
            values = {p: _typed(str(r.get(p)), d) for p, d in dists.items()}
            trial = optuna.trial.create_trial(params=values, distributions=dists, value=_score(r, metric))
            study.add_trial(trial)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (ImportError, RuntimeError, ValueError):
        return variance_importance(rows, list(dists), metric)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _typed(raw: str, dist: Any) -> Any:
    kind = type(dist).__name__
    return int(raw) if kind == "IntDistribution" else float(raw) if kind == "FloatDistribution" else raw


def plot_all(ranked: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], params: Sequence[str],
             front: set[int] | None, out: Path) -> list[Path]:
    """optimisation_history.png, param_importance.png and (two objectives) pareto_front.png under `out`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display on cluster heads; must precede pyplot
    import matplotlib.pyplot as plt

    metric, mode = objectives[0]
    paths = []
    order = sorted((r for r in ranked if r.get("rank")), key=lambda r: r.get("start_ms", 0))
    if order:
        ys = [_score(r, metric) for r in order]
        best = [max(ys[:i + 1]) if mode == "max" else min(ys[:i + 1]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(ys) + 1), ys, "o", alpha=0.6, label="trial")
        ax.step(range(1, len(ys) + 1), best, where="post", color="C3", label=f"best so far ({mode})")
        ax.set(xlabel="trial (start order)", ylabel=metric, title="Optimisation history")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend()
        paths.append(_save(fig, out / "optimisation_history.png"))
    importance = param_importance(ranked, params, metric, mode)
    if importance:
        names = sorted(importance, key=lambda n: importance[n])
        fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(names)))
        ax.barh(names, [importance[n] for n in names])
        ax.set(xlabel=f"importance for {metric}", title="Parameter importance")
        paths.append(_save(fig, out / "param_importance.png"))
    if front is not None and len(objectives) == 2:
        (xn, _), (yn, _) = objectives
        pts = [(_score(r, xn), _score(r, yn), i in front)
               for i, r in enumerate(ranked) if _rankable(r, [xn, yn])]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=["C3" if p[2] else "C0" for p in pts])
        edge = sorted((p[0], p[1]) for p in pts if p[2])
        ax.plot([p[0] for p in edge], [p[1] for p in edge], "C3--", label="Pareto front")
        for i in sorted(front):
            ax.annotate(str(ranked[i]["trial"]), (_score(ranked[i], xn), _score(ranked[i], yn)), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=f"{xn} ({objectives[0].mode})", ylabel=f"{yn} ({objectives[1].mode})",
               title="Pareto front")
        ax.legend()
        paths.append(_save(fig, out / "pareto_front.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class Ranking(NamedTuple):
    parent: RunRecord
    objectives: list[Objective]
    rows: list[Row]  # rank_rows order: the leaderboard's
    params: list[str]  # every param name the trials logged


def search_ranking(*, uri: str, experiment: str, search: str | None,
                   objectives: list[Objective] | None = None) -> Ranking:
    """A search's trials ranked by its first objective (ties: the later ones), as the leaderboard shows them
    and the export picks."""
    parent = find_search(uri=uri, experiment=experiment, search=search)
    trials = list_trials(uri=uri, experiment=experiment, search_run_id=parent.run_id)
    rows = trial_rows(trials, searched=parent.tags.get(SEARCHED_TAG, "").split(","))
    objectives = objectives or search_objectives(parent)
    ranked = rank_rows(rows, *objectives[0], then=objectives[1:])
    return Ranking(parent, objectives, ranked, sorted({k for t in trials for k in t.params}))


def build_leaderboard(*, uri: str = DEFAULT_URI, experiment: str = DEFAULT_EXPERIMENT,
                      search: str | None = None, out: Path | None = None,
                      objectives: list[Objective] | None = None,
                      log: bool = True) -> tuple[str, Path]:
    """Rank a search's trials, write tables and plots under `out`, log them to the parent run under
    `leaderboard/`. Returns (the full text table, out). The tune driver calls this at the end of a search."""
    parent, objectives, ranked, logged = search_ranking(uri=uri, experiment=experiment, search=search,
                                                        objectives=objectives)
    front = pareto_front(ranked, objectives) if len(objectives) > 1 else None
    params = varying_params(ranked, sorted(set(logged) - {o.name for o in objectives} - {"student_params"}))
    columns, cells = table(ranked, objectives, params, front)
    out = out or Path("outputs", "leaderboard", re.sub(r"[^A-Za-z0-9_.-]+", "_", parent.name))
    title = f"kdsearch leaderboard: {parent.name} ({', '.join(f'{n}:{m}' for n, m in objectives)})"
    write_tables(columns, cells, out, title)
    plot_all(ranked, objectives, params, front, out)
    if log:
        log_run_artifacts(uri=uri, experiment=experiment, run_id=parent.run_id, dirs={"leaderboard": out})
    return title + "\n" + render_text(columns, cells), out


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"{item!r}: arguments take the form key=value ({', '.join(_CLI_KEYS)})")
        if key not in _CLI_KEYS:
            close = difflib.get_close_matches(key, _CLI_KEYS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{key}: no such leaderboard option{hint}")
        args[key] = val
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        top = args.get("top", "20")
        if not top.isdigit() or int(top) < 1:
            raise ConfigError(f"top={top}: must be a positive integer")
        text, out = build_leaderboard(
            uri=args.get("tracking.uri", DEFAULT_URI), experiment=args.get("experiment", DEFAULT_EXPERIMENT),
            search=args.get("search") or None, out=Path(args["out"]) if "out" in args else None,
            objectives=parse_objectives(args["objectives"]) if "objectives" in args else None)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lines = text.splitlines()
    print("\n".join(lines[: 2 + int(top)]))  # title + header + top rows
    if len(lines) > 2 + int(top):
        print(f"... {len(lines) - 2 - int(top)} more in {out / 'leaderboard.csv'}")
    print(f"leaderboard written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
