"""The papers' comparison grids: `Study` (rows of config keys, a baseline, the papers' numbers), the study
built for a name, the seeded study taken from a finished search, and a study as a `Space` of fixed points.

Pure data and config work: no Ray, Tune or plotting; MLflow only through `kdsearch.tracking` (seeded study).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kdsearch.config.overrides import parse_value
from kdsearch.config.parse import build_config, flatten, merge, unflatten
from kdsearch.core.errors import ConfigError
from kdsearch.core.registry import Registry
from kdsearch.search import space_model, spaces
from kdsearch.search.board import search_objectives, trial_rows
from kdsearch.search.ranking import rank_rows
from kdsearch.search.settings import absolute_paths
from kdsearch.tracking import SEARCHED_TAG, RunRecord, find_search, format_param, list_trials


@dataclass(frozen=True)
class Row:
    """One strategy: a name, an optional group (a second axis, e.g. the student init) and its config keys."""

    name: str
    group: str
    overrides: dict[str, Any]
    paper: float | None = None
    """The published number for this cell (papers.md), where one exists."""

    @property
    def label(self) -> str:
        return f"{self.name}/{self.group}" if self.group else self.name


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    base: dict[str, Any]  # flat dotted config keys, below the command line's overrides
    rows: list[Row]
    baseline: str | None = None  # the row name every other row of its group is compared with
    notes: list[str] = field(default_factory=list)
    metric: str = "eval_score"
    """The trial metric the table ranks (its final epoch): eval_score = the task's primary metric, or one a task
    reports beside it, such as a generated output's eval_rouge_l."""
    beside: tuple[str, ...] = ()
    """Further final-epoch eval metrics whose means over seeds the table shows beside the score."""


# SST-2 dev accuracy of BERT-base -> 3-layer BERT in Yu, Wen, Mou 2025 (papers.md section 2).
_LAYER_PAPER = {("none", "random"): 81.1, ("forward", "random"): 85.1, ("reverse", "random"): 83.3,
                ("all_to_one", "random"): 85.4, ("random", "random"): 82.9, ("none", "teacher"): 88.7,
                ("forward", "teacher"): 92.3, ("reverse", "teacher"): 90.0, ("all_to_one", "teacher"): 91.4}


GRIDS: Registry[Callable[[int], Study]] = Registry("study")
"""The fixed comparison grids by name, each built for a teacher of width d_teacher (flex halves it)."""


@GRIDS.register("layer_select")
def _layer_select(d_teacher: int) -> Study:
    rows = [Row(m, init, {"distill.layer_map": m, "student.init": init}, _LAYER_PAPER.get((m, init)))
            for init in ("random", "teacher") for m in ("none", "forward", "reverse", "all_to_one", "random")]
    # the BERT code's hidden term: per pair sum mask ||h_t - h_s||^2 / (B * real tokens), mean over pairs, weight 3
    base = {"distill.bridge": "auto", "distill.distance": "layer_select_bert", "distill.hidden_reduce": "mean",
            "distill.embeddings": True, "distill.w_task": 1.0, "distill.w_logit": 1.0, "distill.w_hidden": 3.0,
            "distill.temperature": 1.0}
    return Study("layer_select", "layer maps x student init (Yu, Wen, Mou 2025; papers.md section 2)", base, rows,
                 baseline="none", notes=["paper: BERT-base (93.1) -> 3-layer BERT, full SST-2, GLUE dev; "
                                         "its random/teacher cell is not in papers.md"])


@GRIDS.register("layer_select_seq2seq")
def _layer_select_seq2seq(d_teacher: int) -> Study:
    rows = [Row(m, init, {"distill.layer_map": m, "student.init": init})
            for init in ("random", "teacher") for m in ("none", "forward", "reverse", "all_to_one", "random")]
    # the T5 code's loss (t5mt/scripts): CE 1, KL 1 at T 2, hidden 3 on each layer's standardised states, the
    # pairs of both stacks summed (hid_loss_enc + hid_loss_dec); space seq2seq's points
    base = {"distill.bridge": "auto", "distill.distance": "layer_select_t5", "distill.hidden_reduce": "sum",
            "distill.w_task": 1.0, "distill.w_logit": 1.0, "distill.w_hidden": 3.0, "distill.temperature": 2.0}
    return Study("layer_select_seq2seq", "encoder-decoder layer maps x student init (Yu, Wen, Mou 2025; papers.md "
                 "section 2)", base, rows, baseline="none",
                 notes=["paper: T5 (WMT16 En-Ro) and BART (DART) -> 3+3 layers; papers.md records per-cell "
                        "numbers for its BERT runs only, whose pattern is: teacher init, maps within about a point, "
                        "all >= none; random init, matching beats none"])


@GRIDS.register("ted_vs_lwd")
def _ted_vs_lwd(d_teacher: int) -> Study:
    rows = [Row("TED", "", {"distill.bridge": "ted"}),
            Row("LWD projector", "", {"distill.bridge": "projector"}),
            Row("LWD identity", "", {"distill.bridge": "identity"}),
            Row("logit KD only", "", {"distill.layer_map": "none"}),
            Row("no KD", "", {"distill.layer_map": "none", "distill.w_logit": 0.0})]
    base = {"student.init": "teacher", "distill.layer_map": "forward", "distill.embeddings": False,
            "distill.hidden_reduce": "mean", "distill.distance": "mse", "distill.mask_padding": False,
            "distill.w_logit": 20.0,
            "distill.w_hidden": 20.0, "distill.temperature": 2.0, "ted.filter": "linear", "distill.bridge": "auto"}
    return Study("ted_vs_lwd", "TED vs plain layer-wise distillation vs logit KD vs none (Liang et al. 2023; "
                 "papers.md section 1)", base, rows, baseline="no KD",
                 notes=["TED code's SST-2 stage-2 weights: kl_alpha 20, mse_alpha 20, T 2, element-mean MSE over "
                        "every position (padding included), mean over pairs, uniform (forward) map without the "
                        "embedding pair",
                        "paper: DeBERTaV3-base -> xsmall, TED 94.4 on SST-2 (no same-setup baseline numbers "
                        "in papers.md)"])


@GRIDS.register("flex")
def _flex(d_teacher: int) -> Study:
    half = d_teacher // 2
    # group = the feature distance: the paper pairs units with correlation and the projector with MSE; the
    # swapped pairs tell how much of a gap is the unit selection and how much the distance.
    rows = [Row(name, distance, {"distill.bridge": bridge, "distill.distance": distance})
            for distance in ("correlation", "mse")
            for name, bridge in (("Flex-KD units", "units"), ("linear projector", "projector"))]
    # the other projector-free way across widths: linear CKA between the raw states (papers.md, "other
    # baselines"), no unit selection
    rows.append(Row("CKA, no projector", "cka", {"distill.bridge": "identity", "distill.distance": "cka"}))
    # and the attention-relation one (MiniLMv2): q-q, k-k, v-v relations of the last layers in the teacher's
    # heads count of relation heads, no hidden-state term at all
    rows.append(Row("MiniLMv2 relations, no projector", "relation",
                    {"distill.layer_map": "none", "distill.w_relation": 1.0, "relation.kinds": "qq+kk+vv"}))
    rows.append(Row("no feature KD", "", {"distill.layer_map": "none"}))
    base = {"student.hidden_size": half, "student.init": "random", "distill.embeddings": False,
            "distill.layer_map": "forward", "units.score": "grad", "units.scope": "last",
            "distill.hidden_reduce": "mean", "distill.w_hidden": 1.0, "distill.w_logit": 0.0}
    return Study("flex", f"Flex-KD unit selection vs a linear projector, student width {half} = d_t/2 "
                 "(Saadi & Wang 2025; papers.md section 3)", base, rows, baseline="no feature KD",
                 notes=["paper: up to +3% over the projector (third-party figures, unverified)"])


@GRIDS.register("flex_seq2seq")
def _flex_seq2seq(d_teacher: int) -> Study:
    half = d_teacher // 2
    # the paper's own pairs: units with its correlation loss, the linear projector (its baseline) with MSE; the
    # projector with correlation tells the unit selection apart from the distance
    rows = [Row("Flex-KD units", "", {"distill.bridge": "units", "distill.distance": "correlation"}),
            Row("linear projector", "", {"distill.bridge": "projector", "distill.distance": "mse"}),
            Row("linear projector, correlation", "", {"distill.bridge": "projector",
                                                      "distill.distance": "correlation"}),
            Row("no feature KD", "", {"distill.layer_map": "none"})]
    # Flex-KD: top-d_s units (units.ratio null = d_s / d_t) by first-order gradient relevance on the fine-tuned
    # teacher, ranked once on its last layer; task loss + feature loss + logit KD, the logit term the seq2seq
    # study's (KL 1 at T 2, the layer-selection T5 code's) in every row; both stacks' pairs, no embedding pair
    base = {"student.hidden_size": half, "student.init": "random", "distill.embeddings": False,
            "distill.layer_map": "forward", "units.score": "grad", "units.scope": "last",
            "distill.hidden_reduce": "mean", "distill.w_task": 1.0, "distill.w_hidden": 1.0,
            "distill.w_logit": 1.0, "distill.temperature": 2.0}
    return Study("flex_seq2seq", f"Flex-KD unit selection vs a linear projector on an encoder-decoder, student "
                 f"width {half} = d_t/2, scored by ROUGE-L of greedy generations (Saadi & Wang 2025; papers.md "
                 "section 3)", base, rows, baseline="no feature KD", metric="eval_rouge_l",
                 beside=("eval_bleu", "eval_chrf", "eval_exact_match", "eval_token_accuracy"),
                 notes=["paper: up to +3% over the projector, its largest gain on summarization (+3.75 ROUGE-L); "
                        "third-party figures, unverified"])


@GRIDS.register("relation")
def _relation(d_teacher: int) -> Study:
    # each attention row is the logit-KD-only row plus one relation term, at the layer-selection paper's weights
    rows = [Row("logit KD only", "", {"distill.layer_map": "none"}),
            Row("forward hidden matching", "", {"distill.layer_map": "forward"}),
            Row("MiniLM qk+vv", "", {"distill.layer_map": "none", "distill.w_relation": 1.0,
                                     "relation.kinds": "qk+vv"}),
            Row("MiniLMv2 qq+kk+vv", "", {"distill.layer_map": "none", "distill.w_relation": 1.0,
                                          "relation.kinds": "qq+kk+vv"}),
            Row("TinyBERT attention MSE", "", {"distill.layer_map": "forward", "distill.w_hidden": 0.0,
                                               "distill.w_relation": 1.0, "relation.kinds": "qk",
                                               "relation.loss": "mse", "relation.layers": "map"})]
    base = {"student.init": "teacher", "distill.bridge": "auto", "distill.distance": "layer_select_bert",
            "distill.hidden_reduce": "mean", "distill.embeddings": True, "distill.w_task": 1.0,
            "distill.w_logit": 1.0, "distill.w_hidden": 3.0, "distill.temperature": 1.0}
    return Study("relation", "attention relations (MiniLM, MiniLMv2, TinyBERT) vs hidden-state matching vs logit "
                 "KD (papers.md: other baselines)", base, rows, baseline="logit KD only",
                 notes=["relation terms at weight 1 (the papers' own), beside CE 1 + KL 1 (T 1); MiniLM and "
                        "MiniLMv2 on the last layers, TinyBERT on every forward-mapped pair"])


STUDIES = (*GRIDS.names(), "seeded", "confirm")
"""Every study=: the fixed grids, `seeded` (a finished search's best vs the paper points it was seeded with) and
`confirm` (a finished search's top configurations rerun over fresh seeds)."""


def make_study(name: str, *, d_teacher: int, search_rows: list[Row] | None = None,
               search_base: dict[str, Any] | None = None) -> Study:
    """The grid of one study; widths come from the real teacher."""
    if name == "seeded":
        assert search_rows is not None and search_base is not None
        return Study(name, "a search's best strategy vs the paper settings it was seeded with", search_base,
                     search_rows, baseline=None)
    if name == "confirm":
        assert search_rows is not None and search_base is not None
        return Study(name, "a search's top configurations over fresh seeds: which lead is more than noise",
                     search_base, search_rows, baseline=None)
    if name not in GRIDS.names():
        raise ConfigError(f"study={name}: choose one of {', '.join(STUDIES)}")
    return GRIDS.get(name)(d_teacher)


def _ranked(uri: str, experiment: str, search: str) -> tuple[RunRecord, space_model.Space, dict[str, Any],
                                                               str, list[dict[str, Any]]]:
    """(parent run, the space as searched, its base config, the first objective, finished trials best first)."""
    parent = find_search(uri=uri, experiment=experiment, search=search)
    base = _search_base(parent)
    space = _as_searched(spaces.load_space(parent.tags.get("kdsearch.space", "")), parent, base)
    objectives = search_objectives(parent)
    metric = objectives[0].name
    ranked = [r for r in rank_rows(trial_rows(list_trials(uri=uri, experiment=experiment,
                                                           search_run_id=parent.run_id)),
                                   *objectives[0], then=objectives[1:])
              if r.get("rank") and r.get("status") == "FINISHED"]
    if not ranked:
        raise ConfigError(f"search={search}: no finished trial with a {metric} to take the best from")
    return parent, space, base, metric, ranked


def _point(space: space_model.Space, row: dict[str, Any]) -> dict[str, Any]:
    """A ranked trial's searched params, in the config's own types (MLflow logged strings)."""
    logged = {k: parse_value(str(row[k])) for k in space.params if k in row}
    typed = flatten(build_config(unflatten(logged)))
    return {k: typed[k] for k in logged}


def confirm_rows(*, uri: str, experiment: str, search: str, top: int) -> tuple[dict[str, Any], list[Row]]:
    """(the search's base config, rows): its `top` best distinct configurations, best first. A configuration
    several trials drew (a paper point and its twin) is one row."""
    _, space, base, metric, ranked = _ranked(uri, experiment, search)
    points: list[dict[str, Any]] = []
    for row in ranked:
        point = _point(space, row)
        if all(space_model.trial_config(space, point) != space_model.trial_config(space, p) for p in points):
            points.append(point)
            row["_point"] = point
        if len(points) == top:
            break
    chosen = [r for r in ranked if "_point" in r]
    rows = [Row(f"rank {i} ({r['trial']}, {metric} {float(r[metric]):.4f}): "
                f"{_describe(r['_point'], points) or 'the only configuration'}", "", r["_point"])
            for i, r in enumerate(chosen, 1)]
    return {**_flat(space.base), **base}, rows


def seeded_rows(*, uri: str, experiment: str, search: str) -> tuple[dict[str, Any], list[Row]]:
    """(the search's base config, rows): the best finished trial of `search` and the paper points it was seeded
    with. The base is what the search ran on (teacher, task, data, budget), so `search=` alone reproduces it."""
    _, space, base, metric, ranked = _ranked(uri, experiment, search)
    best = _point(space, ranked[0])
    tag = f"search best ({ranked[0]['trial']}, {metric} {float(ranked[0][metric]):.4f})"
    points = space_model.initial_points(space)
    rows, found = [], False
    for i, point in enumerate(points, 1):
        same = space_model.trial_config(space, point) == space_model.trial_config(space, best)
        found |= same  # the best may be a paper point itself: one row, not two identical grid cells
        name = f"paper {i}" + (f" = {tag}" if same else "")
        rows.append(Row(f"{name}: {_describe(point, [best, *points])}", "", dict(point)))
    if not found:
        rows.insert(0, Row(f"{tag}: {_describe(best, [best, *points])}", "", best))
    return {**_flat(space.base), **base}, rows


def _describe(point: dict[str, Any], among: list[dict[str, Any]]) -> str:
    """The point's values of the keys that tell the rows apart, e.g. `layer_map=forward, w_hidden=3`."""
    varying = [k for k in point if len({format_param(p.get(k)) for p in among}) > 1]
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k in varying for v in [point[k]])


def _search_base(parent: RunRecord) -> dict[str, Any]:
    """The search's own base config (teacher, task, data, budget as its command line set them), typed; {} for a
    search that logged none."""
    logged = {k.removeprefix("base."): None if v == "None" else parse_value(v)
              for k, v in parent.params.items() if k.startswith("base.")}
    return flatten(build_config(unflatten(logged))) if logged else {}


def _as_searched(space: space_model.Space, parent: RunRecord, base: dict[str, Any]) -> space_model.Space:
    """The space as the search ran it: params fixed on its command line (`student.init=teacher`) are fixed
    here too, at the search's value, so its paper points are the ones the search was seeded with."""
    searched = parent.tags.get(SEARCHED_TAG)
    if searched is None or not base:  # a search logged before the tag existed: take the space as shipped
        return space
    return spaces.apply_overrides(space, {k: base[k] for k in space.params if k not in searched.split(",")})


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def grid_space(study: Study, *, cli: dict[str, Any], seeds: list[int],
               concurrency: int | None) -> tuple[space_model.Space, Study]:
    """The study as a Space: every varied key (and train.seed) a categorical, the whole grid as its points.
    Also the study with each row completed over every varied key (so rows can be told apart by their params)."""
    keys = sorted({k for r in study.rows for k in r.overrides})
    base = merge(unflatten(dict(study.base)), cli)
    probe = space_model.Space(study.name, study.description, base, study.metric, "max", space_model.Budget(), {}, [])
    # each row's value of every varied key as its run's Config holds it (and MLflow logs it): a `1` typed on the
    # command line for a float key is 1.0 there, and must be 1.0 here for the trials to find their rows
    study = dataclasses.replace(study, rows=[dataclasses.replace(r, overrides=_typed(probe, r.overrides, keys))
                                             for r in study.rows])
    for i, row in enumerate(study.rows):  # identical cells would be run (and matched back) as one
        twin = next((r for r in study.rows[:i] if r.overrides == row.overrides), None)
        if twin is not None:
            raise ConfigError(f"study={study.name}: rows {twin.label!r} and {row.label!r} run the same config")
    points = [{**r.overrides, "train.seed": s} for r in study.rows for s in seeds]
    params = {k: space_model.Param(k, "categorical", choices=tuple(unique(p[k] for p in points)))
              for k in [*keys, "train.seed"]}
    epochs = int(space_model.base_value(probe, "train.epochs"))
    budget = space_model.Budget(num_samples=len(points), grace_period=epochs, max_concurrent_trials=concurrency)
    space = dataclasses.replace(probe, params=params, points_to_evaluate=points, budget=budget)
    spaces.validate(space)
    return absolute_paths(space), study


def _typed(probe: space_model.Space, overrides: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    flat = flatten(space_model.trial_config(probe, overrides))
    return {k: list(flat[k]) if isinstance(flat[k], tuple) else flat[k] for k in keys}


def unique(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if not any(space_model.same_value(v, o) for o in out):
            out.append(v)
    return out


def row_of(study: Study, params: dict[str, str]) -> Row | None:
    """The study row a trial ran (matched on its logged params)."""
    for row in study.rows:
        if all(params.get(k) == format_param(v) for k, v in row.overrides.items()):
            return row
    return None
