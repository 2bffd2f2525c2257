"""`python -m kdsearch.evaluate model=<dir> split=test`: score a saved student on a labelled split.

A search picks its best trial by the validation score, so that score is biased upward by the selection
itself; a held-out test split gives the figure to quote. Reads an exported best student (its
`kdsearch_config.yaml` supplies the task) or any Hugging Face task model on the teacher's tokenizer, optionally
beside the fine-tuned teacher, and logs one MLflow analysis run. No Ray or Optuna.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoTokenizer

from kdsearch.config.command import Command, parse_settings, run_command
from kdsearch.config.overrides import CONFIG_FILE, load_config, read_config_file
from kdsearch.config.paths import check_local_dirs, check_writable, output_uri, with_absolute_paths
from kdsearch.config.schema import Config
from kdsearch.core.console import render_text
from kdsearch.core.errors import ConfigError
from kdsearch.data import hub
from kdsearch.data.encoding import tokenize_task
from kdsearch.data.loading import Split, check_task, load_raw_task
from kdsearch.data.metrics import generation_metric_names
from kdsearch.data.tasks import TaskSpec, read_by
from kdsearch.run import models
from kdsearch.run.evaluation import evaluate, evaluate_generation, forward_latency_ms
from kdsearch.run.prepare import prepare_teacher
from kdsearch.run.validate import check_generation
from kdsearch.tracking import DEFAULT_EXPERIMENT, check_tracking_uri, default_uri, log_analysis_run

_DESCRIBES_MODEL = ("teacher", "student", "task", "finetune")
"""What `evaluate` reads from a model's kdsearch_config.yaml: the task it was distilled on and how its teacher
was fine-tuned (with_teacher finds that teacher in the cache by these keys)."""


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    model: str = dataclasses.field(default="", metadata={"shown": "<dir>"})
    """A saved Hugging Face task model with its tokenizer (e.g. <search>/best_student); read as an absolute path."""
    split: Literal["test", "validation"] = "test"
    """The labelled split to score: test (task.data_dir's test.tsv/.csv/.jsonl/.parquet, the hub's test split, or
    the default task's) or validation; the training split is no measure."""
    with_teacher: bool = False
    """Also score the fine-tuned teacher the student was distilled from, found in cache_dir (never rebuilt)."""
    out: str | None = dataclasses.field(default=None, metadata={"shown": "<file.json>"})
    """A new JSON file for the scores (default: printed only)."""
    uri: str | None = dataclasses.field(default=None, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    experiment: str = dataclasses.field(default=DEFAULT_EXPERIMENT, metadata={"key": "tracking.experiment"})
    """MLflow experiment."""


def parse_args(argv: Sequence[str]) -> tuple[EvalArgs, Config]:
    """key=value arguments -> (evaluation arguments, config); every error is one ConfigError line.

    The model's `kdsearch_config.yaml` (an exported student's) is read first, so the task is the one it was
    distilled on; overrides such as `task.data_dir=...` apply on top.
    """
    given, rest = parse_settings(EvalArgs, argv, config_keys=True)
    if not given.model:
        raise ConfigError("model=: give a saved student directory (python -m kdsearch.evaluate model=<dir>)")
    model = Path(given.model).expanduser().resolve()
    hub.check_model_dir(model, f"model={given.model}")
    out = _output_file(given.out) if given.out else None
    uri = output_uri(given.uri or default_uri())
    check_tracking_uri(uri)
    described = _model_description(model / CONFIG_FILE)
    cfg = with_absolute_paths(load_config(rest, base=described))
    check_local_dirs(cfg)
    if described:
        distilled_on = load_config(base=described).task.name
        if cfg.task.name != distilled_on:  # its head and tokenizer fit that task: scores elsewhere mean nothing
            raise ConfigError(f"task.name={cfg.task.name}: model={given.model} was distilled on task "
                              f"{distilled_on}; task.data_dir= or task.hub= may point at other files of it")
    # eval.* (beams) as a run reads them: refused where the model generates nothing, as kdsearch.train refuses
    check_generation(cfg, AutoConfig.from_pretrained(model), check_task(cfg.task, (given.split,)),
                     who=f"model={given.model}")
    return dataclasses.replace(given, model=str(model), out=str(out) if out else None, uri=uri), cfg


def _output_file(given: str) -> Path:
    """`out=`: a new JSON file; an existing one is another run's scores, kept unless the user removes it."""
    out = Path(given).expanduser()
    if out.is_dir():
        raise ConfigError(f"out={given}: a folder; give a file name such as {out / 'scores.json'}")
    if out.exists():
        raise ConfigError(f"out={given}: already exists; give a new file name (or remove it)")
    check_writable(out.parent, f"out={given}")
    return out


def _model_description(path: Path) -> dict[str, Any]:
    """The keys of an exported student's kdsearch_config.yaml that describe the model and its task.

    The file travels with the model (shared storage, a colleague's folder): its paths (cache_dir, output_dir,
    storage_path) and run settings are not this evaluation's to take, so only these keys are read.
    """
    if not path.is_file():
        return {}
    return {k: v for k, v in read_config_file(str(path)).items() if k in _DESCRIBES_MODEL}


def _check_head(model_dir: str, spec: TaskSpec, family: models.Family) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    if models.family_of(config) != family:
        raise ConfigError(f"model={model_dir}: a {models.family_of(config)} model, but the task reads "
                          f"{family} models")
    if (spec.kind == "extractive_qa") != models.answers_spans(config):
        raise ConfigError(f"model={model_dir}: {'not ' if spec.kind == 'extractive_qa' else ''}an extractive QA "
                          f"model (*ForQuestionAnswering), but task {spec.name} is a {spec.kind} task")
    if spec.kind not in ("causal_lm", "seq2seq") and config.num_labels != max(spec.num_labels, 1):
        raise ConfigError(f"model={model_dir}: its head has {config.num_labels} outputs; task {spec.name} "
                          f"needs {max(spec.num_labels, 1)}")


def score_model(model_dir: str, cfg: Config, split: Split, device: torch.device) -> dict[str, Any]:
    """Metrics ("eval_" prefixed), parameters and forward latency of the model at `model_dir` on `split`."""
    config = AutoConfig.from_pretrained(model_dir)
    family = models.family_of(config)
    spec, raw = load_raw_task(cfg.task, cache_dir=cfg.cache_dir, splits=(split,))
    _check_head(model_dir, read_by(spec, family), family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:  # GPT-2-like tokenizers ship without one
        tok.pad_token = tok.eos_token
    seq2seq = family == "seq2seq"
    data = tokenize_task(raw, spec, tok, max_length=cfg.task.max_length, cache_dir=cfg.cache_dir, family=family,
                         segments=models.uses_segments(config),
                         decoder_start=config.decoder_start_token_id if seq2seq else None,
                         stride=cfg.task.doc_stride)
    spec = read_by(spec, family)
    model: torch.nn.Module = models.load_task_model(model_dir, family)
    model = models.freeze(model.to(device))
    metrics = evaluate(model, data[split], spec=spec, pad_id=tok.pad_token_id, device=device)
    if generation_metric_names(spec):  # what it writes (greedy, or beams: eval.num_beams) against the references
        metrics |= evaluate_generation(model, data[split], tok, family=family, pad_id=tok.pad_token_id,
                                       device=device, num_beams=cfg.eval.num_beams)
    latency = forward_latency_ms(model, data[split], pad_id=tok.pad_token_id, device=device)
    return {**metrics, "rows": len(data[split]), "params": models.count_parameters(model), "latency_ms": latency}


def run_evaluation(args: EvalArgs, cfg: Config) -> tuple[dict[str, dict[str, Any]], str]:
    """Scores per model name ("student", and "teacher" with_teacher), logged as one MLflow run; (scores, run id)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_dir = None
    if args.with_teacher:  # found (or refused) before anything is scored
        try:
            teacher_dir = prepare_teacher(cfg, device=device, cached_only=True).teacher_dir
        except ConfigError as err:
            raise ConfigError(f"with_teacher=true: {err}") from None
    scores = {"student": score_model(args.model, cfg, args.split, device)}
    if teacher_dir is not None:
        scores["teacher"] = score_model(teacher_dir, cfg, args.split, device)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("x") as f:  # "x": never replace a file that appeared since the check
            generated = any("eval_bleu" in s for s in scores.values())
            f.write(json.dumps({"model": args.model, "teacher": cfg.teacher, "task": cfg.task.name,
                                "data": cfg.task.data_dir or cfg.task.hub, "split": args.split,
                                **({"eval.num_beams": cfg.eval.num_beams} if generated else {}),
                                "scores": scores}, indent=2))
    metrics = {f"{who}.{key}": float(v) for who, s in scores.items() for key, v in s.items()}
    params = {"analysis": "evaluate", "model": args.model, "split": args.split, "teacher": cfg.teacher,
              "task.name": cfg.task.name, "task.data_dir": cfg.task.data_dir, "task.hub": cfg.task.hub}
    run_id = log_analysis_run(uri=args.uri or default_uri(), experiment=args.experiment,
                              name=f"evaluate-{cfg.task.name}-{args.split}",
                              params=params, metrics=metrics, tags={"kdsearch.analysis": "evaluate"})
    return scores, run_id


def format_scores(scores: dict[str, dict[str, Any]]) -> str:
    """One row per model: every eval_ metric, then rows, parameters and latency."""
    found = [k for k in next(iter(scores.values())) if k.startswith("eval_")]
    names = ["eval_score", *(k for k in found if k not in ("eval_score", "eval_loss")), "eval_loss"]
    header = ["model", *(n.removeprefix("eval_") for n in names), "rows", "params", "latency ms"]
    rows = [[who, *(f"{s[n]:.4f}" for n in names), f"{s['rows']:,}", f"{s['params']:,}", f"{s['latency_ms']:.2f}"]
            for who, s in scores.items()]
    return render_text(header, rows)


def _evaluate(args: EvalArgs, cfg: Config) -> int:
    scores, run_id = run_evaluation(args, cfg)
    print(f"[kdsearch.evaluate] task {cfg.task.name}, {args.split} split")
    print(format_scores(scores))
    print(f"scores logged to MLflow run {run_id}" + (f" and written to {Path(args.out).resolve()}" if args.out else ""))
    return 0


COMMAND = Command(
    "evaluate", "Scores a saved student on a labelled split: the held-out test split by default, since the search "
    "chose its best\ntrial by the validation score. An exported best student's kdsearch_config.yaml names the task; "
    "overrides apply on top.", _evaluate, EvalArgs, usage="model=<student dir> [key=value ...]", parse=parse_args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    raise SystemExit(main())
