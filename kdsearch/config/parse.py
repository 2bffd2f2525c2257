"""Nested dicts <-> typed Config: dotted keys, merging, and the did-you-mean on unknown keys."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError, did_you_mean, require


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dataclass -> {dotted key: value}; the names MLflow params and search spaces use."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def config_keys(cls: type = Config) -> list[str]:
    return list(flatten(cls()).keys())


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` asks for, or one ConfigError line naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if len(args) < len(typing.get_args(hint)):
                return None
        return coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(hint)
        require(value in choices, f"{key}={value}: choose one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        require(isinstance(value, (list, tuple)), f"{key}={value}: expected a list such as [1,2,3]")
        return tuple(coerce(v, typing.get_args(hint)[0], key) for v in value)
    if hint is bool:
        require(isinstance(value, bool), f"{key}={value}: expected true or false")
        return value
    if hint in (int, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok and (hint is float or float(value).is_integer()), f"{key}={value}: expected {hint.__name__}")
        require(math.isfinite(value), f"{key}={value}: expected a finite number")
        return hint(value)
    if hint is str:
        return str(value)
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str, all_keys: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key == "tracking":  # the search's and the analyses' key, not a run's
            raise ConfigError("tracking.*: a run logs no MLflow runs of its own; tracking.uri and "
                              "tracking.experiment belong to kdsearch.tune, report, analyze and evaluate")
        if name not in names:
            raise ConfigError(f"{key}: no such config key{did_you_mean(key, all_keys)}")
        if dataclasses.is_dataclass(hints[name]):
            require(isinstance(value, dict), f"{key}={value}: expected keys under {key}.")
            kwargs[name] = _build(hints[name], value, key + ".", all_keys)
        else:
            kwargs[name] = coerce(value, hints[name], key)
    return cls(**kwargs)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _leaves(nested: dict[str, Any], prefix: str = "") -> list[str]:
    return [leaf for key, value in nested.items()
            for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])]


def nest(data: dict[str, Any]) -> dict[str, Any]:
    """A mapping that mixes nested and dotted keys (`train: {lr: ..}`, `train.lr: ..`) -> one nested dict; a key
    given both ways is a ConfigError, not a silent choice of one."""
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for key, value in data.items():
        part = unflatten({str(key): value})
        twice = seen & set(_leaves(part))
        require(not twice, f"{min(twice, default='')}: given twice (nested and dotted); keep one")
        seen |= set(_leaves(part))
        out = merge(out, part)
    return out


def build_config(data: dict[str, Any]) -> Config:
    """Nested dict -> validated Config; unknown keys get a did-you-mean."""
    return _build(Config, data, "", config_keys())
