"""TED filters and Flex-KD units on an encoder-decoder's two stacks: stage 1 per stack (decoder filters with
per-token LM heads, encoder filters with the bag-of-targets head), unit scores per stack, a step that trains
both stacks' bridges, and the cached preparation reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_utils import seq2seq_batch as batch_of
from torch import nn

from kdsearch.config.overrides import load_config
from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.methods.bridges import BRIDGES, BridgeInputs
from kdsearch.methods.bridges.ted import (
    FilterHead,
    bag_of_targets_loss,
    build_filters,
    filter_spec,
    train_stage1,
)
from kdsearch.methods.bridges.units import score_stacks
from kdsearch.methods.inputs import model_inputs
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.methods.losses import task_loss
from kdsearch.run import models
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller, teacher_forward

pytestmark = pytest.mark.usefixtures("offline", "one_thread")
SEQ2SEQ = ("tiny-t5", "tiny-bart")


def tiny(name: str, vocab: int = 50) -> nn.Module:
    torch.manual_seed(0)
    config = models.teacher_config(models.resolve_teacher(name), vocab_size=vocab)
    return models.freeze(models.task_model_class("seq2seq").from_config(config))


# --- stage 1 ---------------------------------------------------------------------------------------------------
def test_the_bag_of_targets_loss_is_the_pooled_cross_entropy_against_every_target_token() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[1, 2:] = labels[2, 4:] = IGNORE_INDEX  # padding
    keep = labels != IGNORE_INDEX
    expected = F.cross_entropy(logits[:, None].expand(-1, 5, -1)[keep], labels[keep])
    torch.testing.assert_close(bag_of_targets_loss(logits, labels), expected)
    # minimised by the target's token frequencies: the head says what the target holds, not in which order
    target = torch.tensor([[0, 0, 1, 2, 3, 3, 3, 3]])
    best = torch.log(torch.tensor([[2.0, 1, 1, 4]]) / 8).requires_grad_(True)
    bag_of_targets_loss(best, target).backward()
    assert best.grad is not None and best.grad.abs().max() < 1e-6


def test_a_mean_pooled_head_reads_only_the_real_tokens() -> None:
    head = FilterHead(8, 5, reads="mean").eval()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    out = head(x, mask)
    changed = x.clone()
    changed[1, 3:] = 100.0  # padding: not read
    torch.testing.assert_close(head(changed, mask), out)
    torch.testing.assert_close(out[1], head(x[1:, :3], mask[1:, :3])[0])


class _TargetAt(nn.Module):
    """A frozen 'encoder-decoder' copying its source (target = source): encoder state `encoder` holds each source
    token one-hot (their mean: the target's bag of tokens), decoder state `decoder` holds target token t at
    position t; every other state is noise. Which filter learns tells which state of which stack it read."""

    def __init__(self, encoder: int, decoder: int, layers: int = 3, vocab: int = 8) -> None:
        super().__init__()
        self.informative, self.layers, self.vocab = {"enc": encoder, "dec": decoder}, layers, vocab
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                decoder_attention_mask: torch.Tensor, output_hidden_states: bool):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        states = {}
        for stack in ("enc", "dec"):
            noise = [self.scale * torch.randn(*input_ids.shape, self.vocab, generator=g)
                     for _ in range(self.layers + 1)]
            noise[self.informative[stack]] = 3 * F.one_hot(input_ids, self.vocab).float() + 0.1 * noise[0]
            states[stack] = tuple(noise)
        return type("Out", (), {"encoder_hidden_states": states["enc"], "decoder_hidden_states": states["dec"]})()


def test_stage1_trains_each_stacks_filters_on_that_stacks_own_states_and_leaves_the_model_alone() -> None:
    model = _TargetAt(encoder=1, decoder=3)
    before = model.scale.detach().clone()
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(8):
        ids = torch.randint(1, 8, (16, 5), generator=g)
        loader.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                       "decoder_input_ids": torch.zeros_like(ids), "decoder_attention_mask": torch.ones_like(ids)})
    spec = filter_spec(load_config(["distill.bridge=ted"]).ted)
    accuracy = {}
    for stack in ("encoder", "decoder"):
        torch.manual_seed(0)
        filters = build_filters([1, 2, 3], 8, 8, spec)
        accuracy[stack] = train_stage1(model, filters, d_f=8, loader=loader, kind="seq2seq", n_out=8, epochs=6,
                                       lr=3e-2, device=torch.device("cpu"), stack=stack)  # type: ignore[arg-type]
    # encoder heads: rows whose top token is in the target (chance about 1 - (6/7)^5 = 0.54; 0.68 on the noise
    # states when written, 0.98 on the informative one)
    assert accuracy["encoder"]["1"] > 0.9 and max(accuracy["encoder"]["2"], accuracy["encoder"]["3"]) < 0.8
    # decoder heads: target tokens predicted at their positions (chance 1/7; 0.21 and 1.0 when written)
    assert accuracy["decoder"]["3"] > 0.9 and max(accuracy["decoder"]["1"], accuracy["decoder"]["2"]) < 0.4
    assert torch.equal(model.scale.detach(), before)


# --- unit scores ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["grad", "grad_x_act"])
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_unit_scores_of_each_stack_are_its_per_token_relevance_over_its_real_tokens(name: str, method: str) -> None:
    teacher = tiny(name)
    batch = batch_of(start=teacher.config.decoder_start_token_id)
    scores = score_stacks(teacher, [batch], kind="seq2seq", method=method, batches=1,  # type: ignore[arg-type]
                          device=torch.device("cpu"))
    # the reference takes gradients through the token ids (embeddings made trainable): the scores' embedding
    # leaves (BART scales its embeddings) must give the same
    teacher.get_input_embeddings().weight.requires_grad_(True)
    out = teacher(**model_inputs(batch), output_hidden_states=True)
    states = {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
    loss = task_loss(out.logits, batch["labels"], kind="seq2seq") * len(batch["labels"])
    grads = torch.autograd.grad(loss, [*states["encoder"], *states["decoder"]])
    per_stack = {"encoder": grads[:len(states["encoder"])], "decoder": grads[len(states["encoder"]):]}
    masks = {"encoder": batch["attention_mask"].bool(), "decoder": batch["decoder_attention_mask"].bool()}
    assert set(scores) == {"encoder", "decoder"}
    for stack, hidden in states.items():
        assert scores[stack].shape == (5, 64)
        for k, (grad, h) in enumerate(zip(per_stack[stack], hidden, strict=True)):
            r = (grad if method == "grad" else grad * h.detach())[masks[stack]]  # (real tokens, d_t)
            torch.testing.assert_close(scores[stack][k], r.abs().mean(0), rtol=1e-4, atol=1e-8)


# --- the step ----------------------------------------------------------------------------------------------
def _artifacts(name: str, pairs: list, dec_pairs: list, d_s: int, cfg) -> dict:
    """Stage-1 filters (random) and unit scores (random) of both stacks, as preparation names them."""
    spec, out = filter_spec(cfg.ted), {}
    for prefix, stack_pairs in (("", pairs), ("decoder_", dec_pairs)):
        out[f"{prefix}teacher_filters"] = build_filters(sorted({t for _, t in stack_pairs}), 64, 64, spec).state_dict()
        out[f"{prefix}student_filters"] = build_filters(sorted({s for s, _ in stack_pairs}), d_s, 64,
                                                        spec).state_dict()
        out[f"{prefix}unit_scores"] = {"scores": torch.rand(5, 64)}
    return out


@pytest.mark.parametrize("bridge", ["ted", "units"])
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_one_step_with_a_bridge_on_each_stack_trains_both_stacks_and_their_filters(name: str, bridge: str) -> None:
    # only the hidden term: what changes in the student is the two stacks' bridged pairs' doing
    cfg = load_config([f"teacher={name}", "task.name=seq2seq_default", "student.decoder_layers=1",
                       "student.hidden_size=32", "student.init=random", f"distill.bridge={bridge}",
                       "distill.w_task=0", "distill.w_logit=0", "distill.w_hidden=1"])
    teacher = tiny(name)
    student = models.build_student(teacher, layers=2, decoder_layers=1, hidden_size=32, init="random", seed=0)
    pairs, dec_pairs = run_pairs(cfg, 4), run_pairs(cfg, 4, stack="decoder")
    assert pairs != dec_pairs
    method = BRIDGES.get(bridge)
    artifacts = _artifacts(name, pairs, dec_pairs, 32, cfg)
    encoder, decoder = (method.build(BridgeInputs(pairs=p, d_student=32, d_teacher=64, settings=method.settings(cfg),
                                                  artifacts=artifacts, stack=stack))  # type: ignore[arg-type]
                        for p, stack in ((pairs, "encoder"), (dec_pairs, "decoder")))
    distiller = Distiller(student, encoder, kind="seq2seq", losses=step_losses(cfg.distill), decoder_bridge=decoder)
    before = {n: p.detach().clone() for n, p in distiller.named_parameters()}
    batch = batch_of(start=teacher.config.decoder_start_token_id)
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), pairs, dec_pairs)
    assert terms["hidden_encoder"] > 0 and terms["hidden_decoder"] > 0
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-2)
    terms["loss"].backward()
    opt.step()
    changed = {n for n, p in distiller.named_parameters() if not torch.equal(p.detach(), before[n])}
    for stack in ("encoder", "decoder"):  # the decoder's blocks are trained by the decoder pairs alone
        assert any(n.startswith("student.") and (f"{stack}.layers." in n or f"{stack}.block." in n) for n in changed)
    if bridge == "ted":  # each stack's student filters train; the teacher filters stay as stage 1 left them
        for module in ("bridge", "decoder_bridge"):
            assert any(n.startswith(f"{module}.student_filters.") for n in changed)
        assert not any(".teacher_filters." in n for n in changed)
        torch.testing.assert_close(decoder.teacher_filters[str(dec_pairs[-1][1])].weight,
                                   artifacts["decoder_teacher_filters"][f"{dec_pairs[-1][1]}.weight"])


# --- preparation ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bridge", "builder"), [("ted", "train_stage1"), ("units", "score_stacks")])
def test_each_stacks_artifacts_are_cached_apart_and_a_second_prepare_builds_nothing(
        bridge: str, builder: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from kdsearch.run.prepare import prepare

    # both stacks 2 layers: their pairs name the same indices, so only the stack keeps their filters apart
    cfg = load_config(["teacher=tiny-t5", "task.name=seq2seq_default", "task.train_size=64", "task.eval_size=16",
                       "finetune.epochs=1", "ted.stage1_epochs=1", "units.score_batches=2", "train.batch_size=16",
                       "student.hidden_size=32", "student.init=random", f"distill.bridge={bridge}",
                       f"cache_dir={tmp_path}"])
    first = prepare(cfg, device=torch.device("cpu")).bridge_artifacts
    names = {"ted": {"teacher_filters", "student_filters", "decoder_teacher_filters", "decoder_student_filters"},
             "units": {"unit_scores", "decoder_unit_scores"}}[bridge]
    assert set(first) == names and len(set(first.values())) == len(names)
    if bridge == "ted":
        assert Path(first["teacher_filters"]).parent != Path(first["decoder_teacher_filters"]).parent

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError(f"{builder} ran again")

    monkeypatch.setattr(importlib.import_module(f"kdsearch.methods.bridges.{bridge}"), builder, refuse)
    assert prepare(cfg, device=torch.device("cpu")).bridge_artifacts == first
