"""Teacher outputs computed once over the training split and read back by row (`train.teacher_cache`).

The teacher is frozen and deterministic (eval mode), so its logits, hidden states and (for the relation terms)
attention projections for a row never change: every step of every trial that shares a fine-tuned teacher, data
and precision can read them instead of running the teacher forward. Stored per real token (padding depends on
the batch, so it is not stored), memory-mapped.
Plain PyTorch: no Ray, Optuna or MLflow import.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, Precision
from .evaluation import make_loader
from .kinds import TaskKind
from .losses import READS_PADDING
from .precision import autocast
from .relations import Projection, Tap
from .safe_io import load_tensors
from .step import TeacherOutputs, teacher_forward

ROW = "row"
"""The column `with_rows` adds to the training split: each batch says which cached rows it holds."""


def blocker(cfg: Config, kind: TaskKind) -> str | None:
    """Why this run cannot read its teacher from the cache, or None when it can."""
    if kind == "causal_lm":
        return "encoder tasks only (a causal LM's teacher logits span the vocabulary at every token)"
    hidden = cfg.distill.w_hidden > 0 and cfg.distill.layer_map != "none"
    if hidden and not cfg.distill.mask_padding:
        return ("it needs distill.mask_padding=true: the teacher's states at padding depend on the batch, so they "
                "are not cached (a space that searches it: add distill.mask_padding=true to fix it)")
    if hidden and cfg.distill.distance in READS_PADDING:
        return (f"distill.distance={cfg.distill.distance} reads the states at padded positions, which depend on the "
                "batch and are not cached")
    return None


def enabled(cfg: Config, kind: TaskKind, train_rows: int) -> bool:
    """train.teacher_cache as set, or (null) on where it applies and the run reads at least as many rows as the
    cache pass does: the pass costs one teacher forward per row, each step then saves one per row it reads."""
    if cfg.train.teacher_cache is not None:
        return cfg.train.teacher_cache
    batches = math.ceil(train_rows / cfg.train.batch_size)
    steps = batches if cfg.train.max_steps_per_epoch is None else min(batches, cfg.train.max_steps_per_epoch)
    return blocker(cfg, kind) is None and cfg.train.epochs * steps * cfg.train.batch_size >= train_rows


def build(teacher: nn.Module, dataset: Any, out: Path, *, pad_id: int, precision: Precision,
          device: torch.device, tap: Tap | None = None, batch_size: int = 64) -> None:
    """Run the teacher once over `dataset` in row order; write logits (rows, C) and hidden states (tokens,
    layers + 1, d), or with `tap` only the tapped attention projections (tokens, taps, d), in the dtype the live
    forward produces under `precision`, so a lookup equals the live pass."""
    teacher.eval()
    taps = sorted((layer, p) for layer in tap.layers for p in tap.projections) if tap else []
    names = ["projections"] if tap else ["logits", "hidden"]
    meta: dict[str, Any] = {"rows": len(dataset), "tokens": 0, "taps": taps}
    offsets = [0]
    with contextlib.ExitStack() as files:
        handles = {name: files.enter_context(open(out / f"{name}.bin", "wb")) for name in names}
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                outputs = teacher_forward(teacher, batch, hidden=tap is None, tap=tap)
            real = batch["attention_mask"].bool()
            for name, tensor in _stored(outputs, taps, real).items():
                handles[name].write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                meta |= {name: list(tensor.shape[1:]), f"{name}_dtype": str(tensor.dtype)}
            offsets.extend((offsets[-1] + real.sum(1).cumsum(0)).tolist())
    meta["tokens"] = offsets[-1]
    torch.save(torch.tensor(offsets), out / "offsets.pt")
    (out / "outputs.json").write_text(json.dumps(meta))  # (meta.json is the Store's)


def _stored(outputs: TeacherOutputs, taps: list[tuple[int, Projection]], real: torch.Tensor) -> dict[str, torch.Tensor]:
    """What one batch adds to the files: per row (logits) or per real token, row-major."""
    if not taps:
        assert outputs.hidden is not None
        return {"logits": outputs.logits, "hidden": torch.stack(outputs.hidden, dim=2)[real]}  # (tokens, L + 1, d)
    assert outputs.projections is not None
    if len({outputs.projections[key].shape for key in taps}) > 1:
        raise ValueError("train.teacher_cache: the relation's projections differ in width (grouped-query "
                         "attention), which the cache does not store; set train.teacher_cache=false")
    return {"projections": torch.stack([outputs.projections[key] for key in taps], dim=2)[real]}  # (tokens, K, d)


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
    offsets: torch.Tensor  # (rows + 1,): row r's tokens are hidden[offsets[r]:offsets[r + 1]]
    projections: torch.Tensor | None = None  # (tokens, taps, d), memory-mapped; taps[i] = (layer, projection)
    taps: tuple[tuple[int, Projection], ...] = ()

    @classmethod
    def open(cls, directory: str | Path, projections: str | Path | None = None) -> TeacherCache:
        """The cached logits and hidden states in `directory`, and (relation terms) the projections that
        `build(tap=...)` wrote to `projections` from the same rows."""
        directory = Path(directory)
        meta = json.loads((directory / "outputs.json").read_text())
        logits = _open(directory, "logits", meta, meta["rows"])
        hidden = _open(directory, "hidden", meta, meta["tokens"])
        if projections is None:
            return cls(logits, hidden, load_tensors(directory / "offsets.pt"))
        projections = Path(projections)
        tapped = json.loads((projections / "outputs.json").read_text())
        if tapped["tokens"] != meta["tokens"]:
            raise ValueError(f"train.teacher_cache: {projections} holds {tapped['tokens']} tokens, {directory} "
                             f"{meta['tokens']}: built from other data")
        taps = tuple((int(layer), str(p)) for layer, p in tapped["taps"])
        return cls(logits, hidden, load_tensors(directory / "offsets.pt"),
                   _open(projections, "projections", tapped, tapped["tokens"]), taps)

    def outputs(self, batch: dict[str, torch.Tensor], *, hidden: bool, tap: Tap | None = None) -> TeacherOutputs:
        """The teacher's outputs for `batch` (which carries ROW), on the batch's device; hidden states and the
        `tap`'s projections are zero at padding, where the live teacher's depend on the batch (hence
        distill.mask_padding=true; the relation losses leave padded queries and keys out anyway)."""
        device = batch["input_ids"].device
        rows = batch[ROW].cpu()  # gathered on the host: memory-mapped rows, then one copy to the device
        logits = self.logits[rows].to(device)
        if not hidden and tap is None:
            return TeacherOutputs(logits, None)
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        tokens = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)])
        real = batch["attention_mask"].cpu().bool()
        if not torch.equal(real.sum(dim=1), self.offsets[rows + 1] - self.offsets[rows]):
            raise ValueError("train.teacher_cache: the batch's tokens do not match the cached rows (was the cache "
                             "built from other data?)")
        states = _padded(self.hidden[tokens], real).to(device).unbind(dim=2) if hidden else None
        if tap is None:
            return TeacherOutputs(logits, states)
        keys = [(layer, p) for layer in tap.layers for p in sorted(tap.projections)]
        missing = [key for key in keys if key not in self.taps]
        if missing or self.projections is None:
            raise ValueError(f"train.teacher_cache: the cache holds the projections {list(self.taps)}, not "
                             f"{missing}: it was built for another relation setting")
        columns = torch.tensor([self.taps.index(key) for key in keys])
        tapped = _padded(self.projections[tokens][:, columns], real).to(device).unbind(dim=2)
        return TeacherOutputs(logits, states, dict(zip(keys, tapped, strict=True)))


def _padded(states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(real tokens, n, d) -> (B, T, n, d), zero at padding (`real`: the (B, T) attention mask as bool)."""
    out = states.new_zeros((*real.shape, *states.shape[1:]))
    out[real] = states
    return out


def with_rows(dataset: Any) -> Any:
    """The training split with its row numbers as a column, for `TeacherCache.outputs`."""
    return dataset.add_column(ROW, list(range(len(dataset))))
