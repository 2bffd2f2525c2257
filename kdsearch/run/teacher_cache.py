"""Teacher outputs computed once over the training split and read back by row (`train.teacher_cache`).

The teacher is frozen and deterministic (eval mode), so its logits, hidden states and (for the relation terms)
attention projections for a row never change: every step of every trial that shares a fine-tuned teacher, data
and precision can read them instead of running the teacher forward. Stored per real token, memory-mapped; for a
run that reads the hidden states at padding too (TED's unmasked MSE, the T5 and Qwen3 standardisation), every
row's states at all positions up to the longest row. A padded position's state depends only on its row and
position (it attends to the row's real tokens alone), not on how long the batch's padding runs, so one stored
copy serves every batch.
Plain PyTorch: no Ray, Optuna or MLflow import.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.config.schema import Config, Precision
from kdsearch.core.errors import ConfigError
from kdsearch.core.kinds import TaskKind
from kdsearch.core.safe_io import load_tensors
from kdsearch.methods.inputs import MODEL_INPUTS
from kdsearch.methods.losses import DISTANCES
from kdsearch.methods.relations import Projection, Tap
from kdsearch.run.evaluation import make_loader
from kdsearch.run.precision import autocast
from kdsearch.run.step import TeacherOutputs, teacher_forward

ROW = "row"
"""The column `with_rows` adds to the training split: each batch says which cached rows it holds."""


def blocker(kind: TaskKind) -> str | None:
    """Why this run cannot read its teacher from the cache, or None when it can."""
    if kind in ("causal_lm", "seq2seq"):
        return "encoder tasks only (a causal LM's or an encoder-decoder's teacher logits span the vocabulary at " \
               "every token)"
    if kind == "extractive_qa":
        return "not for extractive QA yet (its start and end logits span every token of a window)"
    return None


def reads_padding(cfg: Config) -> bool:
    """Whether the run's hidden term reads the teacher's states at padded positions (so the cache stores them)."""
    d = cfg.distill
    return d.w_hidden > 0 and d.layer_map != "none" and (not d.mask_padding or DISTANCES.get(d.distance).reads_padding)


PADDED_AUTO_BYTES = 4 * 2**30
"""Under train.teacher_cache=null, the largest cache that keeps padding built unasked (rows x the longest row x
(layers + 1) x d values: 1.3 GB for MiniLM on 2,000 SST-2 rows in fp32, ~45 GB on all of SST-2)."""


def padded_bytes(dataset: Any, layers: int, width: int, precision: Precision) -> int:
    """Disk size of the hidden states of a cache that keeps padding: every row at the longest row's length."""
    longest = max(map(len, dataset["input_ids"]), default=0)
    return len(dataset) * longest * (layers + 1) * width * (4 if precision == "fp32" else 2)


def check_room(size: int, free: int) -> None:
    """Refuse an asked-for cache (train.teacher_cache=true) that the cache folder's disk cannot hold."""
    if size > free:
        raise ConfigError(f"train.teacher_cache=true: the teacher's states at every position need {size / 2**30:.1f} "
                          f"GiB and the cache folder's disk has {free / 2**30:.1f} GiB free; set "
                          "train.teacher_cache=false, or distill.mask_padding=true with a distance that skips "
                          "padding, or give cache_dir=<a larger disk>")


def enabled(cfg: Config, kind: TaskKind, train_rows: int, padded_size: int = 0) -> bool:
    """train.teacher_cache as set, or (null) on where it applies and the run reads at least as many rows as the
    cache pass does (the pass costs one teacher forward per row, each step then saves one per row it reads) and,
    for a run that reads padding, the cache's `padded_size` in bytes is at most PADDED_AUTO_BYTES."""
    if cfg.train.teacher_cache is not None:
        return cfg.train.teacher_cache
    batches = math.ceil(train_rows / cfg.train.batch_size)
    steps = batches if cfg.train.max_steps_per_epoch is None else min(batches, cfg.train.max_steps_per_epoch)
    small = not reads_padding(cfg) or padded_size <= PADDED_AUTO_BYTES
    return blocker(kind) is None and small and cfg.train.epochs * steps * cfg.train.batch_size >= train_rows


def build(teacher: nn.Module, dataset: Any, out: Path, *, pad_id: int, precision: Precision,
          device: torch.device, tap: Tap | None = None, padded: bool = False, batch_size: int = 64) -> None:
    """Run the teacher once over `dataset` in row order; write logits (rows, C) and hidden states (tokens,
    layers + 1, d), or with `tap` only the tapped attention projections (tokens, taps, d), in the dtype the live
    forward produces under `precision`, so a lookup equals the live pass. `padded`: the hidden states of every
    row at all positions up to the longest row (rows x that length tokens), padding included."""
    teacher.eval()
    taps = sorted((layer, p) for layer in tap.layers for p in tap.projections) if tap else []
    names = ["projections"] if tap else ["logits", "hidden"]
    length = max(map(len, dataset["input_ids"])) if padded and not tap else None
    meta: dict[str, Any] = {"rows": len(dataset), "tokens": 0, "taps": taps, "padded_length": length}
    offsets = [0]
    with contextlib.ExitStack() as files:
        handles = {name: files.enter_context(open(out / f"{name}.bin", "wb")) for name in names}
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
            batch = {k: v.to(device) for k, v in _pad_to(batch, length, pad_id).items()}
            with autocast(device, precision):
                outputs = teacher_forward(teacher, batch, hidden=tap is None, taps=(tap,) if tap else ())
            real = batch["attention_mask"].bool()
            for name, tensor in _stored(outputs, taps, real if length is None else torch.ones_like(real)).items():
                handles[name].write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                meta |= {name: list(tensor.shape[1:]), f"{name}_dtype": str(tensor.dtype)}
            offsets.extend((offsets[-1] + real.sum(1).cumsum(0)).tolist())
    meta["real_tokens"] = offsets[-1]
    meta["tokens"] = offsets[-1] if length is None else len(dataset) * length
    torch.save(torch.tensor(offsets), out / "offsets.pt")
    (out / "outputs.json").write_text(json.dumps(meta))  # (meta.json is the Store's)


def _stored(outputs: TeacherOutputs, taps: list[tuple[int, Projection]], real: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one batch adds to the files: per row (logits) or per real token, row-major."""
    if not taps:
        assert outputs.hidden is not None
        return {"logits": outputs.logits, "hidden": torch.stack(outputs.hidden, dim=2)[real]}  # (tokens, L + 1, d)
    assert outputs.projections is not None
    tapped = outputs.projections["encoder"]
    if len({tapped[key].shape for key in taps}) > 1:
        raise ValueError("train.teacher_cache: the relation's projections differ in width (grouped-query "
                         "attention), which the cache does not store; set train.teacher_cache=false")
    return {"projections": torch.stack([tapped[key] for key in taps], dim=2)[real]}  # (tokens, K, d)


def _pad_to(batch: dict[str, torch.Tensor], length: int | None, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch's model inputs padded on the right to `length` positions (None: as they are)."""
    if length is None or batch["input_ids"].shape[1] == length:
        return batch
    extra = length - batch["input_ids"].shape[1]
    return {k: F.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) if k in MODEL_INPUTS else v
            for k, v in batch.items()}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."))
    assert isinstance(dtype, torch.dtype)
    return dtype


def _open(directory: Path, name: str, meta: dict[str, Any], rows: int) -> torch.Tensor:
    shape = (rows, *meta[name])
    stored = torch.from_file(str(directory / f"{name}.bin"), shared=False, dtype=_dtype(meta[f"{name}_dtype"]),
                             size=int(torch.Size(shape).numel()))
    return stored.view(shape)


@dataclass(frozen=True)
class TeacherCache:
    logits: torch.Tensor  # (rows, C), memory-mapped
    hidden: torch.Tensor  # (tokens, layers + 1, d), memory-mapped
    offsets: torch.Tensor  # (rows + 1,): row r's real tokens are hidden[offsets[r]:offsets[r + 1]] (unpadded)
    projections: torch.Tensor | None = None  # (tokens, taps, d), memory-mapped; taps[i] = (layer, projection)
    taps: tuple[tuple[int, Projection], ...] = ()
    padded_length: int | None = None  # hidden holds rows x padded_length positions, padding included

    @classmethod
    def open(cls, directory: str | Path, projections: str | Path | None = None) -> TeacherCache:
        """The cached logits and hidden states in `directory`, and (relation terms) the projections that
        `build(tap=...)` wrote to `projections` from the same rows."""
        directory = Path(directory)
        meta = json.loads((directory / "outputs.json").read_text())
        logits = _open(directory, "logits", meta, meta["rows"])
        hidden = _open(directory, "hidden", meta, meta["tokens"])
        offsets, length = load_tensors(directory / "offsets.pt"), meta.get("padded_length")
        if projections is None:
            return cls(logits, hidden, offsets, padded_length=length)
        projections = Path(projections)
        tapped = json.loads((projections / "outputs.json").read_text())
        if tapped["tokens"] != meta["real_tokens"]:
            raise ValueError(f"train.teacher_cache: {projections} holds {tapped['tokens']} tokens, {directory} "
                             f"{meta['real_tokens']}: built from other data")
        taps = tuple((int(layer), str(p)) for layer, p in tapped["taps"])
        return cls(logits, hidden, offsets, _open(projections, "projections", tapped, tapped["tokens"]), taps,
                   padded_length=length)

    def outputs(self, batch: dict[str, torch.Tensor], *, hidden: bool, taps: Sequence[Tap] = ()) -> TeacherOutputs:
        """The teacher's outputs for `batch` (which carries ROW), on the batch's device. Hidden states at padding
        are the live teacher's in a padded cache, else zero (every distance then masks them out); the `taps`'
        projections are zero at padding (the relation losses leave padded queries and keys out). One-stack
        models only (an encoder-decoder's teacher is not cached: `blocker`)."""
        device = batch["input_ids"].device
        rows = batch[ROW].cpu()  # gathered on the host: memory-mapped rows, then one copy to the device
        logits = self.logits[rows].to(device)
        if not hidden and not taps:
            return TeacherOutputs(logits, None)
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        tokens = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)])
        real = batch["attention_mask"].cpu().bool()
        if not torch.equal(real.sum(dim=1), self.offsets[rows + 1] - self.offsets[rows]):
            raise ValueError("train.teacher_cache: the batch's tokens do not match the cached rows (was the cache "
                             "built from other data?)")
        states = self._hidden(rows, tokens, real).to(device).unbind(dim=2) if hidden else None
        if not taps:
            return TeacherOutputs(logits, states)
        (tap,) = taps
        assert tap.stack == "encoder", "an encoder-decoder's teacher outputs are not cached"
        keys = [(layer, p) for layer in tap.layers for p in sorted(tap.projections)]
        missing = [key for key in keys if key not in self.taps]
        if missing or self.projections is None:
            raise ValueError(f"train.teacher_cache: the cache holds the projections {list(self.taps)}, not "
                             f"{missing}: it was built for another relation setting")
        columns = torch.tensor([self.taps.index(key) for key in keys])
        tapped = _padded(self.projections[tokens][:, columns], real).to(device).unbind(dim=2)
        return TeacherOutputs(logits, states, {"encoder": dict(zip(keys, tapped, strict=True))})


    def _hidden(self, rows: torch.Tensor, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, T, layers + 1, d) hidden states of the batch's rows."""
        if self.padded_length is None:
            return _padded(self.hidden[tokens], real)
        if real.shape[1] > self.padded_length:
            raise ValueError("train.teacher_cache: the batch is longer than any cached row (was the cache built "
                             "from other data?)")
        positions = rows[:, None] * self.padded_length + torch.arange(real.shape[1])  # (B, T)
        return self.hidden[positions.flatten()].view(*real.shape, *self.hidden.shape[1:])


def _padded(states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(real tokens, n, d) -> (B, T, n, d), zero at padding (`real`: the (B, T) attention mask as bool)."""
    out = states.new_zeros((*real.shape, *states.shape[1:]))
    out[real] = states
    return out


def with_rows(dataset: Any) -> Any:
    """The training split with its row numbers as a column, for `TeacherCache.outputs`."""
    return dataset.add_column(ROW, list(range(len(dataset))))
