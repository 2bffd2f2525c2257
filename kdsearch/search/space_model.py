"""The search-space model: `Param`, `Budget`, `Space`, and how param values become a trial: `when` conditions,
point completion, trial configs and the Optuna define-by-run function.

Reading and validating `search_spaces/<name>.yaml` lives in `spaces`. Imports Optuna (for types) only, never
YAML or Ray.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdsearch.config.parse import build_config, flatten, merge, unflatten
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError

if TYPE_CHECKING:
    import optuna


def same_value(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 (YAML and Optuna both keep them apart)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    return bool(a == b)


@dataclass(frozen=True)
class Param:
    """One searched config key; `when` maps earlier params or config keys to the values that activate it."""

    name: str
    type: Literal["categorical", "int", "float"]
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def suggest(self, trial: optuna.trial.BaseTrial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """What `suggest` draws from: the record of a value found elsewhere (a warm start's earlier trial)."""
        import optuna

        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), step=int(self.step or 1),
                                                        log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, step=self.step, log=self.log)

    def parse(self, text: str) -> Any:
        """A value as MLflow logged it (a string) in this param's type; None when it is not one of its values."""
        if self.type == "categorical":
            return next((c for c in self.choices if str(c) == text or str(c).lower() == text.lower()), None)
        try:
            number = float(text)
        except ValueError:
            return None
        value = int(number) if self.type == "int" and number.is_integer() else number
        return value if self.contains(value) else None

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return any(same_value(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if self.type == "int" and not float(value).is_integer():
            return False
        return self.low <= value <= self.high

    def draw(self, rng: random.Random, where: Literal["low", "high", "any"] = "any") -> Any:
        """A value of the domain: its lower or upper end, or one at random (log-uniform for a log range)."""
        if self.type == "categorical":
            return self.choices[0] if where == "low" else self.choices[-1] if where == "high" else \
                rng.choice(self.choices)
        assert self.low is not None and self.high is not None
        if where != "any":
            value = self.low if where == "low" else self.high
        elif self.log:
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.type == "int":
            step = int(self.step or 1)
            return int(self.low) + step * round((value - self.low) / step)
        return value

    def domain(self) -> str:
        if self.type == "categorical":
            return f"one of {list(self.choices)}"
        return f"[{self.low}, {self.high}]" + (" (log)" if self.log else "")


@dataclass(frozen=True)
class Budget:
    """How many trials and how ASHA cuts them (time_attr: epochs)."""

    num_samples: int = 16
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None
    """None: the driver derives it from the cluster's resources and the per-trial request."""
    time_budget_s: float | None = None


@dataclass(frozen=True)
class Space:
    name: str
    description: str
    base: dict[str, Any]
    """Nested config (kdsearch.config.schema.Config keys) applied to every trial."""
    metric: str
    mode: Literal["max", "min"]
    budget: Budget
    params: dict[str, Param]
    """In suggestion order: a `when` reads only earlier params."""
    points_to_evaluate: list[dict[str, Any]]
    """As written in the YAML (keys are params); `initial_points` completes them."""
    source: Path | None = None


# ---------------------------------------------------------------- conditions, define-by-run, trial configs


def base_value(space: Space, key: str, given: Mapping[str, Any] | None = None) -> Any:
    """A dotted key's fixed value: from base, else the default of the config that base and the params `given`
    so far make (a default can depend on them: train.lr on the teacher and student.init)."""
    node: Any = space.base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            try:
                return flatten(build_config(merge(space.base, unflatten(dict(given or {})))))[key]
            except ConfigError:
                return flatten(Config())[key]
        node = node[part]
    return node


def is_active(space: Space, param: Param, values: Mapping[str, Any]) -> bool:
    """True when every `when` condition holds. A condition on a param reads its suggested value in `values`
    (a param that was itself skipped makes its dependents inactive); on a config key it reads the base."""
    for key, allowed in param.when.items():
        if key in space.params:
            if key not in values:
                return False
            value = values[key]
        else:
            value = base_value(space, key)
        if not any(same_value(value, a) for a in allowed):
            return False
    return True


class DefineByRun:
    """The Optuna define-by-run function of a space: suggests the active params in order, computes nothing,
    returns None (Ray's OptunaSearch would merge a returned dict into every trial's config, flat).
    A class, not a closure, so that Tune can pickle the searcher with the experiment state."""

    def __init__(self, space: Space) -> None:
        self.space = space

    def __call__(self, trial: optuna.trial.BaseTrial) -> None:
        values: dict[str, Any] = {}
        for name, param in self.space.params.items():
            if is_active(self.space, param, values):
                values[name] = param.suggest(trial)


def define_by_run(space: Space) -> Callable[[optuna.trial.BaseTrial], None]:
    return DefineByRun(space)


def probe_params(space: Space, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`n` trials' params as the define-by-run function could draw them: every range at its lower end, at its
    upper end, then at random; conditional params only where active. For checking a space before a search."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        where: Literal["low", "high", "any"] = "low" if i == 0 else "high" if i == 1 else "any"
        values: dict[str, Any] = {}
        for name, param in space.params.items():
            if is_active(space, param, values):
                values[name] = param.draw(rng, where)
        out.append(values)
    return out


def complete_point(space: Space, point: Mapping[str, Any]) -> dict[str, Any]:
    """A point with every active param it leaves out set to the base/default value when that lies in the
    param's range; params with no such value stay out (the sampler draws them). Inactive keys are dropped."""
    out: dict[str, Any] = {}
    for name, param in space.params.items():
        if not is_active(space, param, out):
            continue
        if name in point:
            out[name] = point[name]
        elif param.contains(default := base_value(space, name, out)):
            out[name] = default
    return out


def known_point(space: Space, logged: Mapping[str, str]) -> dict[str, Any] | None:
    """The space's active params as an earlier trial logged its whole config (MLflow's strings); None when one of
    them is missing there or lies outside this space (another range, a choice it lacks)."""
    values: dict[str, Any] = {}
    for name, param in space.params.items():
        if not is_active(space, param, values):
            continue
        value = param.parse(logged[name]) if name in logged else None
        if value is None:
            return None
        values[name] = value
    return values


def warm_storage(space: Space, known: Sequence[tuple[dict[str, Any], list[float]]], modes: Sequence[str],
                 study_name: str) -> optuna.storages.BaseStorage:
    """An Optuna storage holding one study of completed trials (params, objective values): OptunaSearch loads it
    by name, so its sampler starts from what an earlier search learnt instead of from nothing."""
    import optuna

    storage = optuna.storages.InMemoryStorage()
    directions: list[Literal["maximize", "minimize"]] = ["maximize" if m == "max" else "minimize" for m in modes]
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions)
    for params, values in known:
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={n: space.params[n].distribution() for n in params}, values=values))
    return storage


def initial_points(space: Space) -> list[dict[str, Any]]:
    """The papers' settings, completed: pass these as OptunaSearch(points_to_evaluate=...)."""
    return [complete_point(space, p) for p in space.points_to_evaluate]


def trial_overrides(space: Space, params: Mapping[str, Any]) -> dict[str, Any]:
    """base + the trial's params (flat dotted keys as Optuna/Ray give them, or nested) as one nested dict."""
    return merge(copy.deepcopy(space.base), unflatten(dict(params)))


def trial_config(space: Space, params: Mapping[str, Any]) -> Config:
    return build_config(trial_overrides(space, params))


def max_epochs(space: Space) -> int:
    """The most epochs any trial runs: ASHA's max_t (train.epochs may be searched)."""
    param = space.params.get("train.epochs")
    if param is None:
        return int(base_value(space, "train.epochs"))
    return int(max(param.choices) if param.type == "categorical" else param.high)  # type: ignore[arg-type]

