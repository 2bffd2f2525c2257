"""Self-attention relations: capture layers' query/key/value projections during a forward pass.

MiniLM (Wang et al. 2020, arXiv 2002.10957) distils the last layer's attention distributions (query-key) and
value relations (value-value); MiniLMv2 (Wang et al. 2021, arXiv 2012.15828) the query-query, key-key and
value-value relations, each split into R relation heads, so that teacher and student may differ in width and
in attention heads (`kdsearch.methods.losses.relation_kl`); TinyBERT (Jiao et al. 2020, arXiv 1909.10351) matches the
attention scores of every mapped layer pair by MSE (`relation_mse`). Projections are the Linear outputs before
any rotary embedding or relative-position term. Plain PyTorch; knows the module names of the supported families.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoModel

from kdsearch.core.errors import ConfigError
from kdsearch.core.registry import Registry
from kdsearch.methods.layer_maps import LAYER_MAPS, check_map_args, map_layers
from kdsearch.methods.losses import RELATION_LOSSES

if TYPE_CHECKING:
    from kdsearch.config.schema import Config

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
    """Which projections of which layers (1-indexed) a forward pass records."""

    layers: tuple[int, ...]
    projections: frozenset[Projection]


@dataclass(frozen=True)
class RelationSpec:
    """A resolved relation term: the relations, R, the loss, and the (student, teacher) layer pairs compared."""

    kinds: tuple[str, ...]
    heads: int
    pairs: tuple[tuple[int, int], ...]
    loss: str = "kl"

    @property
    def projections(self) -> frozenset[Projection]:
        return frozenset(p for name in self.kinds for p in RELATIONS.get(name))

    @property
    def student(self) -> Tap:
        return Tap(tuple(sorted({s for s, _ in self.pairs})), self.projections)

    @property
    def teacher(self) -> Tap:
        return Tap(tuple(sorted({t for _, t in self.pairs})), self.projections)


def resolve_relation(cfg: Config, teacher_config: Any) -> RelationSpec | None:
    """The relation term's settings with the defaults filled in (last layers, the teacher's heads); None when
    distill.w_relation is 0."""
    if cfg.distill.w_relation == 0:
        return None
    rel, n_t = cfg.relation, teacher_config.num_hidden_layers
    if rel.layers == "map":
        pairs = map_layers(cfg.distill.layer_map, cfg.student.layers, n_t, embeddings=False, seed=cfg.train.seed,
                           epoch=0, layers=cfg.distill.layers)
    else:
        pairs = [(rel.student_layer or cfg.student.layers, rel.teacher_layer or n_t)]
    return RelationSpec(rel.names, rel.heads or teacher_config.num_attention_heads, tuple(pairs), rel.loss)


Captured = dict[tuple[int, Projection], torch.Tensor]
"""(layer, projection) -> that projection's output (B, T, d) in the last forward pass."""


def _recorder(got: Captured, key: tuple[int, Projection], part: int | None) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        got[key] = output if part is None else output.chunk(3, dim=-1)[part]

    return hook


@contextmanager
def capture(model: nn.Module, tap: Tap | None) -> Iterator[Captured]:
    """Within the block, each forward pass of `model` fills the dict with the tapped projections.

    `tap=None` records nothing (the dict stays empty).
    """
    got: Captured = {}
    if tap is None:
        yield got
        return
    handles = []
    for layer in tap.layers:
        modules = projection_modules(model, layer)
        for projection in sorted(tap.projections):
            module, part = modules[projection]
            handles.append(module.register_forward_hook(_recorder(got, (layer, projection), part)))
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


def relation_term(spec: RelationSpec, student: Captured, teacher: Captured, mask: torch.Tensor, *,
                  causal: bool) -> torch.Tensor:
    """Sum over layer pairs and relations (MiniLMv2: L_qq + L_kk + L_vv) of the teacher-student relation loss.

    Relations whose projections share one shape on each side run as one batch of K x B rows: each relation's
    mean runs over the same real entries, so K times the joint mean is their sum, in a third of the ops.
    """
    loss = RELATION_LOSSES.get(spec.loss)
    relations = [RELATIONS.get(name) for name in spec.kinds]
    total = torch.zeros((), device=mask.device)
    for s, t in spec.pairs:
        sides = [[side[(layer, p)] for pair in relations for p in pair]
                 for side, layer in ((student, s), (teacher, t))]
        if all(len({tuple(x.shape) for x in side}) == 1 for side in sides):
            (sx, sy), (tx, ty) = [(torch.cat(side[0::2]), torch.cat(side[1::2])) for side in sides]
            total = total + len(relations) * loss((sx, sy), (tx, ty), heads=spec.heads,
                                                  mask=mask.repeat(len(relations), 1), causal=causal)
            continue
        for x, y in relations:  # widths differ (grouped-query attention): one relation at a time
            total = total + loss((student[(s, x)], student[(s, y)]), (teacher[(t, x)], teacher[(t, y)]),
                                 heads=spec.heads, mask=mask, causal=causal)
    return total


def check_relation(cfg: Config, teacher: Any, student: Any) -> None:
    """ConfigError (one line) unless the relation term can run: layers in range, R dividing every compared
    projection width of the `teacher` and `student` (transformers configs), projections the term can find."""
    rel, n_t = cfg.relation, teacher.num_hidden_layers
    if rel.layers == "map":
        if cfg.distill.layer_map == "none" or LAYER_MAPS.get(cfg.distill.layer_map).redrawn:
            raise ConfigError(f"relation.layers=map takes its layer pairs from distill.layer_map, which is "
                              f"{cfg.distill.layer_map}; choose a fixed map (TinyBERT: forward) or relation.layers=one")
        check_map_args(cfg.distill.layer_map, cfg.student.layers, n_t, cfg.distill.layers)
    for key, layer, depth, who in (("student_layer", rel.student_layer, cfg.student.layers, "student"),
                                   ("teacher_layer", rel.teacher_layer, n_t, "teacher")):
        if layer is not None and layer > depth:
            raise ConfigError(f"relation.{key}={layer} is beyond the {who}'s {depth} layers (1..{depth})")
    heads = rel.heads or teacher.num_attention_heads
    projections = {p for kind in rel.names for p in RELATIONS.get(kind)}
    for who, config in (("teacher", teacher), ("student", student)):
        widths = projection_widths(config)
        if "qk" in rel.names and widths["query"] != widths["key"]:
            raise ConfigError(f"relation.kinds={rel.kinds} has qk, which needs equal query and key widths; the "
                              f"{who}'s are {widths['query']} and {widths['key']} (grouped-query attention): "
                              "use qq, kk, vv")
        bad = sorted(f"{p} {widths[p]}" for p in projections if widths[p] % heads)
        if bad:
            raise ConfigError(f"relation.heads={heads} does not divide the {who}'s projection widths "
                              f"({', '.join(bad)}); choose relation.heads dividing them")
    with torch.device("meta"):  # the architecture without weights: are its projections where we look?
        model = AutoModel.from_config(teacher)
    try:
        projection_modules(model, rel.teacher_layer or n_t)
    except ValueError as err:
        raise ConfigError(f"distill.w_relation > 0: {err}") from None
