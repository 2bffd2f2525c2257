"""Task rows -> token ids: tokenisation for encoders, causal LMs (prompt -> answer, the loss on the answer
only) and encoder-decoders (source -> target, with the decoder's inputs), a content-addressed Arrow cache of the
result, and collation into padded tensors.

Imports no Ray, Optuna or MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from datasets import DatasetDict, Features, Sequence, Value, load_from_disk
from torch.nn.utils.rnn import pad_sequence

from kdsearch.core.cache import content_key
from kdsearch.core.errors import ConfigError
from kdsearch.core.kinds import IGNORE_INDEX
from kdsearch.data.loading import content_hash
from kdsearch.data.qa import QA_META, encode_qa
from kdsearch.data.seq2seq import REFERENCES
from kdsearch.data.tasks import TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CACHE_VERSION = 3  # bump when the tokenised layout changes, so old cache entries are not reused


# --- text views -----------------------------------------------------------------------------------------
def _joined(row: dict[str, Any], spec: TaskSpec) -> str:
    return " | ".join(str(row[name]) for name in spec.text_fields)


def _as_prompt_response(row: dict[str, Any], spec: TaskSpec) -> tuple[str, str]:
    """A classification row as a causal LM reads it: `<text> =>` then ` <label word>`."""
    if spec.kind == "causal_lm":
        return row["prompt"], row["response"]
    return _joined(row, spec) + " =>", " " + spec.label_words[row["label"]]


def train_texts(raw: DatasetDict, spec: TaskSpec) -> Iterator[str]:
    """Every training string a model may read, to train a tokenizer for the built-in tiny models.

    Classification rows come in their causal form (`text => word`), so the label words, the `=>` marker and
    the ` | ` pair separator are in the vocabulary whichever model family uses the tokenizer.
    """
    if spec.kind == "seq2seq":
        for row in raw["train"]:
            yield row["source"]
            yield row["target"]
        return
    if spec.kind == "extractive_qa":
        for row in raw["train"]:
            yield row["question"]
            yield row["context"]
        return
    causal = spec.kind == "causal_lm" or bool(spec.label_words)
    for row in raw["train"]:
        yield "".join(_as_prompt_response(row, spec)) if causal else _joined(row, spec)


# --- tokenisation and its cache -------------------------------------------------------------------------
def _tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Calls with truncation=/padding= leave their settings on the backend; they are not the vocabulary.
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return content_key(kind=type(tokenizer).__name__, ids=ids, state=state)


def _split_keys(raw: DatasetDict, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase,
                max_length: int, family: str, segments: bool, decoder_start: int | None = None,
                stride: int | None = None) -> dict[str, str]:
    """Each split's tokenised identity: its rows and how they are tokenised. It becomes the split's fingerprint,
    which artifacts built from one split (a teacher fine-tuned on train) are keyed on: a new validation split
    leaves the train split's key, and so the fine-tuned teacher, as they were."""
    common = {"version": _CACHE_VERSION, "task": spec.name, "family": family, "max_length": max_length,
              "segments": segments, "tokenizer": _tokenizer_hash(tokenizer),
              **({"decoder_start": decoder_start} if decoder_start is not None else {}),
              **({"stride": stride} if stride is not None else {})}
    return {split: content_key(**common, split=split, rows=[len(ds), content_hash(ds)])
            for split, ds in raw.items()}


def _encode_encoder(batch: dict[str, list], spec: TaskSpec, tokenizer: Any, max_length: int,
                    segments: bool) -> dict:
    enc = tokenizer(*[batch[name] for name in spec.text_fields], truncation=True, max_length=max_length,
                    return_token_type_ids=segments)
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": batch["label"]}
    return {**out, "token_type_ids": enc["token_type_ids"]} if segments else out


def _encode_causal(batch: dict[str, list], spec: TaskSpec, tokenizer: Any, max_length: int) -> dict:
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    pairs = [_as_prompt_response(row, spec) for row in rows]
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos = [bos_id] if bos_id is not None and bos_id != eos_id else []  # GPT-2 style (bos == eos) adds none
    eos = [eos_id] if eos_id is not None else []
    room = max_length - len(bos)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, response in zip(p_ids, r_ids, strict=True):
        # The response (what the loss reads) keeps at least half the window; the prompt keeps its end,
        # which holds the `=>` marker right before the answer.
        response = (response + eos)[: room - min(len(prompt), room // 2)]
        prompt = prompt[max(0, len(prompt) - (room - len(response))):]
        out["input_ids"].append(bos + prompt + response)
        out["attention_mask"].append([1] * (len(bos) + len(prompt) + len(response)))
        out["labels"].append([IGNORE_INDEX] * (len(bos) + len(prompt)) + response)
    return out


def _encode_seq2seq(batch: dict[str, list], tokenizer: Any, max_length: int, decoder_start: int) -> dict:
    """source -> input_ids, attention_mask; target -> labels (its tokens, the tokenizer's end token included)
    and the decoder's inputs: the labels shifted right behind `decoder_start` (teacher forcing), so decoder
    position t reads labels[:t] and predicts labels[t]. Both sides are cut to max_length tokens; so are a
    multi-reference row's `references`, tokenised as its labels are."""
    enc = tokenizer(batch["source"], truncation=True, max_length=max_length)
    labels = tokenizer(batch["target"], truncation=True, max_length=max_length)["input_ids"]
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
           "decoder_input_ids": [[decoder_start, *row[:-1]] for row in labels],
           "decoder_attention_mask": [[1] * len(row) for row in labels]}
    if REFERENCES in batch:
        out[REFERENCES] = [tokenizer(refs, truncation=True, max_length=max_length)["input_ids"]
                           for refs in batch[REFERENCES]]
    return out


def _features(spec: TaskSpec, family: str, segments: bool, references: bool = False) -> Features:
    ids = Sequence(Value("int32"))
    if spec.kind == "extractive_qa":
        return Features({"input_ids": ids, "attention_mask": Sequence(Value("int8")), "labels": ids,
                         **({"token_type_ids": Sequence(Value("int8"))} if segments else {}),
                         "example": Value("int32"), "offsets": Sequence(ids), "context": Value("string"),
                         "answers": Sequence(Value("string"))})
    if family == "seq2seq":
        return Features({"input_ids": ids, "attention_mask": Sequence(Value("int8")), "labels": ids,
                         "decoder_input_ids": ids, "decoder_attention_mask": Sequence(Value("int8")),
                         **({REFERENCES: Sequence(ids)} if references else {})})
    if family == "causal":
        labels: Any = Sequence(Value("int32"))
    else:
        labels = Value("float32" if spec.kind == "regression" else "int64")
    features = {"input_ids": ids, "attention_mask": Sequence(Value("int8")), "labels": labels}
    return Features({**features, "token_type_ids": Sequence(Value("int8"))} if segments else features)


def tokenize_task(raw: DatasetDict, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                  cache_dir: str | Path, family: Literal["encoder", "causal", "seq2seq"], segments: bool,
                  decoder_start: int | None = None, stride: int | None = None) -> DatasetDict:
    """Splits with input_ids, attention_mask, labels (and token_type_ids with `segments`, for a model that
    reads them: `models.uses_segments`); read from `cache_dir/data/<key>` when already built.

    The key hashes the tokenizer, the rows themselves, max_length, family, segments and task, so any change
    re-tokenises and an unchanged run (another trial, a rerun) reads the Arrow files saved by the first one.
    encoder: labels are the class id / score. causal: labels are the token ids, -100 on prompt tokens.
    seq2seq: labels are the target's token ids, with decoder_input_ids (shifted right behind `decoder_start`, the
    model's decoder_start_token_id) and decoder_attention_mask. extractive_qa: one row per window of the context
    (windows overlap by `stride` tokens), labels [start, end] and what decoding reads (data.qa.encode_qa).
    """
    if family != "encoder" and segments:
        reader = "causal LMs" if family == "causal" else "encoder-decoders"
        raise ValueError(f"segments=True: {reader} read no segment ids")
    if (family == "seq2seq") != (spec.kind == "seq2seq"):
        raise ConfigError(f"task.name={spec.name}: a seq2seq task needs an encoder-decoder teacher, and an "
                          "encoder-decoder teacher a seq2seq task")
    if family == "seq2seq" and decoder_start is None:
        raise ValueError("a seq2seq task needs the model's decoder_start_token_id: pass decoder_start=")
    if family == "encoder" and spec.kind == "causal_lm":
        raise ConfigError(f"task.name={spec.name}: a causal_lm task needs a causal (decoder) teacher")
    if family == "causal" and spec.kind == "regression":
        raise ConfigError(f"task.name={spec.name}: a regression task needs an encoder teacher")
    qa = spec.kind == "extractive_qa"
    if qa and family != "encoder":
        raise ConfigError(f"task.name={spec.name}: an extractive QA task needs an encoder teacher")
    if qa and not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"task.name={spec.name}: extractive QA needs a fast tokenizer (offsets map answers to "
                          f"tokens); {type(tokenizer).__name__} is a slow one")
    stride = (stride if stride is not None else max_length // 3) if qa else None
    keys = _split_keys(raw, spec, tokenizer, max_length, family, segments, decoder_start, stride)
    target = Path(cache_dir) / "data" / content_key(**keys)
    if not target.is_dir():
        encode: Any = {"causal": _encode_causal, "seq2seq": _encode_seq2seq}.get(family, _encode_encoder)
        kwargs: dict[str, Any] = {"spec": spec, "tokenizer": tokenizer, "max_length": max_length,
                                  **({"segments": segments} if family == "encoder" else {})}
        if family == "seq2seq":
            kwargs = {"tokenizer": tokenizer, "max_length": max_length, "decoder_start": decoder_start}
        if qa:
            encode = encode_qa
            kwargs = {"tokenizer": tokenizer, "max_length": max_length, "segments": segments, "stride": stride}
        # new_fingerprint: the key already names the result, and spares datasets hashing the tokenizer
        built = DatasetDict({
            split: ds.map(encode, batched=True, remove_columns=ds.column_names, fn_kwargs=kwargs, with_indices=qa,
                          features=_features(spec, family, segments, REFERENCES in ds.column_names),
                          keep_in_memory=True,
                          new_fingerprint=keys[split])
            for split, ds in raw.items()})
        # Trials tokenise concurrently: write aside, then rename; the loser of the race drops its copy.
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        built.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))


def collate(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a list of rows: input_ids and decoder_input_ids with `pad_id`, token labels with -100, anything else
    (attention masks) with 0.

    Scalar labels are stacked: long for classification, float32 for regression. An extractive QA feature's
    decoding columns (data.qa.QA_META) and a multi-reference row's references stay out of the batch.
    """
    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        if key in QA_META or key == REFERENCES:
            continue
        values = [torch.as_tensor(row[key]) for row in batch]
        if values[0].dim() == 0:
            stacked = torch.stack(values)
            out[key] = stacked.float() if stacked.is_floating_point() else stacked.long()
            continue
        fill = pad_id if key in ("input_ids", "decoder_input_ids") else IGNORE_INDEX if key == "labels" else 0
        out[key] = pad_sequence([v.long() for v in values], batch_first=True, padding_value=fill)
    return out



