"""Step overhead of every strategy family: the loop's full distillation step against a bare training step.

    nice python bench/step_overhead.py [--steps N] [--teacher tiny-bert|minilm] [--threads 1] [--device cpu|cuda]
                                       [--precision fp32|bf16|fp16]

For each strategy (forward identity, none = logit KD only, all_to_one, projector with a narrower student, ted
with linear filters, units = Flex-KD, relation = MiniLMv2 attention relations, seq2seq = a tiny-t5 encoder-decoder
with the layer map on both stacks) it times, on the same batches and
interleaved step by step:

  kd    the shared step exactly as the loop runs it: `kdsearch.run.loop._train_epoch` on one batch
        (teacher_forward + Distiller forward + loss.item() check + backward + grad clip + AdamW + scheduler + the
        per-term .item() sums)
  loop  the same loop with the same student but a task-loss-only Distiller (w_logit = w_hidden = 0, no pairs):
        what the loop's bookkeeping costs without any distillation term
  base  teacher forward under no_grad (no hidden states) + plain student forward + task loss + backward +
        AdamW, nothing else: "teacher forward + student forward/backward timed alone"

Each of the three has its own student (same initial weights) and optimiser, so every variant trains normally;
with --precision bf16/fp16 all three run their forward passes under the same autocast (fp16: a loss scaler too).
The order of the variants rotates every step so drift (other processes, frequency scaling) hits all alike.
Reported: median step time per variant after warm-up, kd/base and loop/base (ratios of medians), and the median
of the per-batch paired ratios kd_i/base_i, which the verdict uses (target: <= 1.10): on a shared machine it
cancels drift and other processes' load best. Every number is a median over --rounds rounds. Artifacts
(fine-tuned teacher, TED stage-1 filters, Flex-KD scores) are real, built by `kdsearch.run.prepare.prepare` on a
small config and cached.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from kdsearch.config.overrides import load_config
from kdsearch.config.schema import Config  # noqa: E402
from kdsearch.methods.inputs import model_inputs  # noqa: E402
from kdsearch.methods.losses import task_loss  # noqa: E402
from kdsearch.methods.relations import relation_term  # noqa: E402
from kdsearch.run import models  # noqa: E402
from kdsearch.run.evaluation import make_loader  # noqa: E402
from kdsearch.run.loop import WorkerContext, _train_epoch, build_distiller, decoder_pairs, layer_pairs  # noqa: E402
from kdsearch.run.optimiser import Optimiser  # noqa: E402
from kdsearch.run.precision import autocast, loss_scaler  # noqa: E402
from kdsearch.run.prepare import Prepared, make_student, prepare  # noqa: E402
from kdsearch.run.teacher_cache import TeacherCache, with_rows  # noqa: E402
from kdsearch.run.validate import validate  # noqa: E402

TARGET = 1.10
CLOCK = time.perf_counter
"""Wall clock; main() switches to this thread's CPU time when the step runs on one CPU thread (see --clock)."""

# Overrides per strategy family; NARROW is replaced by half the teacher's width.
STRATEGIES: dict[str, list[str]] = {
    "forward": ["distill.layer_map=forward", "distill.bridge=identity"],
    "none": ["distill.layer_map=none", "distill.w_hidden=0"],
    "all_to_one": ["distill.layer_map=all_to_one", "distill.bridge=identity"],
    "projector": ["distill.layer_map=forward", "distill.bridge=projector", "student.hidden_size=NARROW",
                  "student.init=random"],
    "ted": ["distill.layer_map=forward", "distill.bridge=ted", "ted.filter=linear"],
    "units": ["distill.layer_map=forward", "distill.bridge=units", "student.hidden_size=NARROW",
              "student.init=random"],
    "relation": ["distill.layer_map=none", "distill.w_hidden=0", "distill.w_relation=1"],
    # an encoder-decoder (whatever --teacher says): tiny-t5 4+4 -> 2+2 on the embedded numbers-to-words task, the
    # layer-selection T5 code's loss (space=seq2seq's first point); base runs both stacks, teacher-forced
    "seq2seq": ["teacher=tiny-t5", "task.name=seq2seq_default", "distill.layer_map=forward",
                "distill.distance=layer_select_t5", "distill.hidden_reduce=sum", "distill.temperature=2.0"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_config(args: argparse.Namespace) -> list[str]:
    return [f"teacher={args.teacher}", f"student.layers={args.student_layers}", "task.name=default",
            f"task.train_size={args.train_size}", "task.eval_size=128", f"task.max_length={args.max_length}",
            "finetune.epochs=1", "ted.stage1_epochs=1", "units.score_batches=4",
            f"train.batch_size={args.batch_size}", f"cache_dir={args.cache_dir}", f"train.precision={args.precision}",
            f"resources.gpus_per_trial={1 if args.device.startswith('cuda') else 0}",
            f"train.teacher_cache={str(args.teacher_cache).lower()}"]


def strategy_config(args: argparse.Namespace, name: str) -> Config:
    d_t = models.depth_width(models.teacher_config(models.resolve_teacher(args.teacher)))[1]
    overrides = [o.replace("NARROW", str(d_t // 2)) for o in STRATEGIES[name]]
    cfg = load_config(base_config(args) + overrides)
    validate(cfg)
    return cfg


class Variants:
    """The three step functions of one strategy, each with its own student and optimiser."""

    def __init__(self, cfg: Config, prepared: Prepared, device: torch.device, *, fused: bool = False) -> None:
        self.device, self.fused, self.precision = device, fused, cfg.train.precision
        self.ctx = WorkerContext(device=device, log=lambda line: None)
        self.teacher, self.distiller = build_distiller(cfg, prepared, device)
        # --teacher-cache: the kd step reads the teacher's outputs (the loop and base steps still run it live)
        self.kd_teacher = (TeacherCache.open(prepared.teacher_outputs, prepared.teacher_projections)
                           if prepared.teacher_outputs else self.teacher)
        self.pairs = layer_pairs(cfg, prepared, epoch=0)
        self.decoder_pairs = decoder_pairs(cfg, prepared, epoch=0)  # an encoder-decoder's; [] for the others
        self.optimiser = self._optimiser(self.distiller, cfg)
        plain = replace(cfg, distill=replace(cfg.distill, w_logit=0.0, w_hidden=0.0, w_relation=0.0,
                                             layer_map="none", bridge="auto"))
        _, self.plain = build_distiller(plain, prepared, device)
        self.plain_optimiser = self._optimiser(self.plain, cfg)
        self.student = make_student(cfg, self.teacher).to(device)
        self.student_opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.train.lr,
                                             weight_decay=cfg.train.weight_decay, fused=fused or None)
        self.student_scaler = loss_scaler(device, self.precision)
        self.kind = prepared.spec.kind

    def _optimiser(self, module: torch.nn.Module, cfg: Config) -> Optimiser:
        # the loop's Optimiser with a LambdaLR of the same cost (the schedule's shape does not matter here)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                fused=self.fused or None)
        return Optimiser(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params,
                         loss_scaler(self.device, self.precision))

    def kd(self, batch: dict[str, torch.Tensor]) -> None:
        _train_epoch(self.distiller, self.kd_teacher, [batch], self.optimiser, self.pairs, steps=1, ctx=self.ctx,
                     epoch=0, precision=self.precision, tap=self.distiller.relation.teacher if self.distiller.relation
                     else None, decoder_pairs=self.decoder_pairs)

    def loop(self, batch: dict[str, torch.Tensor]) -> None:
        _train_epoch(self.plain, self.teacher, [batch], self.plain_optimiser, [], steps=1, ctx=self.ctx, epoch=0,
                     precision=self.precision)

    def base(self, batch: dict[str, torch.Tensor]) -> None:
        self.student.train()
        # an encoder-decoder also reads its decoder inputs (teacher forcing); the others the two they always have
        inputs = model_inputs(batch) if self.kind == "seq2seq" else {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with autocast(self.device, self.precision):
            with torch.no_grad():
                self.teacher(**inputs)
            out = self.student(**inputs)
        loss = task_loss(out.logits, batch["labels"], kind=self.kind)
        self.student_opt.zero_grad(set_to_none=True)
        if self.student_scaler is None:
            loss.backward()
            self.student_opt.step()
        else:
            self.student_scaler.scale(loss).backward()
            self.student_scaler.step(self.student_opt)
            self.student_scaler.update()


def time_variants(variants: Variants, batches: list[dict[str, torch.Tensor]], *, steps: int,
                  warmup: int) -> dict[str, list[float]]:
    fns: list[tuple[str, Callable[[dict[str, torch.Tensor]], None]]] = [
        ("kd", variants.kd), ("loop", variants.loop), ("base", variants.base)]
    times: dict[str, list[float]] = {name: [] for name, _ in fns}
    for step in range(warmup + steps):
        batch = batches[step % len(batches)]
        shift = step % len(fns)
        for name, fn in fns[shift:] + fns[:shift]:
            _sync(variants.device)
            began = CLOCK()
            fn(batch)
            _sync(variants.device)
            if step >= warmup:
                times[name].append(CLOCK() - began)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, float]:
    med = {name: statistics.median(values) for name, values in times.items()}
    paired = statistics.median(k / b for k, b in zip(times["kd"], times["base"], strict=True))
    q = statistics.quantiles(times["base"], n=4)
    return {"kd_ms": med["kd"] * 1e3, "loop_ms": med["loop"] * 1e3, "base_ms": med["base"] * 1e3,
            "base_iqr_pct": 100 * (q[2] - q[0]) / med["base"], "ratio": med["kd"] / med["base"],
            "loop_ratio": med["loop"] / med["base"], "paired": paired}


def op_counts(variants: Variants, batches: list[dict[str, torch.Tensor]], steps: int = 1) -> dict[str, float]:
    """ATen ops dispatched per step (nested ops included), per variant: on a tiny model step time follows this."""
    from torch.profiler import profile as torch_profile

    counts = {}
    for name, fn in (("kd", variants.kd), ("loop", variants.loop), ("base", variants.base)):
        fn(batches[0])  # not the optimiser's first step, which creates its state
        with torch_profile() as prof:
            for i in range(steps):
                fn(batches[i % len(batches)])
        counts[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / steps
    return counts


def profile(variants: Variants, batches: list[dict[str, torch.Tensor]], steps: int, rows: int) -> None:
    """torch.profiler tables of the kd and base steps (self CPU time per op), to see where the extra goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if variants.device.type == "cuda" else [])
    for name, fn in (("kd", variants.kd), ("base", variants.base)):
        for batch in batches[:3]:
            fn(batch)
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                fn(batches[i % len(batches)])
        print(f"\n--- profile: {name} step, {steps} steps ---")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def breakdown(variants: Variants, batches: list[dict[str, torch.Tensor]], *, steps: int, warmup: int) -> None:
    """Median time of each phase of the kd step (re-enacted phase by phase) and of the base step."""
    from kdsearch.methods.losses import combine
    from kdsearch.methods.relations import capture
    from kdsearch.run.step import teacher_forward

    v, d = variants, variants.distiller
    params = [p for p in d.parameters() if p.requires_grad]
    kd_t: dict[str, list[float]] = {}
    base_t: dict[str, list[float]] = {}

    def tick(table: dict[str, list[float]], name: str, began: float, record: bool) -> float:
        _sync(v.device)
        now = CLOCK()
        if record:
            table.setdefault(name, []).append(now - began)
        return now

    for step in range(warmup + steps):
        batch, rec = batches[step % len(batches)], step >= warmup
        use_hidden = bool(v.pairs)
        d.train()
        t = tick(kd_t, "", CLOCK(), False)
        teacher = teacher_forward(v.teacher, batch, hidden=use_hidden, tap=d.relation.teacher if d.relation else None)
        t = tick(kd_t, "teacher forward (hidden states)", t, rec)
        with capture(d.student, d.relation.student if d.relation else None) as projections:
            out = d.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=use_hidden)
        t = tick(kd_t, "student forward (hidden states)", t, rec)
        terms = {"task": task_loss(out.logits, batch["labels"], kind=v.kind)}
        t = tick(kd_t, "task loss", t, rec)
        if d.weights["logit"] > 0:
            terms["logit"] = d._logit_term(out.logits, teacher.logits, batch["labels"])
            t = tick(kd_t, "logit KL", t, rec)
        if use_hidden:
            assert teacher.hidden is not None
            terms["hidden"] = d._hidden_term(out.hidden_states, teacher.hidden, batch["attention_mask"], v.pairs)
            t = tick(kd_t, f"hidden term ({len(v.pairs)} pairs)", t, rec)
        if d.relation is not None:
            assert teacher.projections is not None
            terms["relation"] = relation_term(d.relation, projections, teacher.projections, batch["attention_mask"],
                                              causal=d.kind == "causal_lm")
            t = tick(kd_t, f"relation term ({'+'.join(d.relation.kinds)})", t, rec)
        loss = combine(terms, d.weights if use_hidden else {**d.weights, "hidden": 0.0})
        loss.item()
        t = tick(kd_t, "combine + loss.item()", t, rec)
        v.optimiser.opt.zero_grad(set_to_none=True)
        loss.backward()
        t = tick(kd_t, "backward", t, rec)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        t = tick(kd_t, "clip_grad_norm_", t, rec)
        v.optimiser.opt.step()
        v.optimiser.sched.step()
        t = tick(kd_t, "AdamW + scheduler", t, rec)
        for value in terms.values():
            value.item()
        t = tick(kd_t, "per-term .item()", t, rec)

        v.student.train()
        t = tick(base_t, "", CLOCK(), False)
        with torch.no_grad():
            v.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t = tick(base_t, "teacher forward", t, rec)
        out = v.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t = tick(base_t, "student forward", t, rec)
        loss = task_loss(out.logits, batch["labels"], kind=v.kind)
        t = tick(base_t, "task loss", t, rec)
        v.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        t = tick(base_t, "backward", t, rec)
        v.student_opt.step()
        t = tick(base_t, "AdamW", t, rec)

    for title, table in (("kd step, phase by phase", kd_t), ("base step", base_t)):
        total = sum(statistics.median(x) for x in table.values())
        print(f"\n{title}: sum of phase medians {total * 1e3:.2f} ms")
        for name, values in table.items():
            print(f"  {name:<34} {statistics.median(values) * 1e3:8.3f} ms")


def report(names: list[str], pairs: dict[str, int], rounds: list[dict[str, dict[str, float]]],
           ops: dict[str, dict[str, float]]) -> str:
    """One table: per strategy, medians over rounds (each round's numbers are medians over its steps)."""
    lines = [f"{'strategy':<11} {'pairs':>5} {'base ms':>8} {'IQR':>5} {'loop ms':>8} {'kd ms':>8} "
             f"{'loop/base':>9} {'kd/base':>8} {'(min-max)':>13} {'paired':>7} {'ops base/loop/kd':>16}  "
             f"target <= {TARGET:.2f}"]
    for name in names:
        per = [r[name] for r in rounds]

        def med(key: str, per: list[dict[str, float]] = per) -> float:
            return statistics.median(p[key] for p in per)

        ratios = [p["ratio"] for p in per]
        verdict = "PASS" if med("paired") <= TARGET else "FAIL"
        lines.append(f"{name:<11} {pairs[name]:>5} {med('base_ms'):>8.2f} {med('base_iqr_pct'):>4.0f}% "
                     f"{med('loop_ms'):>8.2f} {med('kd_ms'):>8.2f} {med('loop_ratio'):>9.3f} {med('ratio'):>8.3f} "
                     f"{f'({min(ratios):.3f}-{max(ratios):.3f})':>13} {med('paired'):>7.3f} "
                     f"{ops[name]['base']:>5.0f}/{ops[name]['loop']:.0f}/{ops[name]['kd']:<5.0f}"
                     f"  {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per strategy per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per strategy per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all strategies; medians over rounds")
    parser.add_argument("--teacher", default="tiny-bert", help="tiny-bert (default), minilm, or a model path")
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for every variant)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    parser.add_argument("--cache-dir", default="/tmp/kdsearch_bench_cache")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="auto: this thread's CPU time on CPU with --threads 1 (time other processes take "
                             "from the core is not counted), else wall time")
    parser.add_argument("--fused-adamw", action="store_true",
                        help="AdamW(fused=True) in every variant, as in the loop's own optimiser (default: torch's "
                             "default AdamW in every variant)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="train.precision of every variant (autocast forward passes; fp16 needs a GPU)")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="kd reads the teacher's outputs from train.teacher_cache (base still runs the teacher)")
    parser.add_argument("--profile", default=None, help="a strategy to profile with torch.profiler instead")
    parser.add_argument("--breakdown", default=None, help="a strategy whose step to time phase by phase instead")
    args = parser.parse_args()

    global CLOCK
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    device = torch.device(args.device)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu" and args.threads == 1)
    CLOCK = time.thread_time if cpu_clock else time.perf_counter
    names = [s for s in args.strategies.split(",") if s]
    single = args.profile or args.breakdown
    unknown = [s for s in names + ([single] if single else []) if s not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    if args.breakdown == "seq2seq":
        parser.error("--breakdown re-enacts an encoder's step phase by phase; use --profile seq2seq instead")

    setups: dict[str, tuple[Variants, list[dict[str, torch.Tensor]]]] = {}
    for name in [single] if single else names:
        cfg = strategy_config(args, name)
        prepared = prepare(cfg, device=device)  # cached: only the first run builds the artifacts
        train = with_rows(prepared.data["train"]) if prepared.teacher_outputs else prepared.data["train"]
        loader = make_loader(train, batch_size=cfg.train.batch_size, shuffle=True,
                             seed=cfg.train.seed, pad_id=prepared.pad_id)
        batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
        setups[name] = (Variants(cfg, prepared, device, fused=args.fused_adamw), batches)

    if args.profile:
        profile(*setups[args.profile], steps=args.steps, rows=25)
        return 0
    if args.breakdown:
        breakdown(*setups[args.breakdown], steps=args.steps, warmup=args.warmup)
        return 0

    ops = {name: op_counts(*setups[name]) for name in names}
    rounds: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        rounds.append({})
        for name in names:
            variants, batches = setups[name]
            rounds[-1][name] = summarise(time_variants(variants, batches, steps=args.steps, warmup=args.warmup))
        print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {rounds[-1][n]['ratio']:.3f}" for n in names),
              flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nteacher={args.teacher} student.layers={args.student_layers} batch={args.batch_size} "
          f"max_length={args.max_length} device={device} threads={torch.get_num_threads()} "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up) per strategy, "
          f"AdamW {'fused' if args.fused_adamw else 'default'}, {args.precision}, "
          f"{'thread CPU' if cpu_clock else 'wall'} clock, "
          f"torch {torch.__version__}, load average {load:.1f} on {os.cpu_count()} CPUs")
    print("ms = median step time; kd/base = ratio of medians (median over rounds, min-max over rounds); "
          "paired = median of per-batch kd_i/base_i (the verdict: it cancels drift and other processes' load); "
          "ops = ATen ops dispatched per step")
    print(report(names, {n: len(v.pairs) + len(v.decoder_pairs) for n, (v, _) in setups.items()}, rounds, ops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
