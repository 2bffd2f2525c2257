"""DART as the layer-selection paper's BART reads it: triple sets linearised as its code writes them
(task.source_format=triples), one training row per reference, generated outputs scored against all of an example's
references; a local folder laid out as the hub's `dart` read through the same load_dataset call, a short run on it,
and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.loading import load_raw_task
from kdsearch.data.metrics import GENERATION_METRICS, generation_metrics
from kdsearch.data.seq2seq import linearise_triples
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline")
DART = {"source_column": "tripleset", "target_column": "annotations.text", "source_format": "triples"}
PEOPLE, PLACES = ["Ada", "Bob", "Cleo", "Dan"], ["Rome", "Oslo", "Lima"]
RELATIONS = ["BIRTH_PLACE", "lives in", "Works_At"]


def released_linearisation(tripleset: list[list[str]]) -> str:
    """Layer-Selection dart/utils.py, AbstractSeq2SeqDataset.__init__ (lines 143-150), transcribed as written."""
    temp_triples = ''
    for i, tripleset_ in enumerate(tripleset):
        subj, rela, obj = tripleset_
        rela = rela.lower()
        if i > 0:
            temp_triples += ' | '
        temp_triples += '{} : {} : {}'.format(subj, rela, obj)  # noqa: UP032
    return temp_triples


def examples(n: int) -> list[dict]:
    """DART-shaped rows: one to three triples, one to three references (annotations with source and text)."""
    rows = []
    for i in range(n):
        triples = [[PEOPLE[(i + k) % 4], RELATIONS[(i + k) % 3], PLACES[(i * k + i) % 3]] for k in range(1 + i % 3)]
        texts = [" and ".join(f"{s} {p.lower().replace('_', ' ')} {o}" for s, p, o in triples) + ".",
                 *(f"{triples[0][0]} is linked to {triples[0][2]}." for _ in range(i % 2)),
                 *(f"It is about {triples[-1][2]}." for _ in range(i % 3 == 2))]
        rows.append({"tripleset": triples, "subtree_was_extended": bool(i % 2),
                     "annotations": {"source": ["WikiSQL_decl_sents"] * len(texts), "text": texts}})
    return rows


def dart(root: Path, rows: dict[str, list[dict]]) -> Path:
    """The hub's dart in miniature, written by `datasets` with its features (nested lists, a list of dicts), laid
    out as the hub's parquet export of it (revision refs/convert/parquet: default/<split>/0000.parquet), what
    `hf download` brings when the main branch holds only the loading script that datasets no longer runs."""
    from datasets import Dataset, Features, Sequence, Value

    features = Features({"tripleset": Sequence(Sequence(Value("string"))), "subtree_was_extended": Value("bool"),
                         "annotations": Sequence({"source": Value("string"), "text": Value("string")})})
    for split, split_rows in rows.items():
        columns = {name: [r[name] for r in split_rows] for name in features}
        Dataset.from_dict(columns, features=features).to_parquet(str(root / "default" / split / "0000.parquet"))
    return root


def load(tmp_path: Path, splits: tuple = ("train", "validation"), **task: object):
    cfg = TaskConfig(**{"name": "seq2seq", **task})  # type: ignore[arg-type]
    return load_raw_task(cfg, cache_dir=tmp_path / "cache", splits=splits)


# --- the linearisation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("triples", [
    [["Mars", "ORBITS", "the Sun"], ["Mars", "colour", "red"]],
    [["[TABLECONTEXT]", "[TITLE]", "Greece at the Olympics"], ["Athens", "Country_Of", "Greece"],
     ["x : y", "Has | Bar", "z"]],
    [],
])
def test_triples_read_as_the_released_code_writes_them(triples: list[list[str]]) -> None:
    assert linearise_triples(triples) == released_linearisation(triples)


def test_the_linearisation_is_pinned() -> None:
    assert linearise_triples([["Mars", "ORBITS", "the Sun"], ["Mars", "colour", "Red"]]) == \
        "Mars : orbits : the Sun | Mars : colour : Red"
    with pytest.raises(ValueError, match=r"\['a', 'b'\] is not \[subject, predicate, object\]"):
        linearise_triples([["a", "b"]])


# --- reading a local copy of the hub's dart ------------------------------------------------------------------
def test_a_local_dart_reads_one_row_per_reference(tmp_path: Path) -> None:
    rows = examples(6)
    hub = str(dart(tmp_path / "dart", {"train": rows, "validation": rows[:3], "test": rows[3:]}))
    spec, raw = load(tmp_path, hub=hub, **DART)
    assert spec.kind == "seq2seq" and raw["train"].column_names == ["source", "target", "references"]
    expected = [(released_linearisation(r["tripleset"]), text, r["annotations"]["text"])
                for r in rows for text in r["annotations"]["text"]]
    assert list(zip(raw["train"]["source"], raw["train"]["target"], raw["train"]["references"], strict=True)) == \
        expected
    assert len(raw["train"]) == sum(len(r["annotations"]["text"]) for r in rows) > len(rows)
    _, test = load(tmp_path, splits=("test",), hub=hub, **DART)
    assert test["test"]["source"][0] == "Dan : birth_place : Rome"


def test_blank_references_are_left_out(tmp_path: Path) -> None:
    rows = examples(3)
    rows[1]["annotations"] = {"source": ["a", "b"], "text": ["  ", "Kept."]}
    _, raw = load(tmp_path, hub=str(dart(tmp_path / "dart", {"train": rows, "validation": rows})), **DART)
    assert [r for s, r in zip(raw["train"]["source"], raw["train"]["target"], strict=True)
            if s == released_linearisation(rows[1]["tripleset"])] == ["Kept."]


# --- scoring against every reference ------------------------------------------------------------------------
def test_an_output_equal_to_the_second_reference_scores_full_marks() -> None:
    refs = [["Mars orbits the Sun .", "The red planet Mars goes round the Sun ."], ["Ada lives in Rome ."]]
    outputs = ["The red planet Mars goes round the Sun .", "Ada lives in Rome ."]
    assert generation_metrics(outputs, refs) == dict.fromkeys(GENERATION_METRICS, 1.0)
    first_only = generation_metrics(outputs, [r[0] for r in refs])
    assert first_only["exact_match"] == 0.5 and first_only["bleu"] < 0.8 and first_only["rouge_l"] < 0.9


def test_one_reference_in_a_list_scores_as_a_plain_reference() -> None:
    outputs, refs = ["three hundred", "ten one two"], ["three hundred", "ten two"]
    assert generation_metrics(outputs, [[r] for r in refs]) == generation_metrics(outputs, refs)


# --- a run ---------------------------------------------------------------------------------------------------
def test_a_short_run_on_a_local_dart_generates_once_per_example(tmp_path: Path, one_thread: None) -> None:
    from transformers import AutoTokenizer

    from kdsearch.run.evaluation import evaluate_generation
    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import load_teacher, prepare

    rows = examples(30)
    hub = dart(tmp_path / "dart", {"train": rows[:24], "validation": rows[24:]})
    cfg = load_config(["teacher=tiny-bart", "task.name=seq2seq", f"task.hub={hub}", "task.source_column=tripleset",
                       "task.target_column=annotations.text", "task.source_format=triples", "finetune.epochs=1",
                       "train.epochs=1", "train.batch_size=16", "eval.num_beams=2", f"cache_dir={tmp_path / 'c'}"])
    assert validate(cfg).kind == "seq2seq"
    prepared = prepare(cfg)
    validation = prepared.data["validation"]
    assert len(validation) == sum(len(r["annotations"]["text"]) for r in rows[24:]) > 6
    reports: list[dict] = []
    run_distillation(cfg, prepared, WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    assert {f"eval_{m}" for m in GENERATION_METRICS} <= set(reports[-1])
    assert all(0 <= reports[-1][f"eval_{m}"] <= 1 for m in GENERATION_METRICS)

    teacher, tok = load_teacher(prepared, torch.device("cpu")), AutoTokenizer.from_pretrained(prepared.teacher_dir)
    generate, rows_generated = teacher.generate, []

    def spy(**kwargs: object) -> torch.Tensor:
        rows_generated.append(len(kwargs["input_ids"]))  # type: ignore[arg-type]
        return generate(**kwargs)

    teacher.generate = spy  # type: ignore[method-assign]
    evaluate_generation(teacher, validation, tok, family="seq2seq", pad_id=prepared.pad_id,
                        device=torch.device("cpu"), batch_size=4)
    assert sum(rows_generated) == 6  # the validation examples, not their 11 reference rows

    # a model that writes each example's last reference scores full marks: outputs meet their own references
    last = {tuple(ids): refs[-1] for ids, refs in zip(validation["input_ids"], validation["references"], strict=True)}

    def writes_the_last_reference(**kwargs: torch.Tensor) -> torch.Tensor:
        rows = [last[tuple(t for t in ids.tolist() if t != prepared.pad_id)] for ids in kwargs["input_ids"]]
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True,
                                               padding_value=prepared.pad_id)

    teacher.generate = writes_the_last_reference  # type: ignore[method-assign]
    scores = evaluate_generation(teacher, validation, tok, family="seq2seq", pad_id=prepared.pad_id,
                                 device=torch.device("cpu"), batch_size=4)
    assert scores == {f"eval_{m}": pytest.approx(1.0) for m in GENERATION_METRICS}


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("task", "message"), [
    ({"source_format": "text"}, r"train: 'tripleset' \(task.source_column\) holds lists \(.*\); a source is one "
                                r"text per row, or with task.source_format=triples .* set task.source_format=triples"),
    ({"source_column": "annotations.source", "source_format": "text"},
     r"'annotations.source' \(task.source_column\) holds lists .*; write the files with the text to read"),
    ({"source_column": "annotations.source"}, r"task.source_format=triples reads lists of \[subject, predicate, "
                                              r"object\] texts \(DART's tripleset\); 'annotations.source' "),
    ({"target_column": "ids"}, r"'ids' \(task.target_column\) holds lists \(list<item: int64>\); a target is one "
                               r"text per row, or a list of texts"),
    ({"target_column": "annotations"}, r"'annotations' holds dicts \(keys source, text\); name one key"),
    ({"bad_triple": True}, r"train: row 2 of 'tripleset': \['Bob', 'knows'\] is not \[subject, predicate, object\]"),
    ({"no_reference": True}, r"train: row 3 has no non-blank reference in 'annotations.text'"),
])
def test_what_dart_cannot_read_is_one_line(tmp_path: Path, task: dict, message: str) -> None:
    from data_utils import write

    rows = [{**r, "ids": [1, 2]} for r in examples(3)]
    if task.pop("bad_triple", False):
        rows[1]["tripleset"] = [["Bob", "knows"]]
    if task.pop("no_reference", False):
        rows[2]["annotations"] = {"source": [], "text": []}
    for split in ("train", "validation"):
        write(tmp_path / "hub" / f"{split}.jsonl", rows, "jsonl")
    with pytest.raises(ConfigError, match=message) as err:
        load(tmp_path, hub=str(tmp_path / "hub"), **{**DART, **task})
    assert "\n" not in str(err.value)


def test_the_source_format_is_a_seq2seq_key_with_two_values() -> None:
    with pytest.raises(ConfigError, match=r"task.source_format: read only by task.name=seq2seq \(here sst2\)"):
        load_config(["task.name=sst2", "task.source_format=triples"])
    with pytest.raises(ConfigError, match=r"task.source_format=graph: .*triples") as err:
        load_config(["task.name=seq2seq", "task.source_format=graph"])
    assert "\n" not in str(err.value)
