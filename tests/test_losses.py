"""Property tests for kdsearch.losses: zero on identical inputs, masking, F.kl_div parity, invariances."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdsearch.methods.losses import (
    DISTANCES,
    LOGIT_LOSSES,
    READS_PADDING,
    SKEW,
    WIDTH_FREE,
    cka,
    combine,
    describe,
    logit_kl,
    task_loss,
)

NAMES = ["mse", "token_mse", "ln_mse", "cosine", "correlation", "cka", "pkd_cls", "layer_select_bert",
         "layer_select_t5", "layer_select_qwen3"]
# pkd_cls reads the first token only (see its own test); the layer-selection T5 and Qwen3 forms read padded
# positions as their code does (tests/test_fidelity.py)
MASKED = [n for n in NAMES if n != "pkd_cls" and n not in READS_PADDING]
TOKEN_POOLED = [n for n in MASKED if n != "layer_select_bert"]  # it divides by the batch size as well


def _pair(seed: int = 0, b: int = 3, t: int = 5, d: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, d, generator=g)
    te = torch.randn(b, t, d, generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    return s, te, mask


def test_registry_has_exactly_the_documented_distances() -> None:
    assert DISTANCES.names() == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_distance_is_zero_for_identical_inputs(name: str) -> None:
    s, _, mask = _pair()
    for m in (None, mask):
        assert DISTANCES.get(name)(s, s.clone(), mask=m).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_distance_is_positive_scalar_for_different_inputs(name: str) -> None:
    s, te, mask = _pair()
    for m in (None, mask):
        value = DISTANCES.get(name)(s, te, mask=m)
        assert value.shape == ()
        assert value.item() > 0


@pytest.mark.parametrize("name", MASKED)
def test_distance_ignores_padded_positions(name: str) -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get(name)
    pad = mask == 0
    s2, te2 = s.clone(), te.clone()
    s2[pad] = 1e4 * torch.randn(int(pad.sum()), s.shape[-1])
    te2[pad] = float("inf")
    assert torch.allclose(fn(s, te, mask=mask), fn(s2, te2, mask=mask))
    # and the mask matters: without it the padded garbage changes the value
    assert not torch.allclose(fn(s, te, mask=None), fn(s2, te.clone(), mask=None))


@pytest.mark.parametrize("name", TOKEN_POOLED)
def test_masked_distance_equals_mean_over_real_tokens(name: str) -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get(name)
    keep = mask.bool()
    # one sequence per real token: the masked mean is the plain mean over the kept tokens
    expected = fn(s[keep][None], te[keep][None], mask=None)
    assert torch.allclose(fn(s, te, mask=mask), expected, atol=1e-6)


def test_mse_token_mse_values() -> None:
    s, te, mask = _pair()
    keep = mask.bool()
    diff = (s - te)[keep]  # (N, D)
    assert torch.allclose(DISTANCES.get("mse")(s, te, mask=mask), diff.pow(2).mean())
    assert torch.allclose(DISTANCES.get("token_mse")(s, te, mask=mask), diff.pow(2).sum(-1).mean())
    assert torch.allclose(DISTANCES.get("mse")(s, te), F.mse_loss(s, te))


def test_ln_mse_ignores_per_token_shift_and_scale() -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get("ln_mse")
    assert torch.allclose(fn(3.0 * s + 2.0, te, mask=mask), fn(s, te, mask=mask), atol=1e-5)


def test_pkd_cls_compares_unit_normalised_first_tokens_only() -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get("pkd_cls")
    unit = F.normalize(s[:, 0], dim=-1) - F.normalize(te[:, 0], dim=-1)
    assert torch.allclose(fn(s, te, mask=mask), unit.pow(2).sum(-1).mean())
    s2 = s.clone()
    s2[:, 1:] = torch.randn_like(s2[:, 1:])  # every later token: padding or not, never read
    assert torch.allclose(fn(s2, te, mask=mask), fn(s, te, mask=mask))
    assert torch.allclose(fn(7.0 * s, te), fn(s, te))  # PKD normalises the [CLS] vectors
    assert fn(s, -s).item() == pytest.approx(4.0, abs=1e-5)  # opposite unit vectors: ||2u||^2


def test_cosine_is_scale_invariant_not_shift_invariant() -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get("cosine")
    base = fn(s, te, mask=mask)
    assert torch.allclose(fn(5.0 * s, 0.1 * te, mask=mask), base, atol=1e-6)
    assert not torch.allclose(fn(s + 3.0, te, mask=mask), base, atol=1e-3)
    assert fn(s, -s, mask=mask).item() == pytest.approx(2.0, abs=1e-5)


def test_correlation_is_affine_invariant() -> None:
    s, te, mask = _pair()
    fn = DISTANCES.get("correlation")
    base = fn(s, te, mask=mask)
    assert torch.allclose(fn(4.0 * s - 7.0, 0.5 * te + 1.0, mask=mask), base, atol=1e-5)
    assert fn(s, -2.0 * s + 1.0, mask=mask).item() == pytest.approx(2.0, abs=1e-5)
    keep = mask.bool()
    pairs = zip(s[keep], te[keep], strict=True)
    pearson = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in pairs])
    assert torch.allclose(base, (1 - pearson).mean(), atol=1e-5)


def test_correlation_is_finite_for_constant_tokens() -> None:
    s = torch.ones(2, 3, 4, requires_grad=True)
    te = torch.randn(2, 3, 4)
    value = DISTANCES.get("correlation")(s, te)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_distance_gradients_flow_to_student_only_on_real_tokens(name: str) -> None:
    s, te, mask = _pair()
    s.requires_grad_(True)
    DISTANCES.get(name)(s, te, mask=mask).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert s.grad[mask.bool()].abs().sum() > 0
    # the T5 and Qwen3 forms read padded positions, as their reference code does (tests/test_fidelity.py)
    assert (s.grad[~mask.bool()].abs().sum() == 0) == (name not in READS_PADDING)


@pytest.mark.parametrize("name", sorted(set(NAMES) - WIDTH_FREE))
def test_distance_rejects_mismatched_widths(name: str) -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        DISTANCES.get(name)(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_cka_compares_across_widths_up_to_rotation_and_scale() -> None:
    s, _, mask = _pair(d=8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(6)))
    for teacher in (3.0 * s @ rotation, torch.cat([s, s], dim=-1)):  # same width rotated; 16 units, duplicated
        assert cka(s, teacher, mask=mask).item() == pytest.approx(0.0, abs=1e-5)
    unrelated = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(7))
    assert 0.0 < cka(s, unrelated, mask=mask).item() <= 1.0
    with pytest.raises(ValueError, match="more than their width"):
        cka(s, torch.zeros(3, 4, 8))


@pytest.mark.parametrize("name", NAMES)
def test_distance_is_computed_in_fp32_under_autocast(name: str) -> None:
    """BERT-like states (a few outlier units of large magnitude): bf16 matmuls would lose the signal."""
    s, t, mask = _pair(d=64)
    s[..., :2] *= 300.0
    t = s + 0.05 * t
    exact = DISTANCES.get(name)(s, t, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = DISTANCES.get(name)(s, t, mask=mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_logit_kl_matches_kl_div_batchmean(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    s, te = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    expected = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(te / temperature, -1),
                        reduction="batchmean") * temperature**2
    assert torch.allclose(logit_kl(s, te, temperature=temperature), expected, atol=1e-6)


def test_logit_kl_zero_nonnegative_and_asymmetric() -> None:
    g = torch.Generator().manual_seed(2)
    s, te = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert logit_kl(s, s.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kl(s, te, temperature=1.0).item() > 0
    assert not torch.allclose(logit_kl(s, te, temperature=1.0), logit_kl(te, s, temperature=1.0))


def test_logit_kl_token_logits_mean_over_masked_in_tokens() -> None:
    g = torch.Generator().manual_seed(3)
    s, te = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    keep = mask.bool()
    expected = F.kl_div(F.log_softmax(s[keep], -1), F.softmax(te[keep], -1), reduction="batchmean")
    assert torch.allclose(logit_kl(s, te, temperature=1.0, mask=mask), expected, atol=1e-6)
    s2 = s.clone()
    s2[~keep] = 100.0 * torch.randn(int((~keep).sum()), 9)
    assert torch.allclose(logit_kl(s2, te, temperature=1.0, mask=mask), expected, atol=1e-6)


def test_logit_kl_handles_masked_out_teacher_classes_and_low_precision() -> None:
    s = torch.randn(3, 5)
    te = torch.randn(3, 5)
    te[:, 0] = float("-inf")
    value = logit_kl(s, te, temperature=1.0)
    assert torch.isfinite(value) and value.item() > 0
    half = logit_kl(s.bfloat16(), te.bfloat16(), temperature=1.0)
    assert half.dtype == torch.float32


def test_logit_kl_gradient_reaches_student() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    logit_kl(s, torch.randn(3, 4), temperature=2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


LOGIT_NAMES = ["jsd", "kl", "reverse_kl", "skew_kl"]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) per row, straight from the definition."""
    return (p * (p.log() - q.log())).sum(-1)


def test_registry_has_exactly_the_documented_logit_losses() -> None:
    assert LOGIT_LOSSES.names() == LOGIT_NAMES
    assert LOGIT_LOSSES.get("kl") is logit_kl


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_logit_loss_contract(name: str) -> None:
    fn = LOGIT_LOSSES.get(name)
    g = torch.Generator().manual_seed(4)
    s, te = torch.randn(2, 4, 9, generator=g), 2 * torch.randn(2, 4, 9, generator=g)
    assert fn(s, s.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    value = fn(s, te, temperature=1.0, mask=mask)
    assert value.shape == () and value.item() > 0
    keep = mask.bool()
    assert torch.allclose(value, fn(s[keep], te[keep], temperature=1.0), atol=1e-6)  # mean over masked-in
    s2 = s.clone()
    s2[~keep] = 100.0 * torch.randn(int((~keep).sum()), 9)
    assert torch.allclose(fn(s2, te, temperature=1.0, mask=mask), value, atol=1e-6)
    assert fn(s.bfloat16(), te.bfloat16(), temperature=1.0).dtype == torch.float32
    student = s.clone().requires_grad_(True)
    fn(student, te, temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_divergences_match_their_definitions(temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    s, te = torch.randn(6, 5, generator=g), 3 * torch.randn(6, 5, generator=g)
    p_s, p_t = F.softmax(s / temperature, -1), F.softmax(te / temperature, -1)
    t2 = temperature**2

    def loss(name: str, a: Tensor, b: Tensor) -> Tensor:
        return LOGIT_LOSSES.get(name)(a, b, temperature=temperature)

    torch.testing.assert_close(loss("reverse_kl", s, te), _kl(p_s, p_t).mean() * t2)
    m = (p_s + p_t) / 2
    torch.testing.assert_close(loss("jsd", s, te), 0.5 * (_kl(p_t, m) + _kl(p_s, m)).mean() * t2)
    torch.testing.assert_close(loss("jsd", s, te), loss("jsd", te, s))  # symmetric
    assert loss("jsd", s, 50 * te).item() <= torch.log(torch.tensor(2.0)).item() * t2 + 1e-6  # bounded
    skewed = SKEW * p_t + (1 - SKEW) * p_s
    torch.testing.assert_close(loss("skew_kl", s, te), _kl(p_t, skewed).mean() * t2)
    assert loss("skew_kl", s, te).item() < loss("kl", s, te).item()  # the mixture keeps it below forward KL


@pytest.mark.parametrize("name", ["kl", "jsd", "skew_kl"])
def test_teacher_classes_at_minus_infinity_contribute_nothing(name: str) -> None:
    s, te = torch.randn(3, 5), torch.randn(3, 5)
    te[:, 0] = float("-inf")  # e.g. a vocabulary entry the teacher masks out
    value = LOGIT_LOSSES.get(name)(s, te, temperature=1.0)
    assert torch.isfinite(value) and value.item() > 0


def test_task_loss_classification_and_regression() -> None:
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert torch.allclose(task_loss(logits, labels, kind="classification"), F.cross_entropy(logits, labels))
    pred, target = torch.randn(4, 1), torch.randn(4)
    assert torch.allclose(task_loss(pred, target, kind="regression"), F.mse_loss(pred[:, 0], target))


def test_task_loss_causal_lm_shifts_and_ignores() -> None:
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(task_loss(logits, labels, kind="causal_lm"), expected, atol=1e-6)
    # a perfect next-token predictor has ~zero loss only under the shift
    ids = torch.randint(0, 11, (2, 5))
    perfect = torch.full((2, 5, 11), -50.0)
    perfect[:, :-1].scatter_(-1, ids[:, 1:, None], 50.0)
    assert task_loss(perfect, ids, kind="causal_lm").item() < 1e-6
    assert task_loss(logits, torch.full((2, 5), -100), kind="causal_lm").item() == 0.0


def test_combine_weights_and_skips_zero_terms() -> None:
    terms = {"task": torch.tensor(2.0), "logit": torch.tensor(3.0), "hidden": torch.tensor(5.0)}
    total = combine(terms, {"task": 1.0, "logit": 0.5, "hidden": 3.0})
    assert total.item() == pytest.approx(2.0 + 1.5 + 15.0)
    # a zero-weight term need not be computed
    assert combine({"task": torch.tensor(2.0)}, {"task": 1.0, "hidden": 0.0}).item() == 2.0
    with pytest.raises(KeyError, match="hidden"):
        combine({"task": torch.tensor(2.0)}, {"task": 1.0, "hidden": 3.0})
    with pytest.raises(ValueError, match="no weight"):
        combine(terms, {"task": 1.0})
    with pytest.raises(ValueError, match="weight is 0"):
        combine({}, {"task": 0.0})


def test_combine_backpropagates_through_every_weighted_term() -> None:
    a, b = torch.tensor(1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    combine({"task": a * 2, "hidden": b * 3}, {"task": 1.0, "hidden": 3.0}).backward()
    assert a.grad.item() == 2.0 and b.grad.item() == 9.0


def test_describe() -> None:
    assert describe({"task": 1.0, "logit": 1.0, "hidden": 3.0}) == "loss = 1*task + 1*logit + 3*hidden"
    assert describe({"task": 1, "logit": 0.0, "hidden": 20}) == "loss = 1*task + 20*hidden"
    assert describe({"task": 1, "logit": 0.16131289742292726, "hidden": 7500}) == \
        "loss = 1*task + 0.1613*logit + 7500*hidden"
    assert describe({"task": 0.0}) == "loss = 0"
