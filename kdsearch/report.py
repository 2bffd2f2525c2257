"""`python -m kdsearch.report study=<name> ...`: the papers' fixed comparisons, mean +- std over seeds.

The command line and help; the study runs in `kdsearch.search.reports`. No Ray or mlflow import here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kdsearch.config.usage import command_help, wants_help
from kdsearch.core.console import quiet_libraries, run_command
from kdsearch.core.errors import ConfigError
from kdsearch.search.reports import _export_confirmed, parse_args, run_report
from kdsearch.search.studies import STUDIES
from kdsearch.tracking import (
    DEFAULT_URI,
)


def _help() -> str:
    own = [("study=<name>", f"one of {', '.join(STUDIES)}"),
           ("seeds=3", "a count (0, 1, 2) or a list such as [0,1,2]"),
           ("only=[row,...]", "run only these rows (a row's label, name or group)"),
           ("search=<name>", "study=seeded: the finished search whose best trial is rerun beside its paper points; "
                             "study=confirm: whose top configurations are rerun"),
           ("top=3", "study=confirm: how many of the search's best distinct configurations (seeds: fresh, 1..n)"),
           ("out=docs/results/<study>", "where the Markdown table, JSON and plot go"),
           ("name=<name>", "the MLflow parent run (default report-<study>-<time>)"),
           ("concurrency=<n>", "trials at a time (default: what the cluster's resources allow)"),
           ("results_dir=outputs/report", "Tune results"),
           ("tracking.uri=<uri>", f"MLflow store (default $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")]
    return command_help("usage: python -m kdsearch.report study=<name> [key=value ...]",
                        "The papers' fixed comparison grids (strategies x seeds) through the same Tune/Train/MLflow "
                        "machinery as a search;\nmean and std over seeds, written to docs/results/ and to MLflow. "
                        "A config key given here applies to every row.", own)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(_help())
        return 0
    quiet_libraries()
    try:
        args = parse_args(argv)
        run = run_report(args, argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((run.out / f"{args['study']}.md").read_text())
    if args["study"] == "confirm" and (student := _export_confirmed(
            run, search=args["search"], out=run.out / "best_student", uri=args["uri"],
            experiment=args["experiment"])):
        print(f"the best configuration by mean: its student saved to {student}")
    print(f"report written to {run.out.resolve()} and MLflow parent run {run.run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_command(main))
