"""task.name=seq2seq's rows from whatever was read (local files or a hub dataset): the named source and target
columns, or one key of a dict column (`translation.en`), as text columns `source` and `target`; a source of
triples (task.source_format=triples) linearised as the layer-selection code reads DART's, and a target of several
references one row per reference, each carrying all of them in `references`. Checked here, where a hub split's
columns are first known. Imports no Ray, Optuna or MLflow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Value
from datasets import Sequence as ListOf

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError

__all__ = ["REFERENCES", "linearise_triples", "seq2seq_layout"]

REFERENCES = "references"
"""The column of a multi-reference task's rows (raw: texts; tokenised: token ids) that generated outputs are
scored against; every reference of the row's example, the row's own target among them."""


def linearise_triples(triples: Sequence[Sequence[str]]) -> str:
    """A DART triple set as the layer-selection paper's BART reads it (github.com/MANGA-UOFA/Layer-Selection,
    dart/utils.py, AbstractSeq2SeqDataset.__init__, lines 143-150): `subject : predicate : object` per triple, the
    predicate lower-cased, the triples joined by ` | `. [["Mars", "ORBITS", "Sun"], ["Mars", "colour", "red"]]
    -> "Mars : orbits : Sun | Mars : colour : red". A triple of other than three parts is a ValueError."""
    parts = []
    for triple in triples:
        if len(triple) != 3:
            raise ValueError(f"{list(triple)} is not [subject, predicate, object]")
        subject, predicate, obj = triple
        parts.append(f"{subject} : {predicate.lower()} : {obj}")
    return " | ".join(parts)


def _is_list(kind: pa.DataType) -> bool:
    return bool(pa.types.is_list(kind) or pa.types.is_large_list(kind))


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _column(ds: Dataset, name: str, key: str, where: str) -> tuple[str, pa.DataType]:
    """The column of `ds.flatten()` that task.<key>=<name> reads, and its type: the name itself, or `column.key`
    of a dict column (the hub's WMT16 `translation` holds {"en": ..., "ro": ...}). One ConfigError line if it is
    not there or holds dicts."""
    types = {field.name: field.type for field in ds.data.schema}
    if name not in types:
        types = {field.name: field.type for field in ds.flatten(max_depth=8).data.schema}
    if name not in types:
        parent, _, leaf = name.rpartition(".")
        if not parent or parent.split(".")[0] not in ds.column_names:
            raise ConfigError(f"{where}: no '{name}' column (task.{key}); found columns: "
                              f"{', '.join(ds.column_names)}")
        if parent in types:  # a leaf: text, a number or a list
            raise ConfigError(f"{where}: task.{key}={name} reads key '{leaf}' of '{parent}', which holds "
                              f"{types[parent]}, not dicts")
        keys = sorted(n[len(parent) + 1:].split(".")[0] for n in types if n.startswith(parent + "."))
        raise ConfigError(f"{where}: '{parent}' has no key '{leaf}' (task.{key}={name}); "
                          + (f"its keys: {', '.join(dict.fromkeys(keys))}" if keys else "no such column"))
    kind = types[name]
    if pa.types.is_struct(kind):
        keys = [kind.field(i).name for i in range(kind.num_fields)]
        raise ConfigError(f"{where}: '{name}' holds dicts (keys {', '.join(keys)}); name one key, e.g. "
                          f"task.{key}={name}.{keys[0]}")
    return name, kind


def _check_kinds(cfg: TaskConfig, source: pa.DataType, target: pa.DataType, where: str) -> None:
    """A source of text (or, with task.source_format=triples, lists of text triples) and a target of text or of
    lists of texts; anything else is one ConfigError line that says what would read."""
    triples = _is_list(source) and _is_list(source.value_type) and _is_text(source.value_type.value_type)
    if cfg.source_format == "triples" and not triples:
        raise ConfigError(f"{where}: task.source_format=triples reads lists of [subject, predicate, object] texts "
                          f"(DART's tripleset); '{cfg.source_column}' (task.source_column) holds {source}")
    if cfg.source_format == "text" and _is_list(source):
        hint = (" (DART's tripleset): set task.source_format=triples to read them as the layer-selection code does"
                if triples else "; write the files with the text to read")
        raise ConfigError(f"{where}: '{cfg.source_column}' (task.source_column) holds lists ({source}); a source is "
                          f"one text per row, or with task.source_format=triples a list of [subject, predicate, "
                          f"object] triples{hint}")
    if _is_list(target) and not _is_text(target.value_type):
        raise ConfigError(f"{where}: '{cfg.target_column}' (task.target_column) holds lists ({target}); a target is "
                          "one text per row, or a list of texts (several references, as DART's annotations.text)")


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def seq2seq_layout(ds: Dataset, cfg: TaskConfig, where: str) -> Dataset:
    """task.name=seq2seq's rows as every seq2seq task's: columns `source` and `target`, both text, every target
    non-empty. A target column of lists (several references per row) gives one row per non-blank reference, in
    order, each with `references`: all of them, what its generated output is scored against (the layer-selection
    code trains on every DART annotation and scores BLEU against all of an example's: dart/utils.py lines 152-157,
    finetune.py lines 185-194)."""
    (source, source_kind), (target, target_kind) = [
        _column(ds, name, key, where)
        for key, name in (("source_column", cfg.source_column), ("target_column", cfg.target_column))]
    _check_kinds(cfg, source_kind, target_kind, where)
    if any("." in c and c not in ds.column_names for c in (source, target)):
        ds = ds.flatten(max_depth=8)
    ds = ds.select_columns(list(dict.fromkeys((source, target))))
    multi = _is_list(target_kind)

    def read_source(value: Any, row: int) -> str:
        if cfg.source_format == "text":
            return _text(value)
        try:
            return linearise_triples([[_text(part) for part in triple] for triple in value or []])
        except ValueError as err:
            raise ConfigError(f"{where}: row {row} of '{cfg.source_column}': {err}") from None

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        sources = [read_source(v, i + 1) for v, i in zip(batch[source], indices, strict=True)]
        if not multi:
            return {"source": sources, "target": [_text(v) for v in batch[target]]}
        out: dict[str, list] = {"source": [], "target": [], REFERENCES: []}
        for text, refs, i in zip(sources, batch[target], indices, strict=True):
            kept = [_text(r) for r in refs or [] if _text(r).strip()]  # the paper's scorer drops blank ones too
            if not kept:
                raise ConfigError(f"{where}: row {i + 1} has no non-blank reference in '{cfg.target_column}': "
                                  "every row needs a target to learn")
            out["source"] += [text] * len(kept)
            out["target"] += kept
            out[REFERENCES] += [kept] * len(kept)
        return out

    features = {"source": Value("string"), "target": Value("string"),
                **({REFERENCES: ListOf(Value("string"))} if multi else {})}
    ds = ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names,
                features=Features(features))
    blank = pc.equal(pc.utf8_trim_whitespace(ds.data.column("target")), "")
    if pc.any(blank).as_py():
        row = pc.index(blank, True).as_py() + 1
        raise ConfigError(f"{where}: row {row} has an empty target ('{cfg.target_column}'): every row needs a "
                          "target to learn")
    return ds
