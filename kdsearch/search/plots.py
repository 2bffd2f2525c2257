"""The leaderboard's figures: optimisation history, parameter importance, Pareto front (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdsearch.search.importance import param_importance
from kdsearch.search.ranking import Objective, rankable, score


def plot_all(ranked: Sequence[Mapping[str, Any]], objectives: Sequence[Objective], params: Sequence[str],
             front: set[int] | None, out: Path) -> list[Path]:
    """optimisation_history.png, param_importance.png and (two objectives) pareto_front.png under `out`."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no display on cluster heads; must precede pyplot
    import matplotlib.pyplot as plt

    metric, mode = objectives[0]
    paths = []
    order = sorted((r for r in ranked if r.get("rank")), key=lambda r: r.get("start_ms", 0))
    if order:
        ys = [score(r, metric) for r in order]
        best = [max(ys[:i + 1]) if mode == "max" else min(ys[:i + 1]) for i in range(len(ys))]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(ys) + 1), ys, "o", alpha=0.6, label="trial")
        ax.step(range(1, len(ys) + 1), best, where="post", color="C3", label=f"best so far ({mode})")
        ax.set(xlabel="trial (start order)", ylabel=metric, title="Optimisation history")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.legend()
        paths.append(_save(fig, out / "optimisation_history.png"))
    importance = param_importance(ranked, params, metric, mode)
    if importance:
        names = sorted(importance, key=lambda n: importance[n])
        fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(names)))
        ax.barh(names, [importance[n] for n in names])
        ax.set(xlabel=f"importance for {metric}", title="Parameter importance")
        paths.append(_save(fig, out / "param_importance.png"))
    if front is not None and len(objectives) == 2:
        (xn, _), (yn, _) = objectives
        pts = [(score(r, xn), score(r, yn), i in front)
               for i, r in enumerate(ranked) if rankable(r, [xn, yn])]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=["C3" if p[2] else "C0" for p in pts])
        edge = sorted((p[0], p[1]) for p in pts if p[2])
        ax.plot([p[0] for p in edge], [p[1] for p in edge], "C3--", label="Pareto front")
        for i in sorted(front):
            ax.annotate(str(ranked[i]["trial"]), (score(ranked[i], xn), score(ranked[i], yn)), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=f"{xn} ({objectives[0].mode})", ylabel=f"{yn} ({objectives[1].mode})",
               title="Pareto front")
        ax.legend()
        paths.append(_save(fig, out / "pareto_front.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
