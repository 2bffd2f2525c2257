"""Complete check of a run config against the registries, the task files and the real teacher's shape.

Runs before Ray starts; every problem is one ConfigError line naming the key to fix. Reads only the teacher's
config (no weights; a relation term's projections are looked up on the architecture built on the meta device)
and the task files' headers. No Ray, Optuna or MLflow.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PretrainedConfig

from kdsearch.config.paths import check_local_dirs
from kdsearch.config.schema import Config, EvalConfig
from kdsearch.core.errors import ConfigError
from kdsearch.data import hub
from kdsearch.data.loading import check_task
from kdsearch.data.metrics import generation_metric_names
from kdsearch.data.tasks import TaskSpec, read_by
from kdsearch.methods.bridges import BRIDGES, bridge_method
from kdsearch.methods.layer_maps import LAYER_MAPS, check_map_args
from kdsearch.methods.losses import DISTANCES, LOGIT_LOSSES, RELATION_LOSSES
from kdsearch.methods.relations import RELATIONS, check_relation
from kdsearch.run import teacher_cache
from kdsearch.run.models import (
    decoder_depth,
    depth_width,
    family_of,
    max_positions,
    resolve_teacher,
    student_config,
    student_width,
    teacher_config,
)


def check_names(cfg: Config) -> None:
    """Every strategy name the config gives is in its registry."""
    LAYER_MAPS.check(cfg.distill.layer_map, key="distill.layer_map")
    DISTANCES.check(cfg.distill.distance, key="distill.distance")
    LOGIT_LOSSES.check(cfg.distill.logit_loss, key="distill.logit_loss")
    if cfg.distill.bridge != "auto":
        BRIDGES.check(cfg.distill.bridge, key="distill.bridge")
    for name in BRIDGES:  # every config carries every bridge's section, and a space may search it
        BRIDGES.get(name).check_names(cfg)
    for kind in cfg.relation.names:
        RELATIONS.check(kind, key="relation.kinds")
    RELATION_LOSSES.check(cfg.relation.loss, key="relation.loss")


def _student_width_key(cfg: Config, d_s: int) -> str:
    """The student's width as the user set it, for messages."""
    ratio = cfg.student.width_ratio
    return f"student.width_ratio={ratio} gives {d_s}" if ratio is not None else f"student.hidden_size={d_s}"


def _check_shapes(cfg: Config, teacher: PretrainedConfig) -> None:
    (n_t, d_t), d_s = depth_width(teacher), student_width(teacher, cfg.student)
    if cfg.student.layers > n_t and cfg.student.init == "teacher":
        raise ConfigError(f"student.layers={cfg.student.layers} is deeper than the teacher ({n_t} layers): "
                          "use fewer layers or student.init=random")
    if d_s > d_t:
        raise ConfigError(f"{_student_width_key(cfg, d_s)} is wider than the teacher ({d_t}): a student must not "
                          "be wider")
    if d_s != d_t and cfg.student.init == "teacher":
        raise ConfigError(f"student.init=teacher copies teacher weights, which needs the teacher's width {d_t} "
                          f"({_student_width_key(cfg, d_s)}); use student.init=random")
    if cfg.distill.w_hidden > 0:
        check_map_args(cfg.distill.layer_map, cfg.student.layers, n_t, cfg.distill.layers)
    bridge_method(cfg, d_s, d_t).check(cfg, d_s, d_t)
    if cfg.distill.w_task == 0 and cfg.distill.w_logit == 0 and cfg.distill.w_relation == 0 and (
            cfg.distill.w_hidden == 0 or cfg.distill.layer_map == "none"):
        raise ConfigError("every loss weight is 0 (distill.w_task, distill.w_logit, distill.w_hidden, "
                          "distill.w_relation): nothing would be trained")


def _check_seq2seq(cfg: Config, teacher: PretrainedConfig, spec: TaskSpec) -> None:
    """Teacher family and task kind agree on encoder-decoders; what seq2seq does not run yet is refused."""
    seq2seq = family_of(teacher) == "seq2seq"
    if cfg.student.decoder_layers is not None and not seq2seq:
        raise ConfigError(f"student.decoder_layers={cfg.student.decoder_layers}: read only with an encoder-decoder "
                          f"teacher (tiny-t5, tiny-bart, a T5 or BART checkpoint); teacher={cfg.teacher} is "
                          f"{'an encoder' if family_of(teacher) == 'encoder' else 'a causal LM'}; leave it null")
    if seq2seq and spec.kind != "seq2seq":
        raise ConfigError(f"task.name={spec.name} is a {spec.kind} task but teacher={cfg.teacher} is an "
                          "encoder-decoder, which writes a target from a source: use task.name=seq2seq_default or "
                          "task.name=seq2seq (your files), or an encoder or causal teacher")
    if spec.kind == "seq2seq" and not seq2seq:
        raise ConfigError(f"task.name={spec.name} is a seq2seq task (source -> target), which needs an "
                          f"encoder-decoder teacher (tiny-t5, tiny-bart, a T5 or BART checkpoint); teacher="
                          f"{cfg.teacher} is {'an encoder' if family_of(teacher) == 'encoder' else 'a causal LM'}")
    if not seq2seq:
        return
    n_t = depth_width(teacher)[0]
    n_dec_t, n_dec_s = decoder_depth(teacher) or n_t, cfg.student.decoder_layers or cfg.student.layers
    if n_dec_s > n_dec_t and cfg.student.init == "teacher":
        raise ConfigError(f"student.decoder_layers={n_dec_s} is deeper than the teacher's decoder ({n_dec_t} "
                          "layers): use fewer layers or student.init=random")
    if cfg.distill.w_hidden > 0:
        check_map_args(cfg.distill.layer_map, n_dec_s, n_dec_t, cfg.distill.layers)


def check_generation(cfg: Config, model: PretrainedConfig, spec: TaskSpec, *, who: str) -> None:
    """eval.* are read only where outputs are generated: seq2seq targets, causal responses to prompts. `model`:
    the config of the model that would generate (a run's teacher, an evaluated model), named by `who`
    (teacher=..., model=...) in the message."""
    given = [f"eval.{k}={v}" for k, v in vars(cfg.eval).items() if v != getattr(EvalConfig(), k)]
    family = family_of(model)
    if not given or generation_metric_names(read_by(spec, family)):
        return
    why = (f"{who} is an encoder" if family == "encoder" else
           f"task.name={spec.name} holds raw text (a 'text' or 'sentence' column), no prompt -> response rows")
    raise ConfigError(f"{given[0]}: read only where outputs are generated (an encoder-decoder teacher on a seq2seq "
                      f"task, or a causal LM on prompt -> response rows); {why}: leave eval.* at its defaults")


def _check_qa(cfg: Config, teacher: PretrainedConfig, spec: TaskSpec) -> None:
    """An extractive QA task needs an encoder teacher whose tokenizer is a fast one (offsets map answers to
    tokens)."""
    family = family_of(teacher)
    if family != "encoder":
        what = "a causal LM" if family == "causal" else "an encoder-decoder"
        raise ConfigError(f"task.name={spec.name} is an extractive QA task (an answer span in the context), which "
                          f"needs an encoder teacher (tiny-bert, tiny-roberta, tiny-deberta, a BERT-like "
                          f"checkpoint); teacher={cfg.teacher} is {what}")
    source = resolve_teacher(cfg.teacher)
    if source.builtin or source.location is None:
        return  # the built-in teachers train a fast tokenizer
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except (OSError, ValueError):
        return  # not readable here (a hub id not cached): loading it later says why
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"teacher={cfg.teacher}: its tokenizer ({type(tokenizer).__name__}) is a slow one; "
                          "extractive QA needs a fast tokenizer (offset mapping): give a model folder with a "
                          "tokenizer.json")


def validate(cfg: Config) -> TaskSpec:
    """Raise ConfigError (one line) for anything that would fail later; else the task as the teacher reads it."""
    check_names(cfg)
    source = resolve_teacher(cfg.teacher)
    try:
        teacher = teacher_config(source)
    except OSError as err:
        raise ConfigError(f"teacher={cfg.teacher}: cannot load its config ({str(err).splitlines()[0]})") from None
    spec = check_task(cfg.task)
    local = cfg.task.hub is not None and Path(cfg.task.hub).expanduser().is_dir()  # a saved copy: no network
    if cfg.task.hub is not None and not local and not hub.offline() and (why := hub.unreachable()):
        raise ConfigError(f"task.hub={cfg.task.hub}: {why}; set HF_DATASETS_OFFLINE=1 to read it from the datasets "
                          "cache, or give task.data_dir=<folder with its files>")
    check_local_dirs(cfg)
    if spec.kind == "extractive_qa":
        _check_qa(cfg, teacher, spec)
    _check_seq2seq(cfg, teacher, spec)
    if family_of(teacher) == "encoder" and spec.kind == "causal_lm":
        raise ConfigError(f"task.name={spec.name} is a causal-LM task but teacher={cfg.teacher} is an encoder")
    if family_of(teacher) == "causal" and spec.kind == "regression":
        raise ConfigError(f"task.name={spec.name} is a regression task (one score per input), which needs an "
                          f"encoder teacher; teacher={cfg.teacher} is a causal LM")
    check_generation(cfg, teacher, spec, who=f"teacher={cfg.teacher}")
    _check_shapes(cfg, teacher)
    positions = max_positions(teacher)
    if positions is not None and cfg.task.max_length > positions:
        raise ConfigError(f"task.max_length={cfg.task.max_length} is longer than teacher={cfg.teacher} reads "
                          f"({positions} positions): use task.max_length <= {positions}")
    shares = cfg.resources.num_workers * cfg.train.grad_accum
    if cfg.train.batch_size % shares:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} does not split evenly over "
                          f"resources.num_workers={cfg.resources.num_workers} x train.grad_accum="
                          f"{cfg.train.grad_accum} micro-batches: use a multiple of {shares}")
    if cfg.train.teacher_cache and (why := teacher_cache.blocker(read_by(spec, family_of(teacher)).kind)):
        raise ConfigError(f"train.teacher_cache=true: {why}; set train.teacher_cache=false (or null: on where it "
                          "applies)")
    if cfg.distill.w_relation > 0:
        check_relation(cfg, teacher, student_config(teacher, layers=cfg.student.layers,
                                                    hidden_size=student_width(teacher, cfg.student),
                                                    decoder_layers=cfg.student.decoder_layers))
    if cfg.train.precision == "fp16" and not cfg.resources.use_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU (resources.gpus_per_trial > 0); on CPU use bf16 or fp32")
    return read_by(spec, family_of(teacher))
