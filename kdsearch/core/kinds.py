"""What a task asks of a model, as every layer sees it: the loss math, the data and the metrics share these two
names and nothing else, so none of them imports another for them. No imports."""

from __future__ import annotations

from typing import Literal

TaskKind = Literal["classification", "regression", "causal_lm"]
"""One label per input (a class id or a score), or a target token per position."""
IGNORE_INDEX = -100
"""The label of a token that is not a target (prompt, padding): what cross_entropy's ignore_index skips."""
