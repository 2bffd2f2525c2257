"""kdsearch.analyze: the angle math on hand examples, bad input, and the `angles` command on tiny-bert."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["kdsearch.role"] == "analysis" and run.info.status == "FINISHED"
    assert run.data.metrics["acute_share.l1.k2"] == pytest.approx(rows[0]["acute_share"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "angles")} >= {"angles/angles.png",
                                                                                   "angles/angles.json"}

    # The same initial student saved as a Hugging Face directory gives the same angles.
    student_dir = tmp_path / "student"
    student: Any = make_student(cfg, load_teacher(prepared, torch.device("cpu")))  # a transformers model
    student.save_pretrained(student_dir)
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


# --- encoder-decoders and causal LMs ------------------------------------------------------------------------
def _tiny(name: str, layers: int, decoder_layers: int | None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny teacher built from its config (vocabulary 50) and a teacher-init student of its width."""
    from kdsearch.run import models

    config = models.teacher_config(models.resolve_teacher(name), vocab_size=50)
    family = models.family_of(config)
    torch.manual_seed(0)
    teacher = models.task_model_class(family).from_config(config).eval()
    student = models.build_student(teacher, layers=layers, decoder_layers=decoder_layers, hidden_size=None,
                                   init="teacher", seed=1).eval()
    with torch.no_grad():  # a teacher-init student would sit on teacher states: move it off them
        for p in student.parameters():
            p.mul_(1 + 0.2 * torch.randn_like(p))
    return teacher, student


def _rows(seq2seq: bool) -> dict[str, list]:
    """Three rows of uneven source and target lengths: the batch pads both sides."""
    torch.manual_seed(2)
    rows: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    if seq2seq:
        rows |= {"decoder_input_ids": [], "decoder_attention_mask": []}
    for n_src, n_tgt in ((7, 2), (3, 6), (5, 4)):
        source = torch.randint(5, 50, (n_src,)).tolist()
        rows["input_ids"].append(source)
        rows["attention_mask"].append([1] * n_src)
        if not seq2seq:
            rows["labels"].append(source)
            continue
        target = torch.randint(5, 50, (n_tgt,)).tolist()
        rows["labels"].append(target)
        rows["decoder_input_ids"].append([0, *target[:-1]])  # T5 starts decoding from its padding id
        rows["decoder_attention_mask"].append([1] * n_tgt)
    return rows


def _by_hand(h_t: tuple[torch.Tensor, ...], h_s: tuple[torch.Tensor, ...], sl: int, k: int) -> list[float]:
    """The paper's cosine, token by token, from one unpadded row's states (1, T, D)."""
    cosines = []
    for t in range(h_s[sl].shape[1]):
        u, v = h_t[1][0, t] - h_s[sl][0, t], h_t[k][0, t] - h_s[sl][0, t]
        cosines.append(float(torch.dot(u, v) / (torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v) + 1e-6)))
    return cosines


@pytest.mark.parametrize(("name", "layers", "decoder_layers"), [("tiny-t5", 3, 2), ("tiny-bart", 2, 3),
                                                              ("tiny-gpt2", 2, None)])
@pytest.mark.usefixtures("one_thread")
def test_each_stacks_cosines_equal_the_papers_formula_on_each_row_alone(name: str, layers: int,
                                                                         decoder_layers: int | None) -> None:
    # The rows are batched with padding on both sides; the reference runs each row alone, unpadded: the encoder's
    # states over the source, the decoder's teacher-forced on the gold target (a causal LM: its one stack).
    from types import SimpleNamespace

    from datasets import Dataset

    from kdsearch.analyze import collect_stacks
    from kdsearch.methods.bridges.base import Stack
    from kdsearch.methods.inputs import stack_states

    teacher, model = _tiny(name, layers, decoder_layers)
    rows = _rows(seq2seq=decoder_layers is not None)
    prepared = SimpleNamespace(data={"validation": Dataset.from_dict(rows)}, pad_id=0)
    depths: dict[Stack, tuple[int, int]] = {"encoder": (layers, 4)}
    if decoder_layers is not None:
        depths["decoder"] = (decoder_layers, 4)
    found = collect_stacks(teacher, model, prepared, max_batches=None,  # type: ignore[arg-type]
                           layers={stack: (list(range(1, n_s + 1)), n_t) for stack, (n_s, n_t) in depths.items()})
    assert set(found) == set(depths)
    alone = []  # per row: its teacher's and student's outputs
    for i in range(3):
        inputs = {key: torch.tensor([rows[key][i]]) for key in rows if key != "labels"}
        with torch.no_grad():
            alone.append((teacher(**inputs, output_hidden_states=True), model(**inputs, output_hidden_states=True)))
    for stack, (n_s, n_t) in depths.items():
        assert sorted(found[stack]) == [(sl, k) for sl in range(1, n_s + 1) for k in range(2, n_t + 1)]
        real = sum(map(len, rows["input_ids" if stack == "encoder" else "decoder_input_ids"]))
        for (sl, k), cos in found[stack].items():
            expected = [c for out_t, out_s in alone
                        for c in _by_hand(stack_states(out_t, stack), stack_states(out_s, stack), sl, k)]
            assert len(cos) == len(expected) == real, (stack, sl, k)
            assert torch.allclose(cos, torch.tensor(expected), atol=1e-6, rtol=0), (stack, sl, k)
        every = torch.cat(list(found[stack].values()))
        assert every.max() - every.min() > 1e-3, "cosines that hardly vary would not test the states"


def _seq2seq_args(*argv: str) -> list[str]:
    return ["angles", "teacher=tiny-t5", "task=seq2seq_default", "model=init", *argv]


def test_an_encoder_decoder_is_checked_stack_by_stack() -> None:
    args, cfg = parse_args(_seq2seq_args("student.layers=3", "student.decoder_layers=2"))
    assert check_shapes(args, cfg) == {"encoder": (3, 4), "decoder": (2, 4)}
    args, cfg = parse_args(_seq2seq_args("student.layers=3", "student.decoder_layers=2", "model_layers=[1,3]"))
    with pytest.raises(ConfigError, match=r"^model_layers=\[1, 3\]: student layer 3 out of range 1..2 of the "
                                          r"student's decoder \(model_layers applies to both stacks\)$"):
        check_shapes(args, cfg)
    args, cfg = parse_args(_seq2seq_args("student.layers=2", "student.decoder_layers=3", "model_layers=[3]"))
    with pytest.raises(ConfigError, match="student layer 3 out of range 1..2 of the student's encoder"):
        check_shapes(args, cfg)


def test_a_saved_student_of_another_kind_than_the_teacher_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=50)).save_pretrained(tmp_path)
    args, cfg = parse_args(["angles", "teacher=tiny-t5", "task=seq2seq_default", f"model={tmp_path}"])
    with pytest.raises(ConfigError, match="a single-stack model, but teacher=tiny-t5 is an encoder-decoder"):
        check_shapes(args, cfg)


@pytest.mark.slow
def test_angles_command_on_a_tiny_t5_writes_both_stacks(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from kdsearch.run.prepare import load_teacher, make_student, prepare

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["teacher=tiny-t5", "task=seq2seq_default", "task.train_size=64", "task.eval_size=24",
              "finetune.epochs=1", "student.layers=2", "student.decoder_layers=1", f"cache_dir={tmp_path}/cache",
              f"tracking.uri={uri}"]
    assert main(["angles", "model=init", f"out={tmp_path}/init", *common]) == 0
    rows = json.loads((tmp_path / "init" / "angles.json").read_text())["rows"]
    assert [(r["stack"], r["student_layer"], r["teacher_layer"]) for r in rows] == (
        [("encoder", s, k) for s in (1, 2) for k in (2, 3, 4)] + [("decoder", 1, k) for k in (2, 3, 4)])
    _, cfg = parse_args(["angles", "model=init", *common])
    prepared = prepare(cfg)
    validation = prepared.data["validation"]
    tokens = {"encoder": sum(map(len, validation["input_ids"])), "decoder": sum(map(len, validation["labels"]))}
    assert tokens["encoder"] != tokens["decoder"]
    assert all(r["tokens"] == tokens[r["stack"]] for r in rows)
    assert all(0 <= r["acute_share"] <= 1 and -1 <= r["mean_cos"] <= 1 for r in rows)
    assert not (tmp_path / "init" / "angles.png").exists()
    for stack in ("encoder", "decoder"):
        assert (tmp_path / "init" / f"angles_{stack}.png").stat().st_size > 5_000
    md = (tmp_path / "init" / "angles.md").read_text()
    assert md.index("## encoder") < md.index("](angles_encoder.png)") < md.index("## decoder") < md.index(
        "](angles_decoder.png)")

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("kdsearch")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "angles-seq2seq_default-encoder+decoder"
    assert run.data.tags["kdsearch.stacks"] == "encoder,decoder"
    assert run.data.metrics["acute_share.decoder.l1.k4"] == pytest.approx(rows[-1]["acute_share"])
    assert run.data.metrics["mean_cos.encoder.l2.k2"] == pytest.approx(rows[3]["mean_cos"])

    # The same initial student saved as a Hugging Face directory gives the same angles on both stacks.
    student_dir = tmp_path / "student"
    student: Any = make_student(cfg, load_teacher(prepared, torch.device("cpu")))  # a transformers model
    student.save_pretrained(student_dir)
    assert main(["angles", f"model={student_dir}", "model_layers=[1]", f"out={tmp_path}/dir", *common]) == 0
    from_dir = json.loads((tmp_path / "dir" / "angles.json").read_text())["rows"]
    same = [r for r in rows if r["student_layer"] == 1]
    assert [(r["stack"], r["teacher_layer"]) for r in from_dir] == [(r["stack"], r["teacher_layer"]) for r in same]
    assert [r["mean_cos"] for r in from_dir] == pytest.approx([r["mean_cos"] for r in same])
