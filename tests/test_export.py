"""kdsearch.export: which trial is exported, and its model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kdsearch.config.overrides import CONFIG_FILE, load_config, write_config_file
from kdsearch.config.parse import flatten
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError
from kdsearch.search.export import best_result, model_card


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
    assert "`ted.filter`" in card and "`units.ratio`" not in card and "`relation.kinds`" not in card
    logit_only = model_card(load_config(["distill.layer_map=none", "distill.bridge=ted"]), {}, search="s",
                            trial_id="t2", metric="eval_score")
    assert "`distill.temperature`" in logit_only  # only what the run acted on: no hidden term, no filters
    assert not any(f"`{key}`" in logit_only for key in ("ted.filter", "distill.distance", "distill.bridge"))
    assert "latency" not in card  # not measured: no line, rather than nan
    timed = model_card(cfg, {"eval_score": 0.8, "student_latency_ms": 3.25}, search="s", trial_id="t1",
                       metric="eval_score")
    assert "- latency: 3.25 ms" in timed
    # ranked by another metric: the teacher's score stands beside the student's task score, not beside that metric
    other = model_card(cfg, {"eval_score": 0.8, "eval_accuracy": 0.85, "teacher_score": 0.9}, search="s",
                       trial_id="t1", metric="eval_accuracy")
    assert "- eval_accuracy (ranked by): **0.8500**" in other and "- eval_score: **0.8000** (teacher: 0.9000)" in other
    no_hidden = model_card(load_config(["distill.w_hidden=0"]), {}, search="s", trial_id="t3", metric="eval_score")
    assert "`distill.layer_map`" not in no_hidden  # the map pairs nothing without a hidden term
    tinybert = model_card(load_config(["distill.w_hidden=0", "distill.w_relation=1", "relation.layers=map"]), {},
                          search="s", trial_id="t4", metric="eval_score")
    assert "| `distill.layer_map` | `forward` |" in tinybert  # ... unless the relations follow it


def test_the_exported_config_reruns_the_trial_anywhere(tmp_path) -> None:
    cfg = load_config(["distill.bridge=ted", "ted.width_ratio=2", "distill.layers=[2,4]", "distill.layer_map=explicit",
                       "train.lr=3e-4", "cache_dir=/search/host/cache", "output_dir=/search/host/trial_1"])
    path = tmp_path / CONFIG_FILE
    write_config_file(cfg, path)
    assert "cache_dir" not in path.read_text() and "output_dir" not in path.read_text()  # the host's folders
    again = load_config([f"config={path}"])
    assert flatten(again) == {**flatten(cfg), "cache_dir": Config().cache_dir, "output_dir": Config().output_dir}
    # the command line applies on top of the file
    assert load_config([f"config={path}", "train.lr=1e-3", "task=sst2"]).train.lr == 1e-3
    card = model_card(cfg, {"eval_score": 0.8}, search="s", trial_id="t1", metric="eval_score")
    assert f"python -m kdsearch.train config=<this folder>/{CONFIG_FILE}" in card


def test_a_config_file_takes_nested_or_dotted_keys_and_bad_ones_say_so(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("student: {layers: 3}\ntrain.lr: 1e-4\ndistill:\n  w_hidden: 10\n")
    cfg = load_config([f"config={path}"])
    assert (cfg.student.layers, cfg.train.lr, cfg.distill.w_hidden) == (3, 1e-4, 10.0)  # 1e-4: a float
    for text, message in (("- a list\n", "expected a mapping"), ("train: {lr: 1\n", "not valid YAML"),
                          ("train.lr: 1\ntrain.lr: 2\n", "duplicate key 'train.lr'"),
                          ("trian.lr: 1\n", "did you mean train")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config([f"config={path}"])
    with pytest.raises(ConfigError, match=r"config=/no/such\.yaml: no such file"):
        load_config(["config=/no/such.yaml"])
