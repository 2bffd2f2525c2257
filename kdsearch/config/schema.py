"""Typed, frozen run configuration: the dataclasses and their checks (dict -> Config: `kdsearch.config.parse`).

One vocabulary end to end: a dotted key here (`distill.w_hidden`) is the CLI override, the search-space
parameter and the MLflow param. Structural checks live in `__post_init__`; checks that need the real model
(depths, widths, registry names) live in `kdsearch.run.validate`; the command line and YAML files are read in
`kdsearch.config.overrides`. Imports no framework.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from kdsearch.core.errors import require

TABLE_METRICS: dict[str, tuple[str, ...]] = {"classification": ("accuracy", "macro_f1", "mcc"),
                                             "regression": ("pearson", "spearman")}
"""task.name=table's metrics by kind; the first is the default."""
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
QA_HUBS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
"""The hub dataset a SQuAD task name reads when given neither task.data_dir nor task.hub."""
QA_TASKS = ("qa_default", "qa_default_v2", *QA_HUBS)
"""Extractive question answering tasks: the only ones that read task.doc_stride."""
"""The GLUE task names: given neither task.data_dir nor task.hub, they read the hub's `glue`."""
MAX_EPOCHS = 1000
"""The most epochs any stage takes: more is a typo (1e9), which would otherwise run until killed."""


Precision = Literal["fp32", "bf16", "fp16"]
UnitAggregate = Literal["mean_abs", "abs_mean", "rms"]

BUILTIN_TEACHERS = ("tiny-bert", "tiny-roberta", "tiny-deberta", "tiny-gpt2", "tiny-qwen", "tiny-t5", "tiny-bart")
"""Teachers built from in-code configs and trained from scratch on the task; any other is a pretrained checkpoint."""


def teacher_rates(teacher: str, init: str) -> tuple[float, int, float]:
    """(finetune.lr, finetune.epochs, train.lr) that fit the teacher, for the keys left null.

    A built-in tiny teacher learns the task from scratch: 1e-3 over 10 epochs. A pretrained checkpoint collapses
    there (MiniLM on 2,000 SST-2 rows: the majority class); at 1e-4 over 3 epochs it reached 81.7 % and its
    students learnt at 2e-4 from teacher init, 5e-4 from random init (docs/results/README.md, setup).
    """
    if teacher in BUILTIN_TEACHERS:
        return 1e-3, 10, 1e-3
    return 1e-4, 3, 2e-4 if init == "teacher" else 5e-4


def rate_defaults(teacher: str, init: str) -> str:
    """One line: the learning-rate and epoch defaults this teacher gets (keys set explicitly win)."""
    kind = "a from-scratch tiny" if teacher in BUILTIN_TEACHERS else "a pretrained"
    ft_lr, ft_epochs, lr = teacher_rates(teacher, init)
    return (f"defaults for {kind} teacher ({teacher}): finetune.lr {ft_lr:g}, finetune.epochs {ft_epochs}, "
            f"train.lr {lr:g} (student.init={init})")


@dataclass(frozen=True)
class StudentConfig:
    layers: int = 2
    """Student depth n_s (an encoder-decoder's encoder depth)."""
    decoder_layers: int | None = None
    """An encoder-decoder student's decoder depth (T5, BART); null = student.layers. Read only with a seq2seq
    teacher."""
    hidden_size: int | None = None
    """Student width d_s; None keeps the teacher's width (or takes `width_ratio` of it)."""
    width_ratio: float | None = None
    """d_s as a share of the teacher's width, in whole attention heads of the teacher's head size (0.5 of a
    12-head, 384-wide MiniLM: 6 heads, 192). Spaces use it so that one space fits any teacher."""
    init: Literal["teacher", "random"] = "teacher"
    """`teacher` copies the embeddings, the pooler and the teacher layers of the family's copy table (the forward
    map's layers; T5 and Qwen3 have their own tables, as in the layer-selection code); `random` copies nothing."""
    copy_head: bool = False
    """With init=teacher, also copy the teacher's task head (classifier). The layer-selection BERT code leaves it
    random; a causal LM's LM head is part of the language model and is always copied (its Qwen3 code)."""
    finetune: bool = False
    """Fine-tune the initial student on the task before distilling, as TED's code does: stage 1 then trains the
    student filters on it, and distillation starts from it. Cached; finetune.epochs/lr/batch_size as for the
    teacher (changing them re-fine-tunes the teacher too), seeded by train.seed; finetune.mode is the teacher's."""

    def __post_init__(self) -> None:
        require(self.layers >= 1, f"student.layers={self.layers}: a student needs at least 1 layer")
        require(self.decoder_layers is None or self.decoder_layers >= 1,
                f"student.decoder_layers={self.decoder_layers}: a decoder needs at least 1 layer")
        require(self.hidden_size is None or self.hidden_size > 0,
                 f"student.hidden_size={self.hidden_size}: must be > 0")
        require(self.width_ratio is None or 0 < self.width_ratio <= 1,
                 f"student.width_ratio={self.width_ratio}: must be in (0, 1]")
        require(self.hidden_size is None or self.width_ratio is None,
                 f"student.hidden_size={self.hidden_size} and student.width_ratio={self.width_ratio}: give one "
                 "(set the other to null)")


@dataclass(frozen=True)
class TaskConfig:
    name: str = "default"
    """`default` (embedded, no download), a GLUE task (sst2, cola, mrpc, ...), `text` (causal LM corpus),
    `table` (your classification or regression files), `seq2seq_default` (embedded: numbers in digits -> words),
    `seq2seq` (your source -> target files), extractive QA: `qa_default` / `qa_default_v2` (embedded; v2 adds
    unanswerable questions), `squad` / `squad_v2` (the hub's rajpurkar/squad(_v2), or task.data_dir with SQuAD
    json or jsonl files)."""
    data_dir: str | None = None
    """Folder with train/dev files (tsv, csv, jsonl, parquet); None reads the hub (`hub`) or the default task."""
    hub: str | None = None
    """A datasets hub name (e.g. `glue`), read with load_dataset when data_dir is not given; a GLUE task name
    given neither reads `glue`."""
    hub_config: str | None = None
    """task.name=seq2seq or text: the hub dataset's config name (load_dataset's second argument, e.g. `ro-en` for
    `wmt16`); null = its default. A GLUE name reads the config named after the task."""
    max_length: int = 64
    """Longest input in tokens; longer rows are truncated (causal LMs keep the prompt's end and the response)."""
    train_size: int | None = None
    """Subsample the training split to this many rows (seeded); None keeps all."""
    eval_size: int | None = None
    """Subsample the validation split to this many rows (seeded); None keeps all."""
    text_columns: tuple[str, ...] | None = None
    """task.name=table: the one or two text columns a model reads, in order; null = [text]."""
    label_column: str = "label"
    """task.name=table: the column holding each row's label."""
    kind: Literal["classification", "regression"] = "classification"
    """task.name=table: classes read from the training split's labels (strings or integers, in sorted order),
    or one number per row."""
    metric: str | None = None
    """task.name=table: what eval_score is: accuracy, macro_f1 or mcc (classification; null = accuracy),
    pearson or spearman (regression; null = pearson). GLUE names use their official metric."""
    source_column: str = "source"
    """task.name=seq2seq: the column an encoder-decoder reads; `column.key` reads one key of a dict column (the
    hub's WMT16: `translation.en`)."""
    target_column: str = "target"
    """task.name=seq2seq: the column it learns to write (every row needs a non-empty one); dotted as above. A
    column of lists of texts holds several references per row (DART's `annotations.text`): one training row per
    reference, blank ones left out, and each row's generated output scored against all of its references."""
    source_format: Literal["text", "triples"] = "text"
    """task.name=seq2seq: how the source column reads. `text`: as it is. `triples`: a list of [subject, predicate,
    object] (DART's `tripleset`), written as the layer-selection code's BART reads it: `subject : predicate :
    object` per triple, the predicate lower-cased, joined by ` | ` (kdsearch.data.seq2seq.linearise_triples)."""
    doc_stride: int | None = None
    """Extractive QA: a context longer than one window is read in windows of task.max_length tokens that overlap
    by this many tokens (Hugging Face's `stride`); null = max_length // 3 (128 at max_length=384, BERT's SQuAD
    setting)."""

    def __post_init__(self) -> None:
        if self.name in GLUE_TASKS and self.data_dir is None and self.hub is None:  # resolved here: params say it
            object.__setattr__(self, "hub", "glue")
        if self.name in QA_HUBS and self.data_dir is None and self.hub is None:
            object.__setattr__(self, "hub", QA_HUBS[self.name])
        if self.doc_stride is not None:
            require(self.name in QA_TASKS, f"task.doc_stride={self.doc_stride}: read only by extractive QA tasks "
                                           f"({', '.join(QA_TASKS)}; here {self.name})")
            require(0 < self.doc_stride < self.max_length // 2,
                    f"task.doc_stride={self.doc_stride}: must be > 0 and < task.max_length / 2 "
                    f"({self.max_length // 2}), so that every window reads new context")
        if self.hub_config is not None:
            require(self.name in ("seq2seq", "text"),
                    f"task.hub_config={self.hub_config}: read only by task.name=seq2seq or text (here {self.name}"
                    f"{', which reads the config named after the task' if self.name in GLUE_TASKS else ''})")
            require(self.hub is not None and self.data_dir is None,
                    f"task.hub_config={self.hub_config}: names a config of task.hub, so it needs task.hub=<dataset> "
                    "(and no task.data_dir)")
            require(bool(self.hub_config.strip()), "task.hub_config: empty; give a config name or null")
        require(self.max_length >= 4, f"task.max_length={self.max_length}: must be >= 4")
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            require(value is None or value > 0, f"task.{key}={value}: must be > 0")
        if self.name != "seq2seq":
            given = [k for k, v in (("source_column", self.source_column != "source"),
                                    ("target_column", self.target_column != "target"),
                                    ("source_format", self.source_format != "text")) if v]
            require(not given, f"task.{given[0] if given else ''}: read only by task.name=seq2seq (here {self.name})")
        else:
            require(self.source_column != self.target_column,
                    f"task.source_column={self.source_column} and task.target_column={self.target_column}: name "
                    "two different columns")
        if self.name != "table":
            given = [k for k, v in (("text_columns", self.text_columns), ("metric", self.metric),
                                    ("label_column", self.label_column != "label" or None),
                                    ("kind", self.kind != "classification" or None)) if v is not None]
            require(not given, f"task.{given[0] if given else ''}: read only by task.name=table (here "
                               f"{self.name}, whose columns, labels and metric are fixed)")
            return
        require(self.text_columns is None or 1 <= len(self.text_columns) <= 2,
                f"task.text_columns={list(self.text_columns or ())}: one or two text columns")
        allowed = TABLE_METRICS[self.kind]
        require(self.metric is None or self.metric in allowed,
                f"task.metric={self.metric}: for task.kind={self.kind} choose one of {', '.join(allowed)}")


@dataclass(frozen=True)
class DistillConfig:
    layer_map: str = "forward"
    """Which teacher layer each student layer matches (kdsearch/methods/layer_maps.py); none = no hidden term."""
    layers: tuple[int, ...] | None = None
    """Teacher hidden-state indices for layer_map=explicit, one per student layer (1..n_t)."""
    embeddings: bool | None = None
    """Also match the embedding outputs h_s[0] <-> h_t[0] (the layer-selection paper's BERT and seq2seq runs);
    null = true, except with bridge=ted (TED's code has no filter on the embeddings)."""
    bridge: str = "auto"
    """Width bridge, a module of kdsearch/methods/bridges; `auto` = identity if widths match, else projector."""
    distance: str = "mse"
    """Hidden distance (kdsearch/methods/losses.py), including the layer-selection code's own forms
    layer_select_bert, layer_select_t5 and layer_select_qwen3."""
    hidden_reduce: Literal["sum", "mean"] = "sum"
    """How per-pair hidden terms combine. The papers' forms (docs/results/README.md, fidelity): layer-selection
    BERT = layer_select_bert + mean; BART = mse + sum; T5 = layer_select_t5 + sum; Qwen3 = layer_select_qwen3 +
    mean (no embedding pair); TED = mse + mean with mask_padding=false."""
    mask_padding: bool = True
    """Hidden distances over real tokens only (layer-selection paper); false: every position, padding included,
    as TED's code computes its MSE. For extractive QA it also decides whether padding is taken out of the start
    and end distributions of the span KD (TED's QA code: not)."""
    w_task: float = 1.0
    """Weight of the task loss (CE on the labels; MSE for regression; next-token CE for causal LMs)."""
    w_logit: float = 1.0
    """Weight of logit KD (`logit_loss` at `temperature`); 0 = no logit KD."""
    w_hidden: float = 3.0
    """Weight of the hidden-state term over the layer map's pairs (3 in the layer-selection paper, with its
    family's distance and reduction; TED's mse_alpha 10-7500); 0 = none."""
    w_relation: float = 0.0
    """Weight of the self-attention relation term (MiniLM / MiniLMv2; settings under `relation.`)."""
    temperature: float = 1.0
    """Softmax temperature T of logit KD; the divergence is scaled by T^2."""
    logit_loss: str = "kl"
    """Logit-KD divergence registry key: kl (Hinton), reverse_kl (MiniLLM), jsd (GKD, beta 1/2), skew_kl
    (DistiLLM, alpha 0.1); all at temperature T, times T^2."""

    def __post_init__(self) -> None:
        if self.embeddings is None:  # resolved here, so runs, MLflow params and exports all read true or false
            from kdsearch.methods.bridges import BRIDGES  # its bridge's method says (TED: no embeddings pair)

            method = BRIDGES.get(self.bridge) if self.bridge in BRIDGES else None
            object.__setattr__(self, "embeddings", method.embedding_pair if method else True)
        for key in ("w_task", "w_logit", "w_hidden", "w_relation"):
            value = getattr(self, key)
            require(value >= 0, f"distill.{key}={value}: loss weights must be >= 0")
        require(self.temperature > 0, f"distill.temperature={self.temperature}: must be > 0")
        require(self.layers is None or self.layer_map == "explicit",
                f"distill.layers={list(self.layers or ())} is read only by distill.layer_map=explicit (here "
                f"{self.layer_map}); set distill.layer_map=explicit or leave distill.layers out")


@dataclass(frozen=True)
class TedConfig:
    filter: str = "linear"
    """Filter architecture: linear (TED's default) or mlp."""
    width: int | None = None
    """Filter output width d_f; None = the teacher's width (TED code), or `width_ratio` of it."""
    width_ratio: float | None = None
    """d_f as a multiple of the teacher's width (1.0 = TED's code); spaces use it so that one fits any teacher."""
    mlp_hidden: int | None = None
    """Hidden width of the mlp filter; None = its input width."""
    depth: int = 2
    """Number of Linear layers of the mlp filter (>= 2)."""
    activation: str = "gelu"
    """Activation between the mlp filter's layers."""
    stage1_epochs: int = 2
    """Epochs of TED stage 1 (filters and their task heads on the frozen model); TED's scripts reuse the
    model's fine-tuning epochs (6 on SST-2)."""
    stage1_lr: float | None = None
    """Peak learning rate of TED stage 1 (AdamW, no weight decay, linear decay to 0, no warmup, as TED's
    learn_filters script); null = finetune.lr, the model's own fine-tuning rate, as TED's scripts do."""
    student_filters: Literal["stage1", "teacher", "random"] = "stage1"
    """Student filter init: stage-1 training on the student, a copy of the teacher filter, or random."""

    def __post_init__(self) -> None:
        require(self.width is None or self.width > 0, f"ted.width={self.width}: filter width must be > 0")
        require(self.width_ratio is None or self.width_ratio > 0,
                 f"ted.width_ratio={self.width_ratio}: filter width must be > 0")
        require(self.width is None or self.width_ratio is None,
                 f"ted.width={self.width} and ted.width_ratio={self.width_ratio}: give one (set the other to null)")
        require(self.mlp_hidden is None or self.mlp_hidden > 0,
                 f"ted.mlp_hidden={self.mlp_hidden}: must be > 0")
        require(self.depth >= 2, f"ted.depth={self.depth}: an mlp filter has at least 2 layers")
        require(1 <= self.stage1_epochs <= MAX_EPOCHS,
                f"ted.stage1_epochs={self.stage1_epochs}: must be in 1..{MAX_EPOCHS}")
        require(self.stage1_lr is None or self.stage1_lr > 0, f"ted.stage1_lr={self.stage1_lr}: must be > 0")


@dataclass(frozen=True)
class RelationConfig:
    """Self-attention relation distillation (MiniLM, MiniLMv2, TinyBERT), on when distill.w_relation > 0."""

    kinds: str = "qq+kk+vv"
    """Relations compared, `+`-joined names of kdsearch.methods.relations.RELATIONS: qq+kk+vv (MiniLMv2), qk+vv (MiniLM:
    the attention distributions and value relations). One string, so that a search space can choose it."""
    heads: int | None = None
    """Relation heads R (must divide every compared projection width); None = the teacher's attention heads."""
    loss: str = "kl"
    """Relation loss registry key: kl (of the softmaxed relations: MiniLM, MiniLMv2) or mse (of the scores
    before softmax: TinyBERT's attention loss, with kinds=qk)."""
    layers: Literal["one", "map"] = "one"
    """one: student_layer <-> teacher_layer; map: every layer pair of distill.layer_map, embeddings aside
    (TinyBERT: forward), summed."""
    student_layer: int | None = None
    """Student layer (1..n_s) of layers=one; None = the last (MiniLM, MiniLMv2)."""
    teacher_layer: int | None = None
    """Teacher layer (1..n_t) of layers=one; None = the last (MiniLM; MiniLMv2 takes an upper-middle layer of
    large teachers)."""
    stack: Literal["encoder", "decoder", "cross", "all"] = "all"
    """Which attention an encoder-decoder teacher (T5, BART) compares: encoder (its encoder's self-attention),
    decoder (its decoder's, causal), cross (the decoder's cross-attention: qk relates target to source positions,
    qq target to target, kk and vv source to source), all (the three, summed). layers=one and student_layer /
    teacher_layer apply in each (default: each stack's last layer); layers=map pairs each stack's layers as the
    hidden term does. Any other model has one stack: all (or encoder) is its self-attention."""

    def __post_init__(self) -> None:
        require(all(self.names), f"relation.kinds={self.kinds!r}: name relations joined by + (e.g. qq+kk+vv)")
        require(self.heads is None or self.heads > 0, f"relation.heads={self.heads}: must be > 0")
        for key in ("student_layer", "teacher_layer"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"relation.{key}={value}: layers count from 1")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.kinds.split("+"))


@dataclass(frozen=True)
class UnitsConfig:
    ratio: float | None = None
    """Share of teacher units kept, in (0, 1]; None = d_s / d_t (Flex-KD's top-d_s)."""
    score: Literal["grad", "grad_x_act"] = "grad"
    """Relevance: mean |dL/dh| or mean |dL/dh * h| over task tokens."""
    scope: Literal["own", "last"] = "own"
    """Rank units per matched teacher layer, or use the last layer's ranking everywhere."""
    aggregate: UnitAggregate = "mean_abs"
    """How per-token relevances become a unit's score over the task data: mean of magnitudes, magnitude of the
    mean (signed effects cancel: the first-order estimate of the loss change without the unit), or root mean
    square (Fisher-like). Flex-KD leaves it open."""
    score_batches: int = 8
    """Training batches (of train.batch_size) the relevance scores are averaged over."""

    def __post_init__(self) -> None:
        require(self.ratio is None or 0 < self.ratio <= 1, f"units.ratio={self.ratio}: must be in (0, 1]")
        require(self.score_batches >= 1, f"units.score_batches={self.score_batches}: must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    """Distillation epochs (ASHA's time axis in a search)."""
    batch_size: int = 32
    """Global batch: each of n data-parallel workers takes batch_size / n."""
    lr: float | None = None
    """Peak AdamW learning rate of the student (and its bridge), after warmup, decaying linearly to 0; null = 1e-3
    with a built-in tiny teacher, 2e-4 with a pretrained one (5e-4 for a random-init student)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Share of the optimiser steps spent warming the learning rate up from 0."""
    seed: int = 0
    """Seed of the student's init, batch order, dropout, random layer maps and TED stage 1 (not the teacher's)."""
    max_steps_per_epoch: int | None = None
    """Cap on optimiser steps per epoch (smoke runs); None = the whole split."""
    dropout: float | None = None
    """Student dropout (hidden and attention); None keeps the teacher config's."""
    grad_accum: int = 1
    """Micro-batches per optimiser step: each worker's share of batch_size runs as this many forward/backward
    passes (less activation memory, the same update)."""
    precision: Precision = "fp32"
    """Autocast precision of the teacher and student forward passes (training, evaluation, latency): `bf16` on
    Ampere or later GPUs (no loss scaling), `fp16` with a loss scaler on older GPUs; the loss math stays fp32."""
    teacher_cache: bool | None = None
    """Run the frozen teacher once over the training split and read its outputs back by row (cached by content,
    shared by every trial on the same teacher, data and precision) instead of a teacher forward every step; equal
    to the live pass. Encoder tasks only. null: on where it applies and the run reads at least as many rows as
    the cache holds (epochs x steps x batch_size >= training rows). Disk: tokens x (layers + 1) x d, plus tokens
    x 3 x d per relation layer with distill.w_relation > 0 (query, key, value: any relation.kinds). A hidden term
    that reads padding (distill.mask_padding=false, the T5/Qwen3 forms) gets the states at every position: rows
    x the longest row's tokens (under null: only up to 4 GB)."""

    def __post_init__(self) -> None:
        require(1 <= self.epochs <= MAX_EPOCHS, f"train.epochs={self.epochs}: must be in 1..{MAX_EPOCHS}")
        require(self.batch_size >= 1, f"train.batch_size={self.batch_size}: must be >= 1")
        require(self.grad_accum >= 1, f"train.grad_accum={self.grad_accum}: must be >= 1")
        require(self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
                 f"train.max_steps_per_epoch={self.max_steps_per_epoch}: must be >= 1 (or null for whole epochs)")
        require(self.lr is None or self.lr > 0, f"train.lr={self.lr}: must be > 0")
        require(0 <= self.warmup_ratio < 1, f"train.warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        require(self.dropout is None or 0 <= self.dropout < 1, f"train.dropout={self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """How generated outputs are scored (eval_exact_match, eval_chrf, eval_bleu, eval_rouge_l): an encoder-decoder's
    targets, or a causal LM's responses generated from the prompts; the teacher-forced eval_token_accuracy and
    eval_loss are scored every epoch whatever these say. Read only with a seq2seq task or prompt -> response rows."""

    num_beams: int = 1
    """Beams of `generate` on the validation split (batched, on the trial's device); 1 = greedy."""
    generate_every: int = 1
    """Generate every k epochs, and always after the last; 0 = after the last epoch only. A search that ranks by
    a generated metric needs 1: ASHA stops trials at any epoch and ranks them by what that epoch reported."""

    def __post_init__(self) -> None:
        require(self.num_beams >= 1, f"eval.num_beams={self.num_beams}: must be >= 1 (1 = greedy)")
        require(self.generate_every >= 0,
                f"eval.generate_every={self.generate_every}: must be >= 0 (0 = after the last epoch only)")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of a teacher that has not seen the task yet (cached by content)."""

    mode: Literal["auto", "always", "never"] = "auto"
    """auto: fine-tune when the task head was not in the checkpoint (or the teacher is built in code); always:
    fine-tune even a checkpoint with a task head; never: use the checkpoint as it is."""
    epochs: int | None = None
    """Fine-tuning epochs; null = 10 for a built-in tiny teacher (~85% on the default task, ~30 s on 2 CPU cores),
    3 for a pretrained checkpoint."""
    lr: float | None = None
    """Fine-tuning learning rate (AdamW, linear decay); null = 1e-3 for a built-in tiny teacher trained from
    scratch, 1e-4 for a pretrained checkpoint (1e-3 collapses MiniLM to the majority class)."""
    batch_size: int = 32
    """Fine-tuning batch size."""
    seed: int = 0
    """Seed of the teacher's fine-tune, apart from train.seed: students of every seed share one teacher."""
    require_better: bool = False
    """Stop before distilling when the fine-tuned teacher does not beat the majority-class (regression: mean)
    baseline on the validation split by finetune.margin; false = a warning line only."""
    margin: float = 0.02
    """How far (in eval_score) the teacher must clear that baseline not to be called weak."""

    def __post_init__(self) -> None:
        require(self.epochs is None or 1 <= self.epochs <= MAX_EPOCHS,
                f"finetune.epochs={self.epochs}: must be in 1..{MAX_EPOCHS}")
        require(self.batch_size >= 1, f"finetune.batch_size={self.batch_size}: must be >= 1")
        require(self.lr is None or self.lr > 0, f"finetune.lr={self.lr}: must be > 0")
        require(self.margin >= 0, f"finetune.margin={self.margin}: must be >= 0")


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    """Ray Train data-parallel workers per run (per trial)."""
    cpus_per_trial: float = 1.0
    """CPUs of one run (one trial) in all, split evenly over its num_workers."""
    gpus_per_trial: float = 0.0
    """GPUs of one run in all, split over its workers (0.25 = four 1-worker trials share a GPU); > 0 uses CUDA."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, f"resources.num_workers={self.num_workers}: must be >= 1")
        require(self.cpus_per_trial > 0, f"resources.cpus_per_trial={self.cpus_per_trial}: must be > 0")
        require(self.gpus_per_trial >= 0, f"resources.gpus_per_trial={self.gpus_per_trial}: must be >= 0")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_trial > 0


@dataclass(frozen=True)
class Config:
    teacher: str = "tiny-bert"
    """A built-in tiny model (tiny-bert, tiny-roberta, tiny-deberta, tiny-gpt2, tiny-qwen; encoder-decoders
    tiny-t5, tiny-bart), `minilm`, a hub name or a local path."""
    student: StudentConfig = field(default_factory=StudentConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ted: TedConfig = field(default_factory=TedConfig)
    units: UnitsConfig = field(default_factory=UnitsConfig)
    relation: RelationConfig = field(default_factory=RelationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    output_dir: str = "outputs/train"
    """Where `kdsearch.train` writes `student/` (and `ray/`, its Train storage unless storage_path is set)."""
    cache_dir: str = ".kdsearch_cache"
    """Content-addressed store for fine-tuned teachers, TED stage-1 filters, Flex-KD scores, tokenised data."""
    storage_path: str | None = None
    """Ray Train/Tune storage (local path, s3:// or gs://; shared by every node on a cluster); None =
    <output_dir>/ray for kdsearch.train, <results_dir>/ray for searches and reports."""

    def __post_init__(self) -> None:
        """Rates left null take the teacher's defaults here, so that every run, MLflow param and export reads
        the value in use."""
        ft_lr, ft_epochs, lr = teacher_rates(self.teacher, self.student.init)
        ft, tr = self.finetune, self.train
        if ft.lr is None or ft.epochs is None:
            object.__setattr__(self, "finetune", dataclasses.replace(ft, lr=ft.lr or ft_lr,
                                                                     epochs=ft.epochs or ft_epochs))
        if tr.lr is None:
            object.__setattr__(self, "train", dataclasses.replace(tr, lr=lr))



