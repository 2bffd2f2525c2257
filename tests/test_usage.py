"""`--help` of every command: usage, own keys, and every config key with its default and its doc."""

from __future__ import annotations

import importlib
import re

import pytest

from kdsearch.config.parse import config_keys, flatten
from kdsearch.config.schema import Config
from kdsearch.config.usage import config_reference


def test_the_config_reference_lists_every_key_once_with_its_default_and_doc() -> None:
    text = config_reference()
    lines = [line for line in text.splitlines() if re.match(r"  \S+=", line)]
    assert [line.split("=", 1)[0].strip() for line in lines] == config_keys()
    defaults = flatten(Config())
    for line in lines:
        key, rest = line.strip().split("=", 1)
        shown = rest.split()[0]
        expected = defaults[key]
        assert shown == ("null" if expected is None else str(expected).lower() if isinstance(expected, bool)
                         else str(expected)), key
    # the docs are the field docstrings of config.py, wrapped under their key
    flat = " ".join(text.split())
    assert "units.ratio=null Share of teacher units kept, in (0, 1]; None = d_s / d_t (Flex-KD's top-d_s)." in flat
    assert "resources.num_workers=1 Ray Train data-parallel workers per run (per trial)." in flat
    assert all(len(line) <= 118 for line in text.splitlines() if " " * 20 in line)  # wrapped continuation lines


@pytest.mark.parametrize(("command", "expected"), [
    ("train", ["usage: python -m kdsearch.train", "student.width_ratio=null"]),
    ("tune", ["usage: python -m kdsearch.tune [space=<name> (default layer_select)]", "resume=false",
              "distill.bridge=auto"]),
    ("report", ["usage: python -m kdsearch.report study=<name>", "ted_vs_lwd", "seeds=3", "train.epochs=3"]),
    ("analyze", ["usage: python -m kdsearch.analyze angles", "max_batches=null", "teacher=tiny-bert"]),
    ("leaderboard", ["usage: python -m kdsearch.leaderboard", "top=20"]),
    ("evaluate", ["usage: python -m kdsearch.evaluate model=<student dir>", "with_teacher=false",
                  "task.max_length=64"]),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_answers_help_without_starting_anything(command: str, expected: list[str], flag: str,
                                                              capsys: pytest.CaptureFixture) -> None:
    import ray

    main = importlib.import_module(f"kdsearch.{command}").main
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and all(text in out for text in expected), out[:500]
    assert ("distill.bridge=auto" in out) == (command != "leaderboard")  # leaderboard takes no config keys
    assert not ray.is_initialized()
