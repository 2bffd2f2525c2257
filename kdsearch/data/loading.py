"""Task data: read (local files, the hub or the embedded `default` task), validate and subsample; rows are
fingerprinted by content. `kdsearch.data.encoding` turns them into token ids and batches.

Local files go through the same `datasets` loaders as hub data. Imports no Ray, Optuna or MLflow.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import re
from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets import Dataset, DatasetDict, Features, Value, load_dataset

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.seq2seq import seq2seq_layout
from kdsearch.data.squad import check_qa_task, load_qa_splits
from kdsearch.data.tasks import (
    RELEASE_LAYOUTS,
    TASKS,
    ReleaseLayout,
    TaskSpec,
    default_rows,
    seq2seq_default_rows,
    table_spec,
    task_spec,
)

__all__ = ["TASKS", "TaskSpec", "task_spec", "check_task", "load_raw_task", "content_hash", "Split"]

EXTENSIONS = ("tsv", "csv", "jsonl", "parquet")
_CAUSAL_COLUMNS: tuple[tuple[str, ...], ...] = (("prompt", "response"), ("instruction", "output"), ("text",),
                                                ("sentence",))
"""What task=text reads: prompt -> response pairs, or raw text (a `text` column, or a single-sentence GLUE file's
`sentence` column: SST-2 or CoLA as a corpus, for continual pre-training)."""


# --- finding and checking files -----------------------------------------------------------------------
Split = Literal["train", "validation", "test"]
TRAINING_SPLITS: tuple[Split, ...] = ("train", "validation")
"""What training reads; `test` (held out, labelled) only `kdsearch.evaluate` reads."""


def _split_stems(spec: TaskSpec, split: Split) -> tuple[str, ...]:
    matched = spec.name == "mnli"  # MNLI's in-domain dev/test sets
    return {"train": ("train",),
            "validation": ("dev", "validation", "valid", "val",
                           *(("dev_matched", "validation_matched") if matched else ())),
            "test": ("test", *(("test_matched",) if matched else ()))}[split]


def _split_files(cfg: TaskConfig, spec: TaskSpec, splits: tuple[Split, ...] = TRAINING_SPLITS) -> dict[str, Path]:
    root = Path(str(cfg.data_dir)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.data_dir={cfg.data_dir}: no such directory")
    found = sorted(p.name for p in root.iterdir())
    shown = ", ".join(found[:8]) + (f", ... ({len(found) - 8} more)" if len(found) > 8 else "")
    files: dict[str, Path] = {}
    for split in splits:
        stems = _split_stems(spec, split)
        names = [f"{stem}.{ext}" for stem in stems for ext in EXTENSIONS]
        hits = [root / name for name in names if (root / name).is_file()]
        if not hits:
            raise ConfigError(f"task.data_dir={cfg.data_dir}: no {split} file; expected one of "
                              f"{', '.join(names)} (found: {shown or 'nothing'})")
        if len(hits) > 1:
            raise ConfigError(f"task.data_dir={cfg.data_dir}: {len(hits)} {split} files "
                              f"({', '.join(p.name for p in hits)}); keep one")
        files[split] = hits[0]
    return files


def _header(path: Path, where: str) -> list[str]:
    """Column names from the first line (or parquet footer), checking that at least one row follows."""
    if path.stat().st_size == 0:
        raise ConfigError(f"{where}: {path.name} is empty")
    if path.suffix == ".parquet":
        try:
            meta = pq.read_metadata(path)
        except Exception as err:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
            raise ConfigError(f"{where}: {path.name} is not a parquet file ({err})") from None
        if meta.num_rows == 0:
            raise ConfigError(f"{where}: {path.name} has no rows")
        return list(meta.schema.to_arrow_schema().names)
    with closing(_lines(path, where)) as lines:  # utf-8-sig: a byte-order mark (Excel's CSVs) is not in a name
        first = next(lines)
        if path.suffix == ".jsonl":
            row = _json_object(first)
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: the first line of {path.name} is not a JSON object")
            return list(row)
        rows = any(line.strip() for line in lines)  # blank lines are skipped, as the CSV reader skips them
    if not rows:
        raise ConfigError(f"{where}: {path.name} has a header but no rows")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    return [name.strip() for name in next(csv.reader([first], delimiter=delimiter))]


def _headerless(columns: Sequence[str], spec: TaskSpec) -> bool:
    """A release file without a header row: its first row is data (CoLA)."""
    names = RELEASE_LAYOUTS.get(spec.name, ReleaseLayout()).headerless
    return bool(names) and len(columns) == len(names) and not {"label", *spec.text_fields} & set(columns)


def _hub_columns(columns: list[str], spec: TaskSpec) -> list[str]:
    """Column names as the hub spells them (release names renamed where the hub's name is absent)."""
    if _headerless(columns, spec):
        return list(RELEASE_LAYOUTS[spec.name].headerless)
    rename = {a: b for a, b in RELEASE_LAYOUTS.get(spec.name, ReleaseLayout()).columns if b not in columns}
    return [rename.get(c, c) for c in columns]


def _check_columns(columns: list[str], spec: TaskSpec, where: str, label: str = "label") -> None:
    found = f"found columns: {', '.join(columns)}"
    if spec.kind == "causal_lm":
        if not any(set(group) <= set(columns) for group in _CAUSAL_COLUMNS):
            raise ConfigError(f"{where}: needs a 'text' (or GLUE 'sentence') column, or 'prompt'+'response', or "
                              f"'instruction'+'output'; {found}")
        return
    if label not in columns:
        raise ConfigError(f"{where}: no '{label}' column; {found}")
    for name in spec.text_fields:
        if name not in columns:
            raise ConfigError(f"{where}: no '{name}' column (task {spec.name} reads "
                              f"{', '.join(spec.text_fields)}); {found}")


def _lines(path: Path, where: str) -> Generator[str, None, None]:
    """The file's lines decoded as UTF-8; the first bad byte is a ConfigError naming its line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: line {number} of {path.name} is not UTF-8 (byte "
                                  f"0x{raw[err.start]:02x} at column {err.start + 1}); save the file as UTF-8") \
                    from None


def _check_rows(path: Path, where: str, columns: list[str], spec: TaskSpec,
                label: str = "label") -> list[tuple[int, str]]:
    """`_scan_rows`, once per file version: a search validates its base, every paper point and 32 probes, each
    reading the same files."""
    stat = path.stat()
    return _scan_rows(path.resolve(), stat.st_mtime_ns, stat.st_size, where, tuple(columns), spec, label)


@functools.lru_cache(maxsize=32)
def _scan_rows(path: Path, _mtime_ns: int, _size: int, where: str, columns: tuple[str, ...], spec: TaskSpec,
               label: str) -> list[tuple[int, str]]:
    """Every row of a file decodes and is whole: as many cells as the header (CSV/TSV), a JSON object (JSONL),
    and a label in each labelled row. One streaming pass; the loaders would otherwise fill gaps with nulls and
    fail later with a message that names neither the row nor the problem. Returns (line, label text) per row
    (parquet: row number), what task.name=table reads its classes from."""
    at = columns.index(label) if spec.kind != "causal_lm" and label in columns else None
    if path.suffix == ".parquet":
        values = pq.read_table(path, columns=[label]).column(0).to_pylist() if at is not None else []
        return [(i, "" if v is None else str(v)) for i, v in enumerate(values, 1)]
    labels: list[tuple[int, str]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(_lines(path, where), 1):
            if not line.strip():
                continue
            row = _json_object(line)
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: line {number} of {path.name} is not a JSON object")
            if at is not None:
                labels.append((number, "" if row.get(label) is None else str(row[label])))
        return labels
    tsv = path.suffix == ".tsv"
    reader = csv.reader(_lines(path, where), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    header = not _headerless(columns, spec)
    for row in reader:
        if not row or (header and reader.line_num == 1):
            continue
        if len(row) != len(columns):
            cells = f"{len(row)} cell" + ("" if len(row) == 1 else "s")
            raise ConfigError(f"{where}: line {reader.line_num} of {path.name} has {cells} where the header has "
                              f"{len(columns)} ({', '.join(columns)})")
        if at is not None:
            if not row[at].strip():
                raise ConfigError(f"{where}: line {reader.line_num} of {path.name} has an empty '{label}' cell")
            labels.append((reader.line_num, row[at]))
    return labels


def label_key(value: Any) -> str:
    """A label as one string however a loader typed it: 3, 3.0 and " 3" are "3"; text stays text."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _classes(keys: set[str]) -> tuple[str, ...]:
    """Class names in a stable order: numerically when every label is an integer, else alphabetically."""
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return tuple(sorted(keys, key=int))
    return tuple(sorted(keys))


def _table_labels(cfg: TaskConfig, files: dict[str, Path], where: str) -> tuple[str, ...]:
    """task.name=table's classes (classification), read from the training split; checks every split's labels
    against them (or, for regression, that each label is a number). One ConfigError line per problem."""
    template = replace(task_spec("table"), text_fields=cfg.text_columns or ("text",))
    per_split: dict[str, list[tuple[int, str]]] = {}
    for split, path in files.items():
        columns = _header(path, where)
        _check_columns(columns, template, f"{where}: {path.name}", label=cfg.label_column)
        per_split[split] = _check_rows(path, where, columns, template, label=cfg.label_column)
    if cfg.kind == "regression":
        for split, labels in per_split.items():
            for line, text in labels:
                try:
                    float(text)
                except ValueError:
                    raise ConfigError(f"{where}: line {line} of {files[split].name}: '{cfg.label_column}' is "
                                      f"{text!r}, not a number (task.kind=regression)") from None
        return ()
    classes = _classes({label_key(t) for _, t in per_split["train"]})
    if len(classes) < 2:
        raise ConfigError(f"{where}: {files['train'].name} holds one class ({', '.join(classes)}) in "
                          f"'{cfg.label_column}': nothing to learn; task.kind=regression if it is a score")
    for split, labels in per_split.items():
        unseen = sorted({label_key(t) for _, t in labels} - set(classes))
        if unseen:
            raise ConfigError(f"{where}: {files[split].name} has labels the training split lacks "
                              f"({', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''}); a model cannot "
                              f"predict a class it never saw")
    return classes


def _json_object(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _check_seq2seq(cfg: TaskConfig, spec: TaskSpec, splits: tuple[Split, ...]) -> None:
    """task.name=seq2seq: a data_dir whose files hold the source and target columns, every target non-empty; or
    a hub dataset, whose columns are checked when it loads (`seq2seq_layout`)."""
    if cfg.data_dir is not None and cfg.hub is not None:
        raise ConfigError(f"task.data_dir={cfg.data_dir}, task.hub={cfg.hub}: task.name=seq2seq reads one of them; "
                          "unset the other")
    if cfg.hub is not None:
        return
    if cfg.data_dir is None:
        raise ConfigError("task.data_dir: task.name=seq2seq reads a folder with train and dev files (tsv, csv, "
                          "jsonl, parquet) holding task.source_column and task.target_column, or a hub dataset "
                          "(task.hub=wmt16 task.hub_config=ro-en); set task.data_dir=<folder> or task.hub=<dataset> "
                          "(or task.name=seq2seq_default, the embedded task)")
    where = f"task.data_dir={cfg.data_dir}"
    template = replace(spec, text_fields=(cfg.source_column,))
    for path in _split_files(cfg, spec, splits).values():
        columns = _header(path, where)
        for key, name in (("source_column", cfg.source_column), ("target_column", cfg.target_column)):
            head = name.split(".")[0]
            if name not in columns and (head not in columns or path.suffix in (".tsv", ".csv")):
                dotted = f" ('{head}' is a {path.suffix[1:]} column of text, not dicts)" if head in columns else ""
                raise ConfigError(f"{where}: {path.name} has no '{name}' column (task.{key}){dotted}; found "
                                  f"columns: {', '.join(columns)}")
        # A dotted target (`translation.ro`) is a key of a JSON object: seq2seq_layout checks it once loaded.
        target = cfg.target_column if cfg.target_column in columns else cfg.target_column.split(".")[0]
        for line, text in _check_rows(path, where, columns, template, label=target):
            if not text.strip():
                raise ConfigError(f"{where}: line {line} of {path.name} has an empty '{cfg.target_column}' cell: "
                                  "every row needs a target to learn")


def check_task(cfg: TaskConfig, splits: tuple[Split, ...] = TRAINING_SPLITS) -> TaskSpec:
    """Validate task.*: paths, non-empty files, header columns, and one streaming pass over each text file
    (encoding, whole rows, labels present)."""
    spec = task_spec(cfg.name)
    if spec.name == "seq2seq":
        _check_seq2seq(cfg, spec, splits)
        return spec
    if spec.kind == "extractive_qa":
        check_qa_task(cfg, spec, splits)
        return spec
    if spec.name in ("default", "seq2seq_default"):
        if cfg.data_dir is not None or cfg.hub is not None:
            raise ConfigError(f"task.data_dir={cfg.data_dir}, task.hub={cfg.hub}: task.name={spec.name} is "
                              "generated in code; unset both, or name the task that the files hold")
        return spec
    if spec.name == "table":
        if cfg.data_dir is None:
            raise ConfigError("task.data_dir: task.name=table reads a folder with train and dev files (tsv, csv, "
                              "jsonl, parquet); set task.data_dir=<folder>")
        files = _split_files(cfg, spec, tuple(dict.fromkeys(("train", *splits))))  # classes: from train
        return table_spec(cfg, _table_labels(cfg, files, f"task.data_dir={cfg.data_dir}"))
    prompted = True  # a hub split's columns are known only once it is loaded: load_raw_task says then
    if cfg.data_dir is not None:
        for path in _split_files(cfg, spec, splits).values():
            where = f"task.data_dir={cfg.data_dir}: {path.name}"
            columns = _hub_columns(_header(path, f"task.data_dir={cfg.data_dir}"), spec)
            _check_columns(columns, spec, where)
            _check_rows(path, f"task.data_dir={cfg.data_dir}", columns, spec)
            prompted &= spec.kind == "causal_lm" and _prompted(columns)
    elif cfg.hub is None:
        hint = "train/dev .jsonl files" if spec.kind == "causal_lm" else "train.tsv and dev.tsv"
        raise ConfigError(f"task.data_dir: task.name={spec.name} needs data; set task.data_dir=<folder with "
                          f"{hint}>" + ("" if spec.kind == "causal_lm" else " or task.hub=glue"))
    return replace(spec, responses=prompted) if spec.kind == "causal_lm" else spec


# --- loading ------------------------------------------------------------------------------------------
def _read_file(path: Path, where: str, cache_dir: str | None, spec: TaskSpec) -> Dataset:
    builder = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}[path.suffix]
    # quoting=3 (QUOTE_NONE): GLUE TSVs contain bare quote characters inside sentences.
    extra: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
    if builder == "csv" and _headerless(header := _header(path, where), spec):
        extra["column_names"] = _hub_columns(header, spec)
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **extra)
    except Exception as err:  # datasets wraps parser errors in DatasetGenerationError
        cause = str(err.__cause__ or err).splitlines()
        raise ConfigError(f"{where}: cannot read {path.name}: {cause[0] if cause else type(err).__name__}") \
            from None


def _load_hub(cfg: TaskConfig, spec: TaskSpec, cache_dir: str | None, splits: tuple[Split, ...]) -> dict[str, Dataset]:
    config_name = cfg.hub_config if spec.kind in ("causal_lm", "seq2seq") else spec.name
    try:
        raw = load_dataset(str(cfg.hub), config_name, cache_dir=cache_dir)
    except Exception as err:  # network, unknown repo or config
        raise ConfigError(f"task.hub={cfg.hub}: cannot load {config_name or ''}: "
                          f"{(str(err).splitlines() or [''])[0]}") from None
    names = {split: f"{split}_matched" if spec.name == "mnli" and split != "train" else split for split in splits}
    missing = [name for name in names.values() if name not in raw]
    if missing:
        raise ConfigError(f"task.hub={cfg.hub}: needs the {', '.join(map(repr, missing))} split(s); "
                          f"found: {', '.join(raw)}")
    return {split: raw[name] for split, name in names.items()}


def _hub_layout(ds: Dataset, spec: TaskSpec, where: str) -> Dataset:
    """A release-layout split with the hub's column names and class ids."""
    rename = {a: b for a, b in zip(ds.column_names, _hub_columns(ds.column_names, spec), strict=True) if a != b}
    ds = ds.rename_columns(rename) if rename else ds
    classes = RELEASE_LAYOUTS.get(spec.name, ReleaseLayout()).classes
    label_type = ds.data.column("label").type if "label" in ds.column_names else None
    if not classes or not (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)):
        return ds
    unknown = set(pc.unique(ds.data.column("label")).to_pylist()) - set(classes)
    if unknown:
        raise ConfigError(f"{where}: labels {sorted(map(str, unknown))} are not {spec.name} classes "
                          f"({', '.join(classes)})")
    ids = {name: i for i, name in enumerate(classes)}
    return ds.map(lambda b: {"label": [ids[v] for v in b["label"]]}, batched=True,
                  features=Features({**ds.features, "label": Value("int64")}))


def _normalise(ds: Dataset, spec: TaskSpec, where: str) -> Dataset:
    """Keep exactly the task's columns: text fields + label, or prompt + response."""
    ds = _hub_layout(ds, spec, where)
    _check_columns(ds.column_names, spec, where)
    if spec.kind == "causal_lm":
        return _to_prompt_response(ds)
    ds = ds.select_columns([*spec.text_fields, "label"])
    labels = ds.data.column("label")
    classes = f"0..{spec.num_labels - 1}"
    numeric = pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type)
    if spec.kind == "regression" and not numeric:
        raise ConfigError(f"{where}: column 'label' holds {labels.type}; expected numbers")
    if spec.kind == "regression" and len(labels) and pc.all(pc.equal(labels, -1)).as_py():
        raise ConfigError(f"{where}: every label is -1, i.e. unlabelled (GLUE hides its test labels); "
                          "scores need a labelled split")
    if spec.kind == "classification":
        if not pa.types.is_integer(labels.type):
            raise ConfigError(f"{where}: column 'label' holds {labels.type}; expected class ids {classes}")
        lo, hi = pc.min_max(labels).values()
        if hi.as_py() == -1:
            raise ConfigError(f"{where}: every label is -1, i.e. unlabelled (GLUE hides its test labels); "
                              "scores need a labelled split")
        if labels.null_count or lo.as_py() < 0 or hi.as_py() >= spec.num_labels:
            raise ConfigError(f"{where}: labels span {lo}..{hi} (nulls: {labels.null_count}); "
                              f"task {spec.name} has classes {classes}")
    label_type = Value("int64" if spec.kind == "classification" else "float32")
    if ds.features["label"] != label_type:
        ds = ds.cast_column("label", label_type)
    if any(ds.data.column(name).null_count for name in spec.text_fields):  # empty TSV cells read as null
        ds = ds.map(lambda b: {f: [t or "" for t in b[f]] for f in spec.text_fields}, batched=True)
    return ds


def _table_layout(ds: Dataset, cfg: TaskConfig, spec: TaskSpec) -> Dataset:
    """task.name=table's rows as every task's: the label column named `label`, holding class ids (in the
    order of spec.label_names) or floats; the text columns as given."""
    if cfg.label_column != "label":
        ds = ds.remove_columns([c for c in ds.column_names if c == "label"]).rename_column(cfg.label_column, "label")
    if spec.kind == "regression":
        return ds.map(lambda b: {"label": [float(v) for v in b["label"]]}, batched=True,
                      features=Features({**ds.features, "label": Value("float32")}))
    ids = {name: i for i, name in enumerate(spec.label_names)}
    return ds.map(lambda b: {"label": [ids[label_key(v)] for v in b["label"]]}, batched=True,
                  features=Features({**ds.features, "label": Value("int64")}))


def _causal_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """The columns task=text reads from a file with these: the first group of _CAUSAL_COLUMNS it holds."""
    return next(group for group in _CAUSAL_COLUMNS if set(group) <= set(columns))


def _prompted(columns: Sequence[str]) -> bool:
    """Whether task=text reads these columns as prompt -> response pairs (not raw text)."""
    return len(_causal_columns(columns)) == 2


def _to_prompt_response(ds: Dataset) -> Dataset:
    columns = _causal_columns(ds.column_names)

    def convert(batch: dict[str, list]) -> dict[str, list]:
        if len(columns) == 1:  # raw text: every token is a target
            return {"prompt": [""] * len(batch[columns[0]]), "response": [t or "" for t in batch[columns[0]]]}
        prompts = [p or "" for p in batch[columns[0]]]
        if columns[0] == "instruction":  # Alpaca layout: instruction, optional input, output
            extra = batch.get("input") or [""] * len(prompts)
            prompts = ["\n".join(part for part in (p, x or "") if part) + "\n"
                       for p, x in zip(prompts, extra, strict=True)]
        return {"prompt": prompts, "response": [r or "" for r in batch[columns[1]]]}

    ds = ds.map(convert, batched=True, remove_columns=ds.column_names)
    return ds.filter(lambda b: [bool(r.strip()) for r in b["response"]], batched=True)  # blank corpus lines


def _subsample(ds: Dataset, size: int | None) -> Dataset:
    if size is None or size >= len(ds):
        return ds
    keep = np.sort(np.random.default_rng(0).choice(len(ds), size=size, replace=False))
    return ds.select(keep)


def load_raw_task(cfg: TaskConfig, *, cache_dir: str | Path | None = None,
                  splits: tuple[Split, ...] = TRAINING_SPLITS) -> tuple[TaskSpec, DatasetDict]:
    """(spec, {split: rows}) with columns text_fields + label (or prompt + response); train and validation by
    default, subsampled to task.train_size / task.eval_size; a test split is read whole.

    Each split's `_fingerprint` is the sha256 of its rows, so caches keyed on it survive new processes.

    `cache_dir` (e.g. Config.cache_dir) holds the Arrow copies `datasets` makes of local files; None uses
    the datasets default (~/.cache/huggingface/datasets).
    """
    spec = check_task(cfg, splits)
    hf_cache = str(Path(cache_dir) / "raw") if cache_dir is not None else None
    read: dict[str, Dataset]
    if spec.name in ("default", "seq2seq_default"):
        where = f"task.name={spec.name}"
        rows = default_rows() if spec.name == "default" else seq2seq_default_rows()
        read = {split: Dataset.from_dict(cols) for split, cols in rows.items() if split in splits}
    elif spec.kind == "extractive_qa":
        where = f"task.name={spec.name}"
        read = load_qa_splits(cfg, spec, splits, hf_cache)
    elif cfg.data_dir is not None:
        where = f"task.data_dir={cfg.data_dir}"
        read = {split: _read_file(path, where, hf_cache, spec)
                for split, path in _split_files(cfg, spec, splits).items()}
    else:
        where = f"task.hub={cfg.hub}"
        read = _load_hub(cfg, spec, hf_cache, splits)
    sizes = {"train": cfg.train_size, "validation": cfg.eval_size, "test": None}
    out = DatasetDict()
    for split in splits:
        ds, size = read[split], sizes[split]
        if spec.name == "table":
            ds = _table_layout(ds, cfg, spec)
        if spec.name == "seq2seq":
            ds = seq2seq_layout(ds, cfg, f"{where}: {split}")
        elif spec.kind not in ("seq2seq", "extractive_qa"):
            ds = _normalise(ds, spec, f"{where}: {split}") if len(ds) else ds
        if len(ds) == 0:
            raise ConfigError(f"{where}: the {split} split has no rows")
        ds = _subsample(ds, size)
        out[split] = ds.select(range(len(ds)), new_fingerprint=content_hash(ds))  # contiguous: no copy
    if spec.kind == "causal_lm":  # what the rows hold, now that a hub split's columns are known too
        spec = replace(spec, responses=all(_prompted(read[split].column_names) for split in splits))
    return spec, out


def content_hash(ds: Dataset) -> str:
    """sha256 of the rows (a subsample's indices applied): same rows and schema, same hash, in any process."""
    table = ds.with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    # The IPC stream writes only the rows of sliced arrays, not the whole buffers they point into.
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()
