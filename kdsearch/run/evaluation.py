"""Batching and evaluation shared by teacher fine-tuning, TED stage 1 and the distillation loop.

`evaluate` works on a shard of the evaluation split and takes a `gather` callable, so data-parallel workers
compute exact metrics over the whole split (no padded duplicates). Plain PyTorch.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.data.encoding import collate
from kdsearch.data.metrics import compute_metrics, generation_metrics
from kdsearch.data.qa import QA_META, decode_answers, squad_scores
from kdsearch.data.seq2seq import REFERENCES
from kdsearch.methods.inputs import model_inputs, output_logits
from kdsearch.methods.losses import task_loss

if TYPE_CHECKING:
    from kdsearch.data.tasks import TaskSpec
    from kdsearch.run.models import Family


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


def left_pad(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of rows padded on the left: a decoder-only `generate` appends each row's next
    token after the batch's last position, which must be the row's own last token, not padding."""
    width = max(map(len, rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _targets(labels: list[int]) -> list[int]:
    return [t for t in labels if t != IGNORE_INDEX]


def _prompt_response(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """A causal row's prompt (the tokens before its first labelled one) and its response; None for a row with no
    prompt or no response (nothing to generate from, or to score)."""
    start = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), 0)
    return (ids[:start], _targets(labels[start:])) if start else None


def generation_batches(dataset: Any, *, family: Family, batch_size: int,
                       pad_id: int) -> Iterator[tuple[dict[str, torch.Tensor], list[list[int]]]]:
    """(`generate`'s inputs, each row's reference token ids) per batch: an encoder-decoder reads its whole
    source; a causal LM only its prompt, left-padded (built here from the ids, whatever the tokenizer's padding
    side), and its reference is the response alone."""
    if family == "seq2seq":
        for batch in make_loader(dataset, batch_size=batch_size, shuffle=False, seed=0, pad_id=pad_id):
            yield ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                   [_targets(row) for row in batch["labels"].tolist()])
        return
    rows = [pair for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True)
            if (pair := _prompt_response(list(ids), list(labels))) is not None]
    for first in range(0, len(rows), batch_size):
        chunk = rows[first:first + batch_size]
        yield left_pad([prompt for prompt, _ in chunk], pad_id), [response for _, response in chunk]


def first_rows(dataset: Any) -> list[int]:
    """The first row of each example of a multi-reference split: of the rows with the same source and the same
    references (one per reference), the one met first. The layer-selection code generates for every row and
    keeps one (output, references) pair of each (metrics.py calc_eval_metrics, `redup`)."""
    first: dict[tuple, int] = {}
    for i, (ids, refs) in enumerate(zip(dataset["input_ids"], dataset[REFERENCES], strict=True)):
        first.setdefault((tuple(ids), tuple(map(tuple, refs))), i)
    return sorted(first.values())


@torch.no_grad()
def evaluate_generation(model: Any, dataset: Any, tokenizer: Any, *, family: Family, pad_id: int,
                        device: torch.device, batch_size: int = EVAL_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                        gather: Callable[[Any], list[Any]] = lambda x: [x], num_beams: int = 1) -> dict[str, float]:
    """Generated outputs on `dataset` against its references: eval_exact_match, eval_chrf, eval_bleu,
    eval_rouge_l. An encoder-decoder writes its target from the source; a causal LM its response from the
    prompt, and only the tokens it adds are scored (a model that repeats the prompt earns nothing for it).

    Batched `generate`, no sampling: greedy, or beam search with `num_beams` > 1; at most as many new tokens as
    the longest reference holds, so a model that never stops costs no more than one that does. A multi-reference
    task (rows with `references`, one per reference of an example) generates once per example and scores the
    output against all of its references.
    """
    model.eval()
    longest = max((len(_targets(row)) for row in dataset["labels"]), default=1)
    multi = REFERENCES in dataset.column_names
    if multi:
        dataset = dataset.select(first_rows(dataset))
    shard = dataset.select(range(rank, len(dataset), world_size)) if world_size > 1 else dataset
    # A causal LM stops at the end token its responses were trained to end with (a built-in config names none)
    stop = {"pad_token_id": pad_id, "eos_token_id": tokenizer.eos_token_id} if family == "causal" else {}
    outputs: list[str] = []
    references: list[Any] = []
    for inputs, gold in generation_batches(shard, family=family, batch_size=batch_size, pad_id=pad_id):
        generated = model.generate(**{k: v.to(device) for k, v in inputs.items()}, do_sample=False,
                                   num_beams=num_beams, max_new_tokens=max(longest, 1), **stop)
        if family == "causal":  # its output repeats the prompt: keep the new tokens only
            generated = generated[:, inputs["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(generated, skip_special_tokens=True)
        if not multi:
            references += tokenizer.batch_decode(gold, skip_special_tokens=True)
    if multi:  # the loader keeps the rows' order; decoded as the labels are
        references = [tokenizer.batch_decode(refs, skip_special_tokens=True) for refs in shard[REFERENCES]]
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
