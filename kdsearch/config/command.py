"""Every command's skeleton: its own settings (a frozen dataclass, each field documented) read with the config's
grammar and did-you-mean, its `--help`, one line per error, and its exit status (0 done, 1 failed, 2 bad input,
130 interrupted). A command is a `Command`; `python -m kdsearch.<name>` calls `run_command` on it.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from kdsearch.config.parse import coerce
from kdsearch.config.usage import command_help, field_docs, shown, wants_help
from kdsearch.core.console import INTERRUPTED, quiet_libraries
from kdsearch.core.errors import ConfigError, did_you_mean, require

BAD_INPUT = 2


def setting_key(field: dataclasses.Field) -> str:
    """The key a setting is typed as: its field name, or `metadata["key"]` (`tracking.uri` for tracking_uri)."""
    return field.metadata.get("key", field.name)


def setting_keys(settings: type) -> list[str]:
    return [setting_key(f) for f in dataclasses.fields(settings)]


def _value(key: str, text: str) -> Any:
    """A typed value as the config reads it: YAML scalars and lists (`true`, `3`, `[a,b]`, `null`)."""
    try:
        parsed: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))
        return parsed["v"]
    except Exception:
        raise ConfigError(f"{key}={text}: cannot parse the value; a list is written [1,2,3], a string with "
                          "spaces or commas in quotes") from None


def parse_settings(settings: type, argv: Sequence[str], *, config_keys: bool,
                   usage: str = "") -> tuple[Any, list[str]]:
    """`key=value` arguments -> (the command's settings, the config overrides among them, in order).

    With `config_keys=False` every key must be one of the settings; an unknown key gets a did-you-mean over them.
    """
    fields = {setting_key(f): f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(settings)
    given: dict[str, Any] = {}
    rest: list[str] = []
    for item in argv:
        key, eq, text = item.partition("=")
        require(bool(eq), f"{item!r}: arguments take the form key=value{f'. {usage}' if usage else ''}")
        if key in fields:
            name = fields[key].name
            value = _value(key, text)
            # Any: a value of several shapes (a count or a list), checked by its command
            given[name] = value if hints[name] is Any else coerce(value, hints[name], key)
        elif config_keys:
            rest.append(item)
        else:
            raise ConfigError(f"{key}: no such key{did_you_mean(key, list(fields))}; the keys are "
                              f"{', '.join(fields)}")
    return settings(**given), rest


def settings_help(settings: type) -> list[tuple[str, str]]:
    """(`key=default`, doc) per setting, for `--help`: the docs are the fields' own docstrings."""
    docs = field_docs(settings)
    rows = []
    for f in dataclasses.fields(settings):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown_default = f.metadata.get("shown", shown(default))
        rows.append((f"{setting_key(f)}={shown_default}", docs.get(f.name, "")))
    return rows


@dataclass(frozen=True)
class Command:
    """One `python -m kdsearch.<name>` command."""

    name: str
    about: str
    """What the command does, for `--help` (lines of at most ~118 characters)."""
    run: Callable[[Any, Any], int]
    """The work: (its settings, the config overrides or what `parse` made of them) -> exit status. A ConfigError
    it raises is bad input."""
    settings: type
    """A frozen dataclass of the command's own keys, each with a default and a docstring."""
    usage: str = "[key=value ...]"
    config_keys: bool = True
    """Whether config keys (`train.lr=...`) are read too, and listed in `--help`."""
    parse: Callable[[list[str]], tuple[Any, Any]] | None = None
    """A parser of its own when the settings need more than `parse_settings`: (settings, what `run` reads beside
    them: a search's space, an evaluation's config)."""
    help_rows: Callable[[], list[tuple[str, str]]] | None = None
    """Extra `--help` rows after the settings' own (keys the command passes on, such as a space's budget)."""
    quiet: bool = True
    """Turn the libraries' progress bars off first (costs importing transformers: not for a command that reads
    only MLflow)."""

    def help(self) -> str:
        rows = settings_help(self.settings) + (self.help_rows() if self.help_rows else [])
        return command_help(f"usage: python -m kdsearch.{self.name} {self.usage}", self.about, rows,
                            config_keys=self.config_keys)

    def parse_args(self, argv: Sequence[str]) -> tuple[Any, Any]:
        if self.parse is not None:
            return self.parse(list(argv))
        return parse_settings(self.settings, argv, config_keys=self.config_keys,
                              usage=f"usage: python -m kdsearch.{self.name} {self.usage}")


def run_command(command: Command, argv: Sequence[str] | None = None) -> int:
    """Help, bad input as one `error:` line (status 2), Ctrl-C as one line (130), else the command's status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print(command.help())
        return 0
    try:
        if command.quiet:
            quiet_libraries()
        settings, rest = command.parse_args(args)
        return command.run(settings, rest)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt as err:
        print(f"interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return INTERRUPTED
