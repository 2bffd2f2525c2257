"""How much each searched parameter mattered to a search's metric: Optuna's fANOVA, or a variance share.

Works on the leaderboard's plain rows, rebuilding an in-memory Optuna study from them; the only module besides
the search driver that imports Optuna's study API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kdsearch.search.ranking import number, rankable, score, value


def variance_importance(rows: Sequence[Mapping[str, Any]], params: Sequence[str],
                        metric: str) -> dict[str, float]:
    """Share of the metric's variance explained by each param's groups (correlation ratio eta^2), normalised
    to sum 1. Numeric params with more than 4 values are cut into 4 quantile bins. The fallback when Optuna's
    fANOVA cannot run (too few trials, no sklearn)."""
    ys = [(r, score(r, metric)) for r in rows if rankable(r, [metric])]
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

    done = [r for r in rows if rankable(r, [metric])]
    dists: dict[str, Any] = {}
    for p in params:
        raw = sorted({str(r.get(p)) for r in done})
        nums = [n for x in raw if (n := number(x)) is not None]
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
            trial = optuna.trial.create_trial(params=values, distributions=dists, value=score(r, metric))
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
