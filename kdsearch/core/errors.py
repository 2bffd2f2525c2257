"""The one error type for bad user input, and the helpers every check uses to raise it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class ConfigError(ValueError):
    """Bad user input; the message is one line that says how to fix it."""


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """"; did you mean X?" for the closest of `options`, else for the keys that end in `word` (`seed`: train.seed
    or sampler_seed), or "" when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    ends = [o for o in options if o != word and (o.split(".")[-1] == word or o.endswith("_" + word))]
    return f"; did you mean {' or '.join(ends[:3])}?" if ends else ""


def require(ok: bool, message: str) -> None:
    """ConfigError(message) unless ok: the one-line check every config field and command argument uses."""
    if not ok:
        raise ConfigError(message)
