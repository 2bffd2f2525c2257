"""What a task asks of a model, as every layer sees it: the loss math, the data and the metrics share these two
names and nothing else, so none of them imports another for them. No imports."""

from __future__ import annotations

from typing import Literal

TaskKind = Literal["classification", "regression", "causal_lm", "seq2seq", "extractive_qa"]
"""One label per input (a class id or a score), a target token per position (causal_lm: the next token), a
target sequence an encoder-decoder writes from a source (seq2seq: decoder position t predicts label t), or the
answer's (start, end) token positions in a question + context window (extractive_qa: 0, 0 when the window holds
no answer)."""
IGNORE_INDEX = -100
"""The label of a token that is not a target (prompt, padding): what cross_entropy's ignore_index skips."""
