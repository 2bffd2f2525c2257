"""The per-worker distillation loop: epochs of the shared step, evaluation, checkpoints, resume.

Framework-free: a `WorkerContext` supplies rank, device, DDP wrapping, data sharding, metric gathering and
`report`. Ray Train fills it in `kdsearch.train`, a Tune trial in `kdsearch.tune`, tests with plain callables.
No Ray, Optuna or MLflow import here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DistributedSampler

from kdsearch.config.schema import Config, DistillConfig, Precision
from kdsearch.core.safe_io import load_tensors
from kdsearch.data.metrics import generation_metric_names, metric_names
from kdsearch.data.tasks import TaskSpec
from kdsearch.methods.bridges import BridgeInputs, Stack, bridge_method
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.methods.losses import describe
from kdsearch.methods.relations import Tap, resolve_relations
from kdsearch.run import models
from kdsearch.run.evaluation import EVAL_BATCH_SIZE, evaluate, evaluate_generation, forward_latency_ms, make_loader
from kdsearch.run.optimiser import Optimiser, make_optimiser
from kdsearch.run.precision import autocast
from kdsearch.run.prepare import Prepared, decoder_pairs, load_teacher, make_student
from kdsearch.run.step import Distiller, StepLosses, teacher_forward
from kdsearch.run.teacher_cache import TeacherCache, with_rows


def _identity(x: Any) -> Any:
    return x


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], Path | None], None] = lambda metrics, checkpoint: None
    wrap_model: Callable[[nn.Module], nn.Module] = _identity
    wrap_loader: Callable[[Any], Any] = _identity
    gather: Callable[[Any], list[Any]] = lambda x: [x]
    checkpoint: Path | None = None  # latest checkpoint to resume from
    log: Callable[[str], None] = print




def reported_metrics(spec: TaskSpec) -> tuple[str, ...]:
    """The metrics every epoch's report carries, whatever the strategy: what a search may rank and stop on.

    (`train_<term>` exist only for the loss terms with a weight > 0, so they vary between trials.)
    """
    return ("epoch", "train_loss", "epoch_time_s", *(f"eval_{name}" for name in metric_names(spec)), "eval_loss",
            *(f"eval_{name}" for name in generation_metric_names(spec)), "student_params", "student_latency_ms",
            "teacher_score")


def step_losses(cfg: DistillConfig) -> StepLosses:
    """The distill.* keys the step reads, as the step's plain values."""
    return StepLosses(weights={"task": cfg.w_task, "logit": cfg.w_logit, "hidden": cfg.w_hidden,
                               "relation": cfg.w_relation},
                      distance=cfg.distance, logit_loss=cfg.logit_loss, temperature=cfg.temperature,
                      hidden_reduce=cfg.hidden_reduce, mask_padding=cfg.mask_padding)


def build_distiller(cfg: Config, prepared: Prepared, device: torch.device) -> tuple[nn.Module, Distiller]:
    """The frozen teacher and the trainable Distiller (student + bridge), identically on every worker."""
    teacher = load_teacher(prepared, device)
    student = make_student(cfg, teacher, prepared.student_dir)
    d_s = models.student_width(teacher.config, cfg.student)
    method = bridge_method(cfg, d_s, prepared.d_teacher)

    artifacts = prepared.load_artifacts()

    def build(pairs: list[tuple[int, int]], stack: Stack) -> Any:
        return method.build(BridgeInputs(pairs=pairs, d_student=d_s, d_teacher=prepared.d_teacher,
                                         settings=method.settings(cfg), artifacts=artifacts, stack=stack))

    decoder = build(decoder_pairs(cfg, prepared, epoch=0), "decoder") if prepared.family == "seq2seq" else None
    distiller = Distiller(student, build(layer_pairs(cfg, prepared, epoch=0), "encoder"), kind=prepared.spec.kind,
                          losses=step_losses(cfg.distill), relations=resolve_relations(cfg, teacher.config),
                          decoder_bridge=decoder)
    return teacher, distiller.to(device)


def layer_pairs(cfg: Config, prepared: Prepared, *, epoch: int) -> list[tuple[int, int]]:
    return run_pairs(cfg, prepared.n_teacher, epoch=epoch)


def _save_checkpoint(distiller: Distiller, optimiser: Optimiser, epoch: int, out: Path) -> None:
    save_model(distiller, str(out / "distiller.safetensors"))
    torch.save(optimiser.state_dict(), out / "optim.pt")
    (out / "state.json").write_text(json.dumps({"epoch": epoch}))


def _resume(distiller: Distiller, optimiser: Optimiser, checkpoint: Path | None) -> int:
    """Load the latest checkpoint; returns the number of finished epochs."""
    if checkpoint is None:
        return 0
    load_model(distiller, str(checkpoint / "distiller.safetensors"))
    optimiser.load_state_dict(load_tensors(checkpoint / "optim.pt"))
    return int(json.loads((checkpoint / "state.json").read_text())["epoch"])


def run_distillation(cfg: Config, prepared: Prepared, ctx: WorkerContext) -> dict[str, Any]:
    """Train the student for cfg.train.epochs; report metrics (and a checkpoint on rank 0) every epoch."""
    torch.manual_seed(cfg.train.seed)
    live, distiller = build_distiller(cfg, prepared, ctx.device)
    teacher: nn.Module | TeacherCache = live
    train = prepared.data["train"]
    if prepared.teacher_outputs is not None:  # the cached outputs stand in for the live teacher
        teacher = TeacherCache.open(prepared.teacher_outputs, prepared.teacher_projections)
        train = with_rows(train)
    del live
    model = ctx.wrap_model(distiller)
    accum = cfg.train.grad_accum
    # train.batch_size is the global batch: world_size workers x grad_accum micro-batches per optimiser step
    micro = max(1, cfg.train.batch_size // (ctx.world_size * accum))
    loader = ctx.wrap_loader(make_loader(train, batch_size=micro, shuffle=True,
                                         seed=cfg.train.seed, pad_id=prepared.pad_id))
    steps = -(-len(loader) // accum)  # optimiser steps per epoch; a last, shorter group still steps
    steps = min(steps, cfg.train.max_steps_per_epoch or steps)
    optimiser = make_optimiser(cfg, distiller, total_steps=steps * cfg.train.epochs, device=ctx.device)
    start = _resume(distiller, optimiser, ctx.checkpoint)
    precision = cfg.train.precision
    if ctx.rank == 0:
        resuming = f"; resuming after epoch {start}" if start else ""
        ctx.log(f"{describe(step_losses(cfg.distill).weights)}; student {models.count_parameters(distiller.student):,} "
                f"params{resuming}")
    # Measured once, before training: the architecture sets it, not the weights.
    with autocast(ctx.device, precision):
        latency = forward_latency_ms(distiller.student, prepared.data["validation"],
                                     pad_id=prepared.pad_id, device=ctx.device)
    taps = distiller.teacher_taps
    tokenizer = _generation_tokenizer(prepared)
    metrics: dict[str, Any] = {}
    for epoch in range(start, cfg.train.epochs):
        pairs = layer_pairs(cfg, prepared, epoch=epoch)
        _seed_epoch(loader, cfg.train.seed, epoch)
        began = time.perf_counter()
        terms = _train_epoch(model, teacher, loader, optimiser, pairs, steps=steps, ctx=ctx, epoch=epoch,
                             precision=precision, accum=accum, taps=taps,
                             decoder_pairs=decoder_pairs(cfg, prepared, epoch=epoch))
        train_terms = _mean_over_workers(ctx.gather(terms))
        epoch_time = time.perf_counter() - began
        with autocast(ctx.device, precision):
            scores = evaluate(distiller.student, prepared.data["validation"], spec=prepared.spec,
                              batch_size=max(cfg.train.batch_size, EVAL_BATCH_SIZE), pad_id=prepared.pad_id,
                              device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, gather=ctx.gather)
            if tokenizer is not None and generates(cfg, epoch):
                scores |= evaluate_generation(distiller.student, prepared.data["validation"], tokenizer,
                                              batch_size=max(cfg.train.batch_size, EVAL_BATCH_SIZE),
                                              pad_id=prepared.pad_id, device=ctx.device, rank=ctx.rank,
                                              world_size=ctx.world_size, gather=ctx.gather,
                                              num_beams=cfg.eval.num_beams, family=prepared.family)
        metrics = {"epoch": epoch + 1, **train_terms, "epoch_time_s": epoch_time, **scores,
                   "student_params": models.count_parameters(distiller.student), "student_latency_ms": latency,
                   "teacher_score": prepared.teacher_metrics.get("eval_score", float("nan"))}
        if ctx.rank == 0:
            ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(distiller, optimiser, epoch + 1, Path(tmp))
                ctx.report(metrics, Path(tmp))
        else:
            ctx.report(metrics, None)
    return metrics


def generates(cfg: Config, epoch: int) -> bool:
    """Whether 0-based `epoch` ends with generation metrics: every `eval.generate_every` epochs and the last.

    Every epoch by default, not only at the end: a search stops trials early (ASHA), and a metric only a finished
    run reported could not rank them."""
    every = cfg.eval.generate_every
    return epoch + 1 == cfg.train.epochs or (every > 0 and (epoch + 1) % every == 0)


def _generation_tokenizer(prepared: Prepared) -> Any:
    """The tokenizer that decodes generated outputs for the generation metrics: an encoder-decoder's, or a causal
    LM's on prompt -> response rows; None where nothing is generated."""
    if not generation_metric_names(prepared.spec):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared.teacher_dir)


def _mean_over_workers(shares: list[dict[str, float]]) -> dict[str, float]:
    """Each worker's mean loss terms (over equally many micro-batches: DistributedSampler pads the shards to
    one length) -> the mean over all of them, so a multi-worker run reports what a 1-worker run would."""
    return {name: sum(share[name] for share in shares) / len(shares) for name in shares[0]}


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, epoch), the pair hashed: `seed + epoch` would give seed s at epoch e + 1
    the batches and dropout masks of seed s + 1 at epoch e, so runs of neighbouring seeds would share them."""
    digest = hashlib.sha256(f"kdsearch-epoch:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Epoch e draws the same batches and dropout masks whether the run started fresh or resumed."""
    mixed = epoch_seed(seed, epoch)
    torch.manual_seed(mixed)
    sampler: Any = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):  # several workers: it shuffles with its seed + its epoch
        sampler.seed = mixed
        sampler.set_epoch(0)
    elif getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(mixed)


# Steps between finiteness checks of the loss: each check is a host sync, which on a GPU stops the CPU from
# queueing the next steps' kernels; a diverged run still fails within this many steps.
_CHECK_EVERY = 16


def _train_epoch(model: nn.Module, teacher: nn.Module | TeacherCache, loader: Any, optimiser: Optimiser,
                 pairs: list[tuple[int, int]], *, steps: int, ctx: WorkerContext, epoch: int,
                 precision: Precision = "fp32", accum: int = 1, taps: tuple[Tap, ...] = (),
                 decoder_pairs: list[tuple[int, int]] | None = None) -> dict[str, float]:
    """`steps` optimiser steps, each over `accum` micro-batches; the mean of each loss term over micro-batches.

    `taps`: the teacher layers whose attention projections the relation term reads; `decoder_pairs`: an
    encoder-decoder's decoder pairs.
    """
    hidden = bool(pairs or decoder_pairs)
    model.train()
    sums: dict[str, torch.Tensor] = {}  # detached running sums: one host sync per epoch, not per step
    finite = torch.ones((), dtype=torch.bool, device=ctx.device)
    checked = micro_batches = 0
    for index, batch in enumerate(loader):
        step, last = index // accum, (index + 1) % accum == 0 or index + 1 == len(loader)
        if step >= steps:
            break
        group = min(accum, len(loader) - step * accum)  # the epoch's last group may hold fewer micro-batches
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        # DDP all-reduces gradients in backward: only on the micro-batch that completes the step
        no_sync: Any = getattr(model, "no_sync", None)
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync:
            with autocast(ctx.device, precision):
                outputs = (teacher.outputs(batch, hidden=hidden, taps=taps) if isinstance(teacher, TeacherCache)
                           else teacher_forward(teacher, batch, hidden=hidden, taps=taps))
                terms = model(batch, outputs, pairs, decoder_pairs) if decoder_pairs else model(batch, outputs, pairs)
            optimiser.backward(terms["loss"] / group)
        finite &= torch.isfinite(terms["loss"].detach())
        micro_batches += 1
        for name, value in terms.items():
            if name != "logits":
                sums[name] = sums[name] + value.detach() if name in sums else value.detach()
        if not last:
            continue
        norm = optimiser.clip()
        if optimiser.scaler is None:  # with fp16 an overflowing gradient is the scaler's to skip
            finite &= torch.isfinite(norm)
        if (step + 1) % _CHECK_EVERY == 0 or step + 1 == steps:
            # every worker decides alike, at the same step (each sees its own shard's loss); every epoch ends on
            # a check, so no checkpoint holds weights a nan updated
            if not all(ctx.gather(bool(finite.item()))):
                raise FloatingPointError(f"the loss or its gradients became nan or inf at epoch {epoch + 1}, steps "
                                         f"{checked + 1}-{step + 1}: lower train.lr or the loss weights")
            checked = step + 1
        optimiser.step()
    return {f"train_{name}": value.item() / max(micro_batches, 1) for name, value in sums.items()}


def export_student(cfg: Config, prepared: Prepared, checkpoint: Path, out: Path) -> Path:
    """Write the checkpoint's student as a Hugging Face model directory (AutoModel.from_pretrained loads it)."""
    from transformers import AutoTokenizer

    _, distiller = build_distiller(cfg, prepared, torch.device("cpu"))
    load_model(distiller, str(checkpoint / "distiller.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    student: Any = distiller.student
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(prepared.teacher_dir).save_pretrained(out)
    # transformers writes the weights through a private temp file (mode 0600); a shared model folder needs
    # them readable like its other files, under the user's umask.
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o666 & ~umask)
    return out
