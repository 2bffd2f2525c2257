"""Ranking a search's trials: objectives, best-first order with tie-breaks, the Pareto front.

Pure functions over plain row dicts (a trial's params and metrics, flattened); no MLflow, Ray or Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

from kdsearch.core.errors import ConfigError

Row = dict[str, Any]


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


def value(row: Mapping[str, Any], key: str) -> float | None:
    """The row's finite number under `key` (a metric, or a param string that parses), else None."""
    return number(row.get(key))


def number(raw: Any) -> float | None:
    """`raw` as a finite float (a metric, or a logged param string), else None."""
    try:
        x = float(raw)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def rankable(row: Mapping[str, Any], keys: Sequence[str]) -> bool:
    return row.get("status") != "FAILED" and all(value(row, k) is not None for k in keys)


def score(row: Mapping[str, Any], key: str) -> float:
    """`value` for a row already known to be `rankable`."""
    x = value(row, key)
    if x is None:
        raise ValueError(f"row {row.get('trial')} has no finite {key}")
    return x


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

    good = [dict(r) for r in rows if rankable(r, [metric])]
    good.sort(key=key)
    rest = [dict(r, rank=None) for r in rows if not rankable(r, [metric])]
    return [dict(r, rank=i) for i, r in enumerate(good, 1)] + rest


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> set[int]:
    """Indices of the non-dominated rows. Row a dominates b when it is no worse on every objective and better
    on one; failed rows and rows missing an objective are never on the front. Equal rows share the front."""
    names = [name for name, _ in objectives]
    signs = [1.0 if mode == "max" else -1.0 for _, mode in objectives]
    points = {i: [s * score(r, n) for n, s in zip(names, signs, strict=True)]
              for i, r in enumerate(rows) if rankable(r, names)}

    def dominates(a: list[float], b: list[float]) -> bool:
        pairs = list(zip(a, b, strict=True))
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    return {i for i, p in points.items() if not any(dominates(q, p) for j, q in points.items() if j != i)}
