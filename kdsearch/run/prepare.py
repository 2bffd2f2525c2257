"""Shared preparation before distillation, every artifact content-addressed in the cache so later runs reuse it.

Order: task data -> tokenizer -> tokenised data (Arrow) -> fine-tuned teacher -> what the run's bridge prepares
(TED stage-1 filters, Flex-KD unit scores) -> cached teacher outputs. Runs once per run/trial in the driver
process, before any Train worker starts; workers only load the finished artifacts. Plain PyTorch +
transformers; no Ray, Optuna or MLflow.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from kdsearch.config.parse import flatten
from kdsearch.config.schema import Config
from kdsearch.core.cache import Store, content_key, file_digest
from kdsearch.core.errors import ConfigError
from kdsearch.data.encoding import tokenize_task, train_texts
from kdsearch.data.loading import load_raw_task
from kdsearch.data.metrics import baseline_score
from kdsearch.data.tasks import TaskSpec, read_by
from kdsearch.methods.bridges import bridge_method
from kdsearch.methods.inputs import model_inputs, output_logits
from kdsearch.methods.layer_maps import run_pairs
from kdsearch.methods.losses import task_loss
from kdsearch.methods.relations import Tap, resolve_relations
from kdsearch.run import models, teacher_cache
from kdsearch.run.evaluation import evaluate, make_loader


@dataclass(frozen=True)
class Prepared:
    """Everything a worker needs besides the config; small and picklable (paths and a dataset handle)."""

    spec: TaskSpec
    family: models.Family
    teacher_dir: str  # fine-tuned teacher + tokenizer (save_pretrained)
    data: Any  # tokenised DatasetDict (train, validation)
    pad_id: int
    n_teacher: int
    d_teacher: int
    teacher_metrics: dict[str, float]
    n_teacher_decoder: int | None = None  # an encoder-decoder teacher's decoder depth
    bridge_artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> safetensors the
    # run's bridge prepared (TED: teacher_filters, student_filters; Flex-KD: unit_scores; an encoder-decoder's
    # decoder ones as decoder_<name>)
    teacher_outputs: str | None = None  # directory of the cached teacher outputs (kdsearch.run.teacher_cache)
    teacher_projections: str | None = None  # directory of the cached projections the relation term reads
    student_dir: str | None = None  # the fine-tuned initial student (student.finetune), save_pretrained

    def load_artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: load_file(path) for name, path in self.bridge_artifacts.items()}


def _log(message: str) -> None:
    print(f"[kdsearch.prepare] {message}", flush=True)


def _artifact(store: Store, kind: str, key: str, build: Callable[[Path], None], *, cached_only: bool,
              meta: dict[str, Any] | None = None) -> Path:
    """store.get_or_build, or with `cached_only` the finished artifact or a ConfigError: a tokenizer or teacher
    built anew would not be the one an earlier run distilled from (WordPiece training is not bit-reproducible)."""
    if not cached_only:
        return store.get_or_build(kind, key, build, meta=meta)
    found = store.find(kind, key)
    if found is None:
        raise ConfigError(f"cache_dir={store.root}: no {kind} for this teacher and task there ({kind}/{key}); "
                          "pass the cache_dir= of the run that distilled the student")
    return found


def _tokenizer(source: models.TeacherSource, raw: Any, spec: TaskSpec, store: Store, cached_only: bool) -> Any:
    if not source.builtin:
        assert source.location is not None
        tok = AutoTokenizer.from_pretrained(source.location)
    else:
        config = models.teacher_config(source)
        family = models.family_of(config)
        key = content_key(kind="words+chars", family=family, task=spec.name, data=raw["train"]._fingerprint,
                          loads_as=config.model_type)

        def build(out: Path) -> None:
            models.train_tokenizer(train_texts(raw, spec), family=family).save_pretrained(out)
            # Beside a config, AutoTokenizer picks the model type's tokenizer class (Qwen2's re-splits the text
            # its own way), as it will in the teacher's folder and in every exported student's: with the config
            # here too, training reads the text exactly as any later load of an export does.
            config.save_pretrained(out)

        tok = AutoTokenizer.from_pretrained(_artifact(store, "tokenizer", key, build, cached_only=cached_only))
    if tok.pad_token is None:  # GPT-2-like tokenizers ship without one
        tok.pad_token = tok.eos_token
    return tok


def fit_task(model: torch.nn.Module, data: Any, *, spec: TaskSpec, cfg: Config, pad_id: int,
             device: torch.device, label: str = "teacher") -> dict[str, float]:
    """Fine-tune `model` on the task (AdamW, linear decay); returns its evaluation metrics."""
    ft = cfg.finetune
    assert ft.lr is not None and ft.epochs is not None  # Config resolved them for its teacher
    model.to(device).train()
    loader = make_loader(data["train"], batch_size=ft.batch_size, shuffle=True, seed=ft.seed, pad_id=pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=ft.lr, weight_decay=0.01)
    total = ft.epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / total))
    for epoch in range(ft.epochs):
        model.train()
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**model_inputs(batch))
            loss = task_loss(output_logits(out), batch["labels"], kind=spec.kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        metrics = evaluate(model, data["validation"], spec=spec, pad_id=pad_id, device=device)
        _log(f"{label} fine-tune epoch {epoch + 1}/{ft.epochs}: eval_score={metrics['eval_score']:.4f}")
    return metrics


def _teacher(cfg: Config, source: models.TeacherSource, tok: Any, data: Any, spec: TaskSpec,
             store: Store, device: torch.device, cached_only: bool) -> Path:
    family = models.family_of(models.teacher_config(source))
    weights = file_digest(source.location) if source.location and Path(source.location).is_dir() else source.name
    key = content_key(teacher=source.name, weights=weights, data=data["train"]._fingerprint,
                      vocab=len(tok), finetune=flatten(cfg.finetune), task=spec.name)

    def build(out: Path) -> None:
        torch.manual_seed(cfg.finetune.seed)
        if source.builtin:
            config = models.with_task_head(models.teacher_config(source, vocab_size=len(tok)), spec)
            model, has_head = models.task_model_class(family, config).from_config(config), False
        else:
            assert source.location is not None
            model, has_head = models.load_pretrained(source.location, spec=spec, family=family)
        mode = cfg.finetune.mode
        if mode == "always" or (mode == "auto" and not has_head):
            _log(f"fine-tuning teacher {source.name} on {spec.name} (cached as teacher/{key})")
            metrics = fit_task(model, data, spec=spec, cfg=cfg, pad_id=tok.pad_token_id, device=device)
        else:
            metrics = evaluate(model.to(device), data["validation"], spec=spec, pad_id=tok.pad_token_id, device=device)
        model.cpu().save_pretrained(out)
        tok.save_pretrained(out)
        (out / _metrics_file(data["validation"])).write_text(json.dumps(metrics))

    return _artifact(store, "teacher", key, build, cached_only=cached_only,
                     meta={"teacher": source.name, "task": spec.name})


def _metrics_file(validation: Any) -> str:
    return f"metrics-{validation._fingerprint}.json"


def _teacher_metrics(teacher_dir: Path, validation: Any, *, spec: TaskSpec, family: models.Family, pad_id: int,
                     device: torch.device) -> dict[str, float]:
    """The fine-tuned teacher's scores on this validation split, kept beside it. Its key names the training
    split only (fine-tuning never reads the validation split), so another validation split reuses the teacher
    and has it scored once more."""
    path = teacher_dir / _metrics_file(validation)
    if path.is_file():
        return json.loads(path.read_text())
    model: torch.nn.Module = models.load_task_model(str(teacher_dir), family)
    metrics = evaluate(model.to(device), validation, spec=spec, pad_id=pad_id, device=device)
    try:  # write aside, then rename: trials scoring it at once each write a whole file
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(metrics))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: scored again next time
    return metrics


def _labels(split: Any) -> np.ndarray:
    """Every label of a tokenised split, flattened (a causal LM's are per token, of uneven lengths)."""
    column = split["labels"]
    return np.fromiter(itertools.chain.from_iterable(column), dtype=np.int64) if column and isinstance(
        column[0], list) else np.asarray(column)


def check_teacher(cfg: Config, prepared: Prepared) -> None:
    """Warn (finetune.require_better: refuse) when the teacher does not clear the constant-answer baseline: every
    trial would then distil a teacher that knows nothing of the task. Called once, by the command, before any
    trial or Train worker starts."""
    spec, data, score = prepared.spec, prepared.data, prepared.teacher_metrics["eval_score"]
    baseline = baseline_score(spec, _labels(data["train"]), _labels(data["validation"]))
    if score >= baseline + cfg.finetune.margin:
        return
    what = "the mean" if spec.kind == "regression" else "the majority class"
    line = (f"teacher={cfg.teacher} scores {score:.4f} on the validation split, {what} {baseline:.4f}: it has "
            f"learnt next to nothing of {spec.name}; try more finetune.epochs, another finetune.lr or another teacher")
    if cfg.finetune.require_better:
        raise ConfigError(f"finetune.require_better=true: {line}")
    _log(f"warning: {line} (finetune.require_better=true stops here)")


def load_teacher(prepared: Prepared, device: torch.device) -> Any:
    model: torch.nn.Module = models.load_task_model(prepared.teacher_dir, prepared.family)
    return models.freeze(model.to(device))


def make_student(cfg: Config, teacher: Any, fine_tuned: str | None = None) -> torch.nn.Module:
    """The run's initial student; deterministic in cfg, so stage 1 and every worker build the same one.
    `fine_tuned`: the directory of that student fine-tuned on the task (Prepared.student_dir), loaded instead."""
    if fine_tuned is not None:
        return models.load_task_model(fine_tuned, models.family_of(teacher.config))
    return models.build_student(teacher, layers=cfg.student.layers,
                                hidden_size=models.student_width(teacher.config, cfg.student),
                                init=cfg.student.init, seed=cfg.train.seed, dropout=cfg.train.dropout,
                                copy_head=cfg.student.copy_head, decoder_layers=cfg.student.decoder_layers)


def _fine_tuned_student(cfg: Config, prepared: Prepared, store: Store, device: torch.device) -> str:
    """The initial student fine-tuned on the task with the finetune.* settings (student.finetune), seeded by the
    run's train.seed: the teacher's fine-tune is shared by every seed, the student's is part of each seed's run."""
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, seed=cfg.train.seed))
    key = content_key(teacher=prepared.teacher_dir, student=flatten(cfg.student), seed=cfg.train.seed,
                      dropout=cfg.train.dropout, finetune=flatten(cfg.finetune))

    def build(out: Path) -> None:
        student: Any = make_student(cfg, load_teacher(prepared, device))
        torch.manual_seed(cfg.train.seed)
        _log(f"fine-tuning the initial student on {prepared.spec.name} (cached as student/{key})")
        fit_task(student, prepared.data, spec=prepared.spec, cfg=cfg, pad_id=prepared.pad_id, device=device,
                 label="student")
        student.cpu().save_pretrained(out)

    path = store.get_or_build("student", key, build)
    _log(f"distilling from the fine-tuned student (student/{key})")
    return str(path)


def decoder_pairs(cfg: Config, prepared: Prepared, *, epoch: int) -> list[tuple[int, int]]:
    """An encoder-decoder's decoder pairs (the same layer map on its decoder); none for other models."""
    if prepared.n_teacher_decoder is None:
        return []
    return run_pairs(cfg, prepared.n_teacher_decoder, epoch=epoch, stack="decoder")


@dataclass
class _BridgeContext:
    """bridges.PrepareContext for one run: the teacher, the student and the batches made on first use."""

    cfg: Config
    prepared: Prepared
    pairs: list[tuple[int, int]]
    decoder_pairs: list[tuple[int, int]]
    store: Store
    device: torch.device

    def __post_init__(self) -> None:
        spec, teacher = self.prepared.spec, AutoConfig.from_pretrained(self.prepared.teacher_dir)
        self.kind, self.num_labels = spec.kind, spec.num_labels
        self.d_teacher, self.d_student = self.prepared.d_teacher, models.student_width(teacher, self.cfg.student)
        self.teacher_dir, self.student_dir = self.prepared.teacher_dir, self.prepared.student_dir
        self._teacher: Any = None

    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher = load_teacher(self.prepared, self.device)
        return self._teacher

    def student(self) -> Any:
        return models.freeze(make_student(self.cfg, self.teacher(), self.student_dir).to(self.device))

    def batches(self) -> Any:
        return make_loader(self.prepared.data["train"], batch_size=self.cfg.train.batch_size, shuffle=True,
                           seed=self.cfg.train.seed, pad_id=self.prepared.pad_id)

    def cached(self, kind: str, key: str, build: Callable[[Path], None]) -> Path:
        return self.store.get_or_build(kind, key, build)

    def log(self, message: str) -> None:
        _log(message)


def _teacher_outputs(cfg: Config, prepared: Prepared, store: Store, device: torch.device,
                     tap: Tap | None = None) -> str:
    """The cached logits and hidden states, or with `tap` the cached projections of its layers (kept apart, so
    every relation setting shares the one copy of the hidden states)."""
    train = prepared.data["train"]
    padded = tap is None and teacher_cache.reads_padding(cfg)
    key = content_key(teacher=prepared.teacher_dir, precision=cfg.train.precision, device=device.type,
                      data=[file_digest(f["filename"]) for f in train.cache_files],
                      **({"tap_layers": list(tap.layers)} if tap else {}), **({"padded": True} if padded else {}))

    def build(out: Path) -> None:
        if padded and cfg.train.teacher_cache:  # asked for: the null default already kept it under 4 GB
            teacher_cache.check_room(teacher_cache.padded_bytes(train, prepared.n_teacher, prepared.d_teacher,
                                                                cfg.train.precision), shutil.disk_usage(out).free)
        what = f"attention projections of layers {list(tap.layers)}" if tap else "outputs"
        _log(f"caching the teacher's {what}{' at every position' if padded else ''} over {len(train)} training rows")
        teacher_cache.build(load_teacher(prepared, device), train, out, pad_id=prepared.pad_id,
                            precision=cfg.train.precision, device=device, tap=tap, padded=padded)

    return str(store.get_or_build("teacher_projections" if tap else "teacher_outputs", key, build))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_teacher(cfg: Config, *, device: torch.device | None = None, cached_only: bool = False) -> Prepared:
    """The task data, tokenised, and the fine-tuned teacher: what every strategy shares (no bridge artifacts).
    `cached_only`: the tokenizer and teacher an earlier run built, or a ConfigError; never build them."""
    device = device or _default_device()
    store = Store(cfg.cache_dir)
    spec, raw = load_raw_task(cfg.task, cache_dir=cfg.cache_dir)
    source = models.resolve_teacher(cfg.teacher)
    config = models.teacher_config(source)
    family = models.family_of(config)
    tok = _tokenizer(source, raw, spec, store, cached_only)
    data = tokenize_task(raw, spec, tok, max_length=cfg.task.max_length, cache_dir=cfg.cache_dir, family=family,
                         segments=models.uses_segments(config),
                         decoder_start=getattr(config, "decoder_start_token_id", None) if family == "seq2seq" else None,
                         stride=cfg.task.doc_stride)
    spec = read_by(spec, family)
    teacher_dir = _teacher(cfg, source, tok, data, spec, store, device, cached_only)
    trained = AutoConfig.from_pretrained(teacher_dir)
    n_t, d_t = models.depth_width(trained)
    metrics = _teacher_metrics(teacher_dir, data["validation"], spec=spec, family=family, pad_id=tok.pad_token_id,
                               device=device)
    return Prepared(spec=spec, family=family, teacher_dir=str(teacher_dir), data=data,
                    pad_id=tok.pad_token_id, n_teacher=n_t, d_teacher=d_t, teacher_metrics=metrics,
                    n_teacher_decoder=models.decoder_depth(trained))


def prepare(cfg: Config, *, device: torch.device | None = None) -> Prepared:
    """`prepare_teacher` plus the run's strategy artifacts: what its bridge prepares (TED stage-1 filters,
    Flex-KD unit scores), the cached teacher outputs."""
    device = device or _default_device()
    store = Store(cfg.cache_dir)
    prepared = prepare_teacher(cfg, device=device)
    if cfg.student.finetune:  # before stage 1, which reads the student it starts from
        prepared = dataclasses.replace(prepared, student_dir=_fine_tuned_student(cfg, prepared, store, device))
    teacher = AutoConfig.from_pretrained(prepared.teacher_dir)
    method = bridge_method(cfg, models.student_width(teacher, cfg.student), prepared.d_teacher)
    # No hidden pairs (w_hidden = 0, layer_map=none): nothing for the bridge to prepare.
    pairs, dec_pairs = run_pairs(cfg, prepared.n_teacher), decoder_pairs(cfg, prepared, epoch=0)
    extra: dict[str, Any] = {}
    if method.prepare is not None and (pairs or dec_pairs):
        extra["bridge_artifacts"] = method.prepare(_BridgeContext(cfg, prepared, pairs, dec_pairs, store, device))
    train = prepared.data["train"]
    size = teacher_cache.padded_bytes(train, prepared.n_teacher, prepared.d_teacher, cfg.train.precision) if (
        teacher_cache.reads_padding(cfg)) else 0
    if teacher_cache.enabled(cfg, prepared.spec.kind, len(train), size):
        extra["teacher_outputs"] = _teacher_outputs(cfg, prepared, store, device)
        relations = resolve_relations(cfg, teacher)  # one (the encoder's): encoder-decoders are not cached
        if relations:  # every projection of the relation's teacher layers: one cache for any relation.kinds
            tap = Tap(relations[0].teacher.layers, frozenset(("query", "key", "value")))
            extra["teacher_projections"] = _teacher_outputs(cfg, prepared, store, device, tap)
    return dataclasses.replace(prepared, **extra)
