"""`warm_start=<search>`: an earlier search's finished trials, read from MLflow, as known points for this one.

On the same task the sampler is told each earlier trial's params and final objective values before the first
new trial, so a second search continues from what the first learnt rather than sampling blind. On another task
(its task.name or data differ) the scores say nothing of this task's: the earlier search's best configurations
are evaluated first instead (Optuna's points to evaluate), and the sampler learns from their scores here. Only
points this space can express are kept: a param it searches that the earlier trial had at a value outside its
range or choices (or did not log) drops that trial, with one line saying how many. No Ray; Optuna only through
space_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kdsearch.search import space_model
from kdsearch.tracking import find_search, format_param, list_trials

TASK_KEYS = ("task.name", "task.data_dir", "task.hub")
"""What makes two searches' scores comparable: the same task read from the same data."""
CROSS_TASK_POINTS = 3
"""How many of another task's best configurations a cross-task warm start evaluates first."""


@dataclass(frozen=True)
class WarmStart:
    source: str
    """The earlier search's name (or parent run id) as given."""
    known: list[tuple[dict[str, Any], list[float]]]
    """(params, objective values in this search's objective order) per kept trial."""
    dropped: int
    """Finished earlier trials this space cannot express, or that lack an objective."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """Another task's best configurations, best first: evaluated first, their earlier scores not given."""
    other_task: str | None = None
    """The earlier search's task when it differs from this one's (a cross-task warm start), else None."""

    def summary(self) -> str:
        dropped = f", {self.dropped} dropped (a param outside this space, or no final objective value)"
        if self.other_task is not None:
            return (f"[kdsearch.tune] warm start from {self.source}, which ran another task ({self.other_task}): "
                    f"its {len(self.points)} best configuration(s) are evaluated first; its scores are not given "
                    f"to the sampler{dropped if self.dropped else ''}")
        return (f"[kdsearch.tune] warm start from {self.source}: {len(self.known)} earlier trial(s) given to the "
                f"sampler{dropped if self.dropped else ''}")


def read_warm_start(source: str, *, uri: str, experiment: str, space: space_model.Space,
                    objectives: list[tuple[str, str]]) -> WarmStart:
    """The finished trials of search `source` in the same MLflow store and experiment; ConfigError (one line)
    when there is no such search."""
    parent = find_search(uri=uri, experiment=experiment, search=source)
    known: list[tuple[dict[str, Any], list[float]]] = []
    dropped = 0
    tasks = set()
    for trial in list_trials(uri=uri, experiment=experiment, search_run_id=parent.run_id):
        if trial.status != "FINISHED":
            continue
        tasks.add(tuple(trial.params.get(key, "None") for key in TASK_KEYS))
        point = space_model.known_point(space, trial.params)
        values = [trial.metrics.get(name, math.nan) for name, _ in objectives]
        if point is None or not all(math.isfinite(v) for v in values):
            dropped += 1
            continue
        known.append((point, values))
    here = tuple(format_param(space_model.base_value(space, key)) for key in TASK_KEYS)
    other = sorted(t for t in tasks if t != here)
    if not other:
        return WarmStart(source, known, dropped)
    name, mode = objectives[0]
    best_first = sorted(known, key=lambda k: -k[1][0] if mode == "max" else k[1][0])
    points: list[dict[str, Any]] = []
    for point, _ in best_first:
        if point not in points:
            points.append(point)
    described = ", ".join(f"task.name={t[0]}" + (f" from {t[1]}" if t[1] != "None" else "") for t in other)
    return WarmStart(source, [], dropped, points[:CROSS_TASK_POINTS], described)
