"""Search spaces: `search_spaces/<name>.yaml` -> validated `Space` (defined in `space_model`); CLI overrides, smoke.

A space is data: a fixed `base` config, ordered `params` (dotted config keys, optionally conditional through
`when`), the papers' settings as `points_to_evaluate`, the metric, mode and budget. Every check runs at load,
before Ray starts. Imports YAML only, never Optuna or Ray.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdsearch.config.overrides import read_yaml
from kdsearch.config.parse import build_config, config_keys, merge, nest, unflatten
from kdsearch.core.errors import ConfigError, did_you_mean
from kdsearch.data.tasks import TASKS
from kdsearch.search.space_model import Budget, Param, Space, base_value, complete_point, max_epochs, trial_config

SPACES_DIR = "search_spaces"
"""Folder, relative to the working directory, searched before the spaces shipped in the package."""
PACKAGED_SPACES = Path(__file__).parents[1] / "spaces"
PARAM_TYPES = ("categorical", "int", "float")
BUDGET_KEYS = ("num_samples", "grace_period", "reduction_factor", "max_concurrent_trials", "time_budget_s")
_TOP_KEYS = ("description", "base", "metric", "mode", "budget", "params", "points_to_evaluate")
_PARAM_KEYS = ("type", "choices", "low", "high", "step", "log", "when")
_SMOKE = {"teacher": "tiny-bert", "task.name": "default", "task.data_dir": None, "task.hub": None,
          "task.train_size": 256, "task.eval_size": 128, "train.epochs": 2, "train.max_steps_per_epoch": 4,
          "finetune.epochs": 1, "ted.stage1_epochs": 1}

_EITHER = {"student.hidden_size": "student.width_ratio", "student.width_ratio": "student.hidden_size",
           "ted.width": "ted.width_ratio", "ted.width_ratio": "ted.width"}
"""Config keys that say one thing two ways (absolute, or relative to the teacher): a config takes one of each."""


# ---------------------------------------------------------------- reading YAML


def available_spaces() -> list[str]:
    """Names found in ./search_spaces and in the package."""
    folders = (Path.cwd() / SPACES_DIR, PACKAGED_SPACES)
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def find_space(name: str | Path) -> Path:
    """A path to a .yaml as given, else ./search_spaces/<name>.yaml, else the package's own copy."""
    text = str(name)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"space={text}: no such file")
        return path
    for folder in (Path.cwd() / SPACES_DIR, PACKAGED_SPACES):
        if (folder / f"{text}.yaml").is_file():
            return folder / f"{text}.yaml"
    names = available_spaces()
    raise ConfigError(f"space={text}: unknown space{did_you_mean(text, names)}; "
                      f"shipped: {', '.join(names)} (or give a path to a .yaml)")


def load_space(name_or_path: str | Path) -> Space:
    """Read and validate a space; every error is one line naming the file and the key."""
    path = find_space(name_or_path)
    return _parse(read_yaml(path, str(path)), name=path.stem, source=path)


# ---------------------------------------------------------------- parsing and validation


def _nested(data: Any, where: str) -> dict[str, Any]:
    """`base` may mix nested keys and dotted keys (`train.lr: 1e-3`)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys")
    try:
        return nest(data)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _parse(raw: Any, *, name: str, source: Path | None) -> Space:
    where = str(source or name)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a space is a mapping with keys {', '.join(_TOP_KEYS)}")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{did_you_mean(str(key), list(_TOP_KEYS))}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError(f"{where}: budget: expected a mapping with keys {', '.join(BUDGET_KEYS)}")
    for key in budget:
        if key not in BUDGET_KEYS:
            raise ConfigError(f"{where}: budget.{key}: unknown{did_you_mean(str(key), list(BUDGET_KEYS))}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: params: a space needs at least one parameter")
    points = raw.get("points_to_evaluate") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"{where}: points_to_evaluate: expected a list of mappings")
    space = Space(
        name=name, description=str(raw.get("description") or ""),
        base=_nested(raw.get("base"), f"{where}: base"),
        metric=str(raw.get("metric", "eval_score")), mode=raw.get("mode", "max"), budget=Budget(**budget),
        params={str(k): _parse_param(str(k), v, where) for k, v in params.items()},
        points_to_evaluate=[dict(p) for p in points], source=source,
    )
    validate(space)
    return space


def _parse_param(key: str, spec: Any, where: str) -> Param:
    at = f"{where}: params.{key}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: expected a mapping such as {{type: float, low: 0.1, high: 10.0}}")
    for k in spec:
        if k not in _PARAM_KEYS:
            raise ConfigError(f"{at}: unknown field {k!r}{did_you_mean(str(k), list(_PARAM_KEYS))}")
    if "type" not in spec:
        raise ConfigError(f"{at}: give a type: {', '.join(PARAM_TYPES)}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{at}: when: expected a mapping such as {{distill.bridge: [ted]}}")
    when = {str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()}
    fields = {k: v for k, v in spec.items() if k != "when"}
    if isinstance(fields.get("choices"), list):
        fields["choices"] = tuple(fields["choices"])
    try:
        return Param(name=key, when=when, **fields)
    except TypeError as err:
        raise ConfigError(f"{at}: {err}") from None


def _check_param(param: Param, at: str) -> None:
    if param.type not in PARAM_TYPES:
        raise ConfigError(f"{at}: unknown type {param.type!r}; choose one of {', '.join(PARAM_TYPES)}")
    if param.type == "categorical":
        if not isinstance(param.choices, tuple) or not param.choices:
            raise ConfigError(f"{at}: choices: give a non-empty list")
        if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in param.choices):
            raise ConfigError(f"{at}: choices must be strings, numbers, booleans or null")
        if len({repr(c) for c in param.choices}) < len(param.choices):
            raise ConfigError(f"{at}: choices repeat a value")
        if param.low is not None or param.high is not None or param.step is not None or param.log:
            raise ConfigError(f"{at}: a categorical takes choices, not low/high/step/log")
        return
    number = (int,) if param.type == "int" else (int, float)
    for k in ("low", "high", "step"):
        value = getattr(param, k)
        if (value is not None or k != "step") and (isinstance(value, bool) or not isinstance(value, number)):
            kind = "an int" if param.type == "int" else "a number"
            raise ConfigError(f"{at}: {k}={value!r}: expected {kind}")
    assert param.low is not None and param.high is not None
    if param.choices:
        raise ConfigError(f"{at}: an {param.type} takes low/high, not choices")
    if param.low >= param.high:
        raise ConfigError(f"{at}: low={param.low} must be < high={param.high}")
    if param.log and param.low <= 0:
        raise ConfigError(f"{at}: a log range needs low > 0 (got low={param.low})")
    if not isinstance(param.log, bool):
        raise ConfigError(f"{at}: log={param.log!r}: expected true or false")
    if param.step is not None and (param.step <= 0 or param.log):
        raise ConfigError(f"{at}: step must be > 0 and cannot be combined with log")


def _check_when(space: Space, param: Param, earlier: list[str], at: str) -> None:
    keys = config_keys()
    for key, values in param.when.items():
        if key in space.params and key not in earlier:
            raise ConfigError(f"{at}: when: {key} is searched after {param.name}; list {key} first")
        if key not in space.params and key not in keys:
            raise ConfigError(f"{at}: when: {key} is neither an earlier param nor a config key"
                              f"{did_you_mean(key, earlier + keys)}")
        if not values:
            raise ConfigError(f"{at}: when: {key}: give at least one value")
        cond = space.params.get(key)
        for value in values:
            if cond is not None and not cond.contains(value):
                close = did_you_mean(str(value), [str(c) for c in cond.choices])
                raise ConfigError(f"{at}: when: {key}={value} never happens: {key} is {cond.domain()}{close}")


def validate(space: Space) -> None:
    """Every check that needs no model: names, ranges, conditions, points, budget, base and trial configs."""
    where = str(space.source or space.name)
    if space.mode not in ("max", "min"):
        raise ConfigError(f"{where}: mode={space.mode}: choose max or min")
    _check_budget(space.budget, where)
    try:
        build_config(space.base)
    except ConfigError as err:
        raise ConfigError(f"{where}: base: {err}") from None
    if space.budget.grace_period > max_epochs(space):  # ASHA would refuse it once Ray has started
        raise ConfigError(f"{where}: grace_period={space.budget.grace_period} exceeds the most epochs a trial "
                          f"runs ({max_epochs(space)}, train.epochs); lower it or raise train.epochs")
    keys = config_keys()
    for position, (name, param) in enumerate(space.params.items()):
        at = f"{where}: params.{name}"
        if name not in keys:
            raise ConfigError(f"{at}: names no config field{did_you_mean(name, keys)}")
        _check_param(param, at)
        _check_when(space, param, list(space.params)[:position], at)
        values = param.choices if param.type == "categorical" else (param.low, param.high)
        for value in values:
            try:
                trial_config(space, {name: value})
            except ConfigError as err:
                raise ConfigError(f"{at}: value {value!r} is not a valid config: {err}") from None
    for i, point in enumerate(space.points_to_evaluate):
        _check_point(space, point, f"{where}: points_to_evaluate[{i}]")


def _check_budget(budget: Budget, where: str | None) -> None:
    """`where` prefixes the message (a space file); None: the user typed the key on the command line."""
    at = f"{where}: budget." if where else ""
    for key, minimum in (("num_samples", 1), ("grace_period", 1), ("reduction_factor", 2),
                         ("max_concurrent_trials", 1)):
        value = getattr(budget, key)
        if value is None and key == "max_concurrent_trials":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{at}{key}={value}: must be an int >= {minimum}")
    value = budget.time_budget_s
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise ConfigError(f"{at}time_budget_s={value}: must be > 0 (or null for no limit)")


def _check_point(space: Space, point: dict[str, Any], at: str) -> None:
    names = list(space.params)
    for key, value in point.items():
        if key not in space.params:
            why = "a fixed config key: put it in base" if key in config_keys() else "not a searched param"
            raise ConfigError(f"{at}: {key} is {why}{did_you_mean(str(key), names)}")
        if not space.params[key].contains(value):
            raise ConfigError(f"{at}: {key}={value!r} is outside the space: {space.params[key].domain()}")
    full = complete_point(space, point)
    for key in point:
        if key not in full:
            conds = ", ".join(f"{k} in {list(v)}" for k, v in space.params[key].when.items())
            raise ConfigError(f"{at}: {key} is inactive in this point (it needs {conds})")
    try:
        trial_config(space, full)
    except ConfigError as err:
        raise ConfigError(f"{at}: {err}") from None



# ---------------------------------------------------------------- CLI overrides and smoke runs


def _flat_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    keys = set(config_keys())
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in keys:
            out.update(_flat_overrides(value, full + "."))
        else:
            out[full] = value
    return out


def apply_overrides(space: Space, overrides: Mapping[str, Any], *, commands: Sequence[str] = ()) -> Space:
    """CLI `key=value`s, flat dotted or nested: config keys go into base and stop being searched; budget
    keys (`num_samples=40`, `budget.num_samples=40`) into the budget; `metric`/`mode` replace theirs.
    `task=sst2` is short for `task.name=sst2`. `commands`: the calling command's own keys, for did-you-mean."""
    keys = config_keys()
    base, budget = copy.deepcopy(space.base), dataclasses.asdict(space.budget)
    params = dict(space.params)
    top: dict[str, Any] = {"metric": space.metric, "mode": space.mode}
    for key, value in _flat_overrides(overrides).items():
        key = key.removeprefix("budget.")
        if f"{key}.name" in keys and not isinstance(value, dict):
            key = f"{key}.name"
        if key in BUDGET_KEYS:
            budget[key] = value
        elif key in top:
            top[key] = value
        elif key in keys:
            base = merge(base, unflatten({key: value}))
            params.pop(key, None)
            if key in _EITHER and value is not None:  # an absolute width replaces the space's ratio, and back
                other = _EITHER[key]
                base = merge(base, unflatten({other: None}))
                params.pop(other, None)
                # a param searched only at some value of the replaced key (student.init at width_ratio null,
                # "the teacher's width") has lost what it depends on: it takes its base value
                for name in [n for n, p in params.items() if other in p.when]:
                    params.pop(name)
        else:
            raise ConfigError(f"{key}={value}: no such config or budget key"
                              f"{did_you_mean(key, [*keys, *BUDGET_KEYS, *commands])}")
    # The space file passed these checks when it loaded: a failure now is the override's, named as typed.
    _check_budget(Budget(**budget), where=None)
    build_config(base)
    raw_points = [{k: v for k, v in p.items() if k in params} for p in space.points_to_evaluate]
    space = dataclasses.replace(space, base=base, budget=Budget(**budget), params=params,
                                metric=str(top["metric"]), mode=top["mode"], points_to_evaluate=[])
    # A fixed param can switch others off (distill.bridge=projector): drop what became inactive.
    points = [{k: v for k, v in complete_point(space, p).items() if k in p} for p in raw_points]
    space = dataclasses.replace(space, points_to_evaluate=[p for i, p in enumerate(points)
                                                          if p and p not in points[:i]])
    if not space.params:
        raise ConfigError(f"{', '.join(sorted(_flat_overrides(overrides)))}: these fix every param the space "
                          "searches, which leaves nothing to search; `python -m kdsearch.train` runs one config")
    validate(space)
    return space


def smoke(space: Space) -> Space:
    """The same search shrunk to a tiny model, a few steps and 2-3 trials; params and conditions stay."""
    overrides: dict[str, Any] = dict(_SMOKE)
    task = base_value(space, "task.name")
    if task in TASKS and TASKS[task].kind == "seq2seq":  # an encoder-decoder space stays one: tiny-t5 or tiny-bart
        teacher = base_value(space, "teacher")
        overrides.update({"teacher": teacher if teacher in ("tiny-t5", "tiny-bart") else "tiny-t5",
                          "task.name": "seq2seq_default"})
    if task in TASKS and TASKS[task].kind == "extractive_qa":  # a QA space stays one, on an embedded QA task
        overrides["task.name"] = task if task in ("qa_default", "qa_default_v2") else "qa_default"
    width = base_value(space, "student.hidden_size")
    if base_value(space, "teacher") != "tiny-bert" and width is not None and width >= 64:
        # a student sized for a bigger teacher: keep it narrower than tiny-bert's 64 units
        overrides.update({"student.hidden_size": 32, "student.init": "random"})
    if base_value(space, "student.layers") > 2:
        overrides["student.layers"] = 2
    overrides["num_samples"] = min(space.budget.num_samples, 3)
    overrides["grace_period"] = 1
    return apply_overrides(space, overrides)
