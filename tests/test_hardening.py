"""Malformed input, files someone else wrote, and a teacher that learnt nothing: each is one line (or refused)
before Ray or any training starts."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

SST2_ROWS = "sentence\tlabel\na fine film\t1\na dull film\t0\n"


def _data(root: Path, train: bytes | str = SST2_ROWS, name: str = "train.tsv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(train.encode() if isinstance(train, str) else train)
    (root / "dev.tsv").write_text(SST2_ROWS)
    return root


def _model_dir(root: Path, *, weights: bool = True, **config_extra: object) -> Path:
    """A saved tiny BERT; `weights=False` leaves only its config, config_extra edits config.json."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    (BertForSequenceClassification(config) if weights else config).save_pretrained(root)
    data = json.loads((root / "config.json").read_text())
    data.update(config_extra)
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    (root / "config.json").write_text(json.dumps(data))
    return root


def _sst2(root: Path) -> list[str]:
    return ["task.name=sst2", f"task.data_dir={root}"]


# Each case: (command, files to make under tmp -> arguments, the one line's text).
CASES: dict[str, tuple[str, Callable[[Path], list[str]], str]] = {
    "non-UTF-8 bytes in the first lines": (
        "tune", lambda t: _sst2(_data(t / "d", b"sentence\tlabel\n\xff\xfe film\t1\n")),
        "line 2 of train.tsv is not UTF-8 (byte 0xff at column 1); save the file as UTF-8"),
    "non-UTF-8 bytes deep in the file": (
        "train", lambda t: _sst2(_data(t / "d", (SST2_ROWS + "ok\t1\n" * 500).encode() + b"caf\xe9\t1\n")),
        "line 504 of train.tsv is not UTF-8"),
    "a short TSV row": (
        "train", lambda t: _sst2(_data(t / "d", SST2_ROWS + "no label here\n")),
        "line 4 of train.tsv has 1 cell where the header has 2 (sentence, label)"),
    "an empty label cell": (
        "tune", lambda t: _sst2(_data(t / "d", SST2_ROWS + "no label here\t\n")),
        "line 4 of train.tsv has an empty 'label' cell"),
    "a JSONL line that is not an object": (
        "train", lambda t: _sst2(_data(t / "d", '{"sentence": "ok", "label": 1}\n[1, 2]\n', "train.jsonl")),
        "line 2 of train.jsonl is not a JSON object"),
    "evaluate: config.json without model_type": (
        "evaluate", lambda t: [f"model={_model_dir(t / 'm', model_type=None)}"],
        "config.json names no model_type"),
    "evaluate: a config but no weights": (
        "evaluate", lambda t: [f"model={_model_dir(t / 'm', weights=False)}"],
        "no weights in"),
    "teacher: a config but no weights": (
        "train", lambda t: [f"teacher={_model_dir(t / 'm', weights=False)}"],
        "no weights in"),
    "teacher: custom model code (auto_map)": (
        "tune", lambda t: [f"teacher={_model_dir(t / 'm', auto_map={'AutoModel': 'modeling_x.XModel'})}"],
        "needs its own code (config.json's auto_map: AutoModel); kdsearch runs only the architectures"),
    "teacher: a custom tokenizer (auto_map)": (
        "train", lambda t: [f"teacher={_tokenizer_code(_model_dir(t / 'm'))}"],
        "tokenizer_config.json's auto_map"),
    "cache_dir names a file": (
        "train", lambda t: [f"cache_dir={_file(t / 'f')}"], "is a file, not a folder"),
    "output_dir under a file": (
        "train", lambda t: [f"output_dir={_file(t / 'f') / 'out'}"], "is a file, so no folder can be made under it"),
    "storage_path under a file": (
        "tune", lambda t: ["space=smoke", f"storage_path={_file(t / 'f') / 'ray'}"], "storage_path="),
    "results_dir under a file": (
        "tune", lambda t: ["space=smoke", f"results_dir={_file(t / 'f') / 'r'}"], "results_dir="),
    "train.epochs=1e9": ("train", lambda t: ["train.epochs=1e9"], "train.epochs=1000000000: must be in 1..1000"),
    "an unknown categorical choice": (
        "tune", lambda t: [f"space={_space(t, '[forward, bogus_map]')}"],
        "distill.layer_map choice 'bogus_map': distill.layer_map=bogus_map: unknown layer map"),
    "task.hub out of reach": (
        "tune", lambda t: ["task.name=sst2", "task.hub=glue"], "task.hub=glue: 127.0.0.1 is unreachable"),
    "a seq2seq task.hub out of reach": (
        "train", lambda t: ["teacher=tiny-t5", "task.name=seq2seq", "task.hub=wmt16", "task.hub_config=ro-en",
                            "task.source_column=translation.en", "task.target_column=translation.ro"],
        "task.hub=wmt16: 127.0.0.1 is unreachable"),
}


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _tokenizer_code(model: Path) -> Path:
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.XTok", None]}}))
    return model


def _space(root: Path, choices: str) -> Path:
    path = root / "space.yaml"
    path.write_text("base: {task: {train_size: 64, eval_size: 32}}\n"
                    f"params:\n  distill.layer_map: {{type: categorical, choices: {choices}}}\n")
    return path


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub at an address where nothing listens (this machine's real state, made certain)."""
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_is_one_line_before_ray(case: str, tmp_path: Path, no_hub: None,
                                                capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch import evaluate, train, tune

    command, make, message = CASES[case]
    argv = [*make(tmp_path), f"cache_dir={tmp_path / 'cache'}"] if "cache_dir" not in case else make(tmp_path)
    if command == "evaluate":
        argv.append(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    main = {"train": train.main, "tune": tune.main, "evaluate": evaluate.main}[command]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not ray.is_initialized()


def test_a_dry_run_refuses_what_the_run_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.tune import main

    assert main(["space=smoke", f"results_dir={_file(tmp_path / 'f') / 'r'}", "dry_run=true"]) == 2
    assert "is a file, so no folder can be made under it" in capsys.readouterr().err


def test_evaluate_never_overwrites_its_out_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.evaluate import main

    out = _file(tmp_path / "scores.json")
    assert main([f"model={_model_dir(tmp_path / 'm')}", f"out={out}"]) == 2
    assert "already exists; give a new file name" in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def test_evaluate_reads_only_the_model_keys_of_a_shipped_config(tmp_path: Path) -> None:
    """A model folder's kdsearch_config.yaml describes the model; the paths in it are not evaluate's to take."""
    from kdsearch.evaluate import parse_args

    model = _model_dir(tmp_path / "m")
    elsewhere = tmp_path / "someone-elses-folder"
    (model / "kdsearch_config.yaml").write_text(
        f"teacher: tiny-bert\nstudent.layers: 1\ntask.name: default\ncache_dir: {elsewhere}\n"
        f"output_dir: {elsewhere}\ntrain.lr: 0.5\n")
    args, cfg = parse_args([f"model={model}", "split=validation"])
    assert cfg.student.layers == 1 and cfg.task.name == "default"  # read: what the model is
    assert str(elsewhere) not in (cfg.cache_dir, cfg.output_dir) and cfg.train.lr != 0.5  # not read


class _Payload:
    """Unpickling it would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle's protocol
        return (Path.touch, (self.marker,))


def test_a_tampered_checkpoint_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    from kdsearch.core.errors import ConfigError
    from kdsearch.core.safe_io import load_tensors

    marker = tmp_path / "code-ran"
    with (tmp_path / "optim.pt").open("wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)
    with pytest.raises(ConfigError, match=r"optim.pt: refused, it holds more than tensors"):
        load_tensors(tmp_path / "optim.pt")
    assert not marker.exists()


def test_a_real_optimiser_state_loads_as_tensors(tmp_path: Path) -> None:
    """What a checkpoint holds (AdamW moments, the schedule, step counts) passes weights_only."""
    from kdsearch.config.schema import Config, TrainConfig
    from kdsearch.core.safe_io import load_tensors
    from kdsearch.run.optimiser import make_optimiser

    model = torch.nn.Linear(4, 2)
    opt = make_optimiser(Config(train=TrainConfig(lr=1e-3)), model, total_steps=10, device=torch.device("cpu"))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    again = make_optimiser(Config(train=TrainConfig(lr=1e-3)), model, total_steps=10, device=torch.device("cpu"))
    again.load_state_dict(load_tensors(tmp_path / "optim.pt"))
    assert torch.equal(again.opt.state_dict()["state"][0]["exp_avg"], opt.opt.state_dict()["state"][0]["exp_avg"])


@pytest.mark.parametrize("kind, train, labels, expected", [
    ("classification", [0, 1, 1, 1], [1, 0, 1, 1], 0.75),  # always 1, the training majority
    ("regression", [0.5, 2.0, 4.0], [1.0, 3.0, 2.0], 0.0),  # the mean: no correlation
    ("causal_lm", [[-100, 5, 5, 7]], [[-100, 5, 7], [7, -100, 7]], 0.25),  # token 5 everywhere; -100 unscored
])
def test_the_constant_answer_baseline(kind: str, train: list, labels: list, expected: float) -> None:
    from kdsearch.data.metrics import baseline_score
    from kdsearch.data.tasks import task_spec

    spec = task_spec({"classification": "sst2", "regression": "stsb", "causal_lm": "text"}[kind])
    flat = (lambda rows: np.concatenate([np.asarray(r) for r in rows])) if kind == "causal_lm" else np.asarray
    assert baseline_score(spec, flat(train), flat(labels)) == pytest.approx(expected)


def test_a_teacher_that_learnt_nothing_is_warned_about_or_refused(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Labels drawn at random: no teacher can beat the majority class, and the search should not start blind."""
    from kdsearch.config.overrides import load_config
    from kdsearch.core.errors import ConfigError
    from kdsearch.run.prepare import check_teacher, prepare_teacher

    rng = np.random.default_rng(0)
    words = ["film", "plot", "actor", "scene", "score", "story"]
    for split, n in (("train", 100), ("dev", 60)):  # 60% ones in each, in no relation to the words
        labels = rng.permutation([1] * (n * 3 // 5) + [0] * (n * 2 // 5))
        rows = [f"{' '.join(rng.choice(words, 4))}\t{label}" for label in labels]
        (tmp_path / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    keys = [f"task.data_dir={tmp_path}", "task.name=sst2", "finetune.epochs=1", f"cache_dir={tmp_path / 'c'}"]
    cfg = load_config(keys)
    check_teacher(cfg, prepare_teacher(cfg, device=torch.device("cpu")))
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "has learnt next to nothing of sst2" in warning[0], warning
    with pytest.raises(ConfigError, match="finetune.require_better=true: teacher=tiny-bert scores"):
        strict = load_config([*keys, "finetune.require_better=true"])
        check_teacher(strict, prepare_teacher(strict, device=torch.device("cpu")))
    assert os.listdir(tmp_path / "c")  # the teacher stays cached: a rerun with other settings reuses it


def test_two_searches_started_together_never_share_a_name(tmp_path: Path) -> None:
    """Both resolve the same free name; the atomic claim gives it to one and the next number to the other."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from kdsearch.core.errors import ConfigError
    from kdsearch.search.driver import claim_name
    from kdsearch.search.settings import parse_search_args

    settings, space = parse_search_args(["space=smoke", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                         f"results_dir={tmp_path}/results"])
    with ThreadPoolExecutor(4) as pool:
        names = sorted(s.search_name for s in pool.map(lambda _: claim_name(settings, space), range(4)))
    assert names == ["kdsearch-smoke", "kdsearch-smoke-2", "kdsearch-smoke-3", "kdsearch-smoke-4"]
    assert claim_name(replace(settings, name="mine"), space).search_name == "mine"
    with pytest.raises(ConfigError, match="name=mine: a search of that name exists"):
        claim_name(replace(settings, name="mine"), space)  # the second of two named alike is refused


def test_a_new_student_never_replaces_an_earlier_one(tmp_path: Path) -> None:
    from kdsearch.config.paths import fresh_dir

    first = fresh_dir(tmp_path / "student")
    (first / "model.safetensors").write_text("the earlier student")
    assert [fresh_dir(tmp_path / "student").name for _ in range(2)] == ["student-2", "student-3"]
    assert (first / "model.safetensors").read_text() == "the earlier student"


def test_inside_a_ray_job_outputs_resolve_outside_its_temporary_copy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative outputs go under KDSEARCH_HOME, relative inputs still read the job's copy (real job: test_tune)."""
    from kdsearch.config.paths import output_uri, with_absolute_paths
    from kdsearch.config.schema import Config, TaskConfig

    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert output_uri("sqlite:///mlflow.db") == f"sqlite:///{copy}/mlflow.db"  # not a job: the working directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("KDSEARCH_HOME", str(tmp_path / "home"))
    assert output_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/home/mlflow.db"
    assert output_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    cfg = with_absolute_paths(Config(output_dir="outputs/train", task=TaskConfig(name="sst2", data_dir="data")))
    assert cfg.output_dir == f"{tmp_path}/home/outputs/train" and cfg.cache_dir == f"{tmp_path}/home/.kdsearch_cache"
    assert cfg.task.data_dir == f"{copy}/data"
