"""The commands the READMEs show still work with today's CLIs: every key exists and every config validates
against real data files and model depths. Nothing trains and no Ray starts (`dry_run`, `validate`)."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification

from kdsearch import analyze, evaluate, leaderboard
from kdsearch.config.overrides import CONFIG_FILE, load_config, write_config_file
from kdsearch.config.paths import with_absolute_paths
from kdsearch.config.usage import wants_help
from kdsearch.run.validate import validate
from kdsearch.search import reports
from kdsearch.search.settings import SearchSettings, check_search, parse_search_args
from kdsearch.search.studies import grid_space

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "docs" / "results" / "README.md", REPO / "cluster" / "README.md"]
COMMAND = re.compile(r"(?<!`)(['\"]?)python -m kdsearch\.(\w+)(.*)")  # `...` is prose, not a command


def _documented() -> list[tuple[str, str, str]]:
    """(doc:line, module, arguments) for every `python -m kdsearch.<module>` in a fenced code block."""
    found = []
    for doc in DOCS:
        inside, start, pending = False, 0, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                inside = not inside
                continue
            if not inside:
                continue
            start = start if pending else number
            if line.endswith("\\"):  # a shell continuation: the command goes on
                pending += line[:-1] + " "
                continue
            full, pending = pending + line, ""
            match = COMMAND.search(full)
            if match and "..." not in full:  # "...same keys..." abbreviates the line above it
                quote, module, arguments = match.groups()
                arguments = arguments.split(quote)[0] if quote else arguments  # `ray exec ... 'python -m ...'`
                found.append((f"{doc.relative_to(REPO)}:{start}", module, arguments))
    return found


def _table(directory: Path) -> Path:
    """Support tickets as README's own-table example reads them: subject, body, a string topic."""
    directory.mkdir()
    for split in ("train", "dev"):
        rows = "".join(f"ticket {i},my {word} broke,{topic}\n" for i, (word, topic) in
                       enumerate([("invoice", "billing"), ("app", "bug"), ("login", "account")] * 3))
        (directory / f"{split}.csv").write_text("subject,body,topic\n" + rows)
    return directory


def _corpus(directory: Path) -> Path:
    for split in ("train", "validation"):
        rows = [{"text": f"line {i} of a small corpus for continual pre-training"} for i in range(8)]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def _argv(arguments: str, tmp_path: Path) -> list[str]:
    """The documented arguments, with a local store for the servers the docs name (a dry run reads its store)."""
    arguments = arguments.replace("<corpus dir>", str(_corpus(tmp_path)))
    arguments = arguments.replace("<table dir>", str(_table(tmp_path / "table")))
    local = f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"
    return [local if a.startswith("tracking.uri=") else a for a in shlex.split(arguments, comments=True)]


COMMANDS = _documented()


def test_the_readmes_show_every_command() -> None:
    modules = {module for _, module, _ in COMMANDS}
    assert modules == {"tune", "train", "leaderboard", "report", "analyze", "evaluate"}, modules


@pytest.mark.parametrize(("where", "module", "arguments"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_a_documented_command_validates(where: str, module: str, arguments: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the docs' relative paths (../shared/data/sst2) are from the checkout's root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a hub task is checked as on a machine with its cache
    argv = _argv(arguments, tmp_path)
    missing = [a for a in argv if "../shared/" in a and not Path(a.split("=", 1)[1]).exists()]
    if missing:
        pytest.skip(f"{where}: needs {missing[0]} (the shared offline data beside the checkout)")
    if wants_help(argv):
        assert importlib.import_module(f"kdsearch.{module}").main(argv) == 0
    elif module == "tune":
        settings, space = parse_search_args([*argv, "dry_run=true"])
        check_search(settings, space)
    elif module == "train":
        validate(with_absolute_paths(load_config(argv)))
    elif module == "report":
        args = reports.parse_args(argv)
        if args["study"] in ("seeded", "confirm"):  # their rows come from a finished search in MLflow
            return
        space, study = grid_space(reports.build_study(args), cli=args["cli"], seeds=args["seeds"],
                                  concurrency=args["concurrency"])
        check_search(SearchSettings(space=study.name, name=args["name"], dry_run=True,
                                    tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"), space)
    elif module == "analyze":
        _, cfg = analyze.parse_args(argv)
        validate(cfg)
    elif module == "evaluate":  # the model= folder a search exports, with the config it writes there
        cfg = load_config(["task.name=sst2", "task.data_dir=../shared/data/sst2"])
        documented = next(a.split("=", 1)[1] for a in argv if a.startswith("model="))
        saved = tmp_path / documented
        BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=100)).save_pretrained(saved)
        write_config_file(cfg, saved / CONFIG_FILE)
        argv = [f"model={saved}" if a.startswith("model=") else a for a in argv]
        _, loaded = evaluate.parse_args([*argv, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
        assert loaded.task == with_absolute_paths(cfg).task
    else:
        leaderboard.COMMAND.parse_args(argv)


def _yaml_blocks(doc: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.S)


def test_the_readmes_example_space_loads_validates_and_samples(tmp_path: Path) -> None:
    import optuna

    from kdsearch.search.space_model import define_by_run, initial_points, trial_config
    from kdsearch.search.spaces import load_space

    (text,) = [block for block in _yaml_blocks(REPO / "README.md") if "params:" in block]
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    settings, space = parse_search_args([f"space={path}", "dry_run=true"])
    check_search(settings, space)  # every param value and point against the real teacher
    assert space.params == load_space(path).params and list(space.params)[0] == "distill.layer_map"
    assert initial_points(space) == [{"distill.layer_map": "forward", "distill.w_hidden": 3.0,
                                      "distill.distance": "token_mse", "train.lr": 1.0e-3}]
    trial = optuna.trial.FixedTrial({"distill.layer_map": "none", "train.lr": 1e-3})
    define_by_run(space)(trial)  # `when`: no hidden weight or distance without a map
    assert set(trial.params) == {"distill.layer_map", "train.lr"}
    assert trial_config(space, trial.params).train.epochs == 4
