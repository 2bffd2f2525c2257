"""task.name=seq2seq from a hub dataset: a local copy laid out like the hub's WMT16 (`ro-en` config, one
`translation` column of {"en", "ro"} dicts) read through the same load_dataset(hub, config) call, dotted
columns, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_utils import write

from kdsearch.config.overrides import load_config
from kdsearch.config.paths import with_absolute_paths
from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.loading import load_raw_task
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline")
WMT = {"source_column": "translation.en", "target_column": "translation.ro"}


def wmt16(root: Path, rows: int = 4) -> Path:
    """The hub's wmt16 in miniature: config `ro-en`, splits train/validation/test, declared in the README."""
    for split in ("train", "validation", "test"):
        pairs = [{"translation": {"en": f"{split} house {i}", "ro": f"{split} casa {i}"}} for i in range(rows)]
        write(root / "ro-en" / f"{split}.jsonl", pairs, "jsonl")
    files = "".join(f"  - split: {s}\n    path: ro-en/{s}.jsonl\n" for s in ("train", "validation", "test"))
    (root / "README.md").write_text(f"---\nconfigs:\n- config_name: ro-en\n  data_files:\n{files}---\n")
    return root


def load(tmp_path: Path, splits: tuple = ("train", "validation"), **task: object):
    cfg = TaskConfig(**{"name": "seq2seq", **task})  # type: ignore[arg-type]
    return load_raw_task(cfg, cache_dir=tmp_path / "cache", splits=splits)


def test_a_translation_column_reads_as_source_and_target(tmp_path: Path) -> None:
    hub = str(wmt16(tmp_path / "wmt16"))
    spec, raw = load(tmp_path, hub=hub, hub_config="ro-en", **WMT)
    assert spec.kind == "seq2seq" and set(raw) == {"train", "validation"}
    assert raw["train"].column_names == ["source", "target"]
    assert raw["validation"][2] == {"source": "validation house 2", "target": "validation casa 2"}
    _, test = load(tmp_path, splits=("test",), hub=hub, hub_config="ro-en", **WMT)
    assert test["test"][0] == {"source": "test house 0", "target": "test casa 0"}
    _, back = load(tmp_path, hub=hub, hub_config="ro-en", source_column="translation.ro",
                   target_column="translation.en")
    assert back["train"][1] == {"source": "train casa 1", "target": "train house 1"}


def test_dotted_columns_read_json_objects_in_a_data_dir(tmp_path: Path) -> None:
    rows = [{"id": i, "translation": {"en": f"house {i}", "ro": f"casa {i}"}} for i in range(3)]
    write(tmp_path / "d" / "train.jsonl", rows, "jsonl")
    write(tmp_path / "d" / "dev.jsonl", rows[:2], "jsonl")
    _, raw = load(tmp_path, data_dir=str(tmp_path / "d"), **WMT)
    assert raw["validation"][1] == {"source": "house 1", "target": "casa 1"}


@pytest.mark.parametrize(("task", "message"), [
    ({"source_column": "translation.de"}, r"train: 'translation' has no key 'de' \(task.source_column="
                                          r"translation.de\); its keys: en, ro"),
    ({"target_column": "translation"}, r"'translation' holds dicts \(keys en, ro\); name one key, e.g. "
                                       r"task.target_column=translation.en"),
    ({"source_column": "text.en"}, r"no 'text.en' column \(task.source_column\); found columns: translation"),
    ({"source_column": "note.en"}, r"task.source_column=note.en reads key 'en' of 'note', which holds string, "
                                   r"not dicts"),
    ({"source_column": "refs"}, r"'refs' \(task.source_column\) holds lists"),
    ({"target_column": "translation.ro", "source_column": "translation.en", "empty": True},
     r"train: row 2 has an empty target \('translation.ro'\)"),
])
def test_a_bad_column_is_one_line_naming_what_is_there(tmp_path: Path, task: dict, message: str) -> None:
    rows = [{"translation": {"en": f"house {i}", "ro": "" if task.get("empty") and i == 1 else f"casa {i}"},
             "note": "n", "refs": ["a", "b"]} for i in range(3)]
    for split in ("train", "validation"):
        write(tmp_path / "hub" / f"{split}.jsonl", rows, "jsonl")
    task = {k: v for k, v in ({**WMT, **task}).items() if k != "empty"}
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, hub=str(tmp_path / "hub"), **task)
    assert "\n" not in str(err.value)


def test_hub_config_and_its_refusals(tmp_path: Path) -> None:
    hub = str(wmt16(tmp_path / "wmt16"))
    with pytest.raises(ConfigError, match=r"task.hub=.*wmt16: cannot load de-en"):
        load(tmp_path, hub=hub, hub_config="de-en", **WMT)
    with pytest.raises(ConfigError, match="task.hub_config=ro-en: read only by task.name=seq2seq or text"):
        TaskConfig(name="sst2", hub_config="ro-en")
    with pytest.raises(ConfigError, match="task.hub_config=ro-en: names a config of task.hub"):
        TaskConfig(name="seq2seq", hub_config="ro-en", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="task.name=seq2seq reads one of them"):
        load(tmp_path, hub=hub, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"task.data_dir: .* or task.hub=<dataset>"):
        load(tmp_path)


def test_a_csv_column_has_no_keys(tmp_path: Path) -> None:
    rows = [{"translation": "house", "target": "casa"}]
    write(tmp_path / "d" / "train.csv", rows, "csv")
    write(tmp_path / "d" / "dev.csv", rows, "csv")
    with pytest.raises(ConfigError, match=r"train.csv has no 'translation.en' column \(task.source_column\) "
                                          r"\('translation' is a csv column of text, not dicts\)"):
        load(tmp_path, data_dir=str(tmp_path / "d"), source_column="translation.en")


def test_a_local_hub_copy_validates_without_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # nothing says offline, and nothing listens there
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    hub = wmt16(tmp_path / "wmt16")
    args = ["teacher=tiny-t5", "task.name=seq2seq", "task.hub_config=ro-en", *(f"task.{k}={v}" for k, v in WMT.items())]
    spec = validate(load_config([*args, f"task.hub={hub}"]))
    assert spec.kind == "seq2seq"
    with pytest.raises(ConfigError, match=r"task.hub=wmt16: 127.0.0.1 is unreachable") as err:
        validate(load_config([*args, "task.hub=wmt16"]))
    assert "\n" not in str(err.value)


def test_a_relative_hub_folder_is_made_absolute_and_a_hub_id_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    wmt16(tmp_path / "copy")
    monkeypatch.chdir(tmp_path)  # Tune trials read from other working directories
    args = ["teacher=tiny-t5", "task.name=seq2seq", "task.hub_config=ro-en"]
    assert with_absolute_paths(load_config([*args, "task.hub=copy"])).task.hub == str((tmp_path / "copy").resolve())
    assert with_absolute_paths(load_config([*args, "task.hub=wmt16"])).task.hub == "wmt16"


def test_a_corpus_reads_the_named_config_too(tmp_path: Path) -> None:
    for config in ("a", "b"):
        for split in ("train", "validation"):
            write(tmp_path / "hub" / config / f"{split}.jsonl", [{"text": f"corpus {config} {i}"} for i in range(3)],
                  "jsonl")
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.jsonl\n"
                      f"  - split: validation\n    path: {c}/validation.jsonl\n" for c in ("a", "b"))
    (tmp_path / "hub" / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    _, raw = load_raw_task(TaskConfig(name="text", hub=str(tmp_path / "hub"), hub_config="b"),
                           cache_dir=tmp_path / "cache")
    assert raw["train"]["response"] == [f"corpus b {i}" for i in range(3)]


def test_the_hubs_translation_feature_reads_as_a_dict_column() -> None:
    from datasets import Dataset, Features, Translation

    from kdsearch.data.seq2seq import seq2seq_layout

    rows = {"translation": [{"en": "house", "ro": "casa"}, {"en": "tree", "ro": "copac"}]}
    ds = Dataset.from_dict(rows, features=Features({"translation": Translation(languages=["en", "ro"])}))
    out = seq2seq_layout(ds, TaskConfig(name="seq2seq", hub="wmt16", **WMT), "task.hub=wmt16: train")
    assert out[:] == {"source": ["house", "tree"], "target": ["casa", "copac"]}
