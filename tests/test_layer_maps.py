"""Contract tests over every registered layer map, the published forward tables, and the config errors."""

from __future__ import annotations

import pytest

from kdsearch.core.errors import ConfigError
from kdsearch.methods.layer_maps import LAYER_MAPS, ONE_TO_ONE, check_map_args, map_layers

DEPTHS = [(1, 12), (3, 12), (4, 6), (6, 6), (9, 36), (5, 7)]


def _layers_for(name: str, n_s: int, n_t: int) -> tuple[int, ...] | None:
    # a valid explicit map: the last teacher layer for every student layer (repeats are allowed)
    return (n_t,) * n_s if name == "explicit" else None


def test_registry_has_exactly_the_documented_maps() -> None:
    expected = ["all_to_one", "explicit", "forward", "inorder_random", "last", "none", "random", "random_strict",
                "reverse"]
    assert LAYER_MAPS.names() == expected


@pytest.mark.parametrize("name", LAYER_MAPS.names())
@pytest.mark.parametrize(("n_s", "n_t"), DEPTHS)
@pytest.mark.parametrize("embeddings", [True, False])
def test_map_contract(name: str, n_s: int, n_t: int, embeddings: bool) -> None:
    layers = _layers_for(name, n_s, n_t)
    pairs = map_layers(name, n_s, n_t, embeddings=embeddings, seed=3, epoch=2, layers=layers)
    assert all(isinstance(s, int) and isinstance(t, int) for s, t in pairs)
    assert all(0 <= s <= n_s and 0 <= t <= n_t for s, t in pairs)
    if name == "none":
        assert pairs == []
        return
    students = [s for s, _ in pairs]
    assert len(students) == len(set(students))
    assert set(students) == set(range(0 if embeddings else 1, n_s + 1))
    if name == "all_to_one":
        assert len({t for _, t in pairs}) == 1 and pairs[-1][1] >= 1
    else:
        # only the embeddings are matched to the teacher's embeddings; layers go to layers
        assert all((t == 0) == (s == 0) for s, t in pairs)
    again = map_layers(name, n_s, n_t, embeddings=embeddings, seed=3, epoch=2, layers=layers)
    assert pairs == again


@pytest.mark.parametrize(("n_s", "expected"), [
    (1, [11]), (2, [5, 11]), (3, [3, 7, 11]), (4, [2, 5, 8, 11]), (6, [1, 3, 5, 7, 9, 11]),
    (9, [1, 2, 3, 5, 6, 7, 9, 10, 11]),
])
def test_forward_reproduces_released_bert_tables(n_s: int, expected: list[int]) -> None:
    # the tables are 0-indexed teacher layers; hidden_states indices are one higher
    pairs = map_layers("forward", n_s, 12, embeddings=True)
    assert pairs == [(0, 0)] + [(i, t + 1) for i, t in enumerate(expected, start=1)]


def test_last_takes_the_teachers_top_layers() -> None:
    assert map_layers("last", 3, 12, embeddings=False) == [(1, 10), (2, 11), (3, 12)]
    assert map_layers("last", 6, 6, embeddings=True) == map_layers("forward", 6, 6, embeddings=True)


def test_forward_qwen3_36_to_9_and_identity() -> None:
    assert map_layers("forward", 9, 36, embeddings=False) == [(i, 4 * i) for i in range(1, 10)]
    assert map_layers("forward", 6, 6, embeddings=False) == [(i, i) for i in range(1, 7)]


@pytest.mark.parametrize(("n_s", "n_t"), DEPTHS)
def test_reverse_is_forward_reversed(n_s: int, n_t: int) -> None:
    fwd = map_layers("forward", n_s, n_t)
    rev = map_layers("reverse", n_s, n_t)
    assert rev[0] == (0, 0)
    assert [s for s, _ in rev] == [s for s, _ in fwd]
    assert [t for _, t in rev[1:]] == [t for _, t in fwd[1:]][::-1]
    assert map_layers("reverse", 3, 12, embeddings=False) == [(1, 12), (2, 8), (3, 4)]


def test_all_to_one_targets_the_middle_teacher_layer() -> None:
    assert map_layers("all_to_one", 3, 12) == [(0, 6), (1, 6), (2, 6), (3, 6)]
    assert map_layers("all_to_one", 2, 7, embeddings=False) == [(1, 3), (2, 3)]
    assert map_layers("all_to_one", 2, 1, embeddings=False) == [(1, 1), (2, 1)]


@pytest.mark.parametrize("name", ["random", "random_strict"])
def test_random_is_a_fixed_permutation_of_forward(name: str) -> None:
    fwd = [t for _, t in map_layers("forward", 6, 12)]
    draws = {seed: map_layers(name, 6, 12, seed=seed) for seed in range(8)}
    for seed, pairs in draws.items():
        assert pairs[0] == (0, 0)
        assert sorted(t for _, t in pairs) == sorted(fwd)
        for epoch in range(1, 4):
            assert map_layers(name, 6, 12, seed=seed, epoch=epoch) == pairs
    assert len({tuple(p) for p in draws.values()}) > 1  # the seed matters


def test_random_draws_any_permutation_as_the_paper_and_random_strict_never_forward() -> None:
    # the paper's np.random.permutation can return the forward order: with 2 student layers half the seeds do
    fwd = map_layers("forward", 2, 12)
    paper = [map_layers("random", 2, 12, seed=seed) for seed in range(40)]
    assert fwd in paper and any(p != fwd for p in paper)
    # random_strict keeps the earlier rule: never the forward order, also for small students
    for n_student in (2, 3, 6):
        fwd = map_layers("forward", n_student, 12)
        assert all(map_layers("random_strict", n_student, 12, seed=seed) != fwd for seed in range(20))
    # where the paper's draw is not forward, both rules give the same permutation (same seed, same first draw)
    for seed in range(20):
        drawn = map_layers("random", 3, 12, seed=seed)
        if drawn != map_layers("forward", 3, 12):
            assert map_layers("random_strict", 3, 12, seed=seed) == drawn


def test_inorder_random_is_sorted_and_redrawn_per_epoch() -> None:
    draws = [map_layers("inorder_random", 4, 12, seed=0, epoch=e, embeddings=False) for e in range(10)]
    for pairs in draws:
        targets = [t for _, t in pairs]
        assert targets == sorted(targets) and len(set(targets)) == 4
        assert all(1 <= t <= 12 for t in targets)
    assert len({tuple(p) for p in draws}) > 1
    by_seed = {tuple(map_layers("inorder_random", 4, 12, seed=seed, epoch=0)) for seed in range(4)}
    assert len(by_seed) > 1
    # n_s = n_t leaves one subset: the identity, whatever the draw
    identity = [(i, i) for i in range(1, 7)]
    assert map_layers("inorder_random", 6, 6, seed=5, epoch=7, embeddings=False) == identity


def test_explicit_uses_the_given_indices() -> None:
    assert map_layers("explicit", 3, 6, layers=(2, 2, 6)) == [(0, 0), (1, 2), (2, 2), (3, 6)]
    assert map_layers("explicit", 2, 6, embeddings=False, layers=(6, 1)) == [(1, 6), (2, 1)]
    explicit = LAYER_MAPS.get("explicit")
    with pytest.raises(ValueError, match="teacher indices"):
        explicit(2, 6, embeddings=False, seed=0, epoch=0, layers=None)
    with pytest.raises(ValueError, match="teacher indices"):
        explicit(2, 6, embeddings=False, seed=0, epoch=0, layers=(1,))


def test_check_map_args_unknown_name_lists_choices() -> None:
    expected = r"distill\.layer_map=diagonal: unknown layer map; choose one of: all_to_one, explicit, forward"
    with pytest.raises(ConfigError, match=expected):
        check_map_args("diagonal", 3, 12, None)
    with pytest.raises(ConfigError, match=r"=forwrd: unknown layer map; did you mean forward\?; choose one of: "):
        check_map_args("forwrd", 3, 12, None)


def test_check_map_args_explicit_errors() -> None:
    with pytest.raises(ConfigError, match=r"^distill\.layers=\[1,9\]: teacher index 9 out of range 1\.\.6$"):
        check_map_args("explicit", 2, 6, (1, 9))
    with pytest.raises(ConfigError, match=r"distill\.layers=\[0,2\]: teacher index 0 out of range"):
        check_map_args("explicit", 2, 6, (0, 2))
    wrong_length = r"distill\.layers=\[1,2\]: 2 teacher indices for student\.layers=3; give exactly one"
    with pytest.raises(ConfigError, match=wrong_length):
        check_map_args("explicit", 3, 6, (1, 2))
    with pytest.raises(ConfigError, match=r"explicit needs distill\.layers.*distill\.layers=\[2,4,6\]"):
        check_map_args("explicit", 3, 6, None)
    check_map_args("explicit", 8, 6, (1, 2, 3, 4, 5, 6, 6, 6))


@pytest.mark.parametrize("name", sorted(ONE_TO_ONE))
def test_one_to_one_maps_reject_a_deeper_student(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"student\.layers=8 > teacher depth 6: distill\.layer_map={name} "
                                          "cannot map a student deeper than its teacher one-to-one"):
        check_map_args(name, 8, 6, None)
    with pytest.raises(ConfigError):
        map_layers(name, 8, 6)


@pytest.mark.parametrize("name", ["all_to_one", "none"])
def test_many_to_one_maps_accept_a_deeper_student(name: str) -> None:
    check_map_args(name, 8, 6, None)
    assert len(map_layers(name, 8, 6)) == (9 if name == "all_to_one" else 0)


def test_error_messages_are_one_line() -> None:
    cases = [("fwd", 3, 12, None), ("explicit", 2, 6, (1, 9)), ("explicit", 3, 6, None),
             ("forward", 8, 6, None)]
    for args in cases:
        with pytest.raises(ConfigError) as info:
            check_map_args(*args)
        assert "\n" not in str(info.value)
