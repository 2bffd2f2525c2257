"""Self-attention relations: capture one layer's query/key/value projections during a forward pass.

MiniLM (Wang et al. 2020, arXiv 2002.10957) distils the last layer's attention distributions (query-key) and
value relations (value-value); MiniLMv2 (Wang et al. 2021, arXiv 2012.15828) the query-query, key-key and
value-value relations, each split into R relation heads, so that teacher and student may differ in width and
in attention heads (the loss is `kdsearch.losses.relation_kl`). Projections are the Linear outputs before any
rotary embedding or relative-position term. Plain PyTorch; knows the module names of the supported families.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .registry import Registry

Projection = str  # "query" | "key" | "value"

RELATIONS: Registry[tuple[Projection, Projection]] = Registry("attention relation")
"""Relation name -> the two projections whose scaled dot products, softmaxed over keys, are compared."""
RELATIONS.register("qk")(("query", "key"))  # the attention distribution itself (MiniLM)
RELATIONS.register("qq")(("query", "query"))  # MiniLMv2
RELATIONS.register("kk")(("key", "key"))  # MiniLMv2
RELATIONS.register("vv")(("value", "value"))  # MiniLM, MiniLMv2

# Projection modules by family: BERT/RoBERTa, DeBERTa-v2, Llama/Qwen/Mistral/OPT, DistilBERT.
_NAMES: dict[Projection, tuple[str, ...]] = {
    "query": ("query", "query_proj", "q_proj", "q_lin"),
    "key": ("key", "key_proj", "k_proj", "k_lin"),
    "value": ("value", "value_proj", "v_proj", "v_lin"),
}
_FUSED = ("c_attn",)  # GPT-2: one Conv1D whose output is [query | key | value]
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)$")


def _block(model: nn.Module, layer: int) -> nn.Module:
    blocks = {int(m.group(1)): module for name, module in model.named_modules() if (m := _BLOCK.search(name))}
    if layer - 1 not in blocks:
        raise ValueError(f"layer {layer}: the model has transformer blocks 1..{len(blocks)}")
    return blocks[layer - 1]


def projection_modules(model: nn.Module, layer: int) -> dict[Projection, tuple[nn.Module, int | None]]:
    """Layer `layer`'s (1-indexed, as hidden_states) query/key/value modules; the int is the fused part's index."""
    found: dict[Projection, tuple[nn.Module, int | None]] = {}
    for name, module in _block(model, layer).named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _FUSED and "crossattention" not in name:
            return {"query": (module, 0), "key": (module, 1), "value": (module, 2)}
        for projection, names in _NAMES.items():
            if leaf in names and projection not in found:
                found[projection] = (module, None)
    if len(found) < 3:
        raise ValueError(f"{type(model).__name__}: no query/key/value projections found in layer {layer} "
                         f"(looked for {', '.join(sorted({n for v in _NAMES.values() for n in v} | set(_FUSED)))})")
    return found


@dataclass(frozen=True)
class Tap:
    """Which projections of which layer (1-indexed) a forward pass records."""

    layer: int
    projections: frozenset[Projection]


@dataclass(frozen=True)
class RelationSpec:
    """A resolved relation term: the relations, R, and the student and teacher layers they compare."""

    kinds: tuple[str, ...]
    heads: int
    student: Tap
    teacher: Tap


def relation_spec(kinds: tuple[str, ...], *, heads: int, student_layer: int, teacher_layer: int) -> RelationSpec:
    projections = frozenset(p for name in kinds for p in RELATIONS.get(name))
    return RelationSpec(tuple(kinds), heads, Tap(student_layer, projections), Tap(teacher_layer, projections))


@contextmanager
def capture(model: nn.Module, tap: Tap | None) -> Iterator[dict[Projection, torch.Tensor]]:
    """Within the block, each forward pass of `model` fills the dict with the tapped projections (B, T, d).

    `tap=None` records nothing (the dict stays empty).
    """
    got: dict[Projection, torch.Tensor] = {}
    if tap is None:
        yield got
        return
    modules = projection_modules(model, tap.layer)
    handles = []
    for projection in sorted(tap.projections):
        module, part = modules[projection]

        def hook(_module: nn.Module, _args: object, output: torch.Tensor, projection: Projection = projection,
                 part: int | None = part) -> None:
            got[projection] = output if part is None else output.chunk(3, dim=-1)[part]

        handles.append(module.register_forward_hook(hook))
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


def projection_widths(config: Any) -> dict[Projection, int]:
    """Output widths of the query/key/value projections from a Hugging Face config (grouped-query aware)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return {"query": heads * head_dim, "key": kv_heads * head_dim, "value": kv_heads * head_dim}
