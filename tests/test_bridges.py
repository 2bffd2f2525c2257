"""Contract tests over every registered bridge, Flex-KD unit scoring, and the shared step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from data_utils import seq2seq_batch
from torch import nn

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import Config
from kdsearch.data.tasks import task_spec
from kdsearch.methods.bridges import BRIDGES, BridgeInputs
from kdsearch.methods.bridges.ted import FILTERS, build_filters, filter_spec, filter_width
from kdsearch.methods.bridges.units import score_units, select_units
from kdsearch.methods.losses import LOGIT_LOSSES
from kdsearch.run import models
from kdsearch.run.evaluation import make_loader
from kdsearch.run.loop import step_losses
from kdsearch.run.step import Distiller, TeacherOutputs, leaves_parameters_unused, teacher_forward

PAIRS = [(0, 0), (1, 2), (2, 4)]


@dataclass
class Given(BridgeInputs):
    cfg: Config | None = None  # the config the inputs came from


def inputs(bridge: str, d_s: int, d_t: int = 64, **overrides: str) -> Given:
    cfg = load_config([f"distill.bridge={bridge}", *(f"{k}={v}" for k, v in overrides.items())])
    d_f = filter_width(d_t, width=cfg.ted.width, ratio=cfg.ted.width_ratio)
    teacher_f = build_filters([0, 2, 4], d_t, d_f, filter_spec(cfg.ted)).state_dict()
    student_f = build_filters([0, 1, 2], d_s, d_f, filter_spec(cfg.ted)).state_dict()
    return Given(pairs=PAIRS, d_student=d_s, d_teacher=d_t, settings=BRIDGES.get(bridge).settings(cfg),
                 artifacts={"teacher_filters": teacher_f, "student_filters": student_f,
                            "unit_scores": {"scores": torch.rand(5, d_t)}}, cfg=cfg)


@pytest.mark.parametrize("name", BRIDGES.names())
def test_every_bridge_maps_both_sides_to_one_space_and_trains_only_the_student_side(name: str) -> None:
    d_s = 64 if name == "identity" else 32
    bridge = BRIDGES.get(name).build(inputs(name, d_s))
    hs, ht = torch.randn(2, 5, d_s, requires_grad=True), torch.randn(2, 5, 64)
    for s, t in PAIRS:
        sv, tv = bridge.student_view(s, hs), bridge.teacher_view(t, ht)
        assert sv.shape == tv.shape
        sv.sum().backward()
        assert hs.grad is not None and hs.grad.abs().sum() > 0
        hs.grad = None
        assert not tv.requires_grad  # nothing on the teacher side is trained
    teacher_side = [p for n, p in bridge.named_parameters() if n.startswith("teacher")]
    assert all(not p.requires_grad for p in teacher_side)
    assert bool(teacher_side) == (name == "ted")  # only TED's bridge holds teacher-side parameters (frozen)


@pytest.mark.parametrize("name", FILTERS.names())
def test_filters_backpropagate(name: str) -> None:
    cfg = load_config([f"ted.filter={name}", "ted.depth=3"])
    f = FILTERS.get(name)(16, 8, filter_spec(cfg.ted))
    x = torch.randn(3, 16)
    f(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in f.parameters())


def test_ted_student_filters_load_stage1_weights() -> None:
    given = inputs("ted", 32)
    bridge = BRIDGES.get("ted").build(given)
    torch.testing.assert_close(bridge.student_filters["1"].weight, given.artifacts["student_filters"]["1.weight"])
    torch.testing.assert_close(bridge.teacher_filters["2"].weight, given.artifacts["teacher_filters"]["2.weight"])


@pytest.mark.parametrize(("overrides", "d_f"), [({}, 64), ({"ted.width": 48}, 48), ({"ted.width_ratio": 2.0}, 128),
                                                 ({"ted.width_ratio": 0.25}, 16)])
def test_ted_filters_output_the_configured_width(overrides: dict, d_f: int) -> None:
    bridge = BRIDGES.get("ted").build(inputs("ted", 32, **overrides))  # teacher width 64
    assert bridge.student_view(1, torch.randn(2, 5, 32)).shape[-1] == d_f
    assert bridge.teacher_view(2, torch.randn(2, 5, 64)).shape[-1] == d_f


def test_units_bridge_picks_the_top_scored_teacher_units() -> None:
    given = inputs("units", 32, **{"units.ratio": 0.25})
    bridge = BRIDGES.get("units").build(given)
    ht = torch.arange(64.0).expand(1, 1, 64)
    picked = bridge.teacher_view(2, ht).flatten().long()
    assert picked.tolist() == sorted(torch.topk(given.artifacts["unit_scores"]["scores"][2], 16).indices.tolist())
    assert bridge.student_view(1, torch.randn(1, 1, 32)).shape[-1] == 16


def test_units_bridge_serves_teacher_layers_a_map_draws_in_later_epochs() -> None:
    # inorder_random re-draws the teacher layers every epoch; the bridge is built from epoch 0's pairs.
    given = inputs("units", 32, **{"units.ratio": 0.25})
    bridge = BRIDGES.get("units").build(given)
    ht = torch.arange(64.0).expand(1, 1, 64)
    for t in range(5):
        picked = bridge.teacher_view(t, ht).flatten().long()
        assert picked.tolist() == sorted(torch.topk(given.artifacts["unit_scores"]["scores"][t], 16).indices.tolist())
    last = BRIDGES.get("units").build(inputs("units", 32, **{"units.ratio": 0.25, "units.scope": "last"}))
    assert all(torch.equal(last.teacher_view(t, ht), last.teacher_view(4, ht)) for t in range(5))


def test_a_student_as_wide_as_its_teacher_matches_the_units_the_teacher_selection_names() -> None:
    # a teacher-initialised student's unit i is the teacher's unit i: identical states are at distance 0
    bridge = BRIDGES.get("units").build(inputs("units", 64, **{"units.ratio": 0.5}))
    h = torch.randn(2, 5, 64)
    for s, t in PAIRS:
        assert torch.equal(bridge.student_view(s, h, paired_with=t), bridge.teacher_view(t, h))
    narrow = BRIDGES.get("units").build(inputs("units", 32, **{"units.ratio": 0.25}))
    assert torch.equal(narrow.student_view(1, h[..., :32], paired_with=2), h[..., :16])  # another width: first k


def test_select_units_breaks_ties_towards_the_lower_unit() -> None:
    scores = torch.tensor([1.0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0])
    assert select_units(scores, 4).tolist() == [0, 1, 5, 8]


def test_select_units_returns_the_asked_number_of_unique_units() -> None:
    for k in (1, 7, 64):
        chosen = select_units(torch.rand(64), k)
        assert len(set(chosen.tolist())) == k == len(chosen)


@pytest.mark.parametrize("aggregate", ["mean_abs", "abs_mean", "rms"])
@pytest.mark.parametrize("method", ["grad", "grad_x_act"])
def test_flex_scores_find_the_units_that_carry_the_label(method: str, aggregate: str) -> None:
    """A BERT whose classifier reads only units {3, 17, 40} of the [CLS] state: those must rank top."""
    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=30),
                                   task_spec("default"))
    torch.manual_seed(0)
    teacher = models.task_model_class("encoder").from_config(config)
    carrying = [3, 17, 40]
    with torch.no_grad():
        teacher.bert.pooler.dense.weight.copy_(torch.eye(64))
        teacher.bert.pooler.dense.bias.zero_()
        teacher.classifier.weight.zero_()
        teacher.classifier.weight[1, carrying] = 2.0
        teacher.classifier.weight[0, carrying] = -2.0
    models.freeze(teacher)
    batches = [{"input_ids": torch.randint(1, 30, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
                "labels": torch.randint(0, 2, (8,))} for _ in range(3)]
    scores = score_units(teacher, batches, kind="classification", method=method, batches=3,  # type: ignore[arg-type]
                         device=torch.device("cpu"), aggregate=aggregate)  # type: ignore[arg-type]
    assert scores.shape == (5, 64)
    assert select_units(scores[-1], 3).tolist() == carrying


@pytest.mark.parametrize("aggregate", ["mean_abs", "abs_mean", "rms"])
@pytest.mark.parametrize("method", ["grad", "grad_x_act"])
def test_flex_scores_are_each_layers_per_token_relevance_aggregated_over_real_tokens(method: str,
                                                                                    aggregate: str) -> None:
    import torch.nn.functional as F

    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=30),
                                   task_spec("default"))
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class("encoder").from_config(config))
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 4:], mask[3, 2:] = 0, 0
    batch = {"input_ids": torch.randint(1, 30, (4, 7), generator=g), "attention_mask": mask,
             "labels": torch.randint(0, 2, (4,), generator=g)}
    scores = score_units(teacher, [batch], kind="classification", method=method, batches=1,  # type: ignore[arg-type]
                         device=torch.device("cpu"), aggregate=aggregate)  # type: ignore[arg-type]
    embeds = teacher.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    out = teacher(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    grads = torch.autograd.grad(F.cross_entropy(out.logits, batch["labels"], reduction="sum"), out.hidden_states)
    for k, (grad, h) in enumerate(zip(grads, out.hidden_states, strict=True)):
        r = (grad if method == "grad" else grad * h.detach())[mask.bool()]  # (real tokens, d_t)
        expected = {"mean_abs": r.abs().mean(0), "abs_mean": r.mean(0).abs(), "rms": r.pow(2).mean(0).sqrt()}
        torch.testing.assert_close(scores[k], expected[aggregate], rtol=1e-4, atol=1e-8)


def _tiny_pair(hidden: int | None = None) -> tuple[nn.Module, nn.Module]:
    config = models.with_task_head(models.teacher_config(models.resolve_teacher("tiny-bert"), vocab_size=30),
                                   task_spec("default"))
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class("encoder").from_config(config))
    student = models.build_student(teacher, layers=2, hidden_size=hidden, init="random", seed=0)
    return teacher, student


def test_step_terms_and_their_weighted_sum() -> None:
    teacher, student = _tiny_pair()
    cfg = load_config(["distill.w_task=1", "distill.w_logit=2", "distill.w_hidden=3"]).distill
    distiller = Distiller(student, BRIDGES.get("identity").build(inputs("identity", 64)), kind="classification",
                          losses=step_losses(cfg))
    batch = {"input_ids": torch.randint(1, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,))}
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), [(1, 2), (2, 4)])
    assert set(terms) == {"task", "logit", "hidden", "loss", "logits"}
    expected = terms["task"] + 2 * terms["logit"] + 3 * terms["hidden"]
    torch.testing.assert_close(terms["loss"], expected)
    terms["loss"].backward()
    assert [n for n, p in student.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", LOGIT_LOSSES.names())
def test_the_step_takes_its_logit_term_from_the_configured_divergence(name: str) -> None:
    teacher, student = _tiny_pair()
    student.eval()
    cfg = load_config([f"distill.logit_loss={name}", "distill.temperature=2"]).distill
    distiller = Distiller(student, BRIDGES.get("identity").build(inputs("identity", 64)), kind="classification",
                          losses=step_losses(cfg))
    batch = {"input_ids": torch.randint(1, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,))}
    with torch.no_grad():
        outputs = teacher_forward(teacher, batch, hidden=False)
        terms = distiller(batch, outputs, [])
    expected = LOGIT_LOSSES.get(name)(terms["logits"], outputs.logits, temperature=2.0)
    torch.testing.assert_close(terms["logit"], expected)


def test_hidden_distances_skip_padding_unless_told_to_match_every_position() -> None:
    teacher, student = _tiny_pair()
    student.eval()  # no dropout: every forward pass below sees the same network
    batch = {"input_ids": torch.randint(1, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,))}
    batch["attention_mask"][:2, 3:] = 0  # two rows padded after 3 tokens
    with torch.no_grad():
        outputs = teacher_forward(teacher, batch, hidden=True)
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states[2]
        hidden = {}
        for masked in (True, False):
            cfg = load_config(["distill.w_logit=0", f"distill.mask_padding={str(masked).lower()}"]).distill
            distiller = Distiller(student, BRIDGES.get("identity").build(inputs("identity", 64)), kind="classification",
                                  losses=step_losses(cfg))
            hidden[masked] = distiller(batch, outputs, [(2, 4)])["hidden"]
    assert outputs.hidden is not None
    per_token = (s - outputs.hidden[4]).pow(2).mean(-1)  # (B, T): element-mean mse per position
    torch.testing.assert_close(hidden[True], per_token[batch["attention_mask"].bool()].mean())  # real tokens
    torch.testing.assert_close(hidden[False], per_token.mean())  # TED's code: every position
    assert not torch.isclose(hidden[True], hidden[False])


def test_step_with_the_teacher_as_student_has_zero_distillation_terms() -> None:
    teacher, _ = _tiny_pair()
    cfg = load_config(["distill.w_task=0"]).distill
    twin = models.build_student(teacher, layers=4, hidden_size=None, init="teacher", seed=0)
    distiller = Distiller(twin.eval(), BRIDGES.get("identity").build(inputs("identity", 64)), kind="classification",
                          losses=step_losses(cfg))
    batch = {"input_ids": torch.randint(1, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,))}
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), [(k, k) for k in range(5)])
    assert float(terms["logit"].detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(terms["hidden"].detach()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-qwen", "tiny-t5",
                                    "tiny-bart"])
@pytest.mark.parametrize("bridge", BRIDGES.names())
@pytest.mark.parametrize("weights", [(1, 1, 1), (0, 1, 1), (0, 0, 1)])
def test_a_step_leaves_parameters_unused_only_when_declared(family: str, bridge: str, weights: tuple) -> None:
    # DDP runs with find_unused_parameters=leaves_parameters_unused(cfg): a parameter idle when it says False
    # would fail the run ("Expected to have finished reduction..."), a needless True costs a graph traversal.
    source = models.resolve_teacher(family)
    teacher_cfg = models.teacher_config(source, vocab_size=30)
    spec = task_spec("default")
    kind = {"encoder": "classification", "causal": "causal_lm", "seq2seq": "seq2seq"}[models.family_of(teacher_cfg)]
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class(models.family_of(teacher_cfg)).from_config(
        models.with_task_head(teacher_cfg, spec) if kind == "classification" else teacher_cfg))
    d_s = 64 if bridge == "identity" else 32
    student = models.build_student(teacher, layers=2, hidden_size=d_s, init="random", seed=0)
    w_task, w_logit, w_hidden = weights
    given = inputs(bridge, d_s, **{"distill.w_task": w_task, "distill.w_logit": w_logit,
                                   "distill.w_hidden": w_hidden, "units.ratio": 0.25})
    # an encoder-decoder's decoder: its own bridge, from its own (here: the same) artifacts, on the same pairs
    named = {f"decoder_{k}": v for k, v in given.artifacts.items()}
    decoder = dataclasses.replace(given, stack="decoder", artifacts={**given.artifacts, **named})
    distiller = Distiller(student, BRIDGES.get(bridge).build(given), kind=kind, losses=step_losses(given.cfg.distill),  # type: ignore[union-attr]
                          decoder_bridge=BRIDGES.get(bridge).build(decoder) if kind == "seq2seq" else None)
    ids = torch.randint(1, 30, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,)) if kind == "classification" else ids}
    if kind == "seq2seq":
        batch = seq2seq_batch(30, start=teacher.config.decoder_start_token_id)
    distiller(batch, teacher_forward(teacher, batch, hidden=True), PAIRS, PAIRS)["loss"].backward()
    idle = [n for n, p in distiller.named_parameters() if p.requires_grad and p.grad is None]
    if not leaves_parameters_unused(step_losses(given.cfg.distill).weights):
        assert idle == []
    elif family not in ("tiny-gpt2", "tiny-t5", "tiny-bart"):
        # the last hidden state of GPT-2 (after ln_f), T5 (after the final layer norm) and BART (post-norm layers)
        # is what their head reads, and the head shares the embeddings: hidden pairs alone reach every parameter
        assert idle, "hidden pairs alone leave the task head idle"


def test_causal_logit_term_matches_next_token_predictions_on_response_tokens_only() -> None:
    # position t predicts token t+1: the teacher's and student's logits at t are compared where token t+1 is a
    # target (a response token), never at the prompt
    source = models.resolve_teacher("tiny-gpt2")
    config = models.teacher_config(source, vocab_size=30)
    torch.manual_seed(0)
    teacher = models.freeze(models.task_model_class("causal").from_config(config))
    student = models.build_student(teacher, layers=2, hidden_size=None, init="random", seed=0).eval()  # no dropout
    cfg = load_config(["distill.w_task=0", "distill.w_hidden=0", "distill.temperature=2"]).distill
    distiller = Distiller(student, BRIDGES.get("identity").build(inputs("identity", 64)), kind="causal_lm",
                          losses=step_losses(cfg))
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :3] = -100  # a 3-token prompt: the first target is token 3, predicted at position 2
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    live = teacher_forward(teacher, batch, hidden=False)
    terms = distiller(batch, live, [])
    expected = LOGIT_LOSSES.get("kl")(terms["logits"][:, :-1], live.logits[:, :-1], temperature=2.0,
                                      mask=labels[:, 1:] != -100)
    torch.testing.assert_close(terms["logit"].detach(), expected)

    def logit_term_with_teacher_changed_at(position: int) -> torch.Tensor:
        logits = live.logits.clone()
        logits[:, position] += torch.randn_like(logits[:, position])
        return distiller(batch, TeacherOutputs(logits, None), [])["logit"].detach()

    for prompt_position in (0, 1, 5):  # 0, 1 predict prompt tokens; 5 predicts nothing
        torch.testing.assert_close(logit_term_with_teacher_changed_at(prompt_position), terms["logit"].detach())
    assert not torch.isclose(logit_term_with_teacher_changed_at(2), terms["logit"].detach())


class _LabelAtLayer(nn.Module):
    """A frozen 'model' whose hidden state `informative` carries the label in its first token; every other
    state is noise: which filter learns the task tells which state it was trained on."""

    def __init__(self, informative: int, layers: int = 4, width: int = 8) -> None:
        super().__init__()
        self.informative, self.layers, self.width = informative, layers, width
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool):
        g = torch.Generator().manual_seed(int(input_ids.sum()))
        states = [self.scale * torch.randn(*input_ids.shape, self.width, generator=g) for _ in range(self.layers + 1)]
        signal = (input_ids[:, 0] % 2).float() * 2 - 1  # the label, as +-1
        states[self.informative][:, 0, 0] = 3 * signal
        return type("Out", (), {"hidden_states": tuple(states)})()


def test_ted_stage1_trains_each_filter_on_its_own_hidden_state_and_leaves_the_model_alone() -> None:
    from kdsearch.methods.bridges.ted import train_stage1

    model = _LabelAtLayer(informative=2)
    before = model.scale.detach().clone()
    g = torch.Generator().manual_seed(0)
    loader = []
    for _ in range(8):
        ids = torch.randint(1, 50, (16, 5), generator=g)
        loader.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 2})
    cfg = load_config(["distill.bridge=ted"]).ted
    torch.manual_seed(0)
    filters = build_filters([1, 2, 3], 8, 8, filter_spec(cfg))
    accuracy = train_stage1(model, filters, d_f=8, loader=loader, kind="classification", n_out=2, epochs=6,
                            lr=1e-2, device=torch.device("cpu"))
    assert accuracy["2"] > 0.95
    assert accuracy["1"] < 0.8 and accuracy["3"] < 0.8
    assert torch.equal(model.scale.detach(), before)


def test_ted_stage1_optimiser_and_heads_are_teds() -> None:
    """TED's learn_filters script: AdamW without weight decay, linear decay to 0 with no warmup; each filter's
    head pools the first token through dense + GELU (DeBERTa's pooler act), dropout 0.1, then a linear head."""
    from kdsearch.methods.bridges.ted import FilterHead, stage1_optimiser

    param = nn.Parameter(torch.zeros(3))
    opt, sched = stage1_optimiser([param], lr=4e-5, total_steps=4)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([4e-5, 3e-5, 2e-5, 1e-5])
    head = FilterHead(8, 2, reads="first")
    assert isinstance(head.pooler[1], nn.GELU) and head.dropout.p == 0.1
    head.eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(head(x), head.head(torch.nn.functional.gelu(head.pooler[0](x[:, 0]))))


@pytest.fixture(scope="module")
def contract_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("contract")


CONTRACT_RUNS = {"encoder": ["teacher=tiny-bert", "task.name=default"],
                 # an encoder-decoder: each stack's own pairs, artifacts and bridge; one decoder layer, so that the
                 # two stacks' pairs differ
                 "seq2seq": ["teacher=tiny-t5", "task.name=seq2seq_default", "student.decoder_layers=1"]}


@pytest.mark.parametrize("family", CONTRACT_RUNS)
@pytest.mark.parametrize("name", BRIDGES.names())
def test_every_bridge_method_checks_prepares_and_builds_through_its_entry(name: str, family: str,
                                                                         contract_cache: Path) -> None:
    """The contract prepare, validate, the loop and the model card rely on, on a tiny in-code teacher (an encoder,
    and an encoder-decoder, whose every stack is bridged): its checks pass a run it can serve, its preparation
    gives exactly the artifacts its build reads, the built bridge trains in a real step, and its config section
    is on a card only when it runs."""
    from kdsearch.run.loop import build_distiller, layer_pairs
    from kdsearch.run.prepare import decoder_pairs, prepare
    from kdsearch.run.validate import validate
    from kdsearch.search.export import strategy_settings

    width = "1.0" if name == "identity" else "0.5"
    cfg = load_config([*CONTRACT_RUNS[family], "task.train_size=128", "task.eval_size=64", "finetune.epochs=1",
                       "ted.stage1_epochs=1", "train.batch_size=16", "units.score_batches=2",
                       f"cache_dir={contract_cache}", f"distill.bridge={name}", f"student.width_ratio={width}",
                       "student.init=random"])
    method = BRIDGES.get(name)
    validate(cfg)  # calls method.check_names and method.check
    prepared = prepare(cfg, device=torch.device("cpu"))
    stacks = ["encoder", "decoder"] if family == "seq2seq" else ["encoder"]
    if method.prepare is None:
        assert not prepared.bridge_artifacts
    else:  # one set of artifacts per stack, each its own file
        names = set(prepared.bridge_artifacts)
        assert {n for n in names if n.startswith("decoder_")} == ({f"decoder_{n}" for n in names if not n.startswith(
            "decoder_")} if family == "seq2seq" else set())
        assert len(set(prepared.bridge_artifacts.values())) == len(names)
    _, distiller = build_distiller(cfg, prepared, torch.device("cpu"))
    pairs, dec_pairs = layer_pairs(cfg, prepared, epoch=0), decoder_pairs(cfg, prepared, epoch=0)
    assert pairs and pairs[0][0] == (0 if method.embedding_pair else 1)  # the embeddings pair as the method says
    assert bool(dec_pairs) == (family == "seq2seq") and dec_pairs != pairs
    batch = next(iter(make_loader(prepared.data["train"], batch_size=8, shuffle=False, seed=0,
                                  pad_id=prepared.pad_id)))
    teacher = models.load_task_model(prepared.teacher_dir, prepared.family).eval()
    terms = distiller(batch, teacher_forward(teacher, batch, hidden=True), pairs, dec_pairs)
    assert torch.isfinite(terms["hidden"]) and terms["hidden"] > 0
    if family == "seq2seq":
        assert terms["hidden_encoder"] > 0 and terms["hidden_decoder"] > 0
    terms["loss"].backward()
    for stack in stacks:
        module = "bridge." if stack == "encoder" else "decoder_bridge."
        trained = [p for n, p in distiller.named_parameters() if n.startswith(module) and p.requires_grad]
        assert all(p.grad is not None for p in trained)
    card = strategy_settings(cfg)
    for section in {m.section for m in map(BRIDGES.get, BRIDGES) if m.section}:
        assert any(k.startswith(f"{section}.") for k in card) == (section == method.section)


@pytest.mark.parametrize("name", ["ted", "units"])
def test_each_stacks_bridge_reads_its_own_stacks_artifacts(name: str) -> None:
    # an encoder-decoder's preparation saves each stack's artifacts under its own name (decoder_<name>)
    encoder = inputs(name, 32, **{"units.ratio": 0.25})
    decoder = inputs(name, 32, **{"units.ratio": 0.25})
    artifacts = {**encoder.artifacts, **{f"decoder_{k}": v for k, v in decoder.artifacts.items()}}
    views = {}
    for stack in ("encoder", "decoder"):
        given = BridgeInputs(pairs=PAIRS, d_student=32, d_teacher=64, settings=encoder.settings, artifacts=artifacts,
                             stack=stack)  # type: ignore[arg-type]
        views[stack] = BRIDGES.get(name).build(given).teacher_view(2, torch.arange(64.0).expand(1, 1, 64))
    assert not torch.equal(views["encoder"], views["decoder"])
    for stack, given in (("encoder", encoder), ("decoder", decoder)):
        alone = BRIDGES.get(name).build(dataclasses.replace(given, stack="encoder"))  # the same tensors, unnamed
        torch.testing.assert_close(views[stack], alone.teacher_view(2, torch.arange(64.0).expand(1, 1, 64)))


def test_a_bridge_method_refuses_what_it_cannot_run_in_one_line() -> None:
    from kdsearch.core.errors import ConfigError

    cases = {"identity": (["distill.bridge=identity"], 32, 64, "needs equal widths"),
             "ted": (["distill.bridge=ted", "ted.student_filters=teacher"], 32, 64, "copies teacher filters"),
             "units": (["distill.bridge=units", "units.ratio=1.0"], 32, 64, "keeps 64 teacher units")}
    for name, (overrides, d_s, d_t, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            BRIDGES.get(name).check(load_config(overrides), d_s, d_t)
    any_width = set(BRIDGES.names()) - set(cases)  # a method that refuses some widths brings its case above
    assert {"projector", "orthogonal", "mlp_projector"} <= any_width
    for name in any_width:
        BRIDGES.get(name).check(load_config([f"distill.bridge={name}"]), 32, 64)


def test_the_orthogonal_bridge_stays_an_isometry_while_it_trains() -> None:
    bridge = BRIDGES.get("orthogonal").build(BridgeInputs(pairs=[(1, 2)], d_student=16, d_teacher=48))
    opt = torch.optim.AdamW(bridge.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 5, 48, generator=g) * 3  # a scale no isometry reaches: the map must not stretch
    for _ in range(20):
        hidden = torch.randn(4, 5, 16, generator=g)
        loss = (bridge.student_view(1, hidden) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight = bridge.proj["1"].weight  # (48, 16)
    torch.testing.assert_close(weight.T @ weight, torch.eye(16), atol=1e-5, rtol=0)
    hidden = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(bridge.student_view(1, hidden).norm(dim=-1), hidden.norm(dim=-1))
    plain = BRIDGES.get("projector").build(BridgeInputs(pairs=[(1, 2)], d_student=16, d_teacher=48))
    assert not torch.allclose(plain.proj["1"].weight.T @ plain.proj["1"].weight, torch.eye(16), atol=1e-2)


@pytest.mark.parametrize("name", BRIDGES.names())
def test_every_bridge_builds_for_a_run_with_no_pairs_and_nothing_prepared(name: str) -> None:
    # layer_map=none or w_hidden=0: preparation is skipped, so the build gets no artifacts
    method = BRIDGES.get(name)
    bridge = method.build(BridgeInputs(pairs=[], d_student=32, d_teacher=64, settings=method.settings(load_config([]))))
    assert not any(p.requires_grad for p in bridge.parameters())
