"""Self-attention relation distillation: the projections it taps, the relation loss, the step's relation term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdsearch.config.overrides import load_config
from kdsearch.data.tasks import task_spec
from kdsearch.methods.bridges import BRIDGES, BridgeInputs
from kdsearch.methods.losses import RELATION_LOSSES, relation_kl, relation_log_probs, relation_mse, relation_scores
from kdsearch.methods.relations import (
    RELATIONS,
    RelationSpec,
    Tap,
    capture,
    projection_modules,
    projection_widths,
    relation_term,
)
from kdsearch.run import models
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller, teacher_forward

ALL = frozenset({"query", "key", "value"})


def _model(name: str, *, eager: bool = False) -> nn.Module:
    config = models.teacher_config(models.resolve_teacher(name), vocab_size=50)
    if eager:
        config._attn_implementation = "eager"  # attention probabilities are returned only by eager attention
    torch.manual_seed(0)
    return models.task_model_class(models.family_of(config)).from_config(config).eval()


def _batch(b: int = 3, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return {"input_ids": torch.randint(1, 50, (b, t), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 2, (b,), generator=g)}


def _pair(seed: int = 0, b: int = 3, t: int = 6, d: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 4:] = 0
    return torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g), mask


def test_registry_names_the_papers_relations() -> None:
    assert RELATIONS.names() == ["kk", "qk", "qq", "vv"]
    assert RELATIONS.get("qk") == ("query", "key")


@pytest.mark.parametrize("name, causal", [("tiny-bert", False), ("tiny-roberta", False), ("tiny-gpt2", True)])
def test_query_key_relation_with_the_models_heads_is_its_attention(name: str, causal: bool) -> None:
    """Tapped q and k at R = the attention heads reproduce the model's own attention probabilities."""
    model, batch = _model(name, eager=True), _batch()
    with capture(model, Tap((2,), ALL)) as got:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    probs = relation_log_probs(got[(2, "query")], got[(2, "key")], heads=model.config.num_attention_heads,
                               mask=batch["attention_mask"], causal=causal).exp()
    real = batch["attention_mask"].bool()  # padded query rows are never read by the loss
    torch.testing.assert_close(probs[real[:, None, :].expand_as(probs[..., 0])],
                               out.attentions[1][real[:, None, :].expand_as(probs[..., 0])], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-qwen"])
def test_capture_records_each_projection_at_its_width_and_removes_its_hooks(name: str) -> None:
    model, batch = _model(name), _batch()
    with capture(model, Tap((1, 3), ALL)) as got:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    widths = projection_widths(model.config)
    assert {k: tuple(x.shape) for k, x in got.items()} == {(n, p): (3, 7, widths[p]) for n in (1, 3) for p in ALL}
    assert not torch.equal(got[(1, "value")], got[(3, "value")])  # each layer's own projection
    assert all(not module._forward_hooks for module, _ in projection_modules(model, 1).values())


def test_projection_lookup_says_what_it_could_not_find() -> None:
    with pytest.raises(ValueError, match="blocks 1..4"):
        projection_modules(_model("tiny-bert"), 5)
    with pytest.raises(ValueError, match="no query/key/value projections"):
        projection_modules(nn.ModuleDict({"layer": nn.ModuleList([nn.Linear(4, 4)])}), 1)


def test_relation_kl_is_zero_for_identical_and_positive_for_different_projections() -> None:
    x, y, mask = _pair()
    assert relation_kl((x, y), (x.clone(), y.clone()), heads=4, mask=mask).item() == pytest.approx(0.0, abs=1e-6)
    value = relation_kl((x, y), (y, x), heads=4, mask=mask)
    assert value.shape == () and value.item() > 0


def test_relation_kl_ignores_padding() -> None:
    x, y, mask = _pair()
    teacher = (torch.randn_like(x), torch.randn_like(y))
    base = relation_kl((x, y), teacher, heads=4, mask=mask)
    x2, y2 = x.clone(), y.clone()
    x2[0, 4:], y2[0, 4:] = 100.0, -100.0  # padded positions of row 0
    torch.testing.assert_close(relation_kl((x2, y2), teacher, heads=4, mask=mask), base)


def _relation_kl_reference(student, teacher, *, heads: int, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """The relation KL query by query: softmax over the keys that query may see, KL summed over them, mean
    over heads, mean over real queries."""
    (sx, sy), (tx, ty) = student, teacher
    batch, length, width = sx.shape
    step = width // heads
    per_query = []
    for b in range(batch):
        for i in range(length):
            if not mask[b, i]:
                continue
            keys = [j for j in range(length) if mask[b, j] and (not causal or j <= i)]
            kls = []
            for r in range(heads):
                cols = slice(r * step, (r + 1) * step)
                s = torch.stack([sx[b, i, cols] @ sy[b, j, cols] for j in keys]) / step ** 0.5
                t = torch.stack([tx[b, i, cols] @ ty[b, j, cols] for j in keys]) / step ** 0.5
                p_t = t.softmax(-1)
                kls.append((p_t * (p_t.log() - s.log_softmax(-1))).sum())
            per_query.append(torch.stack(kls).mean())
    return torch.stack(per_query).mean()


@pytest.mark.parametrize("causal", [False, True])
def test_relation_kl_matches_a_query_by_query_reference(causal: bool) -> None:
    x, y, mask = _pair()
    teacher = (torch.randn_like(x), torch.randn_like(y))
    expected = _relation_kl_reference((x, y), teacher, heads=4, mask=mask, causal=causal)
    torch.testing.assert_close(relation_kl((x, y), teacher, heads=4, mask=mask, causal=causal), expected)
    assert not torch.allclose(relation_kl((x, y), teacher, heads=4, mask=mask, causal=not causal), expected)


def test_relations_are_computed_in_fp32_under_autocast() -> None:
    x, y, mask = _pair(d=64)
    teacher = (3 * torch.randn_like(x), 3 * torch.randn_like(y))
    exact = relation_kl((x, y), teacher, heads=4, mask=mask), relation_mse((x, y), teacher, heads=4, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert relation_scores(x, y, heads=4).dtype == torch.float32
        low = relation_kl((x, y), teacher, heads=4, mask=mask), relation_mse((x, y), teacher, heads=4, mask=mask)
    for got, want in zip(low, exact, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want)


def test_relations_compare_models_of_different_widths_and_need_one_width_per_pair() -> None:
    narrow, wide = torch.randn(2, 5, 16), torch.randn(2, 5, 64)
    assert torch.isfinite(relation_kl((narrow, narrow), (wide, wide), heads=4))
    with pytest.raises(ValueError, match="one width"):
        relation_kl((narrow, wide), (wide, wide), heads=4)
    with pytest.raises(ValueError, match="3 heads divide"):
        relation_kl((narrow, narrow), (wide, wide), heads=3)


def test_the_step_adds_the_relation_term_and_trains_the_tapped_layer_only_through_it() -> None:
    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=50),
                                   task_spec("default"))
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class("encoder").from_config(config))
    student = models.build_student(teacher, layers=2, hidden_size=32, init="random", seed=0).eval()  # no dropout
    cfg = load_config(["distill.w_task=0", "distill.w_logit=0", "distill.w_hidden=0", "distill.w_relation=2"])
    bridge = BRIDGES.get("identity").build(BridgeInputs(pairs=[], d_student=32, d_teacher=64))
    spec = RelationSpec(("qk", "vv"), heads=2, pairs=((1, 4),))
    distiller = Distiller(student, bridge, kind="classification", losses=step_losses(cfg.distill), relations=[spec])
    batch = _batch()
    with pytest.raises(ValueError, match="teacher's projections"):
        distiller(batch, teacher_forward(teacher, batch, hidden=False), [])
    outputs = teacher_forward(teacher, batch, hidden=False, taps=[spec.teacher])
    assert outputs.projections is not None and outputs.projections["encoder"][(4, "query")].shape == (3, 7, 64)
    terms = distiller(batch, outputs, [])
    mine, theirs = _student_projections(student, batch, spec.student), outputs.projections["encoder"]
    expected = sum(relation_kl((mine[(1, x)], mine[(1, y)]), (theirs[(4, x)], theirs[(4, y)]), heads=2,
                               mask=batch["attention_mask"]) for x, y in [("query", "key"), ("value", "value")])
    torch.testing.assert_close(terms["relation"], expected)
    torch.testing.assert_close(terms["loss"], 2 * terms["relation"])
    terms["loss"].backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("layer.0.attention.self.query" in n for n in grads)
    assert not any("layer.1." in n for n in grads)  # above the tapped layer: untouched by the relation term


def _student_projections(student: nn.Module, batch: dict[str, torch.Tensor], tap: Tap) -> dict:
    with torch.no_grad(), capture(student, tap) as got:
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return dict(got)


@pytest.mark.parametrize("recipe", [
    # MiniLMv2: q-q, k-k, v-v relations of the last layers into a half-width student, 2 relation heads
    ["relation.kinds=qq+kk+vv", "relation.heads=2", "student.hidden_size=32"],
    # TinyBERT: attention-score MSE at every forward-mapped layer pair
    ["relation.kinds=qk", "relation.loss=mse", "relation.layers=map", "distill.layer_map=forward"],
])
def test_a_run_with_the_relation_term_trains_and_reports_it(tmp_path, recipe: list[str]) -> None:
    """The loop taps the teacher at the resolved layers and the term falls as the student learns."""
    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import prepare
    from kdsearch.run.validate import validate

    cfg = load_config(["distill.w_relation=5", "distill.w_hidden=0", "student.init=random", "task.train_size=128",
                       "task.eval_size=32", "train.epochs=2", "finetune.epochs=1", f"cache_dir={tmp_path}", *recipe])
    validate(cfg)
    reports: list[dict] = []
    run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    first, last = reports[0], reports[-1]
    assert 0 < last["train_relation"] < first["train_relation"]  # the student's relations move toward the teacher's
    assert last["train_loss"] == pytest.approx(last["train_task"] + last["train_logit"] + 5 * last["train_relation"],
                                               rel=1e-4)


@pytest.mark.parametrize("loss", RELATION_LOSSES.names())
@pytest.mark.parametrize("widths", [{"query": 16, "key": 16, "value": 16}, {"query": 16, "key": 8, "value": 8}])
def test_the_relation_term_sums_its_pairs_and_relations_batched_or_not(widths: dict[str, int], loss: str) -> None:
    """Equal widths run the relations as one batch, grouped-query widths one by one: the same sum either way."""
    spec = RelationSpec(("qq", "kk", "vv"), heads=2, pairs=((1, 2), (2, 4)), loss=loss)
    g = torch.Generator().manual_seed(0)
    student = {(n, p): torch.randn(3, 6, w, generator=g) for n in (1, 2) for p, w in widths.items()}
    teacher = {(n, p): torch.randn(3, 6, 2 * w, generator=g) for n in (2, 4) for p, w in widths.items()}
    mask = _pair()[2]
    fn = RELATION_LOSSES.get(loss)
    expected = sum(fn((student[(s, p)], student[(s, p)]), (teacher[(t, p)], teacher[(t, p)]), heads=2, mask=mask,
                      causal=True) for s, t in spec.pairs for p in ("query", "key", "value"))
    torch.testing.assert_close(relation_term(spec, student, teacher, mask, causal=True), expected)
    assert spec.student.layers == (1, 2) and spec.teacher.layers == (2, 4)


def test_relation_mse_is_tinyberts_attention_score_mse_over_real_entries() -> None:
    x, y, mask = _pair()
    tx, ty = torch.randn_like(x), torch.randn_like(y)
    keep = mask.bool()[:, :, None] & mask.bool()[:, None, :]  # (B, T, T) real query and real key
    diff = relation_scores(x, y, heads=4) - relation_scores(tx, ty, heads=4)  # (B, R, T, T)
    expected = diff.pow(2).permute(0, 2, 3, 1)[keep].mean()
    torch.testing.assert_close(relation_mse((x, y), (tx, ty), heads=4, mask=mask), expected)
    assert relation_mse((x, y), (x.clone(), y.clone()), heads=4, mask=mask).item() == 0.0


