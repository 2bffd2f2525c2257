"""Task data: read (local files, the hub or the embedded `default` task), validate, subsample, tokenise with a
content-addressed Arrow cache, and collate into padded tensors.

Local files go through the same `datasets` loaders as hub data. Imports no Ray, Optuna or MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value, load_dataset, load_from_disk
from torch.nn.utils.rnn import pad_sequence

from kdsearch.config import ConfigError, TaskConfig
from kdsearch.metrics import IGNORE_INDEX, compute_metrics
from kdsearch.tasks import RELEASE_LAYOUTS, TASKS, ReleaseLayout, TaskSpec, default_rows, task_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TASKS", "TaskSpec", "task_spec", "check_task", "load_raw_task", "train_texts", "tokenize_task",
           "collate", "compute_metrics"]

EXTENSIONS = ("tsv", "csv", "jsonl", "parquet")
_CACHE_VERSION = 1  # bump when the tokenised layout changes, so old cache entries are not reused
_CAUSAL_COLUMNS: tuple[tuple[str, ...], ...] = (("prompt", "response"), ("instruction", "output"), ("text",))


# --- finding and checking files -----------------------------------------------------------------------
def _split_stems(spec: TaskSpec) -> dict[str, tuple[str, ...]]:
    dev = ("dev_matched", "validation_matched") if spec.name == "mnli" else ()
    return {"train": ("train",), "validation": ("dev", "validation", *dev)}


def _split_files(cfg: TaskConfig, spec: TaskSpec) -> dict[str, Path]:
    root = Path(str(cfg.data_dir)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"task.data_dir={cfg.data_dir}: no such directory")
    found = sorted(p.name for p in root.iterdir())
    files: dict[str, Path] = {}
    for split, stems in _split_stems(spec).items():
        names = [f"{stem}.{ext}" for stem in stems for ext in EXTENSIONS]
        hits = [root / name for name in names if (root / name).is_file()]
        if not hits:
            raise ConfigError(f"task.data_dir={cfg.data_dir}: no {split} file; expected one of "
                              f"{', '.join(names)} (found: {', '.join(found) or 'nothing'})")
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
    with path.open(encoding="utf-8") as f:
        first, second = f.readline(), f.readline()
    if path.suffix == ".jsonl":
        try:
            return list(json.loads(first))
        except (json.JSONDecodeError, TypeError):
            raise ConfigError(f"{where}: the first line of {path.name} is not a JSON object") from None
    if not second.strip():
        raise ConfigError(f"{where}: {path.name} has a header but no rows")
    delimiter = "\t" if path.suffix == ".tsv" else ","
    return [name.strip() for name in next(csv.reader([first], delimiter=delimiter))]


def _headerless(columns: list[str], spec: TaskSpec) -> bool:
    """A release file without a header row: its first row is data (CoLA)."""
    names = RELEASE_LAYOUTS.get(spec.name, ReleaseLayout()).headerless
    return bool(names) and len(columns) == len(names) and not {"label", *spec.text_fields} & set(columns)


def _hub_columns(columns: list[str], spec: TaskSpec) -> list[str]:
    """Column names as the hub spells them (release names renamed where the hub's name is absent)."""
    if _headerless(columns, spec):
        return list(RELEASE_LAYOUTS[spec.name].headerless)
    rename = {a: b for a, b in RELEASE_LAYOUTS.get(spec.name, ReleaseLayout()).columns if b not in columns}
    return [rename.get(c, c) for c in columns]


def _check_columns(columns: list[str], spec: TaskSpec, where: str) -> None:
    found = f"found columns: {', '.join(columns)}"
    if spec.kind == "causal_lm":
        if not any(set(group) <= set(columns) for group in _CAUSAL_COLUMNS):
            raise ConfigError(f"{where}: needs a 'text' column, or 'prompt'+'response', or "
                              f"'instruction'+'output'; {found}")
        return
    if "label" not in columns:
        raise ConfigError(f"{where}: no 'label' column; {found}")
    for name in spec.text_fields:
        if name not in columns:
            raise ConfigError(f"{where}: no '{name}' column (task {spec.name} reads "
                              f"{', '.join(spec.text_fields)}); {found}")


def check_task(cfg: TaskConfig) -> TaskSpec:
    """Validate task.* cheaply (paths, non-empty files, header columns) without reading whole files."""
    spec = task_spec(cfg.name)
    if spec.name == "default":
        if cfg.data_dir is not None or cfg.hub is not None:
            raise ConfigError(f"task.data_dir={cfg.data_dir}, task.hub={cfg.hub}: task.name=default is "
                              "generated in code; unset both, or name the task that the files hold")
        return spec
    if cfg.data_dir is not None:
        for path in _split_files(cfg, spec).values():
            where = f"task.data_dir={cfg.data_dir}: {path.name}"
            _check_columns(_hub_columns(_header(path, f"task.data_dir={cfg.data_dir}"), spec), spec, where)
    elif cfg.hub is None:
        hint = "train/dev .jsonl files" if spec.kind == "causal_lm" else "train.tsv and dev.tsv"
        raise ConfigError(f"task.data_dir: task.name={spec.name} needs data; set task.data_dir=<folder with "
                          f"{hint}>" + ("" if spec.kind == "causal_lm" else " or task.hub=glue"))
    return spec


# --- loading ------------------------------------------------------------------------------------------
def _read_file(path: Path, where: str, cache_dir: str | None, spec: TaskSpec) -> Dataset:
    builder = {".tsv": "csv", ".csv": "csv", ".jsonl": "json", ".parquet": "parquet"}[path.suffix]
    # quoting=3 (QUOTE_NONE): GLUE TSVs contain bare quote characters inside sentences.
    extra: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if path.suffix == ".tsv" else {}
    if builder == "csv" and _headerless(_header(path, where), spec):
        extra["column_names"] = _hub_columns(_header(path, where), spec)
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **extra)
    except Exception as err:  # datasets wraps parser errors in DatasetGenerationError
        cause = str(err.__cause__ or err).splitlines()
        raise ConfigError(f"{where}: cannot read {path.name}: {cause[0] if cause else type(err).__name__}") \
            from None


def _load_hub(cfg: TaskConfig, spec: TaskSpec, cache_dir: str | None) -> dict[str, Dataset]:
    config_name = None if spec.kind == "causal_lm" else spec.name
    try:
        raw = load_dataset(str(cfg.hub), config_name, cache_dir=cache_dir)
    except Exception as err:  # network, unknown repo or config
        raise ConfigError(f"task.hub={cfg.hub}: cannot load {config_name or ''}: "
                          f"{(str(err).splitlines() or [''])[0]}") from None
    val = "validation_matched" if spec.name == "mnli" else "validation"
    if "train" not in raw or val not in raw:
        raise ConfigError(f"task.hub={cfg.hub}: needs 'train' and '{val}' splits; found: {', '.join(raw)}")
    return {"train": raw["train"], "validation": raw[val]}


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
    if spec.kind == "classification":
        if not pa.types.is_integer(labels.type):
            raise ConfigError(f"{where}: column 'label' holds {labels.type}; expected class ids {classes}")
        lo, hi = pc.min_max(labels).values()
        if labels.null_count or lo.as_py() < 0 or hi.as_py() >= spec.num_labels:
            raise ConfigError(f"{where}: labels span {lo}..{hi} (nulls: {labels.null_count}); "
                              f"task {spec.name} has classes {classes}")
    label_type = Value("int64" if spec.kind == "classification" else "float32")
    if ds.features["label"] != label_type:
        ds = ds.cast_column("label", label_type)
    if any(ds.data.column(name).null_count for name in spec.text_fields):  # empty TSV cells read as null
        ds = ds.map(lambda b: {f: [t or "" for t in b[f]] for f in spec.text_fields}, batched=True)
    return ds


def _to_prompt_response(ds: Dataset) -> Dataset:
    columns = next(group for group in _CAUSAL_COLUMNS if set(group) <= set(ds.column_names))

    def convert(batch: dict[str, list]) -> dict[str, list]:
        if columns == ("text",):
            return {"prompt": [""] * len(batch["text"]), "response": [t or "" for t in batch["text"]]}
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


def load_raw_task(cfg: TaskConfig, *, cache_dir: str | Path | None = None) -> tuple[TaskSpec, DatasetDict]:
    """(spec, {"train", "validation"}) with columns text_fields + label (or prompt + response).

    Each split's `_fingerprint` is the sha256 of its rows, so caches keyed on it survive new processes.

    `cache_dir` (e.g. Config.cache_dir) holds the Arrow copies `datasets` makes of local files; None uses
    the datasets default (~/.cache/huggingface/datasets).
    """
    spec = check_task(cfg)
    hf_cache = str(Path(cache_dir) / "raw") if cache_dir is not None else None
    if spec.name == "default":
        where = "task.name=default"
        splits = {split: Dataset.from_dict(cols) for split, cols in default_rows().items()}
    elif cfg.data_dir is not None:
        where = f"task.data_dir={cfg.data_dir}"
        splits = {split: _read_file(path, where, hf_cache, spec) for split, path in _split_files(cfg, spec).items()}
    else:
        where = f"task.hub={cfg.hub}"
        splits = _load_hub(cfg, spec, hf_cache)
    out = DatasetDict()
    for split, size in (("train", cfg.train_size), ("validation", cfg.eval_size)):
        ds = splits[split]
        ds = _normalise(ds, spec, f"{where}: {split}") if len(ds) else ds
        if len(ds) == 0:
            raise ConfigError(f"{where}: the {split} split has no rows")
        ds = _subsample(ds, size)
        out[split] = ds.select(range(len(ds)), new_fingerprint=_content_hash(ds))  # contiguous: no copy
    return spec, out


# --- text views -----------------------------------------------------------------------------------------
def _joined(row: dict[str, Any], spec: TaskSpec) -> str:
    return " | ".join(str(row[name]) for name in spec.text_fields)


def _as_prompt_response(row: dict[str, Any], spec: TaskSpec) -> tuple[str, str]:
    """A classification row as a causal LM reads it: `<text> =>` then ` <label word>`."""
    if spec.kind == "causal_lm":
        return row["prompt"], row["response"]
    return _joined(row, spec) + " =>", " " + spec.label_words[row["label"]]


def train_texts(raw: DatasetDict, spec: TaskSpec) -> Iterator[str]:
    """Every training string a model may read, to train a tokenizer for the built-in tiny models.

    Classification rows come in their causal form (`text => word`), so the label words, the `=>` marker and
    the ` | ` pair separator are in the vocabulary whichever model family uses the tokenizer.
    """
    causal = spec.kind == "causal_lm" or bool(spec.label_words)
    for row in raw["train"]:
        yield "".join(_as_prompt_response(row, spec)) if causal else _joined(row, spec)


# --- tokenisation and its cache -------------------------------------------------------------------------
def _content_hash(ds: Dataset) -> str:
    """sha256 of the rows (a subsample's indices applied): same rows and schema, same hash, in any process."""
    table = ds.with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    # The IPC stream writes only the rows of sliced arrays, not the whole buffers they point into.
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue()).hexdigest()


def _tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calls with truncation=/padding= leave their settings on the backend; they are not the vocabulary.
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    blob = json.dumps([type(tokenizer).__name__, ids, state], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cache_key(raw: DatasetDict, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase,
               max_length: int, family: str) -> str:
    parts = {
        "version": _CACHE_VERSION, "task": spec.name, "family": family, "max_length": max_length,
        "tokenizer": _tokenizer_hash(tokenizer),
        "splits": {split: [len(ds), _content_hash(ds)] for split, ds in sorted(raw.items())},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _encode_encoder(batch: dict[str, list], spec: TaskSpec, tokenizer: Any, max_length: int) -> dict:
    enc = tokenizer(*[batch[name] for name in spec.text_fields], truncation=True, max_length=max_length,
                    return_token_type_ids=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}


def _encode_causal(batch: dict[str, list], spec: TaskSpec, tokenizer: Any, max_length: int) -> dict:
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    pairs = [_as_prompt_response(row, spec) for row in rows]
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos = [bos_id] if bos_id is not None and bos_id != eos_id else []  # GPT-2 style (bos == eos) adds none
    eos = [eos_id] if eos_id is not None else []
    room = max_length - len(bos)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(p_ids, r_ids, strict=True):
        # The response (what the loss reads) keeps at least half the window; the prompt keeps its end,
        # which holds the `=>` marker right before the answer.
        response = (response + eos)[: room - min(len(prompt), room // 2)]
        prompt = prompt[max(0, len(prompt) - (room - len(response))):]
        out["input_ids"].append(bos + prompt + response)
        out["attention_mask"].append([1] * (len(bos) + len(prompt) + len(response)))
        out["labels"].append([IGNORE_INDEX] * (len(bos) + len(prompt)) + response)
    return out


def _features(spec: TaskSpec, family: str) -> Features:
    ids = Sequence(Value("int32"))
    if family == "causal":
        labels: Any = Sequence(Value("int32"))
    else:
        labels = Value("float32" if spec.kind == "regression" else "int64")
    return Features({"input_ids": ids, "attention_mask": Sequence(Value("int8")), "labels": labels})


def tokenize_task(raw: DatasetDict, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                  cache_dir: str | Path, family: Literal["encoder", "causal"]) -> DatasetDict:
    """Splits with input_ids, attention_mask, labels; read from `cache_dir/data/<key>` when already built.

    The key hashes the tokenizer, the rows themselves, max_length, family and task, so any change re-tokenises
    and an unchanged run (another trial, a rerun) reads the Arrow files saved by the first one.
    encoder: labels are the class id / score. causal: labels are the token ids, -100 on prompt tokens.
    """
    if family == "encoder" and spec.kind == "causal_lm":
        raise ConfigError(f"task.name={spec.name}: a causal_lm task needs a causal (decoder) teacher")
    if family == "causal" and spec.kind == "regression":
        raise ConfigError(f"task.name={spec.name}: a regression task needs an encoder teacher")
    target = Path(cache_dir) / "data" / _cache_key(raw, spec, tokenizer, max_length, family)
    if not target.is_dir():
        encode = _encode_causal if family == "causal" else _encode_encoder
        kwargs = {"spec": spec, "tokenizer": tokenizer, "max_length": max_length}
        # new_fingerprint: the key already names the result, and spares datasets hashing the tokenizer
        built = DatasetDict({
            split: ds.map(encode, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs,
                          features=_features(spec, family), keep_in_memory=True,
                          new_fingerprint=f"{target.name}-{split}")
            for split, ds in raw.items()})
        # Trials tokenise concurrently: write aside, then rename; the loser of the race drops its copy.
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        built.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))


def collate(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of rows: input_ids with `pad_id`, token labels with -100, anything else with 0.

    Scalar labels are stacked: long for classification, float32 for regression.
    """
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [torch.as_tensor(row[key]) for row in batch]
        if values[0].dim() == 0:
            stacked = torch.stack(values)
            out[key] = stacked.float() if stacked.is_floating_point() else stacked.long()
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        out[key] = pad_sequence([v.long() for v in values], batch_first=True, padding_value=fill)
    return out
