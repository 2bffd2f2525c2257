"""Helpers of the data and encoding tests: task files written as GLUE ships them, and a small trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from kdsearch.config.schema import TaskConfig
from kdsearch.data.encoding import collate
from kdsearch.data.loading import load_raw_task

ROWS = [("a fine film", 1), ("dull and slow", 0), ("it works", 1), ("not good", 0), ("great fun", 1)]


def write(path: Path, rows: list[dict], fmt: str) -> Path:
    """Rows -> one file in `fmt`, as GLUE ships it (tsv: header, tabs, no quoting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return path


def sst2_dir(root: Path, fmt: str = "tsv", dev_stem: str = "dev") -> Path:
    rows = [{"sentence": s, "label": y} for s, y in ROWS]
    write(root / f"train.{fmt}", rows, fmt)
    write(root / f"{dev_stem}.{fmt}", rows[:3], fmt)
    return root


def load(tmp_path: Path, splits: tuple = ("train", "validation"), **task: object):
    return load_raw_task(TaskConfig(**task), cache_dir=tmp_path / "cache", splits=splits)  # type: ignore[arg-type]


def make_tokenizer(texts, *, family: str):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    if family == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def seq2seq_batch(vocab: int = 50, *, start: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of uneven source and target lengths, padded as `collate` pads them."""
    torch.manual_seed(1)
    rows = []
    for n_src, n_tgt in ((7, 5), (4, 3)):
        labels = torch.randint(5, vocab, (n_tgt,)).tolist()
        rows.append({"input_ids": torch.randint(5, vocab, (n_src,)).tolist(), "attention_mask": [1] * n_src,
                     "labels": labels, "decoder_input_ids": [start, *labels[:-1]],
                     "decoder_attention_mask": [1] * n_tgt})
    return collate(rows, pad_id=0)
