"""Each paper's hidden term, transcribed from its released code (../shared/papers.md section 2, TED's section 1),
against the term kdsearch computes and logs: fixed random states, padding, uneven lengths, several pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdsearch.config.overrides import load_config
from kdsearch.methods.bridges import Bridge
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller

B, T, D = 4, 7, 6
LENGTHS = [7, 5, 2, 4]  # uneven real lengths; padding on the right


def _states(seed: int, n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=g) * (1 + k) for k in range(n)]  # layers of growing scale


def _mask() -> Tensor:
    return (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # (B, T)


# --- the reference code, transcribed ---------------------------------------------------------------------
def bert_reference(teacher: list[Tensor], student: list[Tensor], mask: Tensor) -> Tensor:
    """classification/trainer.py `_hidden_loss`: per pair (mask * ||t - s||^2).mean(dim=0).sum() / mask.sum(),
    then the mean over pairs."""
    diffs = [((t - s) * (t - s)).sum(dim=-1) for t, s in zip(teacher, student, strict=True)]
    valids = mask.sum()
    normed = [(d * mask).mean(dim=0).sum() / valids for d in diffs]
    return sum(normed) / len(normed)


def seq2seq_reference(teacher: list[Tensor], student: list[Tensor], mask: Tensor, *, normalize: bool) -> Tensor:
    """dart/ and t5mt/ distillation.py `calc_hidden_loss`: stacked (P, B, T, H) states, layer_norm over
    shape[1:] when normalize_hidden (T5), masked element MSE summed over everything / (real tokens * H)."""
    s, t = torch.stack(student), torch.stack(teacher)
    if normalize:
        s = F.layer_norm(s, s.shape[1:])
        t = F.layer_norm(t, t.shape[1:])
    mse = F.mse_loss(s, t, reduction="none")
    return (mse * mask.unsqueeze(0).unsqueeze(-1)).sum() / (mask.sum() * s.size(-1))


def qwen3_reference(teacher: list[Tensor], student: list[Tensor], mask: Tensor) -> Tensor:
    """llm/sft_trainer.py: unit vectors, ((t - s)**2).sum(-1).mean() over (P, B, T) * valids / totals."""
    t, s = torch.stack(teacher), torch.stack(student)
    t = t / t.norm(dim=-1, keepdim=True)
    s = s / s.norm(dim=-1, keepdim=True)
    return ((t - s) ** 2).sum(dim=-1).mean() * mask.sum() / mask.numel()


def ted_reference(teacher: list[Tensor], student: list[Tensor]) -> Tensor:
    """ted_glue_no_trainer.py: sum over filter pairs of F.mse_loss(reduction="mean"), divided by the pairs."""
    total = sum(F.mse_loss(s, t, reduction="mean") for s, t in zip(student, teacher, strict=True))
    return total / len(student)


# --- kdsearch's hidden term, as the step computes and logs it ---------------------------------------------
def logged_hidden(overrides: list[str], teacher: list[Tensor], student: list[Tensor], mask: Tensor) -> Tensor:
    cfg = load_config(overrides).distill
    distiller = Distiller(nn.Linear(1, 1), Bridge(), kind="classification", losses=step_losses(cfg))
    pairs = [(k, k) for k in range(len(student))]
    used = mask if cfg.mask_padding else None
    return distiller._hidden_term(tuple(student), tuple(teacher), used, pairs)


FORMS = {
    "bert": ["distill.distance=layer_select_bert", "distill.hidden_reduce=mean"],
    "bart": ["distill.distance=mse", "distill.hidden_reduce=sum"],
    "t5": ["distill.distance=layer_select_t5", "distill.hidden_reduce=sum"],
    "qwen3": ["distill.distance=layer_select_qwen3", "distill.hidden_reduce=mean"],
    "ted": ["distill.distance=mse", "distill.hidden_reduce=mean", "distill.mask_padding=false"],
}


@pytest.mark.parametrize("pairs", [1, 4])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_hidden_term_equals_the_reference_code(form: str, pairs: int) -> None:
    teacher, student, mask = _states(0, pairs), _states(1, pairs), _mask()
    reference = {"bert": lambda: bert_reference(teacher, student, mask),
                 "bart": lambda: seq2seq_reference(teacher, student, mask, normalize=False),
                 "t5": lambda: seq2seq_reference(teacher, student, mask, normalize=True),
                 "qwen3": lambda: qwen3_reference(teacher, student, mask),
                 "ted": lambda: ted_reference(teacher, student)}[form]()
    got = logged_hidden(FORMS[form], teacher, student, mask)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)


def test_bert_form_follows_the_batch_size() -> None:
    """The BERT code divides by B once more: the same rows in a batch of twice the size weigh half as much."""
    teacher, student, mask = _states(0, 2), _states(1, 2), _mask()
    doubled = ([torch.cat([t, t]) for t in teacher], [torch.cat([s, s]) for s in student], torch.cat([mask, mask]))
    single = logged_hidden(FORMS["bert"], teacher, student, mask)
    torch.testing.assert_close(logged_hidden(FORMS["bert"], *doubled), single / 2)
    # and token_mse (the per-token squared L2 without that 1/B) is B times it
    token = logged_hidden(["distill.distance=token_mse", "distill.hidden_reduce=mean"], teacher, student, mask)
    torch.testing.assert_close(token, single * B)


def test_t5_form_standardises_the_whole_layer_not_each_token() -> None:
    teacher, student, mask = _states(0, 1), _states(1, 1), _mask()
    base = logged_hidden(FORMS["t5"], teacher, student, mask)
    # one affine map of the whole layer changes nothing; a per-token rescale does (ln_mse would ignore it)
    torch.testing.assert_close(logged_hidden(FORMS["t5"], teacher, [3 * student[0] + 1], mask), base)
    per_token = student[0] * torch.linspace(0.5, 3, T)[None, :, None]
    assert not torch.allclose(logged_hidden(FORMS["t5"], teacher, [per_token], mask), base)


def test_the_layer_select_study_and_space_use_the_bert_form() -> None:
    from kdsearch.search.space_model import initial_points
    from kdsearch.search.spaces import load_space
    from kdsearch.search.studies import make_study

    study = make_study("layer_select", d_teacher=64)
    assert (study.base["distill.distance"], study.base["distill.hidden_reduce"]) == ("layer_select_bert", "mean")
    assert study.base["distill.w_hidden"] == 3.0
    matched = [p for p in initial_points(load_space("layer_select")) if p["distill.layer_map"] != "none"]
    assert matched and all((p["distill.distance"], p["distill.hidden_reduce"], p["distill.w_hidden"])
                           == ("layer_select_bert", "mean", 3.0) for p in matched)


def test_ted_has_no_embedding_pair_unless_asked() -> None:
    assert load_config(["distill.bridge=ted"]).distill.embeddings is False
    assert load_config([]).distill.embeddings is True
    assert load_config(["distill.bridge=ted", "distill.embeddings=true"]).distill.embeddings is True


# --- TED's extractive QA: the span KL of ted_qa_no_trainer.py ---------------------------------------------
def ted_qa_kl_reference(student_start: Tensor, student_end: Tensor, teacher_start: Tensor,
                        teacher_end: Tensor) -> Tensor:
    """question-answering/ted_qa_no_trainer.py: kl_div(input, target, T=2) = F.kl_div(log_softmax(input / T),
    softmax(target / T), reduction="batchmean") * T**2 on (B, T) start and end logits, every position (no mask),
    then (start + end) / 2."""
    def kl_div(inp: Tensor, target: Tensor, temperature: float = 2.0) -> Tensor:
        return F.kl_div(F.log_softmax(inp / temperature, dim=-1), F.softmax(target / temperature, dim=-1),
                        reduction="batchmean") * temperature ** 2

    return (kl_div(student_start, teacher_start) + kl_div(student_end, teacher_end)) / 2.0


def logged_span_kd(overrides: list[str], student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    cfg = load_config(overrides).distill
    distiller = Distiller(nn.Linear(1, 1), Bridge(), kind="extractive_qa", losses=step_losses(cfg))
    return distiller._logit_term(student, teacher, {"attention_mask": mask, "labels": torch.zeros(B, 2).long()})


def test_qa_span_kd_unmasked_equals_teds_qa_code_and_masked_leaves_padding_out() -> None:
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(B, T, 2, generator=g) * 3, torch.randn(B, T, 2, generator=g) * 3
    mask = _mask()
    reference = ted_qa_kl_reference(student[..., 0], student[..., 1], teacher[..., 0], teacher[..., 1])
    ted = ["distill.mask_padding=false", "distill.temperature=2"]
    torch.testing.assert_close(logged_span_kd(ted, student, teacher, mask), reference, rtol=1e-6, atol=1e-6)
    # masked (the default): the same formula over each row's real tokens only, so padding logits cannot move it
    per_row = torch.stack([ted_qa_kl_reference(student[i:i + 1, :n, 0], student[i:i + 1, :n, 1],
                                               teacher[i:i + 1, :n, 0], teacher[i:i + 1, :n, 1])
                           for i, n in enumerate(LENGTHS)])
    masked = logged_span_kd(["distill.temperature=2"], student, teacher, mask)
    torch.testing.assert_close(masked, per_row.mean(), rtol=1e-6, atol=1e-6)
    noisy = student.masked_fill(~mask.bool().unsqueeze(-1), 50.0)
    torch.testing.assert_close(logged_span_kd(["distill.temperature=2"], noisy, teacher, mask), masked)
    assert not torch.allclose(logged_span_kd(ted, noisy, teacher, mask), reference)


def test_the_qa_space_holds_teds_squad_v2_points() -> None:
    from kdsearch.search.space_model import initial_points
    from kdsearch.search.spaces import load_space

    points = initial_points(load_space("qa"))
    ted, kd, lwd = points[0], points[1], points[2]
    assert (ted["distill.bridge"], ted["distill.w_logit"], ted["distill.w_hidden"], ted["distill.temperature"],
            ted["distill.distance"], ted["distill.mask_padding"], ted["student.finetune"]) == (
        "ted", 10.0, 5000.0, 2.0, "mse", False, True)
    assert (kd["distill.layer_map"], kd["distill.w_logit"], kd["distill.mask_padding"]) == ("none", 10.0, False)
    assert (lwd["distill.bridge"], lwd["distill.w_hidden"], lwd["distill.mask_padding"]) == ("projector", 100.0, False)
    assert load_space("qa").base["distill"]["hidden_reduce"] == "mean"  # TED: the mean over its filter pairs
