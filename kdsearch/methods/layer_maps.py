"""Layer maps: which student hidden state is pulled toward which teacher hidden state.

Indices are Hugging Face `hidden_states` indices (0 = embeddings, k >= 1 = output of layer k); a map is a list
of (student_index, teacher_index) pairs. Pure Python: imports no framework.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from kdsearch.core.errors import ConfigError
from kdsearch.core.registry import Registry

if TYPE_CHECKING:
    from kdsearch.config.schema import Config

LayerMap = list[tuple[int, int]]
"""(student hidden index, teacher hidden index) pairs."""


class LayerMapFn(Protocol):
    """Called once per epoch by the train loop (maps that ignore `epoch` return the same list every time)."""

    def __call__(self, n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                 layers: tuple[int, ...] | None) -> LayerMap: ...


@dataclass(frozen=True)
class MapEntry:
    """A registered layer map and what the rest of kdsearch must know of it."""

    fn: LayerMapFn
    one_to_one: bool = False
    """Gives each student layer its own teacher layer, so it needs n_student <= n_teacher."""
    redrawn: bool = False
    """Draws its pairs anew every epoch, so nothing prepared per teacher layer (TED's filters) can follow it."""

    def __call__(self, n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                 layers: tuple[int, ...] | None) -> LayerMap:
        return self.fn(n_student, n_teacher, embeddings=embeddings, seed=seed, epoch=epoch, layers=layers)


LAYER_MAPS: Registry[MapEntry] = Registry("layer map")


def layer_map(name: str, *, one_to_one: bool = False, redrawn: bool = False) -> Callable[[LayerMapFn], LayerMapFn]:
    """Register a layer map under `name` with its properties; the function itself stays plain."""
    def add(fn: LayerMapFn) -> LayerMapFn:
        LAYER_MAPS.register(name)(MapEntry(fn, one_to_one=one_to_one, redrawn=redrawn))
        return fn

    return add


def forward_targets(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer (1..n_t) of each student layer under the forward map; also the layers teacher-init copies."""
    # ceil(i * n_t / n_s) in integer math: last to last, and the released n_t = 12 tables exactly.
    return [-(-i * n_teacher // n_student) for i in range(1, n_student + 1)]


def _with_embeddings(targets: list[int], embeddings: bool) -> LayerMap:
    pairs = [(i, t) for i, t in enumerate(targets, start=1)]
    return [(0, 0), *pairs] if embeddings else pairs


@layer_map("forward", one_to_one=True)
def forward(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
            layers: tuple[int, ...] | None) -> LayerMap:
    """Student layer i <-> teacher layer ceil(i n_t / n_s) (Yu et al. 2025, arXiv 2502.04499, "forward")."""
    return _with_embeddings(forward_targets(n_student, n_teacher), embeddings)


@layer_map("reverse", one_to_one=True)
def reverse(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
            layers: tuple[int, ...] | None) -> LayerMap:
    """The forward targets in reverse order; embeddings stay 0 <-> 0 (Yu et al. 2025, "reverse")."""
    return _with_embeddings(forward_targets(n_student, n_teacher)[::-1], embeddings)


@layer_map("last", one_to_one=True)
def last(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
         layers: tuple[int, ...] | None) -> LayerMap:
    """Student layer i <-> teacher layer n_t - n_s + i: the teacher's top layers (PKD-Last, Sun et al. 2019,
    arXiv 1908.09355; their PKD-Skip is the forward map)."""
    return _with_embeddings(list(range(n_teacher - n_student + 1, n_teacher + 1)), embeddings)


@layer_map("all_to_one")
def all_to_one(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
               layers: tuple[int, ...] | None) -> LayerMap:
    """Every student state (embeddings too) <-> teacher layer n_t / 2 (Yu et al. 2025, "all-to-one")."""
    target = max(1, n_teacher // 2)
    first = 0 if embeddings else 1
    return [(i, target) for i in range(first, n_student + 1)]


@layer_map("random", one_to_one=True)
def random_order(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                 layers: tuple[int, ...] | None) -> LayerMap:
    """One seeded permutation of the forward targets, the same every epoch (Yu et al. 2025, "random").

    Drawn as the paper's code draws it (`np.random.permutation` of the forward list, once per run, after the
    seed is set): any permutation, the forward order included.
    """
    targets = forward_targets(n_student, n_teacher)
    random.Random(seed).shuffle(targets)
    return _with_embeddings(targets, embeddings)


@layer_map("random_strict", one_to_one=True)
def random_strict(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                  layers: tuple[int, ...] | None) -> LayerMap:
    """`random`, but never the forward order: a draw in forward order is drawn again (with two student layers
    it is therefore the reverse order), so a comparison with forward is never a comparison with itself."""
    forward_order = forward_targets(n_student, n_teacher)
    targets, rng = list(forward_order), random.Random(seed)
    rng.shuffle(targets)
    while targets == forward_order and len(set(targets)) > 1:
        rng.shuffle(targets)
    return _with_embeddings(targets, embeddings)


@layer_map("inorder_random", one_to_one=True, redrawn=True)
def inorder_random(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                   layers: tuple[int, ...] | None) -> LayerMap:
    """A sorted random subset of n_s teacher layers, re-drawn each epoch (RAIL-KD, Haidar et al. 2022)."""
    if n_student > n_teacher:
        raise ValueError(f"inorder_random needs n_student <= n_teacher, got {n_student} > {n_teacher}")
    # a string seed is hashed deterministically (sha512), unlike a tuple, and keeps (seed, epoch) pairs apart.
    rng = random.Random(f"inorder_random:{seed}:{epoch}")
    targets = sorted(rng.sample(range(1, n_teacher + 1), n_student))
    return _with_embeddings(targets, embeddings)


@layer_map("explicit")
def explicit(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
             layers: tuple[int, ...] | None) -> LayerMap:
    """Teacher indices given by the user, one per student layer (`distill.layers`, e.g. PKD's skip-k)."""
    if layers is None or len(layers) != n_student:
        got = "none" if layers is None else f"{len(layers)}"
        raise ValueError(f"explicit layer map needs {n_student} teacher indices (one per student layer), "
                         f"got {got}")
    return _with_embeddings(list(layers), embeddings)


@layer_map("none")
def no_matching(n_student: int, n_teacher: int, *, embeddings: bool, seed: int, epoch: int,
                layers: tuple[int, ...] | None) -> LayerMap:
    """No hidden matching: task loss + logit KL only (Yu et al. 2025, "none" baseline)."""
    return []


def _show(layers: tuple[int, ...]) -> str:
    return "[" + ",".join(str(x) for x in layers) + "]"


def check_map_args(name: str, n_student: int, n_teacher: int, layers: tuple[int, ...] | None) -> None:
    """Raise ConfigError (one line, quoting the config keys) when `name` cannot map these depths."""
    LAYER_MAPS.check(name, key="distill.layer_map")
    if n_student < 1 or n_teacher < 1:
        raise ConfigError(f"student.layers={n_student}, teacher depth {n_teacher}: "
                          "both need at least 1 layer")
    if name == "explicit":
        if layers is None:
            example = _show(tuple(forward_targets(n_student, n_teacher)))
            raise ConfigError("distill.layer_map=explicit needs distill.layers: one teacher index "
                              f"(1..{n_teacher}) per student layer, e.g. distill.layers={example}")
        if len(layers) != n_student:
            raise ConfigError(f"distill.layers={_show(layers)}: {len(layers)} teacher indices for "
                              f"student.layers={n_student}; give exactly one per student layer")
        for index in layers:
            if not 1 <= index <= n_teacher:
                raise ConfigError(f"distill.layers={_show(layers)}: teacher index {index} out of range "
                                  f"1..{n_teacher}")
    if LAYER_MAPS.get(name).one_to_one and n_student > n_teacher:
        raise ConfigError(f"student.layers={n_student} > teacher depth {n_teacher}: distill.layer_map={name} "
                          "cannot map a student deeper than its teacher one-to-one; use fewer student layers "
                          "or distill.layer_map=explicit, all_to_one or none")


def map_layers(name: str, n_student: int, n_teacher: int, *, embeddings: bool = True, seed: int = 0,
               epoch: int = 0, layers: tuple[int, ...] | None = None) -> LayerMap:
    """The (student, teacher) hidden-state index pairs of map `name` for this epoch; checks the arguments."""
    check_map_args(name, n_student, n_teacher, layers)
    return LAYER_MAPS.get(name)(n_student, n_teacher, embeddings=embeddings, seed=seed, epoch=epoch,
                                layers=layers)


def decoder_seed(seed: int) -> int:
    """The seed a random map draws an encoder-decoder's decoder pairs with: apart from the encoder's, as the
    layer-selection seq2seq code draws one permutation per stack (t5mt/make_student.py, `random_matching`)."""
    return int.from_bytes(hashlib.sha256(f"kdsearch-decoder:{seed}".encode()).digest()[:8], "little") >> 1


def run_pairs(cfg: Config, n_teacher: int, *, epoch: int = 0, stack: Literal["encoder", "decoder"] = "encoder"
              ) -> LayerMap:
    """The hidden pairs a run matches in `epoch` (distill.* and the run's seed); none when w_hidden is 0.

    An encoder-decoder matches each stack with the same map (Yu et al. 2025, seq2seq): `stack="decoder"` gives
    the decoder's pairs, student.decoder_layers (null: student.layers) against the teacher's decoder depth
    `n_teacher`.
    """
    d = cfg.distill
    if d.w_hidden == 0:
        return []
    n_student, seed = cfg.student.layers, cfg.train.seed
    if stack == "decoder":
        n_student, seed = cfg.student.decoder_layers or cfg.student.layers, decoder_seed(seed)
    return map_layers(d.layer_map, n_student, n_teacher, embeddings=bool(d.embeddings), seed=seed,
                      epoch=epoch, layers=d.layers)


ONE_TO_ONE = frozenset(n for n in LAYER_MAPS if LAYER_MAPS.get(n).one_to_one)
"""The registered maps that pair each student layer with its own teacher layer (their entries say so)."""
