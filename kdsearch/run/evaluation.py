"""Batching and evaluation shared by teacher fine-tuning, TED stage 1 and the distillation loop.

`evaluate` works on a shard of the evaluation split and takes a `gather` callable, so data-parallel workers
compute exact metrics over the whole split (no padded duplicates). Plain PyTorch.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.data.encoding import collate
from kdsearch.data.metrics import compute_metrics, generation_metrics
from kdsearch.data.qa import QA_META, decode_answers, squad_scores
from kdsearch.methods.inputs import model_inputs, output_logits
from kdsearch.methods.losses import task_loss

if TYPE_CHECKING:
    from kdsearch.data.tasks import TaskSpec


EVAL_BATCH_SIZE = 64
"""Rows per evaluation batch, for every model scored anywhere (teachers, students, exports): one batch size, so
one model scores the same wherever it is scored."""
LATENCY_ROWS = 32
"""student_latency_ms: one forward pass over this many evaluation rows."""


def make_loader(dataset: Any, *, batch_size: int, shuffle: bool, seed: int, pad_id: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=functools.partial(collate, pad_id=pad_id))


def predictions(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (or per-response-token for causal LMs) predictions and gold labels."""
    if kind in ("causal_lm", "seq2seq"):  # a seq2seq decoder's position t predicts label t: no shift
        cut = 1 if kind == "causal_lm" else 0
        pred, gold = logits[:, :logits.shape[1] - cut].argmax(-1), labels[:, cut:]
        keep = gold != IGNORE_INDEX
        return pred[keep].cpu().numpy(), gold[keep].cpu().numpy()
    if kind == "regression":
        return logits.squeeze(-1).float().cpu().numpy(), labels.float().cpu().numpy()
    return logits.argmax(-1).cpu().numpy(), labels.cpu().numpy()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Any, *, spec: TaskSpec, pad_id: int, device: torch.device,
             batch_size: int = EVAL_BATCH_SIZE, rank: int = 0, world_size: int = 1,
             gather: Callable[[Any], list[Any]] = lambda x: [x]) -> dict[str, float]:
    """Metrics of `model` on `dataset` ("eval_" prefixed, eval_score = the task's primary metric)."""
    if spec.kind == "extractive_qa":
        return evaluate_qa(model, dataset, spec=spec, pad_id=pad_id, device=device, batch_size=batch_size,
                           rank=rank, world_size=world_size, gather=gather)
    model.eval()
    shard = dataset.select(range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    preds, golds, loss_sum, count = [], [], 0.0, 0
    for batch in make_loader(shard, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        # weighted by what the loss averages over: rows, or a causal LM's target tokens
        weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if spec.kind == "causal_lm" \
            else int((batch["labels"] != IGNORE_INDEX).sum()) if spec.kind == "seq2seq" else len(batch["labels"])
        loss_sum += float(task_loss(logits, batch["labels"], kind=spec.kind)) * weight
        count += weight
        p, g = predictions(logits, batch["labels"], spec.kind)
        preds.append(p)
        golds.append(g)
    parts = gather((np.concatenate(preds) if preds else np.array([]),
                    np.concatenate(golds) if golds else np.array([]), loss_sum, count))
    all_preds = np.concatenate([p for p, _, _, _ in parts])
    all_golds = np.concatenate([g for _, g, _, _ in parts])
    metrics = compute_metrics(spec, all_preds, all_golds)
    out = {f"eval_{k}": float(v) for k, v in metrics.items()}
    out["eval_loss"] = sum(s for _, _, s, _ in parts) / max(sum(c for _, _, _, c in parts), 1)
    return out


@torch.no_grad()
def evaluate_qa(model: torch.nn.Module, dataset: Any, *, spec: TaskSpec, pad_id: int, device: torch.device,
                batch_size: int = EVAL_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                gather: Callable[[Any], list[Any]] = lambda x: [x]) -> dict[str, float]:
    """An extractive QA model's answers on `dataset` (one row per window): eval_exact_match, eval_f1 (= eval_score)
    over its questions, each answered by the best span over all of its windows, and eval_loss over windows.

    Each worker scores its shard of windows; the logits of all are gathered before decoding, since a question's
    windows may lie in several shards."""
    model.eval()
    ids = list(range(rank, len(dataset), world_size))
    shard = dataset.select(ids) if world_size > 1 else dataset
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    loss_sum = 0.0
    for batch in make_loader(shard, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = output_logits(model(**model_inputs(batch))).float()  # (B, T, 2)
        loss_sum += float(task_loss(logits, batch["labels"], kind="extractive_qa")) * len(batch["labels"])
        for row, length in zip(logits.cpu().numpy(), batch["attention_mask"].sum(-1).tolist(), strict=True):
            starts.append(row[:length, 0])
            ends.append(row[:length, 1])
    parts = gather((ids, starts, ends, loss_sum))
    by_row = {i: (s, e) for p in parts for i, s, e in zip(p[0], p[1], p[2], strict=True)}  # every window once
    meta = dataset.select_columns(list(QA_META)).to_dict()
    answers = decode_answers(meta, [by_row[i][0] for i in range(len(dataset))],
                             [by_row[i][1] for i in range(len(dataset))], unanswerable=spec.unanswerable)
    golds = dict(zip(meta["example"], meta["answers"], strict=True))
    examples = sorted(golds)
    scores = squad_scores([answers[e] for e in examples], [golds[e] for e in examples])
    return {"eval_exact_match": scores["exact_match"], "eval_f1": scores["f1"], "eval_score": scores["f1"],
            "eval_loss": sum(p[3] for p in parts) / max(len(dataset), 1)}


@torch.no_grad()
def evaluate_generation(model: Any, dataset: Any, tokenizer: Any, *, pad_id: int, device: torch.device,
                        batch_size: int = EVAL_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                        gather: Callable[[Any], list[Any]] = lambda x: [x], num_beams: int = 1) -> dict[str, float]:
    """An encoder-decoder's generated outputs on `dataset` against its targets: eval_exact_match, eval_chrf,
    eval_bleu, eval_rouge_l.

    Batched `generate`, no sampling: greedy, or beam search with `num_beams` > 1; at most as many new tokens as
    the longest target holds, so a model that never stops costs no more than one that does.
    """
    model.eval()
    shard = dataset.select(range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    longest = max(map(len, dataset["labels"]), default=1)
    outputs: list[str] = []
    references: list[str] = []
    for batch in make_loader(shard, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
        generated = model.generate(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device), do_sample=False,
                                   num_beams=num_beams,
                                   max_new_tokens=longest)
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        gold = [[t for t in row if t != IGNORE_INDEX] for row in batch["labels"].tolist()]
        references += tokenizer.batch_decode(gold, skip_special_tokens=True)
    parts = gather((outputs, references))
    scores = generation_metrics([o for out, _ in parts for o in out], [r for _, ref in parts for r in ref])
    return {f"eval_{k}": v for k, v in scores.items()}


@torch.no_grad()
def forward_latency_ms(model: torch.nn.Module, dataset: Any, *, rows: int = LATENCY_ROWS, pad_id: int,
                       device: torch.device,
                       repeats: int = 10) -> float:
    """Median milliseconds of one forward pass over the first `rows` evaluation rows (one padded batch).

    The student's measured inference latency, which a multi-objective search can minimise; on a GPU the
    clock stops only when the kernels are done. Two untimed passes first (allocator, kernel selection).
    """
    model.eval()
    first = dataset.select(range(min(rows, len(dataset))))
    batch = next(iter(make_loader(first, batch_size=rows, shuffle=False, seed=0, pad_id=pad_id)))
    inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
    times = []
    for k in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 2:
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)
