"""The shared distillation step: one batch + teacher outputs in, named loss terms out.

Every strategy of the three papers is this step with different layer pairs, a different bridge and different
weights: loss = w_task * task + w_logit * D(teacher, student) + w_hidden * reduce_k distance(bridge(h_s[k]),
bridge(h_t[m(k)])) + w_relation * sum of attention relation losses (the MiniLM baselines). An encoder-decoder
matches its encoder's and its decoder's states, each stack with its own pairs and bridge, in one hidden term, and
its relation term sums its encoder's, decoder's and cross-attention's relations (relation.stack).
`Distiller` holds everything trainable (student + bridges) so that DDP wraps one module.
Plain PyTorch: no Ray, Optuna or MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.methods.inputs import model_inputs, output_logits
from kdsearch.methods.losses import DISTANCES, LOGIT_LOSSES, combine, span_kd, task_loss
from kdsearch.methods.relations import Projections, RelationSpec, Tap, capture_all, relation_term

if TYPE_CHECKING:
    from kdsearch.core.kinds import TaskKind
    from kdsearch.methods.bridges import Bridge

Pairs = list[tuple[int, int]]


@dataclass(frozen=True)
class TeacherOutputs:
    """What the step needs from the teacher: run live (`teacher_forward`) or read back (`teacher_cache`)."""

    logits: torch.Tensor  # (B, C) or (B, T, V)
    hidden: tuple[torch.Tensor, ...] | None  # hidden_states (an encoder-decoder's encoder's), each (B, T, d_t)
    projections: Projections | None = None  # stack -> (layer, "query"/"key"/"value") -> (B, T, d): the relation term's
    decoder_hidden: tuple[torch.Tensor, ...] | None = None  # an encoder-decoder's decoder states, (B, T_dec, d_t)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: dict[str, torch.Tensor], *, hidden: bool,
                    taps: Sequence[Tap] = ()) -> TeacherOutputs:
    """The frozen teacher's outputs, with the projections `taps` name (the relation term's); an encoder-decoder's
    decoder is teacher-forced on the gold target (decoder_input_ids) and reads the teacher's own encoder output."""
    with capture_all(teacher, taps) as tapped:
        out = teacher(**model_inputs(batch), output_hidden_states=hidden)
    projections = {stack: dict(got) for stack, got in tapped.items()} if taps else None
    if "decoder_input_ids" in batch:
        return TeacherOutputs(out.logits, out.encoder_hidden_states if hidden else None, projections,
                              decoder_hidden=out.decoder_hidden_states if hidden else None)
    return TeacherOutputs(output_logits(out), out.hidden_states if hidden else None, projections)


@dataclass(frozen=True)
class StepLosses:
    """How the step weighs and measures its terms, as plain values (the distill.* keys; `step_losses` in the loop
    turns a config into them)."""

    weights: dict[str, float]
    """task, logit, hidden and relation: each term's weight in the loss (0 = the term is not computed)."""
    distance: str
    """The hidden term's distance (DISTANCES)."""
    logit_loss: str
    """The logit term (LOGIT_LOSSES)."""
    temperature: float
    hidden_reduce: Literal["sum", "mean"]
    """How the per-pair distances combine."""
    mask_padding: bool
    """Whether padded positions are left out of the hidden distances (and of extractive QA's span KD)."""


def leaves_parameters_unused(weights: dict[str, float]) -> bool:
    """Whether a step can leave trainable parameters without a gradient.

    Only when neither the task loss nor logit KD reads the student's output: the hidden pairs alone then train
    it, and its task head (and any layer above the deepest paired one) stays idle. DDP needs to know, since
    looking for unused parameters costs a traversal of the autograd graph every step.
    """
    return weights["task"] == 0 and weights["logit"] == 0


class Distiller(nn.Module):
    """Student + bridge; forward returns the named loss terms (detached copies are for logging only)."""

    def __init__(self, student: nn.Module, bridge: Bridge, *, kind: TaskKind, losses: StepLosses,
                 relations: Sequence[RelationSpec] = (), decoder_bridge: Bridge | None = None) -> None:
        super().__init__()
        self.student = student
        self.bridge = bridge
        self.decoder_bridge = decoder_bridge
        """An encoder-decoder's bridge for its decoder pairs (`bridge` serves the encoder's)."""
        self.kind = kind
        self.losses = losses
        self.weights = losses.weights
        self.distance = DISTANCES.get(losses.distance)
        self.logit_loss = LOGIT_LOSSES.get(losses.logit_loss)
        if self.weights["relation"] > 0 and not relations:
            raise ValueError("distill.w_relation > 0 needs its layers and heads: pass "
                             "relations=resolve_relations(...)")
        self.relations = tuple(relations) if self.weights["relation"] > 0 else ()
        """The relation term's layers and heads per attention; the loop taps the teacher at `teacher_taps`."""

    @property
    def teacher_taps(self) -> tuple[Tap, ...]:
        """The teacher projections the relation term reads (none without it)."""
        return tuple(spec.teacher for spec in self.relations)

    def forward(self, batch: dict[str, torch.Tensor], teacher: TeacherOutputs,
                pairs: Pairs, decoder_pairs: Pairs | None = None) -> dict[str, torch.Tensor]:
        """`pairs`: the (encoder's) hidden pairs; `decoder_pairs`: an encoder-decoder's decoder pairs."""
        decoder_pairs = decoder_pairs or []
        use_hidden = self.weights["hidden"] > 0 and bool(pairs or decoder_pairs)
        with capture_all(self.student, [spec.student for spec in self.relations]) as projections:
            out = self.student(**model_inputs(batch), output_hidden_states=use_hidden)
        logits = output_logits(out)
        terms: dict[str, torch.Tensor] = {}
        shares: dict[str, torch.Tensor] = {}
        if self.weights["task"] > 0:
            terms["task"] = task_loss(logits, batch["labels"], kind=self.kind)
        if self.weights["logit"] > 0:
            terms["logit"] = self._logit_term(logits, teacher.logits, batch)
        if use_hidden and self.kind == "seq2seq":
            assert teacher.hidden is not None and teacher.decoder_hidden is not None
            assert self.decoder_bridge is not None, "an encoder-decoder's Distiller needs decoder_bridge="
            masks = ((batch["attention_mask"], batch["decoder_attention_mask"]) if self.losses.mask_padding
                     else (None, None))
            encoder = self._per_pair(out.encoder_hidden_states, teacher.hidden, masks[0], pairs, self.bridge)
            decoder = self._per_pair(out.decoder_hidden_states, teacher.decoder_hidden, masks[1], decoder_pairs,
                                     self.decoder_bridge)
            terms["hidden"] = self._reduce(encoder + decoder)
            # each stack's own share, logged only (train_hidden_encoder, train_hidden_decoder): added after combine,
            # which weighs the terms loss_weights names
            shares = {stack: self._reduce(per_pair).detach() for stack, per_pair in
                      (("hidden_encoder", encoder), ("hidden_decoder", decoder)) if per_pair}
        elif use_hidden:
            assert teacher.hidden is not None
            mask = batch["attention_mask"] if self.losses.mask_padding else None
            terms["hidden"] = self._hidden_term(out.hidden_states, teacher.hidden, mask, pairs)
        if self.relations:
            per_stack = self._relation_terms(batch, projections, teacher.projections)
            terms["relation"] = torch.stack(list(per_stack.values())).sum()
            if self.kind == "seq2seq":  # each attention's share, logged only (train_relation_cross, ...)
                shares |= {f"relation_{stack}": value.detach() for stack, value in per_stack.items()}
        terms["loss"] = combine(terms, self.weights if use_hidden else {**self.weights, "hidden": 0.0})
        terms |= shares
        terms["logits"] = logits.detach()
        return terms

    def _relation_terms(self, batch: dict[str, torch.Tensor], student: Projections,
                        teacher: Projections | None) -> dict[str, torch.Tensor]:
        """Each tapped attention's relation term: stack -> scalar."""
        if teacher is None:
            raise ValueError("distill.w_relation > 0 needs the teacher's projections: teacher_forward(taps=...)")
        return {spec.stack: relation_term(spec, student[spec.stack], teacher[spec.stack], batch["attention_mask"],
                                          causal=self.kind == "causal_lm",
                                          target_mask=batch.get("decoder_attention_mask"))
                for spec in self.relations}

    def _logit_term(self, student: torch.Tensor, teacher: torch.Tensor,
                    batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.kind == "extractive_qa":  # the start and the end distributions over each window's positions
            mask = batch["attention_mask"] if self.losses.mask_padding else None  # TED's QA code: every position
            return span_kd(student, teacher, temperature=self.losses.temperature, mask=mask,
                           logit_loss=self.logit_loss)
        if self.kind == "regression":  # one output: KL is undefined, match the scores instead
            return F.mse_loss(student.float(), teacher.float())
        if self.kind == "causal_lm":  # position t predicts token t+1; only response tokens count
            mask = labels[:, 1:] != IGNORE_INDEX
            return self.logit_loss(student[:, :-1], teacher[:, :-1], temperature=self.losses.temperature, mask=mask)
        if self.kind == "seq2seq":  # decoder position t predicts label t; only target tokens count
            return self.logit_loss(student, teacher, temperature=self.losses.temperature, mask=labels != IGNORE_INDEX)
        return self.logit_loss(student, teacher, temperature=self.losses.temperature)

    def _hidden_term(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     mask: torch.Tensor | None, pairs: Pairs) -> torch.Tensor:
        return self._reduce(self._per_pair(student, teacher, mask, pairs, self.bridge))

    def _per_pair(self, student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                  mask: torch.Tensor | None, pairs: Pairs, bridge: Bridge) -> list[torch.Tensor]:
        per_pair = []
        for s, t in pairs:
            with torch.no_grad():
                target = bridge.teacher_view(t, teacher[t])
            per_pair.append(self.distance(bridge.student_view(s, student[s], paired_with=t), target, mask=mask))
        return per_pair

    def _reduce(self, per_pair: list[torch.Tensor]) -> torch.Tensor:
        """distill.hidden_reduce over every pair (an encoder-decoder's: both stacks' pairs together, so that sum
        is the layer-selection code's hid_loss_enc + hid_loss_dec)."""
        stacked = torch.stack(per_pair)
        return stacked.sum() if self.losses.hidden_reduce == "sum" else stacked.mean()
