"""Bad input: one clear line naming the key, before any cluster work."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("overrides, message", [
    (["distill.layer_map=sideways"], "unknown layer map"),
    (["distill.layer_map=explicit", "distill.layers=[1,9]"], "out of range"),
    (["student.layers=6", "student.init=teacher"], "deeper than the teacher"),
    (["student.hidden_size=128"], "wider"),
    (["student.width_ratio=1.5"], "student.width_ratio=1.5: must be in (0, 1]"),
    (["student.width_ratio=0.5", "student.hidden_size=32"], "give one (set the other to null)"),
    (["student.width_ratio=0.5"], "width 64 (student.width_ratio=0.5 gives 32); use student.init=random"),
    (["ted.width=32", "ted.width_ratio=2"], "give one"),
    (["units.ratio=1.5"], "must be in (0, 1]"),
    (["ted.width=0"], "filter width must be > 0"),
    (["ted.filter=conv"], "unknown filter"),
    (["task.name=glue9"], "unknown task"),
    (["task.name=sst2", "task.data_dir=/nonexistent/sst2"], "task.data_dir"),
    (["teacher=./no/such/model"], "no model directory"),
    (["train.precision=fp16"], "fp16 needs a GPU"),
    (["train.batch_size=4", "train.grad_accum=8"], "does not split evenly"),
    (["train.batch_size=33", "resources.num_workers=2"], "use a multiple of 2"),
    (["task.max_length=300"], "task.max_length=300 is longer than teacher=tiny-bert reads (256 positions)"),
    (["teacher=tiny-roberta", "task.max_length=257"], "(256 positions)"),  # 257 embeddings, 1 before the first
    (["train.max_steps_per_epoch=0"], "train.max_steps_per_epoch=0: must be >= 1"),
    (["finetune.batch_size=0"], "finetune.batch_size=0: must be >= 1"),
    (["distill.layers=[1,2", "distill.layer_map=explicit"], "'distill.layers=[1,2': cannot parse the value"),
    (["tracking.uri=http://127.0.0.1:5000"], "tracking.uri and tracking.experiment belong to kdsearch.tune"),
    (["distill.logit_loss=wasserstein"], "unknown logit loss"),
    (["train.precision=fp8"], "choose one of fp32, bf16, fp16"),
    (["distill.w_relation=1", "relation.teacher_layer=9"], "beyond the teacher's 4 layers"),
    (["distill.w_relation=1", "relation.heads=3"], "does not divide the teacher's projection widths"),
    (["distill.w_relation=1", "relation.kinds=qk+xy"], "unknown attention relation"),
    (["distill.w_relation=1", "teacher=tiny-qwen", "relation.kinds=qk"], "grouped-query attention"),
    (["distill.w_relation=1", "relation.layers=map", "distill.layer_map=none"], "relation.layers=map takes"),
    (["distill.w_relation=1", "relation.loss=l1"], "unknown relation loss"),
    (["train.teacher_cache=true", "teacher=tiny-gpt2"], "train.teacher_cache=true: encoder tasks only"),
    (["ted.stage1_lr=0"], "ted.stage1_lr=0.0: must be > 0"),
    (["train.lr=.inf"], "train.lr=inf: expected a finite number"),
    (["distill.temperature=.nan"], "distill.temperature=nan: expected a finite number"),
    (["distill.layers=[4,4]"], "distill.layers=[4, 4] is read only by distill.layer_map=explicit (here forward)"),
])
def test_train_command_rejects_bad_input_in_one_line_before_ray(overrides: list[str], message: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch.train import main

    assert main(overrides) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not ray.is_initialized()  # rejected before any cluster work


def test_a_hub_teacher_out_of_reach_fails_at_once(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    from huggingface_hub import constants

    from kdsearch.train import main

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")  # nothing listens on 443 here
    assert main(["teacher=no-such-org/no-such-model"]) == 2
    assert "not in the Hugging Face cache, and 127.0.0.1 is unreachable" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["teacher=no-such-org/no-such-model"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.parametrize("rows, overrides, message", [
    ("a b\tc d\t3.5\n", ["task.name=stsb", "teacher=tiny-gpt2"], "regression task"),
    ("a good film\t7\n", ["task.name=sst2"], "labels span 7..7"),  # found only by reading the rows
])
def test_train_command_rejects_bad_data_in_one_line(tmp_path, rows: str, overrides: list[str], message: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch.train import main

    header = "sentence1\tsentence2\tlabel\n" if "stsb" in overrides[0] else "sentence\tlabel\n"
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text(header + rows)
    assert main([*overrides, f"task.data_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # reading the rows may show datasets' progress
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and message in errors[0], lines
    assert not ray.is_initialized()


@pytest.mark.parametrize("argv, message", [
    (["space=nope"], "ted"),  # lists the shipped spaces
    (["space=ted", "distill.w_hiden=3"], "did you mean distill.w_hidden"),
    (["space=ted", "num_samples=0"], "error: num_samples=0: must be an int >= 1"),
    (["space=smoke", "tracking.uri=http://127.0.0.1:9"], "tracking"),
    (["space=smoke", "tracking.uri=./mlruns"], "sqlite"),
    (["space=flex", "units.ratio=0.9"], "units.ratio"),
    (["space=smoke", "objectives=[eval_score:up]"], "objectives"),
    (["space=smoke", "objectives=[eval_score:max,latency:min]"], "no trial reports latency"),
    (["space=smoke", "metric=eval_scor"], "did you mean eval_score"),
    (["space=smoke", "resume=true", "name=never-started"], "no search named never-started"),
    (["space=smoke", "dryrun=true"], "did you mean dry_run?"),
    (["space=smoke", "sampler_seed=1e3"], "error: sampler_seed=1000.0: expected an integer"),  # Optuna's sampler
    (["space=smoke", "seed=3"],  # the sampler's seed or a run's: say both
     "error: seed=3: no such config or budget key; did you mean train.seed or finetune.seed or sampler_seed?"),
    (["space=smoke", "smoke=maybe"], "error: smoke=maybe: expected true or false"),
    (["space=smoke", "name=my/search"], "error: name=my/search: a search name is letters, digits"),
    (["space=smoke", "results_dir="], "error: results_dir=: expected a non-empty string"),
    (["space=smoke", "grace_period=3"], "grace_period=3 exceeds the most epochs a trial runs (2, train.epochs)"),
    (["space=kd", "distill.w_logit=1", "distill.temperature=2", "distill.logit_loss=kl", "student.init=teacher",
      "train.lr=1e-3"], "these fix every param the space searches, which leaves nothing to search"),
])
@pytest.mark.parametrize("dry_run", [False, True])  # a dry run refuses what the real run would refuse
def test_tune_command_rejects_bad_input_in_one_line_before_ray(argv: list[str], message: str, dry_run: bool,
                                                              capsys: pytest.CaptureFixture) -> None:
    import ray

    from kdsearch.tune import main

    assert main([*argv, *(["dry_run=true"] if dry_run else [])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not ray.is_initialized()


def test_bad_space_files_are_rejected_with_the_reason(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.tune import main

    cases = {
        "empty": "params:\n  distill.layer_map: {type: categorical, choices: []}\n",
        "range": "params:\n  train.lr: {type: float, low: 0.1, high: 0.01}\n",
        "log": "params:\n  train.lr: {type: float, low: 0.0, high: 0.01, log: true}\n",
    }
    for name, params in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text("description: bad\nbase: {}\nmetric: eval_score\nmode: max\n"
                        "budget: {num_samples: 2}\n" + params)
        assert main([f"space={path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err


def test_a_space_whose_combinations_fail_is_warned_about_before_ray(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from kdsearch.tune import main

    # each value is valid on its own; 0.75 of the teacher's 64 units do not fit a student of width 32
    path = tmp_path / "units.yaml"
    path.write_text("description: interacting ranges\nmetric: eval_score\nmode: max\nbudget: {num_samples: 2}\n"
                    "base: {student: {init: random}, distill: {bridge: units}}\n"
                    "params:\n  student.width_ratio: {type: categorical, choices: [null, 0.5]}\n"
                    "  units.ratio: {type: float, low: 0.25, high: 0.75}\n")
    assert main([f"space={path}", "dry_run=true"]) == 0  # a warning, not an error: the other trials can run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "of 32 trials drawn from space units" in err[0]
    assert "student.width_ratio=0.5, units.ratio=0.75: units.ratio=0.75 keeps 48 teacher units" in err[0]
    assert main(["space=flex", "dry_run=true"]) == 0
    assert not capsys.readouterr().err  # the shipped spaces draw no failing trial
    path.write_text(path.read_text().replace("choices: [null, 0.5]", "choices: [0.5]").replace("low: 0.25", "low: 0.6"))
    assert main([f"space={path}", "dry_run=true"]) == 2  # every trial would fail: refused, not warned about
    assert "every one of 32 trials drawn from it fails validation" in capsys.readouterr().err


def test_task_shorthand_composes_with_task_keys_on_every_command() -> None:
    """`task=sst2 task.data_dir=...` names the task and adds its files (the later key must not replace the first)."""
    from kdsearch.config.overrides import load_config
    from kdsearch.search.reports import parse_args
    from kdsearch.search.settings import parse_search_args

    argv = ["task=sst2", "task.data_dir=/data/sst2", "task.train_size=64"]
    task = load_config(argv).task  # python -m kdsearch.train
    assert (task.name, task.data_dir, task.train_size) == ("sst2", "/data/sst2", 64)
    _, space = parse_search_args(["space=kd", *argv])  # python -m kdsearch.tune
    assert space.base["task"] == {"name": "sst2", "data_dir": "/data/sst2", "train_size": 64}
    assert parse_args(["study=flex", *argv])["cli"]["task"] == space.base["task"]  # python -m kdsearch.report


def test_rates_fit_the_teacher_unless_set() -> None:
    from kdsearch.config.overrides import load_config
    from kdsearch.config.schema import rate_defaults

    tiny = load_config([])
    assert (tiny.finetune.lr, tiny.finetune.epochs, tiny.train.lr) == (1e-3, 10, 1e-3)
    pretrained = load_config(["teacher=minilm"])
    assert (pretrained.finetune.lr, pretrained.finetune.epochs, pretrained.train.lr) == (1e-4, 3, 2e-4)
    assert load_config(["teacher=minilm", "student.init=random"]).train.lr == 5e-4
    mine = load_config(["teacher=minilm", "finetune.lr=3e-5", "finetune.epochs=5", "train.lr=1e-5"])
    assert (mine.finetune.lr, mine.finetune.epochs, mine.train.lr) == (3e-5, 5, 1e-5)
    assert "pretrained teacher (minilm): finetune.lr 0.0001" in rate_defaults("minilm", "teacher")
