"""`python -m kdsearch.leaderboard [search=<name or run id>] [tracking.uri=...] [experiment=kdsearch] [top=20]
[out=<dir>] [objectives=eval_score:max,student_params:min]`: one search's ranked table, Pareto front and plots,
built by `kdsearch.search.board` and logged to the search's parent run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from kdsearch.config.paths import output_uri
from kdsearch.config.usage import command_help, wants_help
from kdsearch.core.console import run_command
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.search.board import build_leaderboard
from kdsearch.search.ranking import parse_objectives
from kdsearch.tracking import (
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    default_uri,
)

_CLI_KEYS = ("search", "tracking.uri", "tracking.experiment", "top", "out", "objectives")


def parse_args(argv: Sequence[str]) -> dict[str, str]:
    args = {}
    for item in argv:
        key, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"{item!r}: arguments take the form key=value ({', '.join(_CLI_KEYS)})")
        if key not in _CLI_KEYS:
            raise ConfigError(f"{key}: no such leaderboard option{did_you_mean(key, _CLI_KEYS)}")
        args[key] = val
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(command_help(
            "usage: python -m kdsearch.leaderboard [key=value ...]",
            "The ranked trials of one search from MLflow: a table here, CSV and Markdown files, and plots "
            "(optimisation history,\nparameter importance, Pareto front) logged to the search's parent run.",
            [("search=<name|run id>", "the search (default: the latest one)"),
             ("objectives=m:max,...", "rank by these (default: the search's own)"),
             ("top=20", "rows printed (the files hold every trial)"),
             ("out=<dir>", "where the files go (default outputs/search/<search>/leaderboard, as the search's own; "
                           "leaderboard-<objectives> when ranked by others)"),
             ("tracking.uri=<uri>", f"MLflow store (default $MLFLOW_TRACKING_URI, else {DEFAULT_URI})"),
             ("tracking.experiment=<name>", f"MLflow experiment (default {DEFAULT_EXPERIMENT})")],
            config_keys=False))
        return 0
    try:
        args = parse_args(argv)
        top = args.get("top", "20")
        if not top.isdigit() or int(top) < 1:
            raise ConfigError(f"top={top}: must be a positive integer")
        text, out = build_leaderboard(
            uri=output_uri(args.get("tracking.uri", default_uri())),
            experiment=args.get("tracking.experiment", DEFAULT_EXPERIMENT),
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
    raise SystemExit(run_command(main))
