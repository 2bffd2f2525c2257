"""The one command runner: typed settings read with the config's grammar, help from their docs, one line per
error, the exit statuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kdsearch.config.command import Command, parse_settings, run_command
from kdsearch.core.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    top: int = 20
    """Rows printed."""
    fast: bool = False
    """Skip the slow part."""
    uri: str | None = field(default=None, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """Where runs go."""
    names: tuple[str, ...] = ()
    """Which ones."""


def test_settings_are_typed_as_the_config_reads_values_and_the_rest_are_config_keys() -> None:
    given, rest = parse_settings(Settings, ["top=3", "fast=true", "tracking.uri=sqlite:///a.db", "names=[a,b]",
                                            "train.lr=1e-4"], config_keys=True)
    assert given == Settings(top=3, fast=True, uri="sqlite:///a.db", names=("a", "b"))
    assert rest == ["train.lr=1e-4"]


@pytest.mark.parametrize(("argv", "message"), [
    (["top=many"], "top=many: expected int"),
    (["fast=maybe"], "fast=maybe: expected true or false"),
    (["tpo=3"], "tpo: no such key; did you mean top?"),
    (["uri=x"], "did you mean tracking.uri?"),
    (["top"], "'top': arguments take the form key=value"),
])
def test_bad_settings_are_one_line_that_says_what_to_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings(Settings, argv, config_keys=False)


def _command(run: Any) -> Command:
    return Command("demo", "A demo.", run, Settings, config_keys=False, quiet=False)


def test_help_lists_each_setting_with_its_default_and_doc(capsys: pytest.CaptureFixture) -> None:
    assert run_command(_command(lambda s, r: pytest.fail("help runs nothing")), ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m kdsearch.demo [key=value ...]")
    assert all(row in " ".join(out.split()) for row in
               ["top=20 Rows printed.", "fast=false Skip the slow part.", "tracking.uri=<uri> Where runs go."])


def test_exit_statuses_and_one_line_per_error(capsys: pytest.CaptureFixture) -> None:
    def bad_input(settings: Settings, rest: list[str]) -> int:
        raise ConfigError("top=3: too few")

    def interrupted(settings: Settings, rest: list[str]) -> int:
        raise KeyboardInterrupt

    assert run_command(_command(lambda s, r: 0 if s.top == 5 else 1), ["top=5"]) == 0
    assert run_command(_command(lambda s, r: 1), []) == 1  # the command's own status: it failed
    assert run_command(_command(bad_input), []) == 2
    assert capsys.readouterr().err == "error: top=3: too few\n"
    assert run_command(_command(lambda s, r: 0), ["tpo=1"]) == 2  # bad input before the command runs
    assert capsys.readouterr().err.count("\n") == 1
    assert run_command(_command(interrupted), []) == 130
    assert capsys.readouterr().err == "interrupted\n"


SETTINGS = {"tune": "kdsearch.search.settings:SearchSettings", "train": "kdsearch.train:TrainSettings",
            "report": "kdsearch.search.reports:ReportSettings",
            "leaderboard": "kdsearch.leaderboard:LeaderboardSettings", "analyze": "kdsearch.analyze:AngleArgs",
            "evaluate": "kdsearch.evaluate:EvalArgs"}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_command_runs_through_the_runner_and_none_shadows_a_config_key(name: str) -> None:
    """A command's own key is not a config key, a config section or a config key's last part (`seed` would read
    as train.seed, `student=` as the student section); `name` (a search's, a study's) is the one exception: the
    config's only `name` is task.name, always typed with its section (`task=sst2` is task.name)."""
    import importlib
    import inspect

    from kdsearch.config.command import setting_keys
    from kdsearch.config.parse import config_keys

    assert "run_command(" in inspect.getsource(importlib.import_module(f"kdsearch.{name}").main)
    path, _, cls = SETTINGS[name].partition(":")
    keys = set(setting_keys(getattr(importlib.import_module(path), cls))) - {"name"}
    config = set(config_keys())
    taken = config | {k.split(".")[0] for k in config} | {k.split(".")[-1] for k in config}
    assert not keys & taken, f"kdsearch.{name}: {sorted(keys & taken)} shadow config keys"
