"""kdsearch.analyze: the angle math on hand examples, bad input, and the `angles` command on tiny-bert."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from kdsearch.analyze import angle_cosines, check_shapes, main, parse_args
from kdsearch.core.errors import ConfigError

os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")


def _states(*vectors: list[float]) -> torch.Tensor:
    return torch.tensor([vectors], dtype=torch.float32)  # (1, T, D)


def test_angle_cosines_match_hand_computed_angles_on_real_tokens_only() -> None:
    # Per token: h_s, h_t[1], h_t[k] in 2-D; u = h_t[1] - h_s, v = h_t[k] - h_s.
    h_s = _states([1, 1], [0, 0], [0, 0], [0, 0], [5, 5])
    h_t1 = _states([2, 1], [1, 0], [1, 0], [3, 4], [9, 9])  # u: (1,0) (1,0) (1,0) (3,4) padding
    h_tk = _states([1, 3], [1, 1], [-2, 0], [3, 4], [0, 9])  # v: (0,2) (1,1) (-2,0) (3,4) padding
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    cos = angle_cosines(h_t1, h_tk, h_s, mask)
    # right angle, 45 degrees, opposite, same direction; the padded token is left out
    expected = torch.tensor([0.0, 1 / math.sqrt(2), -1.0, 25 / (25 + 1e-6)])
    assert cos.shape == (4,)
    assert torch.allclose(cos, expected, atol=1e-6)


def test_angle_cosines_are_finite_when_the_student_sits_on_a_teacher_state() -> None:
    h = _states([1.0, 2.0])
    cos = angle_cosines(h, _states([3.0, 0.0]), h, torch.ones(1, 1))  # u = 0: the 1e-6 keeps it finite
    assert torch.isfinite(cos).all() and cos.item() == 0.0


def test_angle_cosines_reject_states_of_different_widths() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        angle_cosines(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), torch.zeros(1, 2, 3), torch.ones(1, 2))


def test_a_narrower_student_gets_one_line_before_anything_loads() -> None:
    args, cfg = parse_args(["angles", "teacher=tiny-bert", "model=init", "student.hidden_size=32",
                            "student.init=random"])
    with pytest.raises(ConfigError, match=r"student.hidden_size=32: .*teacher's width 64"):
        check_shapes(args, cfg)


@pytest.mark.parametrize(("argv", "message"), [
    (["tiles", "model=init"], "known: angles"),
    (["angles", "teacher=tiny-bert"], "model="),
    (["angles", "model=/no/such/dir"], "no model directory"),
    (["angles", "model=init", "model_layers=[1,x]"], "model_layers="),
    (["angles", "model=init", "distill.w_hiden=1"], "did you mean distill.w_hidden"),
])
def test_bad_command_lines_say_what_to_fix(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_a_student_layer_beyond_the_student_is_refused() -> None:
    args, cfg = parse_args(["angles", "teacher=tiny-bert", "model=init", "student.layers=2", "model_layers=[3]"])
    with pytest.raises(ConfigError, match="out of range 1..2"):
        check_shapes(args, cfg)


@pytest.mark.slow
def test_angles_command_writes_histograms_and_an_mlflow_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from kdsearch.run.prepare import load_teacher, make_student, prepare

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["teacher=tiny-bert", "task=default", "task.train_size=256", "task.eval_size=48", "finetune.epochs=1",
              "student.layers=2", f"cache_dir={tmp_path}/cache", f"tracking.uri={uri}"]
    assert main(["angles", "model=init", f"out={tmp_path}/init", *common]) == 0
    summary = json.loads((tmp_path / "init" / "angles.json").read_text())
    rows = summary["rows"]
    assert [(r["student_layer"], r["teacher_layer"]) for r in rows] == [(s, k) for s in (1, 2) for k in (2, 3, 4)]
    _, cfg = parse_args(["angles", "model=init", *common])
    prepared = prepare(cfg)
    real_tokens = sum(len(ids) for ids in prepared.data["validation"]["input_ids"])  # no padding before batching
    assert all(r["tokens"] == real_tokens for r in rows)
    assert all(0 <= r["acute_share"] <= 1 and -1 <= r["mean_cos"] <= 1 for r in rows)
    assert (tmp_path / "init" / "angles.png").stat().st_size > 10_000
    assert "| 1 | 2 |" in (tmp_path / "init" / "angles.md").read_text()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kdsearch")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["kdsearch.role"] == "analysis" and run.info.status == "FINISHED"
    assert run.data.metrics["acute_share.l1.k2"] == pytest.approx(rows[0]["acute_share"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "angles")} >= {"angles/angles.png",
                                                                                   "angles/angles.json"}

    # The same initial student saved as a Hugging Face directory gives the same angles.
    student_dir = tmp_path / "student"
    make_student(cfg, load_teacher(prepared, torch.device("cpu"))).save_pretrained(student_dir)
    assert main(["angles", f"model={student_dir}", "model_layers=[2]", f"out={tmp_path}/dir", *common]) == 0
    from_dir = json.loads((tmp_path / "dir" / "angles.json").read_text())["rows"]
    assert [r["acute_share"] for r in from_dir] == pytest.approx([r["acute_share"] for r in rows[3:]])


class _Layers(torch.nn.Module):
    """States known in closed form: hidden state j of every token is j * `direction` (2 units)."""

    def __init__(self, direction: tuple[float, float], layers: int) -> None:
        super().__init__()
        self.direction, self.layers = torch.tensor(direction), layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool):
        shape = (*input_ids.shape, 2)
        states = tuple(j * self.direction.expand(shape) for j in range(self.layers + 1))
        return type("Out", (), {"hidden_states": states})()


def test_collect_measures_each_student_and_teacher_layer_pair_on_real_tokens() -> None:
    # teacher h_t[j] = (j, 0), student h_s[l] = (0, l): u = h_t[1] - h_s[l] = (1, -l), v = h_t[k] - h_s[l] = (k, -l)
    from types import SimpleNamespace

    from datasets import Dataset

    from kdsearch.analyze import collect

    rows = {"input_ids": [[5, 6, 7], [5, 6], [8]], "attention_mask": [[1, 1, 1], [1, 1], [1]], "labels": [0, 1, 0]}
    prepared = SimpleNamespace(data={"validation": Dataset.from_dict(rows)}, pad_id=0)
    cosines = collect(_Layers((1.0, 0.0), 4), _Layers((0.0, 1.0), 2), prepared,  # type: ignore[arg-type]
                      student_layers=[1, 2], n_teacher=4, max_batches=None)
    assert sorted(cosines) == [(sl, k) for sl in (1, 2) for k in (2, 3, 4)]
    for (sl, k), cos in cosines.items():
        expected = (k + sl * sl) / (math.hypot(1, sl) * math.hypot(k, sl))
        assert len(cos) == 6 and torch.allclose(cos, torch.full((6,), expected), atol=1e-5), (sl, k)
