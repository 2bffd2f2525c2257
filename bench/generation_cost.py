"""Generation's share of a default seq2seq trial: how much of a trial's time its generated-output metrics cost.

    nice python bench/generation_cost.py [--num-beams 1,4] [--generate-every 1] [--threads 1] [--device cpu|cuda]

A default trial is `space=seq2seq`'s base config with its first paper point (forward map, teacher init: tiny-t5
4+4 -> 2+2 layers on the embedded numbers-to-words task, 3 epochs), run by the loop a Tune trial runs
(`kdsearch.run.loop.run_distillation`) without Ray around it. The denominator is the whole run (student build,
latency, every epoch's training, teacher-forced evaluation, checkpoint); the numerator is the time inside
`evaluate_generation` (batched `generate` on the validation split, decoding, exact match, chrF, BLEU, ROUGE-L).
Leaving Ray's per-trial overhead out makes the denominator smaller, so the share printed is an upper bound of
the share in a real search. Target: <= 25 %. The teacher's fine-tune (once per search, cached) is not timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from kdsearch.config.schema import Config  # noqa: E402
from kdsearch.core.provenance import commit  # noqa: E402
from kdsearch.run import loop  # noqa: E402
from kdsearch.run.prepare import prepare  # noqa: E402
from kdsearch.run.validate import validate  # noqa: E402
from kdsearch.search import space_model  # noqa: E402
from kdsearch.search.spaces import load_space  # noqa: E402

TARGET = 0.25


def trial_config(args: argparse.Namespace, num_beams: int) -> Config:
    """The seq2seq space's first trial, with this run's device, cache, beams and schedule."""
    space = load_space("seq2seq")
    cfg = space_model.trial_config(space, space_model.initial_points(space)[0])
    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    return replace(cfg, cache_dir=args.cache_dir,
                   eval=replace(cfg.eval, num_beams=num_beams, generate_every=args.generate_every),
                   resources=replace(cfg.resources, gpus_per_trial=gpus),
                   finetune=replace(cfg.finetune, epochs=args.finetune_epochs or cfg.finetune.epochs))


def measure(args: argparse.Namespace, num_beams: int) -> dict[str, float]:
    cfg = trial_config(args, num_beams)
    validate(cfg)
    prepared = prepare(cfg, device=torch.device(args.device))  # the teacher's fine-tune: cached, not timed
    spent: list[float] = []
    real = loop.evaluate_generation

    def timed(*a: object, **k: object) -> dict[str, float]:
        began = time.perf_counter()
        out = real(*a, **k)  # type: ignore[arg-type]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        spent.append(time.perf_counter() - began)
        return out

    reports: list[dict] = []
    loop.evaluate_generation = timed  # type: ignore[assignment]
    try:
        began = time.perf_counter()
        loop.run_distillation(cfg, prepared, loop.WorkerContext(device=torch.device(args.device),
                                                                report=lambda m, _: reports.append(m),
                                                                log=lambda _: None))
        total = time.perf_counter() - began
    finally:
        loop.evaluate_generation = real  # type: ignore[assignment]
    last = reports[-1]
    return {"beams": num_beams, "total_s": total, "generation_s": sum(spent), "calls": len(spent),
            "train_s": sum(r["epoch_time_s"] for r in reports), "share": sum(spent) / total,
            "rows": len(prepared.data["validation"]), "exact_match": last["eval_exact_match"],
            "bleu": last["eval_bleu"], "token_accuracy": last["eval_token_accuracy"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-beams", default="1", help="comma-separated eval.num_beams to measure (default: 1)")
    parser.add_argument("--generate-every", type=int, default=1, help="eval.generate_every (default 1, every epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="the teacher's fine-tune epochs (default: the config's; fewer = a faster first run)")
    parser.add_argument("--cache-dir", default="/tmp/kdsearch_bench_cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    rows = [measure(args, int(b)) for b in args.num_beams.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"default seq2seq trial (space=seq2seq, first point), eval.generate_every={args.generate_every}, "
          f"device={args.device}, threads={torch.get_num_threads()}, torch {torch.__version__}, commit {commit()}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"{'beams':>5} {'trial s':>8} {'train s':>8} {'generate s':>10} {'calls':>5} {'rows':>5} {'share':>6} "
          f"{'exact':>6} {'bleu':>6} {'tok acc':>7}  target <= {TARGET:.0%}")
    for r in rows:
        verdict = "PASS" if r["share"] <= TARGET else "FAIL"
        print(f"{r['beams']:>5} {r['total_s']:>8.1f} {r['train_s']:>8.1f} {r['generation_s']:>10.2f} "
              f"{r['calls']:>5} {r['rows']:>5} {r['share']:>6.1%} {r['exact_match']:>6.3f} {r['bleu']:>6.3f} "
              f"{r['token_accuracy']:>7.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
