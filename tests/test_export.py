"""kdsearch.export: which trial is exported, and its model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdsearch.config import load_config
from kdsearch.export import best_result, model_card


@dataclass
class FakeResult:
    """The parts of a Tune Result that the export reads."""

    trial_id: str
    error: Exception | None = None
    checkpoint: Any = "checkpoint"
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = {"trial_id": self.trial_id, **self.metrics}


def test_best_result_follows_the_leaderboard_order_past_unusable_trials() -> None:
    results = [FakeResult("a"), FakeResult("b"), FakeResult("c", error=RuntimeError("boom")),
               FakeResult("d", checkpoint=None)]
    # ties are broken by the leaderboard: whatever it ranks first is exported, not Tune's result order
    assert best_result(results, ["b", "a"]).trial_id == "b"
    assert best_result(results, ["c", "d", "a"]).trial_id == "a"  # failed / no checkpoint: skipped
    assert best_result(results, ["c", "d"]) is None
    assert best_result(results, []) is None


def test_model_card_names_the_strategy_metric_and_teacher() -> None:
    cfg = load_config(["distill.bridge=ted", "distill.layer_map=reverse"])
    card = model_card(cfg, {"eval_score": 0.8125, "teacher_score": 0.9, "student_params": 1234, "epoch": 3},
                      search="s", trial_id="t1", metric="eval_score")
    assert "**0.8125**" in card and "teacher `tiny-bert`" in card and "1,234" in card
    assert "| `distill.bridge` | `ted` |" in card and "| `distill.layer_map` | `reverse` |" in card
    assert "latency" not in card  # not measured: no line, rather than nan
    timed = model_card(cfg, {"eval_score": 0.8, "student_latency_ms": 3.25}, search="s", trial_id="t1",
                       metric="eval_score")
    assert "- latency: 3.25 ms" in timed
