"""`python -m kdsearch.report study=<name> ...`: the papers' fixed comparisons, mean +- std over seeds.

The command line and help; the study runs in `kdsearch.search.reports`. No Ray or mlflow import here.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from kdsearch.config.command import Command, run_command
from kdsearch.search.reports import ReportSettings, export_confirmed_run, keep_confirmed, parse_args, run_report


def report(args: dict[str, Any], argv: list[str]) -> int:
    run = run_report(args, argv)
    print((run.out / f"{args['study']}.md").read_text())
    if args["study"] == "confirm":
        keep_confirmed(run, search=args["search"], uri=args["uri"], experiment=args["experiment"])
        student = export_confirmed_run(run, search=args["search"], out=run.out / "best_student", uri=args["uri"],
                                       experiment=args["experiment"])
        if student:
            print(f"the best configuration by mean: its student saved to {student}")
    print(f"report written to {run.out.resolve()} and MLflow parent run {run.run_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = Command(
        "report", "The papers' fixed comparison grids (strategies x seeds) through the same Tune/Train/MLflow "
        "machinery as a search;\nmean and std over seeds, written to docs/results/ and to MLflow. A config key given "
        "here applies to every row.", lambda args, _: report(args, argv), ReportSettings,
        usage="study=<name> [key=value ...]", parse=lambda given: (parse_args(given), []))
    return run_command(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
