"""Search settings of `python -m kdsearch.tune`: which space, how it is changed, where results go.

Parses the command line into a validated `SearchSettings` plus the adjusted `Space`, checks every trial
config it can know in advance (the papers' points, the base) and renders the dry run. No Ray import.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdsearch.config.overrides import parse_overrides
from kdsearch.config.parse import flatten
from kdsearch.config.paths import check_writable, output_path, output_uri
from kdsearch.config.schema import rate_defaults
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.data.metrics import GENERATION_METRICS, generation_metric_names
from kdsearch.data.tasks import TaskSpec
from kdsearch.run.loop import reported_metrics
from kdsearch.run.validate import check_names, validate
from kdsearch.search import space_model, spaces
from kdsearch.search.ranking import parse_objectives
from kdsearch.tracking import DEFAULT_EXPERIMENT, check_tracking_uri, default_uri

DEFAULT_SPACE = "layer_select"


@dataclass(frozen=True)
class SearchSettings:
    space: str = DEFAULT_SPACE
    """A shipped space name (search_spaces/<name>.yaml) or a path to a YAML file."""
    name: str | None = None
    """Search name: the Tune experiment, the MLflow parent run; None = kdsearch-<space> (-smoke with smoke=true)."""
    smoke: bool = False
    """Shrink the search to a tiny model, a few steps and 2-3 trials (check a cluster or a config)."""
    resume: bool = False
    """Continue an interrupted search of the same name; finished trials are not rerun."""
    confirm: int = 0
    """After the search: rerun its best `confirm` distinct configurations over `confirm_seeds` fresh seeds
    (study=confirm: mean, 95% interval, which leads are within noise); 0 = none."""
    confirm_seeds: int = 3
    """Fresh seeds (1..n) per confirmed configuration."""
    warm_start: str | None = None
    """An earlier search (name or parent run id, same store and experiment) whose finished trials the sampler is
    given before the first new trial."""
    dry_run: bool = False
    """Make every check a real run makes (the tracking store is read, not written), print the resolved search,
    start nothing."""
    objectives: tuple[str, ...] = ()
    """Multi-objective, e.g. [eval_score:max,student_params:min]; empty = the space's metric and mode."""
    sampler_seed: int = 0
    """Seed of the Optuna sampler (train.seed seeds each trial's run)."""
    tracking_uri: str = field(default_factory=default_uri, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """MLflow store: `tracking.uri=`, else $MLFLOW_TRACKING_URI (clusters), else sqlite:///mlflow.db."""
    experiment: str = field(default=DEFAULT_EXPERIMENT, metadata={"key": "tracking.experiment"})
    """MLflow experiment."""
    results_dir: str = "outputs/search"
    """Local folder for Tune results (when storage_path is not set), the leaderboard and the best student."""

    @property
    def search_name(self) -> str:
        return self.name or f"kdsearch-{Path(self.space).stem}{'-smoke' if self.smoke else ''}"


_SEARCH_KEYS = {"space", "name", "smoke", "resume", "dry_run", "objectives", "sampler_seed", "warm_start", "confirm",
                "confirm_seeds"}


def space_help_rows() -> list[tuple[str, str]]:
    """`--help` rows for the keys a search passes on to its space."""
    return [(f"{'|'.join(spaces.BUDGET_KEYS[:2])}|...", f"the space's budget: {', '.join(spaces.BUDGET_KEYS)}"),
            ("metric=<name> mode=max|min", "the space's objective")]


def parse_search_args(argv: list[str]) -> tuple[SearchSettings, space_model.Space]:
    """Command line -> (settings, adjusted space); one ConfigError line for anything wrong."""
    raw = parse_overrides(argv)
    tracking = raw.pop("tracking", {}) or {}
    if not isinstance(tracking, dict) or set(tracking) - {"uri", "experiment"}:
        raise ConfigError(f"tracking: known keys are tracking.uri and tracking.experiment (got {tracking})")
    settings_kw: dict[str, Any] = {k: raw.pop(k) for k in list(raw) if k in _SEARCH_KEYS}
    _check_setting_types(settings_kw, tracking, raw.get("results_dir", "outputs/search"))
    if "name" in settings_kw:
        settings_kw["name"] = str(settings_kw["name"])
    if "objectives" in settings_kw:
        value = settings_kw["objectives"]
        settings_kw["objectives"] = tuple(value if isinstance(value, list) else str(value).split(","))
    if "uri" in tracking:
        settings_kw["tracking_uri"] = str(tracking["uri"])
    settings = SearchSettings(**settings_kw, results_dir=output_path(str(raw.pop("results_dir", "outputs/search"))),
                              experiment=str(tracking.get("experiment", DEFAULT_EXPERIMENT)))
    settings = dataclasses.replace(settings, tracking_uri=output_uri(settings.tracking_uri))
    check_writable(settings.results_dir, f"results_dir={settings.results_dir}")
    space = spaces.load_space(settings.space)
    if settings.smoke:
        space = spaces.smoke(space)
    if raw:
        space = spaces.apply_overrides(space, raw, commands=[*_SEARCH_KEYS, "results_dir", "tracking.uri",
                                                              "tracking.experiment"])
    for objective in settings.objectives:
        parse_objectives(objective)
    return settings, absolute_paths(space)


_FLAGS = ("smoke", "resume", "dry_run")


def _check_setting_types(given: dict[str, Any], tracking: dict[str, Any], results_dir: Any) -> None:
    """The search's own keys, typed: a wrong one would otherwise fail after Ray has started (a float seed in
    Optuna's sampler) or do something else than asked (smoke=maybe read as true, results_dir= as ./None)."""
    for key in _FLAGS:
        if key in given and not isinstance(given[key], bool):
            raise ConfigError(f"{key}={given[key]}: expected true or false")
    if "sampler_seed" in given and (isinstance(given["sampler_seed"], bool) or
                                    not isinstance(given["sampler_seed"], int)):
        raise ConfigError(f"sampler_seed={given['sampler_seed']}: expected an integer")
    for key, low in (("confirm", 0), ("confirm_seeds", 2)):
        value = given.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key}={value}: expected an integer >= {low}" +
                              (" (an interval needs two seeds)" if key == "confirm_seeds" else ""))
    if "warm_start" in given and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(given["warm_start"] or "")):
        raise ConfigError(f"warm_start={given['warm_start'] or ''}: name an earlier search (or its parent run id)")
    if "name" in given and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(given["name"] or "")):
        raise ConfigError(f"name={given['name'] or ''}: a search name is letters, digits, '_', '.' and '-', "
                          "starting with a letter or digit")
    for key, value in (("space", given.get("space", DEFAULT_SPACE)), ("results_dir", results_dir),
                       ("tracking.uri", tracking.get("uri", "-")),
                       ("tracking.experiment", tracking.get("experiment", "-"))):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}={value if value is not None else ''}: expected a non-empty string")


def absolute_paths(space: space_model.Space) -> space_model.Space:
    """Resolve relative local paths in the driver: Tune runs each trial in its own working directory."""
    fixed: dict[str, Any] = {}
    for key in ("cache_dir", "output_dir", "task.data_dir", "teacher", "storage_path"):
        value = space_model.base_value(space, key)
        if isinstance(value, str) and "://" not in value and (key != "teacher" or Path(value).exists()):
            inputs = key in ("task.data_dir", "teacher")
            fixed[key] = str(Path(value).expanduser().resolve()) if inputs else output_path(value)
    return spaces.apply_overrides(space, fixed)


def objectives_of(settings: SearchSettings, space: space_model.Space) -> list[tuple[str, str]]:
    if settings.objectives:
        return [(o.name, o.mode) for text in settings.objectives for o in parse_objectives(text)]
    return [(space.metric, space.mode)]


def check_choices(space: space_model.Space) -> None:
    """Each categorical choice, on its own, is a value its key takes (a type, a known strategy name): a typo in
    a space's list would otherwise fail only the trials that draw it."""
    for name, param in space.params.items():
        for choice in param.choices if param.type == "categorical" else ():
            try:
                check_names(space_model.trial_config(space, {name: choice}))
            except ConfigError as err:
                raise ConfigError(f"space {space.name}: {name} choice {choice!r}: {err}") from None


def check_search(settings: SearchSettings, space: space_model.Space) -> None:
    """Everything checkable before ray.init: the base config, each categorical choice, the objectives, every paper
    point, the store."""
    base = space_model.trial_config(space, {})
    spec = validate(base)
    check_choices(space)
    check_objectives(settings, space, spec)
    for point in space_model.initial_points(space):
        validate(space_model.trial_config(space, point))
    check_tracking_uri(settings.tracking_uri)


def check_objectives(settings: SearchSettings, space: space_model.Space, spec: TaskSpec) -> None:
    """Every trial reports each ranked metric, at every epoch ASHA may stop it. Checked on the task as validated
    and again once its rows are read (a hub split's columns say only then whether its rows have responses)."""
    base = space_model.trial_config(space, {})
    known = reported_metrics(spec)
    generated = {f"eval_{name}" for name in generation_metric_names(spec)}
    for name, _ in objectives_of(settings, space):
        key = f"objectives={','.join(settings.objectives)}" if settings.objectives else f"metric={name}"
        if name not in known and name.removeprefix("eval_") in GENERATION_METRICS:
            raise ConfigError(f"{key}: no trial reports {name}, which scores generated outputs: an encoder-decoder "
                              "teacher on a seq2seq task, or a causal LM on prompt -> response rows (task.name="
                              f"{spec.name} with teacher={base.teacher} generates nothing)")
        if name not in known:
            raise ConfigError(f"{key}: no trial reports {name}{did_you_mean(name, known)} "
                              f"(reported: {', '.join(known)})")
        if name in generated and base.eval.generate_every != 1:
            raise ConfigError(f"{key}: {name} is scored only every eval.generate_every={base.eval.generate_every} "
                              "epochs, but ASHA stops and ranks trials at any epoch: set eval.generate_every=1")


PROBES = 32
"""Random trials drawn from a space before a search, to warn of combinations its trials would fail on."""


def probe_space(space: space_model.Space, n: int = PROBES) -> str | None:
    """One warning line when some of `n` drawn trials fail validation (each param's ends, then at random), else
    None; ConfigError when all do. A combination of valid values can still be invalid (a unit ratio above a
    narrow student's share): such trials fail in the search, which goes on; the warning says so before any runs."""
    failed: list[tuple[dict[str, Any], str]] = []
    for params in space_model.probe_params(space, n):
        try:
            validate(space_model.trial_config(space, params))
        except ConfigError as err:
            failed.append((params, str(err)))
    if not failed:
        return None
    params, reason = failed[0]
    if len(failed) == n:
        raise ConfigError(f"space {space.name}: every one of {n} trials drawn from it fails validation, e.g. {reason}")
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return (f"warning: {len(failed)} of {n} trials drawn from space {space.name} would fail validation, e.g. "
            f"{shown}: {reason}. Such trials end FAILED and the search goes on; narrow the ranges or add `when`.")


def render_dry_run(settings: SearchSettings, space: space_model.Space) -> str:
    """The resolved search as YAML: settings, objectives, budget, then one line per param and per paper point
    (written as in a space file), then every key of the base config."""
    def flow(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()

    base_cfg = space_model.trial_config(space, {})
    base = flatten(base_cfg)
    cli_names = {"tracking_uri": "tracking.uri", "experiment": "tracking.experiment"}  # as they are typed
    shown = {cli_names.get(k, k): v for k, v in dataclasses.asdict(settings).items()}
    head = {"search": shown | {"search_name": settings.search_name},
            "objectives": [f"{m}:{d}" for m, d in objectives_of(settings, space)],
            "budget": dataclasses.asdict(space.budget),
            "rates": rate_defaults(base_cfg.teacher, base_cfg.student.init) + "; keys set in base or params win"}
    params = [f"  {name}: {flow(_param_fields(p))}" for name, p in space.params.items()]
    points = [f"  - {flow(point)}" for point in space_model.initial_points(space)]
    tail = {"base_config": {k: list(v) if isinstance(v, tuple) else v for k, v in base.items()}}
    return "\n".join([yaml.safe_dump(head, sort_keys=False).rstrip(), "params:", *params,
                      "points_to_evaluate:" + ("" if points else " []"), *points,
                      yaml.safe_dump(tail, sort_keys=False).rstrip()]) + "\n"


def _param_fields(param: space_model.Param) -> dict[str, Any]:
    # unset fields left out; `is`, not ==, so that low: 0.0 stays (0.0 == False)
    fields = {k: v for k, v in dataclasses.asdict(param).items()
              if k != "name" and v is not None and v is not False and v != {} and v != ()}
    if "choices" in fields:
        fields["choices"] = list(fields["choices"])
    if "when" in fields:
        fields["when"] = {k: list(v) for k, v in fields["when"].items()}
    return fields
