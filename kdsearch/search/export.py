"""The end of a search: pick the best trial, export its student with a model card, rank and summarise.

Takes Tune's ResultGrid (duck-typed: an iterable of results with .config, .metrics, .checkpoint, .error);
imports Ray only to open a multi-worker trial's Train checkpoint. The last line it prints says where the best
student is.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kdsearch.config.overrides import CONFIG_FILE, write_config_file
from kdsearch.config.parse import flatten
from kdsearch.config.paths import job_copy
from kdsearch.config.schema import rate_defaults
from kdsearch.core.provenance import code_version
from kdsearch.methods.bridges import BRIDGES, bridge_sections
from kdsearch.run.loop import export_student
from kdsearch.run.prepare import prepare
from kdsearch.search import space_model
from kdsearch.search.board import build_leaderboard, search_ranking
from kdsearch.search.ranking import Objective
from kdsearch.search.settings import SearchSettings
from kdsearch.tracking import SearchTracker


def _checkpoint_dir(result: Any) -> Any:
    """A trial's last checkpoint: Tune's own, or the Train run's (Train reports `checkpoint_path`)."""
    if result.checkpoint is not None:
        return result.checkpoint
    path = (result.metrics or {}).get("checkpoint_path")
    if path:
        from ray.tune import Checkpoint

        return Checkpoint(path)
    return None


def best_result(results: Any, ranked_trials: list[str]) -> Any | None:
    """The first of `ranked_trials` (the leaderboard's order, so that ties resolve alike) that finished with a
    checkpoint to export."""
    usable = {str((r.metrics or {}).get("trial_id")): r for r in results
              if r.error is None and _checkpoint_dir(r) is not None}
    return next((usable[t] for t in ranked_trials if t in usable), None)


_HIDDEN_KEYS = ("distill.layers", "distill.embeddings", "distill.bridge", "distill.distance", "distill.hidden_reduce",
                "distill.mask_padding")
_LOGIT_KEYS = ("distill.temperature", "distill.logit_loss")


def strategy_settings(cfg: Any) -> dict[str, Any]:
    """The strategy keys the run acted on: a family's settings only when its term or bridge is on (a logit-only
    student's card does not list TED filter widths)."""
    d = cfg.distill
    hidden = d.w_hidden > 0 and d.layer_map != "none"
    mapped = hidden or (d.w_relation > 0 and cfg.relation.layers == "map")  # TinyBERT's relations follow the map
    running = BRIDGES.get(d.bridge).section if hidden and d.bridge in BRIDGES else None
    off = {f"{section}.": section != running for section in bridge_sections()} | {"relation.": d.w_relation == 0}
    out = {}
    for key, value in flatten(cfg).items():
        if not key.startswith(("distill.", "relation.", "student.", *off)):
            continue
        if any(key.startswith(prefix) and skip for prefix, skip in off.items()):
            continue
        if (key in _HIDDEN_KEYS and not hidden) or (key in _LOGIT_KEYS and d.w_logit == 0):
            continue
        if key == "distill.layer_map" and not mapped:
            continue
        out[key] = value
    return out


def _write_student(result: Any, cfg: Any, out: Path, card: str, *, replacing: str) -> None:
    """Export `result`'s student with its card and config into `out`, staged whole before it takes out's place;
    an earlier `out` (`replacing` says whose) is replaced with one line saying so."""
    staged = out.with_name(f".{out.name}.new-{os.getpid()}")
    with _checkpoint_dir(result).as_directory() as directory:
        export_student(cfg, prepare(cfg), Path(directory), staged)
    (staged / "README.md").write_text(card)
    write_config_file(cfg, staged / CONFIG_FILE)
    if out.exists():
        print(f"[kdsearch.tune] replacing {replacing}, in {out}", flush=True)
        shutil.rmtree(out)
    staged.rename(out)


def export_confirmed(results: Any, *, rows: list[dict[str, Any]], space: space_model.Space, search: str,
                     out: Path) -> Path | None:
    """After study=confirm: the configuration with the best mean over the fresh seeds is exported to `out`, as
    its best seed's run, its card giving the mean and the 95% interval. None when no row finished."""
    finished = [r for r in rows if r["mean"] is not None]
    if not finished:
        return None
    best = max(finished, key=lambda r: r["mean"])
    mine = [r for r in results if r.error is None and _checkpoint_dir(r) is not None
            and "eval_score" in (r.metrics or {})
            and all(r.config.get(k) == v for k, v in best["overrides"].items())]
    if not mine:
        return None
    top = max(mine, key=lambda r: r.metrics["eval_score"])
    cfg = space_model.trial_config(space, top.config)
    out = out.resolve()
    card = model_card(cfg, top.metrics, search=f"{search}-confirm", trial_id=str(top.metrics["trial_id"]),
                      metric="eval_score") + _confirmed_section(best, finished, seed=cfg.train.seed)
    _write_student(top, cfg, out, card, replacing="the search's single-seed best with the best by mean")
    return out


def _confirmed_section(best: dict[str, Any], rows: list[dict[str, Any]], *, seed: int) -> str:
    ci = best["ci95"]
    interval = f"; 95% t interval of the mean {best['mean'] - ci:.2f}-{best['mean'] + ci:.2f}" if ci else ""
    tied = [r["label"] for r in rows if r.get("vs_best") == "within noise"]
    scores = ", ".join(f"{s:.2f}" for s in best["scores"])
    return f"""
## Confirmed over fresh seeds
This configuration ranked first by its mean eval_score over {len(best['scores'])} fresh seeds
({', '.join(map(str, best['seeds']))}): {best['mean']:.2f} % ({scores}{interval}).
It is the best by mean, not the luckiest single run; this student is its seed {seed} run. Configurations
Welch's test cannot tell from it at 5%: {'; '.join(tied) if tied else 'none'}.
"""


def _scores(metrics: dict[str, Any], metric: str) -> str:
    """The ranked metric, and the task score beside the teacher's (`teacher_score` is the teacher's eval_score,
    not its value of whatever metric the search ranked by)."""
    def number(name: str) -> str:
        return f"{metrics.get(name, float('nan')):.4f}"

    task = f"eval_score: **{number('eval_score')}** (teacher: {number('teacher_score')})"
    return f"- {task}" if metric == "eval_score" else f"- {metric} (ranked by): **{number(metric)}**\n- {task}"


def model_card(cfg: Any, metrics: dict[str, Any], *, search: str, trial_id: str, metric: str) -> str:
    strategy = strategy_settings(cfg)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in strategy.items())
    latency = (f"\n- latency: {metrics['student_latency_ms']:.2f} ms per forward pass over 32 evaluation rows "
               "(measured during the search, on its device)" if "student_latency_ms" in metrics else "")
    return f"""# kdsearch student ({search}, trial {trial_id})

Distilled by kdsearch from teacher `{cfg.teacher}` on task `{cfg.task.name}`
(data: `{cfg.task.data_dir or cfg.task.hub or 'embedded'}`, train subsample: {cfg.task.train_size or 'all'}).

{_scores(metrics, metric)}
- parameters: {int(metrics.get('student_params', 0)):,}{latency}
- epochs trained: {metrics.get('epoch')}, train.lr {cfg.train.lr:g}; teacher fine-tune: finetune.lr {cfg.finetune.lr:g},
  finetune.epochs {cfg.finetune.epochs} ({rate_defaults(cfg.teacher, cfg.student.init)}; keys set explicitly win)

Load it with `transformers.AutoModelForSequenceClassification.from_pretrained(<this folder>)` (encoders),
`AutoModelForQuestionAnswering` (extractive QA: start and end logits; kdsearch.data.qa decodes the best span),
`AutoModelForCausalLM` (causal LMs) or `AutoModelForSeq2SeqLM` (encoder-decoders, which `generate`);
`AutoModel.from_pretrained` loads the backbone.

Train this strategy again (longer, on more data, another seed) from the trial's whole config in
`{CONFIG_FILE}`: `python -m kdsearch.train config=<this folder>/{CONFIG_FILE} train.epochs=10`.

The {metric} above is the one the search ranked trials by, so it flatters the winner a little; score it on the
held-out test split, beside its teacher: `python -m kdsearch.evaluate model=<this folder> with_teacher=true`.

## Strategy
| setting | value |
|---|---|
{rows}
"""


def export_best(results: Any, *, settings: SearchSettings, space: space_model.Space,
                objectives: list[tuple[str, str]]) -> Path | None:
    metric = objectives[0][0]
    tracker = SearchTracker(uri=settings.tracking_uri, experiment=settings.experiment)
    tracker.start_search(name=settings.search_name, space=space.name, config={"space": space.name},
                         code_version=code_version(), objectives=objectives)
    failed = sum(1 for r in results if r.error is not None)
    ranking = search_ranking(uri=settings.tracking_uri, experiment=settings.experiment,
                             search=settings.search_name,
                             objectives=[Objective(m, "max" if d == "max" else "min") for m, d in objectives])
    best = best_result(results, [row["trial"] for row in ranking.rows if row.get("rank")])
    if best is None:
        print(f"[kdsearch.tune] no trial finished with a {metric}; {failed} failed", flush=True)
        tracker.end_search(status="FAILED", summary={"failed_trials": failed})
        return None
    cfg = space_model.trial_config(space, best.config)
    trial_id = str(best.metrics["trial_id"])
    out = Path(settings.results_dir, settings.search_name, "best_student").resolve()
    # a resumed search: the best of its earlier part, replaced whole (no stale files)
    _write_student(best, cfg, out, model_card(cfg, best.metrics, search=settings.search_name, trial_id=trial_id,
                                              metric=metric), replacing="the best student this search exported before")
    tracker.log_search_artifacts(dirs={"best_student": out})
    text, board = build_leaderboard(uri=settings.tracking_uri, experiment=settings.experiment,
                                    search=settings.search_name,
                                    out=Path(settings.results_dir, settings.search_name, "leaderboard"))
    print(text)
    tracker.end_search(summary={"best_trial": trial_id, f"best_{metric}": best.metrics[metric],
                                "failed_trials": failed, "trials": len(list(results))})
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    print(f"[kdsearch.tune] best trial {trial_id}: {metric}={best.metrics[metric]:.4f} ({params}); "
          f"{failed} trial(s) failed; leaderboard in {board}")
    if job_copy() is not None:  # Ray deletes the job's working directory, not these
        print(f"[kdsearch.tune] on this node, outside the job's temporary folder: MLflow store "
              f"{settings.tracking_uri}, leaderboard {board}; fetch them with `ray rsync-down <cluster.yaml> "
              f"{Path(settings.results_dir, settings.search_name)} .`")
    print(f"best student saved to {out}")
    return out
