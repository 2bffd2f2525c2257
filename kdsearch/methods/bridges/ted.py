"""TED, task-aware layer-wise distillation (Liang et al., ICML 2023; papers.md section 1), as one bridge.

Stage 1 trains one filter + pooler + task head per matched layer on a frozen model with the task loss (mean
over filters), so each filter keeps what the task needs. It runs on the fine-tuned teacher (its filters are
frozen in stage 2) and on the student distillation starts from, fine-tuned first or not (to initialise the
student filters). Stage 2 (the bridge) trains the student filters g_s^k to match the frozen teacher filters
g_t^m(k). An encoder-decoder gets filters on both stacks, each stack's own stage 1 and bridge: decoder filters
with per-token LM heads on the teacher-forced decoder states, encoder filters with a mean-pooled head on the
target's tokens (`bag_of_targets_loss`). This module holds the whole method: filter architectures, stage 1, its
cached preparation, the checks and the build. Plain PyTorch only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from kdsearch.core.cache import content_key
from kdsearch.core.errors import ConfigError
from kdsearch.core.kinds import IGNORE_INDEX, TaskKind
from kdsearch.core.registry import Registry
from kdsearch.methods.bridges.base import (
    BRIDGES,
    Bridge,
    BridgeInputs,
    BridgeMethod,
    PrepareContext,
    Stack,
    stack_artifact,
    stacks,
)
from kdsearch.methods.inputs import model_inputs, stack_mask, stack_states
from kdsearch.methods.layer_maps import LAYER_MAPS
from kdsearch.methods.losses import task_loss

if TYPE_CHECKING:
    from kdsearch.config.schema import Config, TedConfig

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry("activation")
ACTIVATIONS.register("gelu")(nn.GELU)
ACTIVATIONS.register("relu")(nn.ReLU)
ACTIVATIONS.register("tanh")(nn.Tanh)

@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """A TED filter's architecture as plain values, what the builders take (`filter_spec` reads ted.*)."""

    name: str
    """The FILTERS entry: linear or mlp."""
    depth: int
    """An mlp's Linear layers."""
    hidden: int | None
    """An mlp's inner width; None = its input width."""
    activation: str
    """The ACTIVATIONS entry between an mlp's layers."""


def filter_spec(ted: TedConfig) -> FilterSpec:
    return FilterSpec(name=ted.filter, depth=ted.depth, hidden=ted.mlp_hidden, activation=ted.activation)


FilterBuilder = Callable[[int, int, FilterSpec], nn.Module]
FILTERS: Registry[FilterBuilder] = Registry("filter")


@FILTERS.register("linear")
def linear_filter(d_in: int, d_out: int, spec: FilterSpec) -> nn.Module:
    """TED's default filter: Linear(d, d_f)."""
    return nn.Linear(d_in, d_out)


@FILTERS.register("mlp")
def mlp_filter(d_in: int, d_out: int, spec: FilterSpec) -> nn.Module:
    """TED's non-linear option generalised: `depth` Linear layers, width `hidden`, activation between."""
    hidden = spec.hidden or d_in
    dims = [d_in] + [hidden] * (spec.depth - 1) + [d_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i:
            layers.append(ACTIVATIONS.get(spec.activation)())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def filter_width(d_teacher: int, *, width: int | None, ratio: float | None) -> int:
    """d_f: `ted.width`, or `ted.width_ratio` x the teacher's width, or the teacher's width (TED's code)."""
    if width:
        return width
    return max(1, round(ratio * d_teacher)) if ratio else d_teacher


def build_filters(indices: Iterable[int], d_in: int, d_out: int, spec: FilterSpec) -> nn.ModuleDict:
    """One filter per hidden-state index, keyed by str(index)."""
    return nn.ModuleDict({str(i): FILTERS.get(spec.name)(d_in, d_out, spec) for i in indices})


HEAD_DROPOUT = 0.1
"""Dropout before each stage-1 task head: TED's `filter_dropout` (StableDropout(cls_dropout), default 0.1)."""


HeadReading = Literal["first", "tokens", "mean"]
"""What a stage-1 head reads of its filtered state: the first token (pooled), every token, or the mean over the
real tokens (pooled)."""


def head_reading(kind: TaskKind, stack: Stack = "encoder") -> HeadReading:
    """The stage-1 head a filter of `stack` gets for a task of `kind` (see FilterHead)."""
    if kind == "seq2seq":
        return "mean" if stack == "encoder" else "tokens"
    return "tokens" if kind in ("causal_lm", "extractive_qa") else "first"


class FilterHead(nn.Module):
    """Stage-1 head on a filtered state, as TED's code builds it per filter: a pooler (dense d_f -> d_f + GELU on
    the first token: DeBERTa's ContextPooler with its pooler_hidden_act), dropout, a linear task head.

    `reads="tokens"`: a per-token head instead, with no pooler: an LM head for causal LMs (the continual
    pre-training scenario) and for an encoder-decoder's decoder filters (teacher-forced position t predicts target
    token t), a span head for extractive QA (n_out = 2: start and end logits, as TED's SQuAD filters feed a
    qa_outputs layer). `reads="mean"`: the pooler on the mean over real tokens, for an encoder-decoder's encoder
    filters (see `bag_of_targets_loss`).
    """

    def __init__(self, d_f: int, n_out: int, *, reads: HeadReading) -> None:
        super().__init__()
        self.reads = reads
        self.pooler = None if reads == "tokens" else nn.Sequential(nn.Linear(d_f, d_f), nn.GELU())
        self.dropout = nn.Dropout(HEAD_DROPOUT)
        self.head = nn.Linear(d_f, n_out)

    def forward(self, filtered: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, d_f)
        if self.reads == "tokens":
            return self.head(filtered)  # (B, T, n_out)
        assert self.pooler is not None
        if self.reads == "first":
            pooled = filtered[:, 0]
        else:
            assert mask is not None, "a mean-pooled head needs the attention mask"
            weights = mask.unsqueeze(-1).to(filtered.dtype)  # (B, T, 1)
            pooled = (filtered * weights).sum(1) / weights.sum(1).clamp_min(1)  # (B, d_f)
        return self.head(self.dropout(self.pooler(pooled)))  # (B, n_out)


def bag_of_targets_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The stage-1 loss of an encoder-decoder's encoder filter: the mean over the real target tokens of the
    cross-entropy of one distribution over the vocabulary, pooled from the source, against each token.

    logits (B, V): one per row; labels (B, T): the target, IGNORE_INDEX on padding. It is minimised by the
    target's token frequencies: the filter must keep what the target says, though not its order (which only the
    decoder can produce). TED trains a filter with the task's own head; an encoder state has no target position of
    its own to predict (source and target are not aligned), so this is the pooled task head TED's classification
    filters use, with the target's tokens as the labels. Not chosen: feeding the filtered states through the frozen
    model's own decoder, which would fix d_f to the teacher's width (ted.width, a narrower student's filters),
    backpropagate through the whole decoder for every filter, and credit the filter with what that decoder could
    rebuild on its own. Softmax in fp32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    keep = labels != IGNORE_INDEX  # (B, T)
    per_token = -logp.gather(1, labels.clamp_min(0))  # (B, T)
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


def stage1_loss(logits: torch.Tensor, labels: torch.Tensor, kind: TaskKind, reads: HeadReading) -> torch.Tensor:
    """The task loss of a stage-1 head; an encoder-decoder's encoder heads (mean-pooled) `bag_of_targets_loss`."""
    if kind == "seq2seq" and reads == "mean":
        return bag_of_targets_loss(logits, labels)
    return task_loss(logits, labels, kind=kind)


def stage1_accuracy(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[float, int]:
    """(correct, count) of a stage-1 head; regression heads count within 0.5. An encoder-decoder's decoder heads
    (B, T, V) count target tokens predicted, its encoder heads (B, V) the rows whose top token is in the target (a
    coarse check: a task whose targets share a frequent token scores well on that token alone)."""
    if kind == "causal_lm":
        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        keep = gold != IGNORE_INDEX
        return float((pred[keep] == gold[keep]).sum()), int(keep.sum())
    if kind == "seq2seq" and logits.dim() == 3:
        keep = labels != IGNORE_INDEX
        return float((logits.argmax(-1)[keep] == labels[keep]).sum()), int(keep.sum())
    if kind == "seq2seq":
        return float((labels == logits.argmax(-1, keepdim=True)).any(-1).sum()), len(labels)
    if kind == "regression":
        return float(((logits.squeeze(-1) - labels).abs() < 0.5).sum()), len(labels)
    if kind == "extractive_qa":  # (B, T, 2): a window counts when both its start and its end are right
        return float((logits.argmax(1) == labels).all(-1).sum()), len(labels)
    return float((logits.argmax(-1) == labels).sum()), len(labels)


def stage1_optimiser(params: list[nn.Parameter], *, lr: float,
                     total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """TED's learn_filters optimiser: AdamW at `lr` with no weight decay (its --weight_decay default 0), the
    linear schedule with no warmup (its --lr_scheduler_type and --num_warmup_steps defaults): lr * (1 - s / S)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = max(1, total_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, (total - step) / total))


def train_stage1(model: nn.Module, filters: nn.ModuleDict, *, d_f: int, loader: Iterable[dict], kind: TaskKind,
                 n_out: int, epochs: int, lr: float, device: torch.device,
                 stack: Stack = "encoder") -> dict[str, float]:
    """Train `filters` (+ fresh heads) on the frozen `model`'s `stack` of hidden states; loss = mean over filters of
    the task loss.

    As TED's learn_filters script: AdamW at `lr` without weight decay, decaying linearly to 0 with no warmup;
    the frozen model runs in training mode (its dropout on), as there. Returns the final-epoch training accuracy
    of each filter's head (a check that filters learned the task).
    """
    reads = head_reading(kind, stack)
    heads = nn.ModuleDict({k: FilterHead(d_f, n_out, reads=reads) for k in filters})
    filters.to(device).train()
    heads.to(device).train()
    was_training = model.training
    model.train()
    opt, sched = stage1_optimiser([*filters.parameters(), *heads.parameters()], lr=lr,
                                  total_steps=epochs * len(loader))  # type: ignore[arg-type]
    for _ in range(epochs):
        correct = {k: 0.0 for k in filters}
        seen = {k: 0 for k in filters}
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                hidden = stack_states(model(**model_inputs(batch), output_hidden_states=True), stack)
            mask = stack_mask(batch, stack) if reads == "mean" else None
            losses = []
            for key, filt in filters.items():
                logits = heads[key](filt(hidden[int(key)]), mask)
                losses.append(stage1_loss(logits, batch["labels"], kind, reads))
                c, n = stage1_accuracy(logits.detach(), batch["labels"], kind)
                correct[key] += c
                seen[key] += n
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).mean().backward()
            opt.step()
            sched.step()
    model.train(was_training)
    return {k: correct[k] / max(seen[k], 1) for k in filters}



STAGE1_VERSION = 2
"""Bump when stage 1's training changes, so that filters cached by an earlier rule are not reused (2: TED's
pooler activation, head dropout, schedule and weight decay)."""


def _stage1_filters(ctx: PrepareContext, model: nn.Module, indices: list[int], d_in: int, *, label: str,
                    kind: str, key: str, stack: Stack) -> str:
    """Stage 1 on the frozen `model` at hidden states `indices` of `stack`, cached as `kind`/`key`: the filters'
    file."""
    cfg, ted = ctx.cfg, ctx.cfg.ted
    d_f = filter_width(ctx.d_teacher, width=ted.width, ratio=ted.width_ratio)
    # Stage-1 heads predict the task: classes, a score, or (causal LMs, encoder-decoders) tokens of the vocabulary.
    vocab = ctx.kind in ("causal_lm", "seq2seq")
    n_out = ctx.teacher().config.vocab_size if vocab else max(ctx.num_labels, 1)

    def build(out: Path) -> None:
        torch.manual_seed(cfg.train.seed)
        filters = build_filters(indices, d_in, d_f, filter_spec(ted))
        acc = train_stage1(model, filters, d_f=d_f, loader=ctx.batches(), kind=ctx.kind, n_out=n_out,
                           epochs=ted.stage1_epochs, lr=_stage1_lr(cfg), device=ctx.device, stack=stack)
        per_layer = ", ".join(f"h[{k}] {a:.3f}" for k, a in acc.items())
        ctx.log(f"TED stage 1 ({label}): head accuracy per filtered layer: {per_layer}")
        save_file({k: v.contiguous() for k, v in filters.cpu().state_dict().items()}, out / "filters.safetensors")
        (out / "head_accuracy.json").write_text(json.dumps(acc))

    return str(ctx.cached(kind, key, build) / "filters.safetensors")


def _stage1_lr(cfg: Config) -> float:
    lr = cfg.ted.stage1_lr or cfg.finetune.lr  # TED's scripts reuse each model's fine-tuning rate
    assert lr is not None  # Config resolves finetune.lr for its teacher
    return lr


def prepare_ted(ctx: PrepareContext) -> dict[str, str]:
    """Stage 1 on the frozen teacher (teacher filters) and, with ted.student_filters=stage1, on the student
    distillation starts from (student filters); an encoder-decoder's encoder and decoder filters each by a stage
    1 of their own, cached apart (their keys name the stack)."""
    cfg = ctx.cfg
    # What stage 1 reads: the filter settings (not how stage 2 initialises its student filters), the batches.
    architecture = {k: v for k, v in dataclasses.asdict(cfg.ted).items() if k != "student_filters"}
    d_f = filter_width(ctx.d_teacher, width=cfg.ted.width, ratio=cfg.ted.width_ratio)
    common = dict(filter=architecture, d_f=d_f, teacher=ctx.teacher_dir,
                  seed=cfg.train.seed, batch_size=cfg.train.batch_size, lr=_stage1_lr(cfg), version=STAGE1_VERSION)
    out = {}
    for stack, pairs in stacks(ctx):
        # a single-stack model's keys name no stack, as before encoder-decoders: its cached filters stay valid
        at = {"stack": stack} if ctx.kind == "seq2seq" else {}
        where = f" {stack}" if at else ""
        t_idx = sorted({t for _, t in pairs})
        out[stack_artifact("teacher_filters", stack)] = _stage1_filters(
            ctx, ctx.teacher(), t_idx, ctx.d_teacher, label=f"teacher{where}", kind="ted_teacher",
            key=content_key(indices=t_idx, **at, **common), stack=stack)
        if cfg.ted.student_filters == "stage1":
            s_idx = sorted({s for s, _ in pairs})
            key = content_key(indices=s_idx, student=dataclasses.asdict(cfg.student), start=ctx.student_dir, **at,
                              **common)
            out[stack_artifact("student_filters", stack)] = _stage1_filters(
                ctx, ctx.student(), s_idx, ctx.d_student, label=f"student{where}", kind="ted_student", key=key,
                stack=stack)
    return out


def check_ted_names(cfg: Config) -> None:
    FILTERS.check(cfg.ted.filter, key="ted.filter")
    ACTIVATIONS.check(cfg.ted.activation, key="ted.activation")


def check_ted(cfg: Config, d_student: int, d_teacher: int) -> None:
    if LAYER_MAPS.get(cfg.distill.layer_map).redrawn:
        raise ConfigError("distill.bridge=ted needs a fixed layer map (its filters are trained per teacher "
                          f"layer in stage 1); distill.layer_map={cfg.distill.layer_map} re-draws layers every epoch")
    if cfg.ted.student_filters == "teacher" and d_student != d_teacher:
        raise ConfigError(f"ted.student_filters=teacher copies teacher filters, which needs equal widths "
                          f"(student {d_student}, teacher {d_teacher}); use stage1 or random")


class FilterBridge(Bridge):
    def __init__(self, student: nn.ModuleDict, teacher: nn.ModuleDict) -> None:
        super().__init__()
        self.student_filters = student
        self.teacher_filters = teacher.requires_grad_(False)

    def student_view(self, index: int, hidden: torch.Tensor, *, paired_with: int | None = None) -> torch.Tensor:
        return self.student_filters[str(index)](hidden)

    def teacher_view(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.teacher_filters[str(index)](hidden)


def ted_bridge(inputs: BridgeInputs) -> Bridge:
    """TED stage 2: student filters g_s^k trained to match frozen stage-1 teacher filters g_t^m(k)."""
    if not inputs.pairs:  # nothing to compare, and no stage 1 ran
        return Bridge()
    ted: TedConfig = inputs.settings
    d_f, spec = filter_width(inputs.d_teacher, width=ted.width, ratio=ted.width_ratio), filter_spec(ted)
    teacher = build_filters(sorted({t for _, t in inputs.pairs}), inputs.d_teacher, d_f, spec)
    teacher.load_state_dict(inputs.artifact("teacher_filters"))
    student = build_filters(sorted({s for s, _ in inputs.pairs}), inputs.d_student, d_f, spec)
    if ted.student_filters == "stage1":
        student.load_state_dict(inputs.artifact("student_filters"))
    elif ted.student_filters == "teacher":  # same widths (checked): copy the matched teacher filter
        for s, t in inputs.pairs:
            student[str(s)].load_state_dict(teacher[str(t)].state_dict())
    return FilterBridge(student, teacher)


BRIDGES.register("ted")(BridgeMethod(build=ted_bridge, section="ted", check_names=check_ted_names,
                                     check=check_ted, prepare=prepare_ted, embedding_pair=False))
