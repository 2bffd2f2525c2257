"""Teacher outputs computed once over the training split and read back by row (`train.teacher_cache=true`).

The teacher is frozen and deterministic (eval mode), so its logits and hidden states for a row never change:
every step of every trial that shares a fine-tuned teacher, data and precision can read them instead of running
the teacher forward. Stored per real token (padding depends on the batch, so it is not stored), memory-mapped.
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
from .step import TeacherOutputs, teacher_forward

ROW = "row"
"""The column `with_rows` adds to the training split: each batch says which cached rows it holds."""


def _write(handle: Any, tensor: torch.Tensor) -> None:
    handle.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def build(teacher: nn.Module, dataset: Any, out: Path, *, pad_id: int, precision: Precision,
          device: torch.device, batch_size: int = 64) -> None:
    """Run the teacher once over `dataset` in row order; write logits (rows, C) and hidden states (tokens,
    layers + 1, d) in the dtype the live forward produces under `precision`, so a lookup equals the live pass."""
    teacher.eval()
    meta: dict[str, Any] = {"rows": len(dataset), "tokens": 0}
    offsets = [0]
    with open(out / "logits.bin", "wb") as logits_file, open(out / "hidden.bin", "wb") as hidden_file:
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                outputs = teacher_forward(teacher, batch, hidden=True)
            assert outputs.hidden is not None
            real = batch["attention_mask"].bool()
            states = torch.stack(outputs.hidden, dim=2)[real]  # (real tokens, layers + 1, d), row-major
            _write(logits_file, outputs.logits)
            _write(hidden_file, states)
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


@dataclass(frozen=True)
class TeacherCache:
    logits: torch.Tensor  # (rows, C), memory-mapped
    hidden: torch.Tensor  # (tokens, layers + 1, d), memory-mapped
    offsets: torch.Tensor  # (rows + 1,): row r's tokens are hidden[offsets[r]:offsets[r + 1]]

    @classmethod
    def open(cls, directory: str | Path) -> TeacherCache:
        directory = Path(directory)
        meta = json.loads((directory / "outputs.json").read_text())
        logits_shape, hidden_shape = (meta["rows"], *meta["logits"]), (meta["tokens"], *meta["hidden"])
        logits = torch.from_file(str(directory / "logits.bin"), shared=False, dtype=_dtype(meta["logits_dtype"]),
                                 size=int(torch.Size(logits_shape).numel()))
        hidden = torch.from_file(str(directory / "hidden.bin"), shared=False, dtype=_dtype(meta["hidden_dtype"]),
                                 size=int(torch.Size(hidden_shape).numel()))
        return cls(logits.view(logits_shape), hidden.view(hidden_shape), torch.load(directory / "offsets.pt"))

    def outputs(self, batch: dict[str, torch.Tensor], *, hidden: bool) -> TeacherOutputs:
        """The teacher's outputs for `batch` (which carries ROW), on the batch's device; hidden states are zero
        at padding, where the live teacher's depend on the batch (hence distill.mask_padding=true)."""
        device = batch["input_ids"].device
        rows = batch[ROW].cpu()  # gathered on the host: memory-mapped rows, then one copy to the device
        logits = self.logits[rows].to(device)
        if not hidden:
            return TeacherOutputs(logits, None)
        starts, ends = self.offsets[rows].tolist(), self.offsets[rows + 1].tolist()
        tokens = torch.cat([torch.arange(s, e) for s, e in zip(starts, ends, strict=True)])
        real = batch["attention_mask"].cpu().bool()
        if int(real.sum()) != len(tokens):
            raise ValueError("train.teacher_cache: the batch's tokens do not match the cached rows (was the cache "
                             "built from other data?)")
        states = self.hidden[tokens]
        padded = states.new_zeros((*real.shape, *states.shape[1:]))
        padded[real] = states
        return TeacherOutputs(logits, tuple(padded.to(device).unbind(dim=2)))


def with_rows(dataset: Any) -> Any:
    """The training split with its row numbers as a column, for `TeacherCache.outputs`."""
    return dataset.add_column(ROW, list(range(len(dataset))))
