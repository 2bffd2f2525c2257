"""The attention relation term on encoder-decoders (T5, BART): the encoder's and the decoder's self-attention and
the decoder's cross-attention; the taps against the models' own attentions, each relation against a transcription
of its formula, the step's term, a short run, and the refusals."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from data_utils import seq2seq_batch

from kdsearch.config.overrides import load_config
from kdsearch.core.errors import ConfigError
from kdsearch.methods.bridges import Bridge
from kdsearch.methods.inputs import model_inputs
from kdsearch.methods.losses import relation_log_probs
from kdsearch.methods.relations import (
    RELATIONS,
    STACKS,
    RelationSpec,
    Stack,
    Tap,
    capture_all,
    projection_modules,
    relation_term,
    resolve_relations,
)
from kdsearch.run import models
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller, teacher_forward
from kdsearch.run.validate import validate

pytestmark = pytest.mark.usefixtures("offline", "one_thread")
SEQ2SEQ = ("tiny-t5", "tiny-bart")
ALL = frozenset({"query", "key", "value"})


def _model(name: str, *, eager: bool = False) -> torch.nn.Module:
    config = models.teacher_config(models.resolve_teacher(name), vocab_size=50)
    if eager:
        config._attn_implementation = "eager"  # attention probabilities are returned only by eager attention
    torch.manual_seed(0)
    return models.task_model_class("seq2seq").from_config(config).eval()


# --- the taps ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_each_attention_is_tapped_at_its_own_modules_and_lengths(name: str) -> None:
    model, batch = _model(name), seq2seq_batch()
    with capture_all(model, [Tap((1, 3), ALL, stack) for stack in STACKS["all"]]) as got:
        model(**model_inputs(batch))
    source, target = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
    lengths = {"encoder": dict.fromkeys(ALL, source), "decoder": dict.fromkeys(ALL, target),
               "cross": {"query": target, "key": source, "value": source}}
    for stack in STACKS["all"]:
        assert {k: tuple(x.shape) for k, x in got[stack].items()} == {
            (n, p): (2, lengths[stack][p], 64) for n in (1, 3) for p in ALL}
    modules = {stack: {id(m) for m, _ in projection_modules(model, 3, stack).values()} for stack in STACKS["all"]}
    assert len(set.union(*modules.values())) == 9  # three attentions, three projections each, none shared
    assert all(not m._forward_hooks for s in STACKS["all"] for m, _ in projection_modules(model, 3, s).values())


@pytest.mark.parametrize("stack", STACKS["all"])
def test_bart_query_key_relations_are_its_attentions(stack: Stack) -> None:
    """BART (transformers 5.25) scales the scores, not q_proj's output, by 1/sqrt(head dim): its tapped q and k
    at R = its heads give its own attention probabilities, the cross-attention's (target x source) included."""
    probs, attentions, real = _query_key_probabilities(_model("tiny-bart", eager=True), stack, query_scale=1.0)
    torch.testing.assert_close(probs[real], attentions[real], atol=1e-6, rtol=1e-5)


def test_t5_query_key_relations_are_scaled_and_leave_out_the_position_bias() -> None:
    """T5 does not scale q k^T and adds a relative-position bias to its self-attention scores; the relation keeps
    MiniLM's q k^T / sqrt(d/R) for every family. Undoing the scale gives T5's cross-attention (which has no
    position bias) exactly; its self-attention differs by the bias."""
    model = _model("tiny-t5", eager=True)
    root_d = math.sqrt(model.config.d_kv)
    probs, attentions, real = _query_key_probabilities(model, "cross", query_scale=root_d)
    torch.testing.assert_close(probs[real], attentions[real], atol=1e-6, rtol=1e-5)
    for stack in ("encoder", "decoder"):
        probs, attentions, real = _query_key_probabilities(model, stack, query_scale=root_d)
        assert (probs[real] - attentions[real]).abs().max() > 1e-2


def _query_key_probabilities(model: torch.nn.Module, stack: Stack, *, query_scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the qk relation of layer 2 at R = the heads, the model's own attention probabilities, real queries)."""
    batch = seq2seq_batch(start=model.config.decoder_start_token_id)
    with capture_all(model, [Tap((2,), ALL, stack)]) as got:
        out = model(**model_inputs(batch), output_attentions=True)
    source, target = batch["attention_mask"], batch["decoder_attention_mask"]
    queries = source if stack == "encoder" else target
    probs = relation_log_probs(got[stack][(2, "query")] * query_scale, got[stack][(2, "key")], heads=4,
                               mask=queries, causal=stack == "decoder",
                               key_mask=source if stack == "cross" else None).exp()
    attentions = {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions,
                  "cross": out.cross_attentions}[stack][1]
    return probs, attentions, queries.bool()[:, None, :, None].expand_as(probs)


# --- the formulas ----------------------------------------------------------------------------------------------
def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    """(source (3, 7), target (3, 5)) real positions, padded on the right as `collate` pads."""
    source, target = torch.ones(3, 7, dtype=torch.long), torch.ones(3, 5, dtype=torch.long)
    source[1, 4:], source[2, 6:] = 0, 0
    target[0, 3:], target[2, 4:] = 0, 0
    return source, target


def _projections(stack: Stack, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = {"encoder": (7, 7, 7), "decoder": (5, 5, 5), "cross": (5, 7, 7)}[stack]
    return {(layer, p): torch.randn(3, n, width, generator=g) for layer in (1, 2, 4)
            for p, n in zip(("query", "key", "value"), lengths, strict=True)}


def _reference(stack: Stack, kinds: list[tuple[str, str]], student: dict, teacher: dict, pairs: list, *,
               heads: int, loss: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The relation term written out entry by entry, in float64, from the definitions: a projection's positions
    run over the source in the encoder, over the target in the decoder, and in the cross-attention over the target
    for queries and over the source for keys and values; keys are real positions of their sequence, and a target
    position relates only to target positions up to itself. KL: per real query, KL(teacher || student) of the
    softmaxes over its keys of x.y / sqrt(d/R), mean over heads, mean over real queries. MSE: mean over real
    (query, key) entries and heads of the squared score difference. Summed over relations and layer pairs."""
    def seq(p: str) -> str:
        return "target" if stack == "decoder" or (stack == "cross" and p == "query") else "source"

    masks = {"source": source, "target": target}
    total = torch.zeros((), dtype=torch.float64)
    for s_layer, t_layer in pairs:
        for x, y in kinds:
            qm, km, causal = masks[seq(x)], masks[seq(y)], seq(x) == seq(y) == "target"
            values = []
            for b in range(qm.shape[0]):
                for i in range(qm.shape[1]):
                    if not qm[b, i]:
                        continue
                    keys = [j for j in range(km.shape[1]) if km[b, j] and (not causal or j <= i)]
                    per_head = []
                    for r in range(heads):
                        scores = []
                        for side, layer in ((student, s_layer), (teacher, t_layer)):
                            xs, ys = side[(layer, x)].double(), side[(layer, y)].double()
                            step = xs.shape[-1] // heads
                            cols = slice(r * step, (r + 1) * step)
                            scores.append(torch.stack([xs[b, i, cols] @ ys[b, j, cols] for j in keys]) / step ** 0.5)
                        s, t = scores
                        if loss == "kl":
                            p_t = t.softmax(-1)
                            per_head.append((p_t * (p_t.log() - s.log_softmax(-1))).sum())
                        else:
                            per_head.extend((s - t).pow(2))
                    values.append(torch.stack(per_head).mean() if loss == "kl" else torch.stack(per_head))
            total = total + (torch.stack(values).mean() if loss == "kl" else torch.cat(values).mean())
    return total


@pytest.mark.parametrize("loss", ["kl", "mse"])
@pytest.mark.parametrize("stack", STACKS["all"])
def test_each_relation_of_each_attention_equals_its_transcription(stack: Stack, loss: str) -> None:
    """A narrower student (16) than teacher (32), 2 relation heads, two layer pairs, padded sources and targets."""
    source, target = _masks()
    student, teacher = _projections(stack, 16, seed=0), _projections(stack, 32, seed=1)
    pairs = [(1, 2), (2, 4)]
    for kinds in ("qk", "qq", "kk", "vv", "qk+vv", "qq+kk+vv"):
        names = kinds.split("+")
        spec = RelationSpec(tuple(names), heads=2, pairs=tuple(pairs), loss=loss, stack=stack)
        got = relation_term(spec, student, teacher, source, causal=False, target_mask=target)
        want = _reference(stack, [RELATIONS.get(n) for n in names], student, teacher, pairs, heads=2, loss=loss,
                          source=source, target=target)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6, msg=f"{stack} {kinds} {loss}")
        assert want > 0


def test_padding_does_not_reach_the_cross_attention_relation() -> None:
    source, target = _masks()
    student, teacher = _projections("cross", 16, seed=0), _projections("cross", 32, seed=1)
    spec = RelationSpec(("qk", "qq", "kk", "vv"), heads=2, pairs=((1, 2),), stack="cross")
    base = relation_term(spec, student, teacher, source, causal=False, target_mask=target)
    noisy = {k: v.clone() for k, v in student.items()}
    noisy[(1, "query")][0, 3:] = 100.0  # padded target positions of row 0
    noisy[(1, "key")][1, 4:] = -100.0  # padded source positions of row 1
    noisy[(1, "value")][1, 4:] = 100.0
    torch.testing.assert_close(relation_term(spec, noisy, teacher, source, causal=False, target_mask=target), base)


# --- the step --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_a_model_against_itself_has_zero_relations_and_a_student_learns_each(name: str) -> None:
    teacher = models.freeze(_model(name))
    batch = seq2seq_batch(start=teacher.config.decoder_start_token_id)
    cfg = load_config([f"teacher={name}", "task.name=seq2seq_default", "distill.w_task=0", "distill.w_logit=0",
                       "distill.w_hidden=0", "distill.w_relation=1", "relation.kinds=qk+qq+kk+vv",
                       "relation.layers=map", "student.layers=4"])
    specs = resolve_relations(cfg, teacher.config)
    assert [s.stack for s in specs] == ["encoder", "decoder", "cross"]
    assert all(s.pairs == ((1, 1), (2, 2), (3, 3), (4, 4)) and s.heads == 4 for s in specs)

    def terms(student: torch.nn.Module) -> dict[str, torch.Tensor]:
        distiller = Distiller(student, Bridge(), kind="seq2seq", losses=step_losses(cfg.distill), relations=specs,
                              decoder_bridge=Bridge())
        return distiller(batch, teacher_forward(teacher, batch, hidden=False,
                                                taps=[s.teacher for s in specs]), [])

    same = terms(copy.deepcopy(teacher))
    for key in ("relation", "relation_encoder", "relation_decoder", "relation_cross"):
        assert same[key].abs().item() < 1e-6, key
    student = models.build_student(teacher, layers=4, hidden_size=32, init="random", seed=0).eval()  # no dropout
    other = terms(student)
    assert all(other[f"relation_{s}"] > 0 for s in STACKS["all"])
    torch.testing.assert_close(other["relation"], sum(other[f"relation_{s}"] for s in STACKS["all"]))
    torch.testing.assert_close(other["loss"], other["relation"])
    other["loss"].backward()
    cross = [m for m, _ in projection_modules(student, 2, "cross").values()]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in cross)


def test_the_stacks_and_their_layers_resolve_per_stack() -> None:
    teacher = models.teacher_config(models.resolve_teacher("tiny-bart"))
    base = ["teacher=tiny-bart", "task.name=seq2seq_default", "distill.w_relation=1", "student.layers=2",
            "student.decoder_layers=1"]
    (cross,) = resolve_relations(load_config([*base, "relation.stack=cross"]), teacher)
    assert cross.stack == "cross" and cross.pairs == ((1, 4),)  # each stack's last layers by default
    encoder, decoder = resolve_relations(load_config([*base, "relation.stack=all", "relation.layers=map"]),
                                         teacher)[:2]
    assert encoder.pairs == ((1, 2), (2, 4)) and decoder.pairs == ((1, 4),)
    assert resolve_relations(load_config(["distill.w_relation=1"]), models.teacher_config(
        models.resolve_teacher("tiny-bert")))[0].stack == "encoder"  # one stack: its self-attention


# --- a run -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_a_short_seq2seq_run_logs_the_relation_term_of_each_attention(name: str, tmp_path: Path) -> None:
    from kdsearch.run.loop import WorkerContext, run_distillation
    from kdsearch.run.prepare import prepare

    cfg = load_config([f"teacher={name}", "task.name=seq2seq_default", "task.train_size=64", "task.eval_size=16",
                       "finetune.epochs=1", "train.epochs=2", "train.batch_size=16", "student.init=random",
                       "student.layers=2", "student.decoder_layers=2", "distill.w_hidden=0", "distill.w_relation=5",
                       "relation.kinds=qk+vv", f"cache_dir={tmp_path}"])
    validate(cfg)
    reports: list[dict] = []
    run_distillation(cfg, prepare(cfg), WorkerContext(report=lambda m, _: reports.append(m), log=lambda _: None))
    first, last = reports[0], reports[-1]
    assert all(m[f"train_relation_{s}"] > 0 for m in reports for s in STACKS["all"])
    assert last["train_relation"] == pytest.approx(sum(last[f"train_relation_{s}"] for s in STACKS["all"]),
                                                   rel=1e-5)
    assert last["train_loss"] == pytest.approx(last["train_task"] + last["train_logit"] + 5 * last["train_relation"],
                                               rel=1e-4)
    assert last["train_relation"] < first["train_relation"]  # the student's relations move toward the teacher's


# --- refusals ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.w_relation=1", "relation.stack=crosss"],
     r"relation.stack=crosss: choose one of encoder, decoder, cross, all"),
    (["distill.w_relation=1", "relation.stack=cross"],
     r"relation.stack=cross: only an encoder-decoder teacher .* teacher=tiny-bert has one stack"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.w_relation=1", "train.teacher_cache=true"],
     r"train.teacher_cache=true: encoder tasks only"),
    (["teacher=tiny-bart", "task.name=seq2seq_default", "distill.w_relation=1", "student.layers=2",
      "student.decoder_layers=1", "relation.stack=decoder", "relation.student_layer=2"],
     r"relation.student_layer=2 is beyond the student's 1 decoder layers .*relation.stack=decoder"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.w_relation=1", "relation.heads=3"],
     r"relation.heads=3 does not divide the teacher's projection widths"),
    (["teacher=tiny-t5", "task.name=seq2seq_default", "distill.w_relation=1", "relation.layers=map",
      "distill.layer_map=inorder_random"], r"relation.layers=map .* choose a fixed map"),
])
def test_what_the_seq2seq_relation_cannot_run_is_one_line_before_ray(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        validate(load_config(overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_a_seq2seq_relation_config_validates(name: str) -> None:
    for stack in ("encoder", "decoder", "cross", "all"):
        spec = validate(load_config([f"teacher={name}", "task.name=seq2seq_default", "distill.w_relation=1",
                                     "student.decoder_layers=1", "relation.layers=map", f"relation.stack={stack}",
                                     "student.hidden_size=32", "student.init=random", "relation.heads=2"]))
        assert spec.kind == "seq2seq"
