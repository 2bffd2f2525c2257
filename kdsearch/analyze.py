"""`python -m kdsearch.analyze angles ...`: the angle analysis of the layer-selection paper (papers.md section 2).

For every real token and a student layer l: u = h_t[1] - h_s[l], v = h_t[k] - h_s[l], cos = u.v / (|u||v| + 1e-6),
histogrammed per teacher layer k. Mostly acute angles (cos > 0) mean that pulling h_s[l] toward any teacher layer
moves it roughly the same way, which is why the layer map matters little (Yu, Wen, Mou 2025, arXiv 2502.04499).
An encoder-decoder (T5, BART) is analysed per stack, as its paper runs match each stack apart: the encoder's states
over the source's real tokens, the decoder's (both decoders teacher-forced on the gold target) over the target's.
Plain PyTorch and matplotlib; MLflow only through kdsearch.tracking; no Ray or Optuna.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdsearch.config.command import Command, parse_settings, run_command
from kdsearch.config.overrides import load_config
from kdsearch.config.paths import output_uri, with_absolute_paths
from kdsearch.config.schema import Config
from kdsearch.core.errors import ConfigError, require
from kdsearch.core.provenance import commit, hardware
from kdsearch.data import hub
from kdsearch.methods.bridges.base import Stack
from kdsearch.methods.inputs import model_inputs, stack_mask, stack_states
from kdsearch.run import models
from kdsearch.run.evaluation import EVAL_BATCH_SIZE, make_loader
from kdsearch.run.prepare import Prepared, load_teacher, make_student, prepare
from kdsearch.run.validate import validate
from kdsearch.tracking import DEFAULT_EXPERIMENT, default_uri, log_analysis_run

EPS = 1e-6
USAGE = "angles model=<HF student dir|init> [model_layers=[1,2]] [key=value ...]"


def angle_cosines(h_t1: Tensor, h_tk: Tensor, h_s: Tensor, mask: Tensor) -> Tensor:
    """Cosines of the angle at h_s between the directions to h_t[1] and to h_t[k], one per real token.

    h_t1, h_tk, h_s: (B, T, D) hidden states of equal width; mask: (B, T) attention mask (1 = real token).
    Returns (N,) for the N real tokens, in fp32. Yu et al. 2025 (arXiv 2502.04499), the angle analysis.
    """
    if not h_t1.shape == h_tk.shape == h_s.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(h_t1.shape)}, {tuple(h_tk.shape)}, "
                         f"{tuple(h_s.shape)}")
    u = h_t1.float() - h_s.float()  # (B, T, D)
    v = h_tk.float() - h_s.float()  # (B, T, D)
    cos = (u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1) + EPS)  # (B, T)
    return cos[mask.bool()]


@dataclasses.dataclass(frozen=True)
class AngleArgs:
    model: str = dataclasses.field(default="", metadata={"shown": "<dir>|init"})
    """A saved Hugging Face student (save_pretrained), or `init`: the student a run would start from."""
    model_layers: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"shown": "[1,2]"})
    """Student hidden_states indices l to analyse (1..n_s); default: every student layer. An encoder-decoder's:
    the same indices in both stacks, each within its own stack's depth (student.layers, student.decoder_layers)."""
    max_batches: int | None = None
    """Evaluation batches to read (default: all)."""
    out: str = "docs/results/angles"
    """Where the histograms (angles.png; an encoder-decoder's angles_encoder.png, angles_decoder.png) and the table
    (angles.json, angles.md) go."""
    uri: str | None = dataclasses.field(default=None, metadata={"key": "tracking.uri", "shown": "<uri>"})
    """MLflow store (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."""
    experiment: str = dataclasses.field(default=DEFAULT_EXPERIMENT, metadata={"key": "tracking.experiment"})
    """MLflow experiment."""


def parse_args(argv: Sequence[str]) -> tuple[AngleArgs, Config]:
    """`angles key=value ...` -> (analysis arguments, run config); every error is one ConfigError line."""
    if not argv or argv[0] != "angles":
        raise ConfigError(f"the first argument names the analysis; known: angles. usage: python -m kdsearch.analyze "
                          f"{USAGE}")
    given, rest = parse_settings(AngleArgs, argv[1:], config_keys=True)
    if not given.model:
        raise ConfigError("model=: give a Hugging Face student directory or `init` (python -m kdsearch.analyze "
                          f"{USAGE})")
    if given.model != "init":
        hub.check_model_dir(Path(given.model).expanduser(), f"model={given.model} (or model=init)")
    require(given.max_batches is None or given.max_batches >= 1,
            f"max_batches={given.max_batches}: must be a positive integer")
    cfg = with_absolute_paths(load_config(rest))
    model = given.model if given.model == "init" else str(Path(given.model).expanduser().resolve())
    return dataclasses.replace(given, model=model, uri=output_uri(given.uri or default_uri())), cfg


def check_shapes(args: AngleArgs, cfg: Config) -> dict[Stack, tuple[int, int]]:
    """stack -> (n_s, n_t), the encoder's (a single-stack model's) and an encoder-decoder's decoder's, before
    anything heavy loads; ConfigError on unequal widths, a student without the teacher's stacks, or layers out of
    range of a stack."""
    teacher = models.teacher_config(models.resolve_teacher(cfg.teacher))
    (n_t, d_t), n_dec_t = models.depth_width(teacher), models.decoder_depth(teacher)
    validate(cfg)
    if args.model == "init":
        n_s, d_s = cfg.student.layers, models.student_width(teacher, cfg.student)
        n_dec_s = None if n_dec_t is None else cfg.student.decoder_layers or n_s
        where = "student.width_ratio" if cfg.student.width_ratio is not None else "student.hidden_size"
    else:
        from transformers import AutoConfig

        student = AutoConfig.from_pretrained(args.model)
        (n_s, d_s), n_dec_s = models.depth_width(student), models.decoder_depth(student)
        where = f"model={args.model} (hidden_size)"
        if (n_dec_s is None) != (n_dec_t is None):
            kinds = ("an encoder-decoder", "a single-stack model")
            raise ConfigError(f"model={args.model}: {kinds[n_dec_s is None]}, but teacher={cfg.teacher} is "
                              f"{kinds[n_dec_t is None]}; the angles compare the states of the same stack: give a "
                              "student of the teacher's kind")
    if d_s != d_t:
        raise ConfigError(f"{where}={d_s}: the angle analysis subtracts student from teacher states, which needs "
                          f"the teacher's width {d_t} (a teacher-init or same-width student)")
    depths: dict[Stack, tuple[int, int]] = {"encoder": (n_s, n_t)}
    if n_dec_s is not None and n_dec_t is not None:
        depths["decoder"] = (n_dec_s, n_dec_t)
    for stack, (n, _) in depths.items():
        for layer in args.model_layers or ():
            if not 1 <= layer <= n:
                whose = f" of the student's {stack} (model_layers applies to both stacks)" if len(depths) > 1 else ""
                raise ConfigError(f"model_layers={list(args.model_layers or ())}: student layer {layer} out of range "
                                  f"1..{n}{whose}")
    return depths


def load_student(args: AngleArgs, cfg: Config, prepared: Prepared, teacher: torch.nn.Module) -> torch.nn.Module:
    if args.model == "init":
        return models.freeze(make_student(cfg, teacher, prepared.student_dir))
    student = models.load_task_model(args.model, prepared.family)
    fine_tuned = models.teacher_config(models.TeacherSource("", False, prepared.teacher_dir))
    vocab_t, vocab_s = fine_tuned.vocab_size, student.config.vocab_size
    if vocab_s != vocab_t:
        raise ConfigError(f"model={args.model}: vocabulary of {vocab_s} tokens, the teacher's has {vocab_t}; "
                          "the student must read the teacher's tokenizer")
    return models.freeze(student)


@torch.no_grad()
def collect_stacks(teacher: torch.nn.Module, student: torch.nn.Module, prepared: Prepared, *,
                   layers: dict[Stack, tuple[list[int], int]],
                   max_batches: int | None) -> dict[Stack, dict[tuple[int, int], Tensor]]:
    """stack -> {(l, k): cosines over the evaluation split's real positions of that stack}, for the student layers
    l and k = 2..n_t that `layers` gives each stack as (student layers, n_t); k = 1 gives u = v, cos = 1.

    One forward per model and batch, the run's own inputs (`model_inputs`): an encoder-decoder's decoders read
    the gold target (teacher forcing), each its own encoder's output, as in distillation (`teacher_forward`);
    the decoder's real positions are the target's (`stack_mask`)."""
    loader = make_loader(prepared.data["validation"], batch_size=EVAL_BATCH_SIZE, shuffle=False, seed=0,
                         pad_id=prepared.pad_id)
    parts: dict[Stack, dict[tuple[int, int], list[Tensor]]] = {
        stack: {(sl, k): [] for sl in student_layers for k in range(2, n_t + 1)}
        for stack, (student_layers, n_t) in layers.items()}
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        inputs = {**model_inputs(batch), "output_hidden_states": True}
        out_t, out_s = teacher(**inputs), student(**inputs)
        for stack, pairs in parts.items():
            h_t, h_s, mask = stack_states(out_t, stack), stack_states(out_s, stack), stack_mask(batch, stack)
            for (sl, k), found in pairs.items():
                found.append(angle_cosines(h_t[1], h_t[k], h_s[sl], mask))
    return {stack: {key: torch.cat(found) for key, found in pairs.items()} for stack, pairs in parts.items()}


def collect(teacher: torch.nn.Module, student: torch.nn.Module, prepared: Prepared, *, student_layers: list[int],
            n_teacher: int, max_batches: int | None) -> dict[tuple[int, int], Tensor]:
    """`collect_stacks` of one stack, a single-stack model's (an encoder-decoder's encoder): {(l, k): cosines}."""
    return collect_stacks(teacher, student, prepared, layers={"encoder": (student_layers, n_teacher)},
                          max_batches=max_batches)["encoder"]


def summarise(cosines: dict[tuple[int, int], Tensor]) -> list[dict[str, Any]]:
    rows = []
    for (sl, k), cos in sorted(cosines.items()):
        # numpy: torch.quantile refuses inputs of more than 2^24 values (a long validation split)
        q = np.quantile(cos.numpy(), [0.1, 0.5, 0.9]).tolist() if len(cos) else [float("nan")] * 3
        rows.append({"student_layer": sl, "teacher_layer": k, "tokens": len(cos),
                     "acute_share": float((cos > 0).float().mean()) if len(cos) else float("nan"),
                     "mean_cos": float(cos.mean()) if len(cos) else float("nan"),
                     "p10": q[0], "median": q[1], "p90": q[2]})
    return rows


def plot(cosines: dict[tuple[int, int], Tensor], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    ls = sorted({sl for sl, _ in cosines})
    ks = sorted({k for _, k in cosines})
    fig, axes = plt.subplots(len(ls), len(ks), figsize=(2.4 * len(ks), 1.9 * len(ls)), squeeze=False,
                             sharex=True)
    for i, sl in enumerate(ls):
        for j, k in enumerate(ks):
            cos, ax = cosines[(sl, k)].numpy(), axes[i][j]
            ax.hist(cos, bins=40, range=(-1, 1), color="C0")
            ax.axvline(0, color="C3", lw=0.8)
            ax.set_title(f"l={sl}, k={k}: {100 * float((cos > 0).mean()):.0f}% acute", fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("cos(u, v)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


STACK_NOTES: dict[Stack, str] = {
    "encoder": "The encoder's states over the source's real tokens (attention_mask)",
    "decoder": "The decoder's states over the target's real tokens (decoder_attention_mask); both decoders are "
               "teacher-forced on the gold target and read their own encoder's output"}


def image_name(stack: Stack | None) -> str:
    """The histograms' file: angles.png for a single-stack model, angles_<stack>.png for an encoder-decoder's."""
    return "angles.png" if stack is None else f"angles_{stack}.png"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The table of `rows`; an encoder-decoder's rows (each with its "stack") get one section per stack."""
    lines = ["# Angle analysis (papers.md section 2)", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "u = h_t[1] - h_s[l], v = h_t[k] - h_s[l], cos = u.v / (|u||v| + 1e-6) over real tokens; "
              "acute = cos > 0."]
    for stack in dict.fromkeys(r.get("stack") for r in rows):
        if stack is not None:
            lines += ["", f"## {stack}", "", f"{STACK_NOTES[stack]}."]
        lines += ["", f"![{f'{stack} ' if stack else ''}histograms]({image_name(stack)})", "",
                  "| student layer l | teacher layer k | tokens | acute share | mean cos | p10 | median | p90 |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['student_layer']} | {r['teacher_layer']} | {r['tokens']} | {r['acute_share']:.3f} | "
                  f"{r['mean_cos']:.3f} | {r['p10']:.3f} | {r['median']:.3f} | {r['p90']:.3f} |"
                  for r in rows if r.get("stack") == stack]
    return "\n".join(lines) + "\n"


def _metric(name: str, row: dict[str, Any]) -> str:
    stack = f"{row['stack']}." if "stack" in row else ""
    return f"{name}.{stack}l{row['student_layer']}.k{row['teacher_layer']}"


def run_angles(args: AngleArgs, cfg: Config, argv: Sequence[str] = ()) -> tuple[list[dict[str, Any]], str]:
    """Prepare (cached fine-tuned teacher and data), collect cosines, write PNG/JSON/Markdown, log to MLflow.
    Returns (summary rows, MLflow run id); an encoder-decoder's rows name their stack."""
    depths = check_shapes(args, cfg)
    prepared = prepare(cfg, device=torch.device("cpu"))
    teacher = load_teacher(prepared, torch.device("cpu"))
    student = load_student(args, cfg, prepared, teacher)
    layers = {stack: (list(args.model_layers or range(1, n_s + 1)), n_t) for stack, (n_s, n_t) in depths.items()}
    cosines = collect_stacks(teacher, student, prepared, layers=layers, max_batches=args.max_batches)
    seq2seq = "decoder" in depths
    rows = [{"stack": stack, **r} if seq2seq else r for stack, found in cosines.items() for r in summarise(found)]
    decoder = f" + {depths['decoder'][0]}" if seq2seq and args.model == "init" else ""
    student_name = f"init ({cfg.student.init}, {cfg.student.layers}{decoder} layers)" if args.model == "init" \
        else args.model
    header = {"teacher": cfg.teacher, "teacher eval_score": round(prepared.teacher_metrics["eval_score"], 4),
              "student": student_name, "task": f"{cfg.task.name} (validation split, "
              f"{len(prepared.data['validation'])} rows)",
              "teacher fine-tune": f"{cfg.task.train_size or 'all'} train rows, {cfg.finetune.epochs} epochs, "
                                   f"lr {cfg.finetune.lr}", "commit": commit(), "hardware": hardware(),
              "command": "`python -m kdsearch.analyze " + " ".join(argv) + "`"}
    if seq2seq:
        header["stacks"] = ", ".join(f"{stack} ({n_s} student, {n_t} teacher layers)"
                                     for stack, (n_s, n_t) in depths.items())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stack, found in cosines.items():
        plot(found, out / image_name(stack if seq2seq else None), f"teacher {cfg.teacher}, student {student_name}, "
             f"task {cfg.task.name}{f', {stack}' if seq2seq else ''}")
    (out / "angles.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    (out / "angles.md").write_text(markdown(rows, header))
    metrics = {_metric(name, r): r[key] for r in rows for name, key in (("acute_share", "acute_share"),
                                                                         ("mean_cos", "mean_cos"))}
    params: dict[str, Any] = {
        "analysis": "angles", "student": args.model, "layers": layers["encoder"][0], "teacher": cfg.teacher,
        "task.name": cfg.task.name, "student.init": cfg.student.init, "student.layers": cfg.student.layers}
    tags = {"kdsearch.analysis": "angles"}
    if seq2seq:
        params |= {"decoder_layers": layers["decoder"][0], "student.decoder_layers": depths["decoder"][0]}
        tags["kdsearch.stacks"] = ",".join(depths)
    run_id = log_analysis_run(uri=args.uri or default_uri(), experiment=args.experiment,
                              name=f"angles-{cfg.task.name}{'-' + '+'.join(depths) if seq2seq else ''}",
                              params=params, metrics=metrics, tags=tags, dirs={"angles": out})
    return rows, run_id


def _analyze(args: AngleArgs, cfg: Config, argv: Sequence[str]) -> int:
    rows, run_id = run_angles(args, cfg, argv)
    for r in rows:
        print(f"{r['stack'] + ' ' if 'stack' in r else ''}l={r['student_layer']} k={r['teacher_layer']}: "
              f"{100 * r['acute_share']:.1f}% acute (mean cos {r['mean_cos']:.3f}, {r['tokens']} tokens)")
    print(f"angles written to {Path(args.out).resolve()} and MLflow run {run_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = Command(
        "analyze", "The layer-selection paper's angle analysis: for each real token, the cosine of the angle at a "
        "student state between\nthe directions to teacher layer 1 and to teacher layer k; histograms per k (PNG), a "
        "table, an MLflow run.\nAn encoder-decoder (T5, BART): each stack apart, the encoder over the source's "
        "tokens, the decoder (teacher-forced\non the gold target) over the target's.",
        lambda args, cfg: _analyze(args, cfg, argv), AngleArgs, usage=USAGE, parse=parse_args)
    return run_command(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
