"""task.name=seq2seq's rows from whatever was read (local files or a hub dataset): the named source and target
columns, or one key of a dict column (`translation.en`), as text columns `source` and `target`. Checked here,
where a hub split's columns are first known. Imports no Ray, Optuna or MLflow."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, Value

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError

__all__ = ["seq2seq_layout"]


def _column(ds: Dataset, name: str, key: str, where: str) -> str:
    """The column of `ds.flatten()` that task.<key>=<name> reads: the name itself, or `column.key` of a dict
    column (the hub's WMT16 `translation` holds {"en": ..., "ro": ...}). One ConfigError line if it is not there
    or holds no text."""
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
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        raise ConfigError(f"{where}: '{name}' (task.{key}) holds lists ({kind}); a seq2seq row reads one text per "
                          "column: write the files with the text to read")
    return name


def seq2seq_layout(ds: Dataset, cfg: TaskConfig, where: str) -> Dataset:
    """task.name=seq2seq's rows as every seq2seq task's: columns `source` and `target`, both text, every target
    non-empty."""
    columns = [_column(ds, name, key, where)
               for key, name in (("source_column", cfg.source_column), ("target_column", cfg.target_column))]
    if any("." in c and c not in ds.column_names for c in columns):
        ds = ds.flatten(max_depth=8)
    ds = ds.select_columns(list(dict.fromkeys(columns)))

    def convert(batch: dict[str, list]) -> dict[str, list]:
        return {name: ["" if v is None else str(v) for v in batch[column]]
                for name, column in zip(("source", "target"), columns, strict=True)}

    ds = ds.map(convert, batched=True, remove_columns=ds.column_names,
                features=Features({"source": Value("string"), "target": Value("string")}))
    blank = pc.equal(pc.utf8_trim_whitespace(ds.data.column("target")), "")
    if pc.any(blank).as_py():
        row = pc.index(blank, True).as_py() + 1
        raise ConfigError(f"{where}: row {row} has an empty target ('{cfg.target_column}'): every row needs a "
                          "target to learn")
    return ds
