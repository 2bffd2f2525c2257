"""The leaderboard of one search: trials read back from MLflow become plain rows (the ranking, the importance
and the plots work on those), ranked, written as tables and plots. MLflow only through kdsearch.tracking; no Ray.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from kdsearch.config.parse import config_keys
from kdsearch.core.console import render_text
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.search.page import leaderboard_page
from kdsearch.search.plots import plot_all
from kdsearch.search.ranking import Objective, Row, pareto_front, parse_objectives, rank_rows, value
from kdsearch.tracking import (
    CONFIRMED_TAG,
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    NONFINITE_TAG,
    SAMPLED_TAG,
    SEARCHED_TAG,
    RunRecord,
    find_search,
    list_trials,
    log_run_artifacts,
    open_client,
)

# Params that differ per trial without being a strategy choice: never leaderboard columns.
_BOOKKEEPING = ("output_dir", "storage_path", "cache_dir", "resources.")


def search_objectives(search: RunRecord) -> list[Objective]:
    """The objectives SearchTracker.start_search stored on the parent run (tags, else params)."""
    stored = {**search.params, **search.tags}
    if stored.get("kdsearch.objectives"):
        return parse_objectives(stored["kdsearch.objectives"])
    if stored.get("kdsearch.metric"):
        return parse_objectives(f"{stored['kdsearch.metric']}:{stored.get('kdsearch.mode', 'max')}")
    raise ConfigError(f"search={search.name}: its run stores no kdsearch.metric; "
                      "pass objectives=<metric>:max")


def trial_rows(trials: Sequence[RunRecord], searched: Collection[str] = ()) -> list[Row]:
    """One flat row per trial run: params, metrics (they win a clash), trial, status, time_s, start_ms.

    A `searched` param that a trial did not draw (a conditional one, inactive there) is left out of its row,
    although the run logs the whole config: ted.filter means nothing for a projector trial. So is a metric
    whose last value was NaN/inf: the row would pair an earlier epoch's value with the last epoch's others.
    """
    rows = []
    for t in trials:
        sampled = t.tags.get(SAMPLED_TAG)
        inactive = set(searched) - set(sampled.split(",")) if sampled is not None else set()
        stale = set(t.tags.get(NONFINITE_TAG, "").split(","))  # last value NaN/inf: MLflow shows an older one
        time_s = (t.end_time - t.start_time) / 1000 if t.end_time and t.start_time else None
        rows.append({**{k: v for k, v in t.params.items() if k not in inactive},
                     **{k: v for k, v in t.metrics.items() if k not in stale}, "trial": t.name,
                     "status": t.status, "time_s": time_s, "start_ms": t.start_time or 0, "run_id": t.run_id})
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
    # the epoch a trial's metrics come from: ASHA stops weak trials early, so rows may differ in training
    epochs = any(value(row, "epoch") is not None for row in ranked)
    columns = ["rank", "trial", *params, *metrics, *(["epochs"] if epochs else []), "time (s)", "status"]
    columns += ["pareto"] if front is not None else []
    cells = []
    for i, row in enumerate(ranked):
        line = [str(row.get("rank") or "-"), str(row["trial"]), *(_param(row.get(p, "-")) for p in params)]
        line += [_fmt(value(row, m)) for m in metrics]
        if epochs:
            epoch = value(row, "epoch")
            line.append("-" if epoch is None else str(int(epoch)))
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


def write_tables(columns: Sequence[str], cells: Sequence[Sequence[str]], out: Path, title: str) -> list[Path]:
    """leaderboard.csv and leaderboard.md under `out` (all rows)."""
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([columns, *cells])
    md = [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    paths = [out / "leaderboard.csv", out / "leaderboard.md"]
    for path, text in zip(paths, [buffer.getvalue(), "\n".join(md) + "\n"], strict=True):
        path.write_text(text)
    return paths


def run_links(uri: str, experiment: str, ranked: Sequence[Mapping[str, Any]]) -> tuple[list[str | None], str]:
    """Each ranked trial's page in the MLflow UI, and a note on where that UI is: the tracking server itself,
    or `mlflow ui` on this store at its default address."""
    _, experiment_id = open_client(uri, experiment, create=False)
    server = uri.lower().startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else "http://127.0.0.1:5000"
    note = ("Each trial links to its MLflow run." if server else
            f"Each trial links to its MLflow run in `mlflow ui --backend-store-uri {uri}` at {base}.")
    return [f"{base}/#/experiments/{experiment_id}/runs/{r['run_id']}" if r.get("run_id") else None
            for r in ranked], note


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
    reported = sorted({k for t in trials for k in t.metrics})
    for objective in objectives:
        if reported and objective.name not in reported:  # (nothing reported yet: a search stopped early)
            raise ConfigError(f"objectives={objective.name}:{objective.mode}: no trial of {parent.name} reports "
                              f"{objective.name}{did_you_mean(objective.name, reported)}")
    ranked = rank_rows(rows, *objectives[0], then=objectives[1:])
    return Ranking(parent, objectives, ranked, sorted({k for t in trials for k in t.params}))


def build_leaderboard(*, uri: str = DEFAULT_URI, experiment: str = DEFAULT_EXPERIMENT,
                      search: str | None = None, out: Path | None = None,
                      objectives: list[Objective] | None = None,
                      log: bool = True) -> tuple[str, Path]:
    """Rank a search's trials, write tables and plots under `out`, log them to the parent run under
    `leaderboard/` (`leaderboard-<objectives>/` when ranked by others than the search's). Returns (the full text
    table, out). The tune driver calls this at the end of a search."""
    parent, objectives, ranked, logged = search_ranking(uri=uri, experiment=experiment, search=search,
                                                        objectives=objectives)
    front = pareto_front(ranked, objectives) if len(objectives) > 1 else None
    params = varying_params(ranked, sorted(set(logged) - {o.name for o in objectives} - {"student_params"}))
    columns, cells = table(ranked, objectives, params, front)
    # ranked by other objectives than the search's: beside its own tables, not over them
    try:
        own = list(objectives) == search_objectives(parent)
    except ConfigError:  # a parent that stores none (a report's): the objectives given are its only ones
        own = True
    folder = "leaderboard" if own else "leaderboard-" + "-".join(f"{n}_{m}" for n, m in objectives)
    out = out or Path("outputs", "search", re.sub(r"[^A-Za-z0-9_.-]+", "_", parent.name), folder)
    title = f"kdsearch leaderboard: {parent.name} ({', '.join(f'{n}:{m}' for n, m in objectives)})"
    write_tables(columns, cells, out, title)
    plots = plot_all(ranked, objectives, params, front, out)
    urls, note = run_links(uri, experiment, ranked)
    (out / "leaderboard.html").write_text(leaderboard_page(
        title, columns, cells, run_urls=urls, plots=[p.name for p in plots], ui_note=note,
        confirmed=json.loads(parent.tags[CONFIRMED_TAG]) if parent.tags.get(CONFIRMED_TAG) else None))
    if log:
        log_run_artifacts(uri=uri, experiment=experiment, run_id=parent.run_id, dirs={folder: out})
    return title + "\n" + render_text(columns, cells), out


def confirmed_table(parent: RunRecord) -> str | None:
    """The search's confirmed ranking (`confirm=k`, CONFIRMED_TAG on its parent) as text, best mean first; None
    when the search was not confirmed."""
    raw = parent.tags.get(CONFIRMED_TAG)
    if not raw:
        return None
    rows = json.loads(raw)
    cells = [[str(rank), f"{r['mean']:.2f}" + (f" ± {r['ci95']:.2f}" if r["ci95"] is not None else ""),
              str(len(r["scores"])), r["vs_best"], r["label"]] for rank, r in enumerate(rows, 1)]
    title = ("confirmed over fresh seeds: mean score x 100 ± the half-width of its 95% t interval; \"within "
             "noise\": Welch's test cannot tell it from the best at 5%")
    return title + "\n" + render_text(["rank", "mean ± 95% CI", "seeds", "vs best", "configuration"], cells,
                                       width=80)