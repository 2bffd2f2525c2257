"""`warm_start=<search>`: an earlier search's finished trials, read from MLflow, as known points for this one.

The sampler is told each earlier trial's params and final objective values before the first new trial, so a
second search continues from what the first learnt rather than sampling blind. Only points this space can
express are kept: a param it searches that the earlier trial had at a value outside its range or choices (or
did not log) drops that trial, with one line saying how many. No Ray; Optuna only through space_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kdsearch.search import space_model
from kdsearch.tracking import find_search, list_trials


@dataclass(frozen=True)
class WarmStart:
    source: str
    """The earlier search's name (or parent run id) as given."""
    known: list[tuple[dict[str, Any], list[float]]]
    """(params, objective values in this search's objective order) per kept trial."""
    dropped: int
    """Finished earlier trials this space cannot express, or that lack an objective."""

    def summary(self) -> str:
        dropped = f", {self.dropped} dropped (a param outside this space, or no final objective value)"
        return (f"[kdsearch.tune] warm start from {self.source}: {len(self.known)} earlier trial(s) given to the "
                f"sampler{dropped if self.dropped else ''}")


def read_warm_start(source: str, *, uri: str, experiment: str, space: space_model.Space,
                    objectives: list[tuple[str, str]]) -> WarmStart:
    """The finished trials of search `source` in the same MLflow store and experiment; ConfigError (one line)
    when there is no such search."""
    parent = find_search(uri=uri, experiment=experiment, search=source)
    known: list[tuple[dict[str, Any], list[float]]] = []
    dropped = 0
    for trial in list_trials(uri=uri, experiment=experiment, search_run_id=parent.run_id):
        if trial.status != "FINISHED":
            continue
        point = space_model.known_point(space, trial.params)
        values = [trial.metrics.get(name, math.nan) for name, _ in objectives]
        if point is None or not all(math.isfinite(v) for v in values):
            dropped += 1
            continue
        known.append((point, values))
    return WarmStart(source, known, dropped)
