"""The command line's side of the config: `key=value` overrides and `config=<file>` YAML files, read into the
nested dicts that `kdsearch.config.parse.build_config` turns into a Config.

Imports OmegaConf (the dotted-list grammar) and PyYAML; no framework.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from kdsearch.config.parse import build_config, flatten, merge, nest
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError, require

CONFIG_FILE = "kdsearch_config.yaml"
"""An exported student's whole trial config, which `config=<file>` reads back."""


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+)$"),
    list("-+0123456789."),
)


def read_yaml(path: Path, where: str) -> Any:
    """A YAML file as YamlLoader reads it; a syntax error or a duplicate key is one ConfigError that starts with
    `where` (the key or file the user named)."""
    try:
        return yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_value(text: str) -> Any:
    """One logged or typed value as YAML reads it, `1e-05` as a float (MLflow logs small floats that way)."""
    return yaml.load(text, Loader=YamlLoader)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[1,2]"]` -> nested dict, values parsed as YAML.

    `task=sst2` is short for `task.name=sst2`, rewritten before parsing so that a `task.data_dir=...` beside it
    adds to the task instead of replacing it. `config=<file>` reads a YAML file of config keys first (an
    exported trial's `kdsearch_config.yaml`, say); the other overrides then apply on top of it.
    """
    for item in overrides:
        require("=" in item, f"{item!r}: overrides take the form key=value")
    files = [item.partition("=")[2] for item in overrides if item.startswith("config=")]
    items = [f"task.name={item[5:]}" if item.startswith("task=") and "{" not in item else item
             for item in overrides if not item.startswith("config=")]
    try:
        given: dict[str, Any] = OmegaConf.to_container(OmegaConf.from_dotlist(items))  # type: ignore[assignment]
    except Exception:  # OmegaConf/YAML grammar errors span lines: name the override that broke it, in one
        for item in items:
            try:
                OmegaConf.from_dotlist([item])
            except Exception as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ConfigError(f"{item!r}: cannot parse the value ({first}); a list is written [1,2,3], "
                                  "a string with spaces or commas in quotes") from None
        raise ConfigError(f"cannot parse overrides {overrides}") from None
    base: dict[str, Any] = {}
    for path in files:
        base = merge(base, read_config_file(path))
    return merge(base, given)


def read_config_file(path: str) -> dict[str, Any]:
    """`config=<path>`: a YAML mapping of config keys, nested or dotted (as a search space's `base`)."""
    file = Path(path).expanduser()
    require(file.is_file(), f"config={path}: no such file")
    data = read_yaml(file, f"config={path}")
    require(isinstance(data, dict), f"config={path}: expected a mapping of config keys (key: value)")
    try:
        return nest(data)
    except ConfigError as err:
        raise ConfigError(f"config={path}: {err}") from None


def load_config(overrides: list[str] | None = None, *, base: dict[str, Any] | None = None) -> Config:
    return build_config(merge(base or {}, parse_overrides(overrides or [])))


_LOCAL_KEYS = ("output_dir", "cache_dir", "storage_path")
"""Where a run ran, not what it ran: left out of a written config, so a rerun uses its own folders."""


def config_yaml(cfg: Config) -> str:
    """The whole config as dotted keys, what `config=<file>` reads back."""
    flat = {k: list(v) if isinstance(v, tuple) else v for k, v in flatten(cfg).items() if k not in _LOCAL_KEYS}
    return yaml.safe_dump(flat, sort_keys=False)


def write_config_file(cfg: Config, path: Path) -> Path:
    """Write `config_yaml(cfg)` beside a saved student, so `config=<path>` trains it again."""
    path.write_text(config_yaml(cfg))
    return path
