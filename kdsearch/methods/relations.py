"""Self-attention relations: capture layers' query/key/value projections during a forward pass.

MiniLM (Wang et al. 2020, arXiv 2002.10957) distils the last layer's attention distributions (query-key) and
value relations (value-value); MiniLMv2 (Wang et al. 2021, arXiv 2012.15828) the query-query, key-key and
value-value relations, each split into R relation heads, so that teacher and student may differ in width and
in attention heads (`kdsearch.methods.losses.relation_kl`); TinyBERT (Jiao et al. 2020, arXiv 1909.10351) matches the
attention scores of every mapped layer pair by MSE (`relation_mse`). Projections are the Linear outputs before
any rotary embedding or relative-position term. An encoder-decoder (T5, BART) has three attentions, each a
`Stack` here: its encoder's and its decoder's self-attention and the decoder's cross-attention (decoder queries,
encoder keys and values). Plain PyTorch; knows the module names of the supported families.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers import AutoModel

from kdsearch.core.errors import ConfigError
from kdsearch.core.registry import Registry
from kdsearch.methods.layer_maps import LAYER_MAPS, check_map_args, decoder_seed, map_layers
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

Stack = Literal["encoder", "decoder", "cross"]
"""Which attention: a model's (an encoder-decoder's encoder's) self-attention, an encoder-decoder's decoder
self-attention, or its decoder's cross-attention (queries from the decoder, keys and values from the encoder)."""
STACKS: dict[str, tuple[Stack, ...]] = {"encoder": ("encoder",), "decoder": ("decoder",), "cross": ("cross",),
                                        "all": ("encoder", "decoder", "cross")}
"""relation.stack -> the attentions it compares (a model with one stack has only "encoder")."""
Side = Literal["source", "target"]
_SIDES: dict[Stack, dict[Projection, Side]] = {
    "encoder": {"query": "source", "key": "source", "value": "source"},
    "decoder": {"query": "target", "key": "target", "value": "target"},
    "cross": {"query": "target", "key": "source", "value": "source"},
}
"""The sequence each projection's positions run over: the source (the encoder's input, or a one-stack model's)
or an encoder-decoder's target (the decoder's input)."""

# Projection modules by family: BERT/RoBERTa, DeBERTa-v2, Llama/Qwen/Mistral/OPT/BART, DistilBERT, T5.
_NAMES: dict[Projection, tuple[str, ...]] = {
    "query": ("query", "query_proj", "q_proj", "q_lin", "q"),
    "key": ("key", "key_proj", "k_proj", "k_lin", "k"),
    "value": ("value", "value_proj", "v_proj", "v_lin", "v"),
}
_FUSED = ("c_attn",)  # GPT-2: one Conv1D whose output is [query | key | value]
_CROSS = ("crossattention", "EncDecAttention", "encoder_attn")  # GPT-2 (add_cross_attention), T5, BART
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)$")


def _stack_root(model: nn.Module, stack: Stack) -> nn.Module:
    """The module holding `stack`'s blocks: an encoder-decoder's encoder or decoder, any other model itself."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        root: nn.Module = model.get_encoder() if stack == "encoder" else model.get_decoder()  # type: ignore[operator]
        return root
    if stack != "encoder":
        raise ValueError(f"{type(model).__name__} is not an encoder-decoder: it has no {stack} attention")
    return model


def _block(model: nn.Module, layer: int, stack: Stack = "encoder") -> nn.Module:
    # the outermost numbered container holds the blocks (T5's blocks hold numbered sub-layers of their own)
    containers: dict[str, dict[int, nn.Module]] = {}
    for name, module in _stack_root(model, stack).named_modules():
        if m := _BLOCK.search(name):
            containers.setdefault(name[:m.end() - len(m.group(1)) - 1], {})[int(m.group(1))] = module
    blocks = containers[min(containers, key=lambda c: c.count("."))] if containers else {}
    if layer - 1 not in blocks:
        raise ValueError(f"layer {layer}: the model has transformer blocks 1..{len(blocks)}")
    return blocks[layer - 1]


def projection_modules(model: nn.Module, layer: int,
                       stack: Stack = "encoder") -> dict[Projection, tuple[nn.Module, int | None]]:
    """Layer `layer`'s (1-indexed, as hidden_states) query/key/value modules of `stack`'s attention; the int is
    the fused part's index."""
    found: dict[Projection, tuple[nn.Module, int | None]] = {}
    for name, module in _block(model, layer, stack).named_modules():
        path = name.split(".")
        if any(part in _CROSS for part in path) != (stack == "cross"):
            continue
        leaf = path[-1]
        if leaf in _FUSED:
            return {"query": (module, 0), "key": (module, 1), "value": (module, 2)}
        for projection, names in _NAMES.items():
            if leaf in names and projection not in found:
                found[projection] = (module, None)
    if len(found) < 3:
        where = "cross-attention " if stack == "cross" else ""
        raise ValueError(f"{type(model).__name__}: no {where}query/key/value projections found in layer {layer} "
                         f"(looked for {', '.join(sorted({n for v in _NAMES.values() for n in v} | set(_FUSED)))})")
    return found


@dataclass(frozen=True)
class Tap:
    """Which projections of which layers (1-indexed) of which attention a forward pass records."""

    layers: tuple[int, ...]
    projections: frozenset[Projection]
    stack: Stack = "encoder"


@dataclass(frozen=True)
class RelationSpec:
    """A resolved relation term of one attention: the relations, R, the loss, the (student, teacher) layer pairs
    compared, and which attention (`stack`)."""

    kinds: tuple[str, ...]
    heads: int
    pairs: tuple[tuple[int, int], ...]
    loss: str = "kl"
    stack: Stack = "encoder"

    @property
    def projections(self) -> frozenset[Projection]:
        return frozenset(p for name in self.kinds for p in RELATIONS.get(name))

    @property
    def student(self) -> Tap:
        return Tap(tuple(sorted({s for s, _ in self.pairs})), self.projections, self.stack)

    @property
    def teacher(self) -> Tap:
        return Tap(tuple(sorted({t for _, t in self.pairs})), self.projections, self.stack)


def _depths(cfg: Config, teacher_config: Any, stack: Stack) -> tuple[int, int]:
    """(student, teacher) depth of the stack that holds `stack`'s attention."""
    if stack == "encoder":
        return cfg.student.layers, int(teacher_config.num_hidden_layers)
    decoder = next(int(getattr(teacher_config, k)) for k in ("num_decoder_layers", "decoder_layers")
                   if getattr(teacher_config, k, None) is not None)
    return cfg.student.decoder_layers or cfg.student.layers, decoder


def _heads(teacher_config: Any, stack: Stack) -> int:
    """The teacher's attention heads in `stack` (BART's decoder has its own count)."""
    if stack != "encoder" and getattr(teacher_config, "decoder_attention_heads", None):
        return int(teacher_config.decoder_attention_heads)
    return int(teacher_config.num_attention_heads)


def relation_stacks(cfg: Config, teacher_config: Any) -> tuple[Stack, ...]:
    """The attentions relation.stack compares: a model with one stack has only its self-attention."""
    if not getattr(teacher_config, "is_encoder_decoder", False):
        return ("encoder",)
    return STACKS[cfg.relation.stack]


def resolve_relations(cfg: Config, teacher_config: Any) -> tuple[RelationSpec, ...]:
    """The relation term's settings per attention (relation.stack), defaults filled in (last layers, the
    teacher's heads); none when distill.w_relation is 0. relation.layers=map takes each stack's pairs from
    distill.layer_map, the decoder's and the cross-attention's drawn as the hidden term draws the decoder's."""
    if cfg.distill.w_relation == 0:
        return ()
    rel, specs = cfg.relation, []
    for stack in relation_stacks(cfg, teacher_config):
        n_s, n_t = _depths(cfg, teacher_config, stack)
        if rel.layers == "map":
            seed = cfg.train.seed if stack == "encoder" else decoder_seed(cfg.train.seed)
            pairs = map_layers(cfg.distill.layer_map, n_s, n_t, embeddings=False, seed=seed, epoch=0,
                               layers=cfg.distill.layers)
        else:
            pairs = [(rel.student_layer or n_s, rel.teacher_layer or n_t)]
        specs.append(RelationSpec(rel.names, rel.heads or _heads(teacher_config, stack), tuple(pairs), rel.loss,
                                  stack))
    return tuple(specs)


Captured = dict[tuple[int, Projection], torch.Tensor]
"""(layer, projection) -> that projection's output (B, T, d) in the last forward pass."""
Projections = dict[Stack, Captured]
"""Each tapped attention's captured projections."""


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
        modules = projection_modules(model, layer, tap.stack)
        for projection in sorted(tap.projections):
            module, part = modules[projection]
            handles.append(module.register_forward_hook(_recorder(got, (layer, projection), part)))
    try:
        yield got
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_all(model: nn.Module, taps: Sequence[Tap]) -> Iterator[Projections]:
    """`capture` of every tap at once (one per attention): stack -> its captured projections."""
    with ExitStack() as stack:
        yield {tap.stack: stack.enter_context(capture(model, tap)) for tap in taps}


def projection_widths(config: Any) -> dict[Projection, int]:
    """Output widths of the query/key/value projections from a Hugging Face config (grouped-query aware)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return {"query": heads * head_dim, "key": kv_heads * head_dim, "value": kv_heads * head_dim}


def relation_term(spec: RelationSpec, student: Captured, teacher: Captured, mask: torch.Tensor, *,
                  causal: bool, target_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over layer pairs and relations (MiniLMv2: L_qq + L_kk + L_vv) of the teacher-student relation loss.

    `mask` (B, T_src): the source's real positions (a one-stack model's input, an encoder-decoder's encoder's),
    `causal` whether they attend only backwards (a causal LM); `target_mask` (B, T_tgt): an encoder-decoder's
    target positions, which its decoder reads causally. Each relation (x, y) relates the positions of x's
    sequence to those of y's (`_SIDES`): in the cross-attention qk is (target x source), qq (target x target,
    causal), kk and vv (source x source).
    Relations of one (query side, key side) whose projections share one shape on each side run as one batch of
    K x B rows: each relation's mean runs over the same real entries, so K times the joint mean is their sum.
    """
    loss = RELATION_LOSSES.get(spec.loss)
    masks: dict[Side, torch.Tensor | None] = {"source": mask, "target": target_mask}
    groups: dict[tuple[Side, Side], list[tuple[Projection, Projection]]] = {}
    for x, y in (RELATIONS.get(name) for name in spec.kinds):
        groups.setdefault((_SIDES[spec.stack][x], _SIDES[spec.stack][y]), []).append((x, y))
    total = torch.zeros((), device=mask.device)
    for (query_side, key_side), relations in groups.items():
        queries = masks[query_side]
        if queries is None:
            raise ValueError(f"the {spec.stack} relations need the target's mask: pass target_mask=")
        keys = masks[key_side] if key_side != query_side else None
        backwards = causal if query_side == "source" else key_side == "target"
        for s, t in spec.pairs:
            sides = [[side[(layer, p)] for pair in relations for p in pair]
                     for side, layer in ((student, s), (teacher, t))]
            if all(len({tuple(x.shape) for x in side}) == 1 for side in sides):
                (sx, sy), (tx, ty) = [(torch.cat(side[0::2]), torch.cat(side[1::2])) for side in sides]
                k = len(relations)
                total = total + k * loss((sx, sy), (tx, ty), heads=spec.heads, mask=queries.repeat(k, 1),
                                         causal=backwards, key_mask=None if keys is None else keys.repeat(k, 1))
                continue
            for x, y in relations:  # widths differ (grouped-query attention): one relation at a time
                total = total + loss((student[(s, x)], student[(s, y)]), (teacher[(t, x)], teacher[(t, y)]),
                                     heads=spec.heads, mask=queries, causal=backwards, key_mask=keys)
    return total


def check_relation(cfg: Config, teacher: Any, student: Any) -> None:
    """ConfigError (one line) unless the relation term can run: relation.stack on the teacher's attentions,
    layers in range, R dividing every compared projection width of the `teacher` and `student` (transformers
    configs), projections the term can find."""
    rel = cfg.relation
    if not getattr(teacher, "is_encoder_decoder", False) and rel.stack in ("decoder", "cross"):
        raise ConfigError(f"relation.stack={rel.stack}: only an encoder-decoder teacher (tiny-t5, tiny-bart, a T5 "
                          f"or BART checkpoint) has a decoder and cross-attention; teacher={cfg.teacher} has one "
                          "stack: leave relation.stack=all")
    stacks = relation_stacks(cfg, teacher)
    if rel.layers == "map":
        if cfg.distill.layer_map == "none" or LAYER_MAPS.get(cfg.distill.layer_map).redrawn:
            raise ConfigError(f"relation.layers=map takes its layer pairs from distill.layer_map, which is "
                              f"{cfg.distill.layer_map}; choose a fixed map (TinyBERT: forward) or relation.layers=one")
        for stack in stacks:
            check_map_args(cfg.distill.layer_map, *_depths(cfg, teacher, stack), cfg.distill.layers)
    for stack in stacks:
        n_s, n_t = _depths(cfg, teacher, stack)
        where = "" if stack == "encoder" else " decoder"
        for key, layer, depth, who in (("student_layer", rel.student_layer, n_s, "student"),
                                       ("teacher_layer", rel.teacher_layer, n_t, "teacher")):
            if layer is not None and layer > depth:
                raise ConfigError(f"relation.{key}={layer} is beyond the {who}'s {depth}{where} layers (1..{depth})"
                                  + ("" if stack == "encoder" else f" (relation.stack={rel.stack} reads its decoder)"))
    projections = {p for kind in rel.names for p in RELATIONS.get(kind)}
    for who, config in (("teacher", teacher), ("student", student)):
        widths = projection_widths(config)
        if "qk" in rel.names and widths["query"] != widths["key"]:
            raise ConfigError(f"relation.kinds={rel.kinds} has qk, which needs equal query and key widths; the "
                              f"{who}'s are {widths['query']} and {widths['key']} (grouped-query attention): "
                              "use qq, kk, vv")
        for heads in sorted({rel.heads or _heads(teacher, stack) for stack in stacks}):
            bad = sorted(f"{p} {widths[p]}" for p in projections if widths[p] % heads)
            if bad:
                raise ConfigError(f"relation.heads={heads} does not divide the {who}'s projection widths "
                                  f"({', '.join(bad)}); choose relation.heads dividing them")
    with torch.device("meta"):  # the architecture without weights: are its projections where we look?
        model = AutoModel.from_config(teacher)
    try:
        for stack in stacks:
            projection_modules(model, rel.teacher_layer or _depths(cfg, teacher, stack)[1], stack)
    except ValueError as err:
        raise ConfigError(f"distill.w_relation > 0: {err}") from None
