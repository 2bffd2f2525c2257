"""Teacher resolution, student derivation and teacher-weight init on tiny in-code models."""

from __future__ import annotations

import pytest
import torch

from kdsearch.core.errors import ConfigError
from kdsearch.data.tasks import task_spec
from kdsearch.run import models

SPEC = task_spec("default")
ONE_STACK = [name for name in models.TINY_MODELS if name not in ("tiny-t5", "tiny-bart")]
"""The built-in encoders and causal LMs; the encoder-decoders' own tests are in tests/test_seq2seq.py."""


def tiny(name: str, vocab: int = 50) -> torch.nn.Module:
    source = models.resolve_teacher(name)
    config = models.with_task_head(models.teacher_config(source, vocab_size=vocab), SPEC)
    family = models.family_of(config)
    torch.manual_seed(0)
    return models.task_model_class(family).from_config(config)


@pytest.mark.parametrize("copy_head", [False, True])
@pytest.mark.parametrize("name", ONE_STACK)
def test_teacher_init_copies_exactly_the_forward_mapped_layers(name: str, copy_head: bool) -> None:
    teacher = tiny(name)
    student = models.build_student(teacher, layers=2, hidden_size=None, init="teacher", seed=1, copy_head=copy_head)
    mapped = [1, 3]  # 0-indexed blocks of hidden_states 2 and 4: the forward map of 2 -> 4 layers
    copied = 0
    t_state, s_state = teacher.state_dict(), student.state_dict()
    heads = [k for k in s_state if k.startswith(("classifier.", "score."))]
    for key, value in s_state.items():
        match = models._LAYER_KEY.match(key)
        if match:
            prefix, index, rest = match.groups()
            torch.testing.assert_close(value, t_state[f"{prefix}.{mapped[int(index)]}.{rest}"], rtol=0, atol=0)
            copied += 1
        elif key in heads and not copy_head:
            # the layer-selection BERT code copies embeddings, mapped layers and pooler, not the classifier
            # (biases start at 0 on both sides, so compare the weights)
            assert key.endswith("bias") or not torch.equal(value, t_state[key]), key
        elif key in t_state:  # embeddings, pooler, final norm, a causal LM's lm_head: always copied
            torch.testing.assert_close(value, t_state[key], rtol=0, atol=0)
    assert copied > 0
    assert bool(heads) == (models.family_of(teacher.config) == "encoder")
    # and it is not the same as copying the first two layers
    first = {k for k, v in s_state.items() if models._LAYER_KEY.match(k) and ".0." in k and v.dim() == 2}
    some = sorted(first)[0]
    prefix, _, rest = models._LAYER_KEY.match(some).groups()
    assert not torch.equal(s_state[some], t_state[f"{prefix}.0.{rest}"])


def test_bert_init_copies_the_pooler_but_not_the_classifier() -> None:
    teacher = tiny("tiny-bert")
    student = models.build_student(teacher, layers=2, hidden_size=None, init="teacher", seed=1)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    assert torch.equal(s_state["bert.pooler.dense.weight"], t_state["bert.pooler.dense.weight"])
    assert not torch.equal(s_state["classifier.weight"], t_state["classifier.weight"])


@pytest.mark.parametrize(("model_type", "n_s", "n_t", "blocks"), [
    # the layer-selection code's tables, transcribed from papers.md section 2
    ("bert", 3, 12, [3, 7, 11]), ("bert", 6, 12, [1, 3, 5, 7, 9, 11]), ("bart", 3, 12, [3, 7, 11]),
    ("t5", 3, 12, [0, 6, 11]), ("t5", 6, 12, [0, 2, 4, 7, 9, 11]),
    ("qwen3", 9, 36, [0, 4, 9, 13, 18, 22, 27, 31, 35]),
    ("qwen3", 4, 36, [8, 17, 26, 35]),  # no table for this depth: the forward map's layers
])
def test_copy_tables_per_family(model_type: str, n_s: int, n_t: int, blocks: list[int]) -> None:
    assert models.copied_blocks(model_type, n_s, n_t) == blocks


def test_a_qwen3_student_copies_its_table_not_the_forward_layers() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=50, hidden_size=16, num_hidden_layers=36, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, head_dim=8, max_position_embeddings=32)
    torch.manual_seed(0)
    teacher = Qwen3ForCausalLM(config)
    student = models.build_student(teacher, layers=9, hidden_size=None, init="teacher", seed=0)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for j, block in enumerate([0, 4, 9, 13, 18, 22, 27, 31, 35]):
        key = f"model.layers.{j}.mlp.up_proj.weight"
        assert torch.equal(s_state[key], t_state[f"model.layers.{block}.mlp.up_proj.weight"])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])  # Qwen3 code copies the LM head
    assert torch.equal(s_state["model.norm.weight"], t_state["model.norm.weight"])


def test_random_init_differs_from_teacher() -> None:
    teacher = tiny("tiny-bert")
    student = models.build_student(teacher, layers=2, hidden_size=None, init="random", seed=1)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(student.state_dict()[key], teacher.state_dict()[key])


@pytest.mark.parametrize("name", ONE_STACK)
def test_narrow_student_runs(name: str) -> None:
    teacher = tiny(name)
    student = models.build_student(teacher, layers=2, hidden_size=32, init="random", seed=0)
    out = student(input_ids=torch.randint(0, 50, (2, 7)), output_hidden_states=True)
    assert len(out.hidden_states) == 3
    assert out.hidden_states[-1].shape[-1] == 32
    assert models.count_parameters(student) < models.count_parameters(teacher)


def test_missing_teacher_path_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no model directory"):
        models.resolve_teacher(str(tmp_path / "nope"))


def test_families() -> None:
    assert models.family_of(tiny("tiny-bert").config) == "encoder"
    assert models.family_of(tiny("tiny-gpt2").config) == "causal"


def test_saved_teacher_round_trips_through_from_pretrained(tmp_path) -> None:
    teacher = tiny("tiny-bert")
    teacher.save_pretrained(tmp_path)
    loaded, has_head = models.load_pretrained(str(tmp_path), spec=SPEC, family="encoder")
    assert has_head
    torch.testing.assert_close(loaded.state_dict()["classifier.weight"], teacher.state_dict()["classifier.weight"])


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_fp32(tmp_path, stored) -> None:
    """transformers keeps a checkpoint's stored dtype; training needs fp32 master weights (autocast does the rest)."""
    teacher = tiny("tiny-bert").to(stored)
    teacher.save_pretrained(tmp_path)
    loaded, _ = models.load_pretrained(str(tmp_path), spec=SPEC, family="encoder")
    reloaded = models.load_task_model(str(tmp_path), "encoder")
    for model in (loaded, reloaded):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(loaded.state_dict()["classifier.weight"],
                               teacher.state_dict()["classifier.weight"].float())


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-gpt2", "tiny-qwen"])
def test_a_width_ratio_keeps_whole_heads_of_the_teachers_head_size(name: str) -> None:
    from kdsearch.config.schema import StudentConfig

    teacher = models.teacher_config(models.resolve_teacher(name))  # width 64, 4 heads of 16
    assert models.student_width(teacher, StudentConfig()) == 64
    assert models.student_width(teacher, StudentConfig(hidden_size=48)) == 48
    assert models.student_width(teacher, StudentConfig(width_ratio=0.5)) == 32
    assert models.student_width(teacher, StudentConfig(width_ratio=0.3)) == 16  # 1.2 heads -> 1
    assert models.student_width(teacher, StudentConfig(width_ratio=0.05)) == 16  # never below one head
    assert models.student_width(teacher, StudentConfig(width_ratio=0.625)) == 48  # 2.5 heads -> 3
    assert models.student_width(teacher, StudentConfig(width_ratio=0.375)) == 32  # 1.5 heads -> 2
    config = models.student_config(teacher, layers=2, hidden_size=32)
    assert config.hidden_size // config.num_attention_heads == 16


@pytest.mark.parametrize("name", models.TINY_MODELS)
def test_a_built_in_teachers_special_ids_are_its_tokenizers(name: str) -> None:
    family = models.family_of(models.teacher_config(models.resolve_teacher(name)))
    tok = models.train_tokenizer(["a good film", "a bad one"], family=family, vocab_size=40)
    model = tiny(name, vocab=len(tok))
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().padding_idx in (None, tok.pad_token_id)  # [UNK] trains like any token
    if family == "encoder" and model.config.bos_token_id is not None:
        assert (model.config.bos_token_id, model.config.eos_token_id) == (tok.cls_token_id, tok.sep_token_id)


def test_the_built_in_tokenizer_is_the_same_every_time_it_is_trained() -> None:
    # content-addressed caches and fine-tuned teachers assume it: the same text gives the same vocabulary
    texts = [f"sentence {i} with words {'good ' * (i % 3)}and bad endings" for i in range(200)]
    first, again = (models.train_tokenizer(texts, family="encoder", vocab_size=60) for _ in range(2))
    assert first.get_vocab() == again.get_vocab() and len(first) == 60  # 53 characters and pieces, 7 words
    pieces = first.convert_ids_to_tokens(first("endings goodbad")["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and "[UNK]" not in pieces  # rarer words spelled out
    assert len(pieces) > 4  # ... in characters


@pytest.mark.parametrize(("task", "names"), [("mnli", ["entailment", "neutral", "contradiction"]),
                                             ("rte", ["entailment", "not_entailment"]), ("stsb", None)])
def test_a_task_head_carries_the_tasks_class_names(task: str, names: list[str] | None) -> None:
    from transformers import BertConfig

    from kdsearch.data.tasks import task_spec
    from kdsearch.run.models import with_task_head

    config = with_task_head(BertConfig(), task_spec(task))
    if names is None:  # regression: one output, no class names
        assert config.num_labels == 1 and config.problem_type == "regression"
    else:
        assert list(config.id2label.values()) == names and config.label2id[names[-1]] == len(names) - 1


def test_a_shallower_student_keeps_one_attention_kind_per_layer() -> None:
    """Qwen-like configs list an attention kind per layer: a student's list matches its depth, taken from the
    teacher blocks it copies, so that its saved config loads again (transformers checks the lengths)."""
    from transformers import AutoConfig, Qwen2Config

    from kdsearch.run.models import student_config

    teacher = Qwen2Config(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, vocab_size=100, use_sliding_window=True, max_window_layers=2)
    assert teacher.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = student_config(teacher, layers=2, hidden_size=None)
    assert student.layer_types == ["full_attention", "sliding_attention"]  # forward map: teacher blocks 1 and 3
    assert student_config(teacher, layers=6, hidden_size=None).layer_types[4:] == ["full_attention"] * 2
    loaded = AutoConfig.for_model(**student.to_dict())
    assert loaded.num_hidden_layers == 2 and loaded.layer_types == student.layer_types
