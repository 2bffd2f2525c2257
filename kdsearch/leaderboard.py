"""`python -m kdsearch.leaderboard [search=<name or run id>] [key=value ...]`: one search's ranked table, Pareto
front and plots, built by `kdsearch.search.board` and logged to the search's parent run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kdsearch.config.command import Command, run_command
from kdsearch.config.paths import output_uri
from kdsearch.core.errors import require
from kdsearch.search.board import build_leaderboard, confirmed_table
from kdsearch.search.ranking import parse_objectives
from kdsearch.tracking import DEFAULT_EXPERIMENT, default_uri, find_search


@dataclass(frozen=True)
class LeaderboardSettings:
    search: str | None = field(default=None, metadata={"shown": "<name|run id>"})
    """The search (default: the latest one)."""
    objectives: str | None = field(default=None, metadata={"shown": "<metric:max,...>"})
    """Rank by these, e.g. eval_score:max,student_params:min (default: the search's own)."""
    top: int = 20
    """Rows printed (the files hold every trial)."""
    out: str | None = field(default=None, metadata={"shown": "<dir>"})
    """Where the files go (default outputs/search/<search>/leaderboard, as the search's own; leaderboard-<objectives>
    when ranked by others)."""
    tracking_uri: str | None = field(default=None, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    experiment: str = field(default=DEFAULT_EXPERIMENT, metadata={"key": "tracking.experiment"})
    """MLflow experiment."""

    def __post_init__(self) -> None:
        require(self.top >= 1, f"top={self.top}: must be a positive integer")


def show(settings: LeaderboardSettings, _: list[str]) -> int:
    uri = output_uri(settings.tracking_uri or default_uri())
    text, out = build_leaderboard(
        uri=uri, experiment=settings.experiment, search=settings.search or None,
        out=Path(settings.out) if settings.out else None,
        objectives=parse_objectives(settings.objectives) if settings.objectives else None)
    lines = text.splitlines()
    print("\n".join(lines[: 2 + settings.top]))  # title + header + top rows
    if len(lines) > 2 + settings.top:
        print(f"... {len(lines) - 2 - settings.top} more in {out / 'leaderboard.csv'}")
    confirmed = confirmed_table(find_search(uri=uri, experiment=settings.experiment, search=settings.search or None))
    if confirmed:  # a single-seed ranking ranks noise as well: what the fresh seeds say comes last, to be read
        print("\n" + confirmed)
    print(f"leaderboard written to {out}")
    return 0


COMMAND = Command(
    "leaderboard", "The ranked trials of one search from MLflow: a table here, CSV and Markdown files, and plots "
    "(optimisation history,\nparameter importance, Pareto front) logged to the search's parent run.",
    show, LeaderboardSettings, config_keys=False, quiet=False)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    raise SystemExit(main())
