"""Teacher outputs computed once over the training split and read back by row (`train.teacher_cache=true`).

The teacher is frozen and deterministic (eval mode), so its logits, hidden states and (for the relation terms)
attention projections for a row never change: every step of every trial that shares a fine-tuned teacher, data
and precision can read them instead of running the teacher forward. Stored per real token (padding depends on
the batch, so it is not stored), memory-mapped.
Plain PyTorch: no Ray, Optuna or MLflow import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Precision
from .evaluation import make_loader
from .precision import autocast
from .relations import Projection, Tap
from .step import TeacherOutputs, teacher_forward

ROW = "row"
"""The column `with_rows` adds to the training split: each batch says which cached rows it holds."""


def _write(handle: Any, tensor: torch.Tensor) -> None:
    handle.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def build(teacher: nn.Module, dataset: Any, out: Path, *, pad_id: int, precision: Precision,
          device: torch.device, tap: Tap | None = None, batch_size: int = 64) -> None:
    """Run the teacher once over `dataset` in row order; write logits (rows, C), hidden states (tokens, layers + 1,
    d) and, with `tap`, the tapped attention projections (tokens, taps, d), in the dtype the live forward
    produces under `precision`, so a lookup equals the live pass."""
    teacher.eval()
    taps = sorted((layer, p) for layer in tap.layers for p in tap.projections) if tap else []
    meta: dict[str, Any] = {"rows": len(dataset), "tokens": 0, "taps": taps}
    offsets = [0]
    with (open(out / "logits.bin", "wb") as logits_file, open(out / "hidden.bin", "wb") as hidden_file,
          open(out / "projections.bin", "wb") as projections_file):
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                outputs = teacher_forward(teacher, batch, hidden=True, tap=tap)
            assert outputs.hidden is not None
            real = batch["attention_mask"].bool()
            states = torch.stack(outputs.hidden, dim=2)[real]  # (real tokens, layers + 1, d), row-major
            _write(logits_file, outputs.logits)
            _write(hidden_file, states)
            if taps:
                assert outputs.projections is not None
                if len({outputs.projections[key].shape for key in taps}) > 1:
                    raise ValueError("train.teacher_cache: the relation's projections differ in width (grouped-"
                                     "query attention), which the cache does not store; set train.teacher_cache=false")
                tapped = torch.stack([outputs.projections[key] for key in taps], dim=2)[real]  # (tokens, taps, d)
                _write(projections_file, tapped)
                meta |= {"projections": list(tapped.shape[1:]), "projections_dtype": str(tapped.dtype)}
            offsets.extend((offsets[-1] + real.sum(1).cumsum(0)).tolist())
            meta |= {"logits": list(outputs.logits.shape[1:]), "logits_dtype": str(outputs.logits.dtype),
                     "hidden": list(states.shape[1:]), "hidden_dtype": str(states.dtype)}
    meta["tokens"] = offsets[-1]
    torch.save(torch.tensor(offsets), out / "offsets.pt")
    (out / "outputs.json").write_text(json.dumps(meta))  # (meta.json is the Store's)


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
    def open(cls, directory: str | Path) -> TeacherCache:
        directory = Path(directory)
        meta = json.loads((directory / "outputs.json").read_text())
        taps = tuple((int(layer), str(p)) for layer, p in meta.get("taps", []))
        return cls(_open(directory, "logits", meta, meta["rows"]), _open(directory, "hidden", meta, meta["tokens"]),
                   torch.load(directory / "offsets.pt"),
                   _open(directory, "projections", meta, meta["tokens"]) if taps else None, taps)

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
        if int(real.sum()) != len(tokens):
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
