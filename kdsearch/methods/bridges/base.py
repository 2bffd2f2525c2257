"""The bridge contract: one registry entry per width bridge, carrying its whole method.

A bridge brings a student hidden state and a teacher hidden state to one space where a distance compares them.
A `BridgeMethod` is everything the rest of kdsearch needs to know of one: the config section it owns, its checks
(names, then shapes), its preparation (artifacts built once per teacher and cached, e.g. TED's stage-1 filters),
and its build (the nn.Module a run trains). `prepare`, `validate`, `export` and the loop call these hooks on the
chosen entry and never test a bridge's name. An encoder-decoder (T5, BART) runs every method on each stack:
preparation gets both stacks' pairs and names each artifact by its stack (`stack_artifact`), and the loop builds
one bridge per stack (`BridgeInputs.stack`). Plain PyTorch; the run layer hands preparation what it needs
through `PrepareContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from kdsearch.core.registry import Registry

if TYPE_CHECKING:
    from kdsearch.config.schema import Config
    from kdsearch.core.kinds import TaskKind


class Bridge(nn.Module):
    """Maps one matched pair's hidden states into a space where a distance can compare them; itself the identity.

    The Distiller calls `student_view(l, h_s[l], paired_with=k)` and `teacher_view(k, h_t[k])` once per layer
    pair (l, k) per step. The student view trains with the student; the teacher view runs on frozen states (its
    parameters, TED's teacher filters, never train).
    """

    def student_view(self, index: int, hidden: torch.Tensor, *,
                     paired_with: int | None = None) -> torch.Tensor:  # (B, T, d_s) -> (B, T, d)
        return hidden

    def teacher_view(self, index: int, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, d_t) -> (B, T, d)
        return hidden


Tensors = dict[str, torch.Tensor]
Pairs = list[tuple[int, int]]
Stack = Literal["encoder", "decoder"]
"""Which stack of hidden states: an encoder-decoder's encoder or decoder; every other model's one stack is
"encoder"."""


def stack_artifact(name: str, stack: Stack) -> str:
    """The artifact name of `stack`: `name` for the encoder (and every single-stack model, so that their cached
    artifacts keep their names), `decoder_<name>` for an encoder-decoder's decoder."""
    return name if stack == "encoder" else f"decoder_{name}"


@dataclass
class BridgeInputs:
    """What a build gets: the stack's layer pairs, both widths, the method's own config section (None for a method
    without one), the tensors its preparation saved, by artifact name, and the stack it bridges."""

    pairs: Pairs
    d_student: int
    d_teacher: int
    settings: Any = None
    artifacts: dict[str, Tensors] = field(default_factory=dict)
    stack: Stack = "encoder"

    def artifact(self, name: str) -> Tensors:
        """This stack's artifact `name` (what preparation saved as `stack_artifact(name, stack)`)."""
        return self.artifacts[stack_artifact(name, self.stack)]


class PrepareContext(Protocol):
    """What the run layer gives a bridge's preparation: the run, its teacher and student, the task batches and the
    artifact cache. Models and batches are made on first use; the artifacts an earlier run built cost nothing."""

    cfg: Config
    pairs: Pairs  # the (encoder's) pairs
    decoder_pairs: Pairs  # an encoder-decoder's decoder pairs; empty for other models
    kind: TaskKind
    num_labels: int
    d_student: int
    d_teacher: int
    teacher_dir: str  # the fine-tuned teacher: part of every artifact's cache key
    student_dir: str | None  # the fine-tuned initial student (student.finetune), else None
    device: torch.device

    def teacher(self) -> Any:
        """The frozen fine-tuned teacher (a transformers model)."""
        ...

    def student(self) -> Any:
        """The frozen initial student, as distillation starts from it."""
        ...

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """Shuffled training batches of train.batch_size (seeded by train.seed)."""
        ...

    def cached(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        """The cache folder of `kind`/`key`, built by `build(folder)` once."""
        ...

    def log(self, message: str) -> None: ...


def stacks(ctx: PrepareContext) -> list[tuple[Stack, Pairs]]:
    """The stacks with pairs to prepare for, each with its pairs: the encoder's (a single-stack model's), then an
    encoder-decoder's decoder's."""
    both: list[tuple[Stack, Pairs]] = [("encoder", ctx.pairs), ("decoder", ctx.decoder_pairs)]
    return [(stack, pairs) for stack, pairs in both if pairs]


Check = Callable[["Config"], None]
ShapeCheck = Callable[["Config", int, int], None]
Prepare = Callable[[PrepareContext], dict[str, str]]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class BridgeMethod:
    """One width bridge, whole. Adding one is a module in this package that registers a BridgeMethod, plus its
    config section (config.py) and a space entry."""

    build: Callable[[BridgeInputs], Bridge]
    """The trainable bridge of a run, from its pairs, widths, settings and prepared artifacts."""
    section: str | None = None
    """The config section the method owns (`ted`, `units`): its settings reach `build`, and its keys belong to a
    run (model card, leaderboard) only when the method runs."""
    check_names: Check = _nothing
    """Registry names in its section, checked in every config (a space may search them under another bridge)."""
    check: ShapeCheck = _nothing
    """Raise ConfigError (one line) when the method cannot run `cfg` at student width d_s, teacher width d_t."""
    prepare: Prepare | None = None
    """Build (cached) the artifacts it needs: artifact name -> safetensors file, each stack's named by
    `stack_artifact`. Called only when there are pairs to match."""
    embedding_pair: bool = True
    """Whether the embeddings pair h[0] <-> h[0] is matched when distill.embeddings is left unset."""

    def settings(self, cfg: Config) -> Any:
        return getattr(cfg, self.section) if self.section else None


BRIDGES: Registry[BridgeMethod] = Registry("bridge")


def resolve_bridge(name: str, d_student: int, d_teacher: int) -> str:
    """`auto` = identity when widths match, otherwise the projector baseline."""
    if name != "auto":
        return name
    return "identity" if d_student == d_teacher else "projector"


def bridge_method(cfg: Config, d_student: int, d_teacher: int) -> BridgeMethod:
    """The registry entry a run uses (`auto` resolved by the widths)."""
    return BRIDGES.get(resolve_bridge(cfg.distill.bridge, d_student, d_teacher))


def bridge_sections() -> list[str]:
    """The config sections the registered bridges own."""
    return sorted({m.section for m in map(BRIDGES.get, BRIDGES) if m.section})
