"""`python -m kdsearch.tune space=<name> key=value ...`: a Ray Tune + Optuna search, every trial in MLflow.

The command: its settings, the name it claims, what it prints, the best student's export and the optional
confirmation over fresh seeds. The search itself runs in `kdsearch.search.driver`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kdsearch.config.command import Command, run_command
from kdsearch.config.paths import job_note
from kdsearch.core.console import INTERRUPTED
from kdsearch.core.errors import ConfigError
from kdsearch.search.driver import check_resumable, claim_name, resolve_name, run_search, unfinished_trials
from kdsearch.search.export import export_best
from kdsearch.search.reports import confirm_search
from kdsearch.search.settings import (
    DEFAULT_SPACE,
    SearchSettings,
    check_search,
    objectives_of,
    parse_search_args,
    probe_space,
    render_dry_run,
    space_help_rows,
)
from kdsearch.search.space_model import Space
from kdsearch.search.warm_start import read_warm_start
from kdsearch.tracking import CONFIRMED_TAG, find_search


def search(settings: SearchSettings, space: Space, argv: list[str]) -> int:
    """Check, name, run, export and (with confirm=k) confirm one search; its exit status."""
    check_search(settings, space)  # a dry run makes every check a real run makes, Ray's start aside
    asked, settings = settings, resolve_name(settings, space)
    check_resumable(settings, space)
    warning = probe_space(space)
    warm = None if settings.resume or not settings.warm_start else read_warm_start(
        settings.warm_start, uri=settings.tracking_uri, experiment=settings.experiment, space=space,
        objectives=objectives_of(settings, space))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if warm is not None:
        print(warm.summary(), flush=True)
    if settings.resume and unfinished_trials(settings) == 0:
        if settings.confirm and not settings.dry_run and not confirmed(settings):  # its confirmation did not end
            return confirm(settings, argv, Path(settings.results_dir, settings.search_name, "best_student"))
        print(f"[kdsearch.tune] {settings.search_name} ran to its end: nothing to resume (`python -m "
              f"kdsearch.leaderboard search={settings.search_name}` shows its trials)")
        return 0
    if settings.dry_run:
        print(render_dry_run(settings, space))
        return 0
    if note := job_note():
        print(note, flush=True)
    settings = claim_name(asked, space)  # the name resolved above, unless a search started since took it
    try:
        results, seconds = run_search(settings, space, warm)
    except ConfigError:
        folder = Path(settings.results_dir, settings.search_name)
        if not settings.resume and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # refused before any trial: the name is free again
        raise
    stopped = unfinished_trials(settings) or 0
    budget = space.budget.time_budget_s
    expired = budget is not None and seconds >= budget  # else Ctrl-C stopped it
    if stopped:  # Tune saved the search's state; what finished so far is still ranked and exported
        why = f"time_budget_s={budget:g} ran out" if expired else "interrupted"
        print(f"[kdsearch.tune] {why} with {stopped} trial(s) unfinished; {continue_with(settings, argv)}",
              file=sys.stderr, flush=True)
    out = export_best(results, settings=settings, space=space, objectives=objectives_of(settings, space))
    if out is not None and settings.confirm and not stopped:
        return confirm(settings, argv, out)
    return INTERRUPTED if stopped and not expired else 0 if out is not None else 1


def confirm(settings: SearchSettings, argv: list[str], out: Path) -> int:
    """confirm=k: the finished search's k best configurations over fresh seeds, the best by mean exported to
    `out`; with resume=true an interrupted confirmation continues, each of its finished runs kept."""
    try:
        table = confirm_search(search=settings.search_name, top=settings.confirm, seeds=settings.confirm_seeds,
                               uri=settings.tracking_uri, experiment=settings.experiment,
                               results_dir=settings.results_dir, resume=settings.resume)
    except KeyboardInterrupt:  # Ctrl-C, or Tune stopped with trials unfinished: the search itself has ended
        raise KeyboardInterrupt(f"the confirmation of {settings.search_name} stopped before its end; "
                                f"{continue_with(settings, argv)}") from None
    print(table.read_text())
    print(f"[kdsearch.tune] confirmation of the {settings.confirm} best configurations over "
          f"{settings.confirm_seeds} fresh seeds: {table}; the best configuration by mean is now the "
          f"best student saved to {out}")
    return 0


def confirmed(settings: SearchSettings) -> bool:
    """Whether the search's parent run holds a confirmed ranking (its confirmation ran to its end)."""
    parent = find_search(uri=settings.tracking_uri, experiment=settings.experiment, search=settings.search_name)
    return CONFIRMED_TAG in parent.tags


def continue_with(settings: SearchSettings, argv: list[str]) -> str:
    """The command, as the user typed it plus name= and resume=true, that continues this search."""
    again = [a for a in argv if a.split("=", 1)[0] not in ("name", "resume")]
    return (f"this continues it: python -m kdsearch.tune "
            f"{shlex.join([*again, f'name={settings.search_name}', 'resume=true'])}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = Command(
        "tune", "A Ray Tune + Optuna search over a space's strategies; each trial is one run of the shared "
        "distillation step,\nlogged to MLflow. A config key given here is fixed for every trial (and no longer "
        "searched).", lambda settings, space: search(settings, space, argv), SearchSettings,
        usage=f"[space=<name> (default {DEFAULT_SPACE})] [key=value ...]", parse=parse_search_args,
        help_rows=space_help_rows)
    return run_command(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
