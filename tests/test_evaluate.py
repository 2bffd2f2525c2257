"""kdsearch.evaluate: a saved student scored on a labelled split, beside its fine-tuned teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

from kdsearch.config.overrides import CONFIG_FILE, load_config, write_config_file
from kdsearch.core.errors import ConfigError
from kdsearch.evaluate import main, parse_args


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A saved 3-class model directory, weights and config, no tokenizer: enough for the checks that run first."""
    BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             num_labels=3)).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize(("argv", "message"), [
    ([], "model=: give a saved student directory"),
    (["model=/no/such/dir"], "model=/no/such/dir: no model directory there"),
    (["model={m}", "split=train"], "split=train: choose one of test, validation"),
    (["model={m}", "with_teacher=maybe"], "with_teacher=maybe: expected true or false"),
    (["model={m}", "oops"], "'oops': arguments take the form key=value"),
    (["model={m}", "distill.layer_mapp=forward"], "did you mean distill.layer_map"),
    (["model={m}", "tracking.uri=file:./mlruns"], "the file store .* is unsupported"),
    (["model={m}", "out={m}"], "a folder; give a file name such as"),
])
def test_bad_command_lines_say_what_to_fix(tiny_model: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args([a.format(m=tiny_model) for a in argv])


@pytest.mark.parametrize("key", ["eval.num_beams=4", "eval.generate_every=2"])
def test_eval_keys_an_encoder_never_reads_are_refused_as_train_refuses_them(tiny_model: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"{key}: read only where outputs are generated .* model=.* is an "
                                          "encoder: leave eval.\\* at its defaults") as err:
        parse_args([f"model={tiny_model}", key])
    assert "\n" not in str(err.value)


def test_eval_keys_are_read_where_the_model_generates(tmp_path: Path) -> None:
    T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                        decoder_start_token_id=0)).save_pretrained(tmp_path / "t5")
    args, cfg = parse_args([f"model={tmp_path / 't5'}", "task.name=seq2seq_default", "eval.num_beams=4"])
    assert cfg.eval.num_beams == 4 and args.model == str(tmp_path / "t5")


def test_a_head_that_does_not_fit_the_task_is_refused_before_its_weights_load(tiny_model: Path, tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    assert main([f"model={tiny_model}", f"cache_dir={tmp_path}/cache", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                 "task.train_size=8", "task.eval_size=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("its head has 3 outputs; task default needs 2") and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_saved_student_is_scored_on_the_test_split_beside_its_teacher(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    from kdsearch.run import models
    from kdsearch.run.prepare import load_teacher, make_student, prepare_teacher

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(["teacher=tiny-bert", "task.train_size=256", "task.eval_size=48", "finetune.epochs=1",
                       "student.layers=2", f"cache_dir={tmp_path}/cache"])
    prepared = prepare_teacher(cfg)
    student = make_student(cfg, load_teacher(prepared, torch.device("cpu")))
    saved = tmp_path / "student"
    student.save_pretrained(saved)
    AutoTokenizer.from_pretrained(prepared.teacher_dir).save_pretrained(saved)
    write_config_file(cfg, saved / CONFIG_FILE)  # as an export writes it: the task, not the cache folder
    local = [f"cache_dir={tmp_path}/cache", f"tracking.uri={uri}"]

    # the teacher it was distilled from is looked up, never fine-tuned anew (that would be another teacher)
    assert main([f"model={saved}", "with_teacher=true", f"cache_dir={tmp_path}/elsewhere", f"tracking.uri={uri}"]) == 2
    assert "with_teacher=true: cache_dir=" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere" / "teacher").exists()
    with pytest.raises(ConfigError, match="was distilled on task default"):  # its head and vocabulary fit that task
        parse_args([f"model={saved}", "task=sst2", "task.data_dir=/data/sst2"])

    # validation: the teacher's score is the one its fine-tune recorded, read back through the saved model
    assert main([f"model={saved}", "split=validation", "with_teacher=true", f"out={tmp_path}/val.json", *local]) == 0
    val = json.loads((tmp_path / "val.json").read_text())["scores"]
    assert val["teacher"]["eval_score"] == pytest.approx(prepared.teacher_metrics["eval_score"])
    assert val["teacher"]["rows"] == val["student"]["rows"] == 48  # task.eval_size from the saved config
    assert val["student"]["params"] == models.count_parameters(student) < val["teacher"]["params"]

    # test (the default split): the default task's 500 held-out rows, read whole
    assert main([f"model={saved}", f"out={tmp_path}/test.json", *local]) == 0
    printed = capsys.readouterr().out
    test = json.loads((tmp_path / "test.json").read_text())
    assert test["split"] == "test" and set(test["scores"]) == {"student"}
    assert test["scores"]["student"]["rows"] == 500 and 0 <= test["scores"]["student"]["eval_score"] <= 1
    assert "task default, test split" in printed and "scores logged to MLflow run" in printed

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("kdsearch").experiment_id],
                              order_by=["attributes.start_time ASC"])
    assert [r.data.params["split"] for r in runs] == ["validation", "test"]
    assert all(r.data.tags["kdsearch.role"] == "analysis" and r.data.tags["kdsearch.analysis"] == "evaluate"
               for r in runs)
    assert runs[0].data.metrics["teacher.eval_score"] == pytest.approx(val["teacher"]["eval_score"])
    assert runs[1].data.metrics["student.eval_accuracy"] == pytest.approx(test["scores"]["student"]["eval_accuracy"])
