"""The per-worker loop without Ray (resume, NaN), TED stage 1, and Ray Train runs (1 vs 2 workers, the CLI)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdsearch.config.overrides import CONFIG_FILE, load_config
from kdsearch.config.schema import Config
from kdsearch.run.evaluation import make_loader
from kdsearch.run.loop import (
    WorkerContext,
    _train_epoch,
    build_distiller,
    layer_pairs,
    reported_metrics,
    run_distillation,
)
from kdsearch.run.optimiser import Optimiser
from kdsearch.run.precision import autocast
from kdsearch.run.prepare import prepare
from kdsearch.run.step import teacher_forward

SMALL = ["task.train_size=256", "task.eval_size=128", "train.epochs=2", "finetune.epochs=2", "train.dropout=0.0",
         "train.batch_size=16", "ted.stage1_epochs=2"]


def small(tmp_cache: Path, *extra: str) -> Config:
    return load_config([*SMALL, f"cache_dir={tmp_cache}", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _run(cfg: Config, checkpoint: Path | None = None, store: Path | None = None) -> list[dict]:
    reports: list[dict] = []

    def report(metrics: dict, ckpt: Path | None) -> None:
        reports.append(metrics)
        if store is not None and ckpt is not None:
            target = store / f"epoch{metrics['epoch']}"
            target.mkdir(parents=True)
            for f in ckpt.iterdir():
                (target / f.name).write_bytes(f.read_bytes())

    run_distillation(cfg, prepare(cfg), WorkerContext(report=report, checkpoint=checkpoint, log=lambda _: None))
    return reports


@pytest.mark.slow
def test_loop_reports_each_epoch_and_resumes_from_a_checkpoint(cache: Path, tmp_path: Path) -> None:
    cfg = small(cache)
    full = _run(cfg, store=tmp_path)
    assert [m["epoch"] for m in full] == [1, 2]
    assert all(0 <= m["eval_score"] <= 1 and m["student_params"] > 0 for m in full)
    assert all(set(reported_metrics(prepare(cfg).spec)) <= set(m) for m in full)  # what searches may rank on
    assert full[0]["student_latency_ms"] > 0
    assert json.loads((tmp_path / "epoch1" / "state.json").read_text()) == {"epoch": 1}
    resumed = _run(cfg, checkpoint=tmp_path / "epoch1")
    assert [m["epoch"] for m in resumed] == [2]  # only the unfinished epoch runs
    assert resumed[0]["eval_score"] == pytest.approx(full[1]["eval_score"], abs=1e-6)
    assert resumed[0]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_resumed_run_repeats_dropout_accumulation_and_a_redrawn_layer_map(cache: Path, tmp_path: Path) -> None:
    # epoch 2 after a restart draws the batches, dropout masks and in-order random layers it drew the first time
    cfg = small(cache, "train.dropout=0.1", "train.grad_accum=2", "distill.layer_map=inorder_random")
    full = _run(cfg, store=tmp_path)
    resumed = _run(cfg, checkpoint=tmp_path / "epoch1")
    assert resumed[0]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-6)
    assert resumed[0]["eval_loss"] == pytest.approx(full[1]["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_another_validation_split_reuses_the_fine_tuned_teacher_and_scores_it_anew(cache: Path) -> None:
    from kdsearch.run.evaluation import evaluate
    from kdsearch.run.prepare import load_teacher

    first, other = prepare(small(cache)), prepare(small(cache, "task.eval_size=40"))
    assert other.teacher_dir == first.teacher_dir and len(other.data["validation"]) == 40
    scored = evaluate(load_teacher(other, torch.device("cpu")), other.data["validation"], spec=other.spec,
                      batch_size=64, pad_id=other.pad_id, device=torch.device("cpu"))
    assert other.teacher_metrics == pytest.approx(scored)
    assert prepare(small(cache)).teacher_metrics == first.teacher_metrics


@pytest.mark.slow
def test_a_diverging_run_fails_with_a_clear_error(cache: Path) -> None:
    cfg = small(cache, "train.lr=1e12", "train.warmup_ratio=0", "train.epochs=1")
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        _run(cfg)


def test_each_seed_and_epoch_draws_its_own_batches_on_one_worker_and_on_several() -> None:
    from torch.utils.data import DataLoader, DistributedSampler

    from kdsearch.run.loop import _seed_epoch

    rows = list(range(24))

    def order(loader, seed: int, epoch: int) -> list[int]:
        _seed_epoch(loader, seed, epoch)
        return [int(x) for batch in loader for x in batch]

    one = DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator())
    shard = DataLoader(rows, batch_size=4, sampler=DistributedSampler(rows, num_replicas=2, rank=0, shuffle=True))
    for loader in (one, shard):
        orders = {(seed, epoch): order(loader, seed, epoch) for seed in (0, 1, 7) for epoch in (0, 1)}
        assert len({tuple(o) for o in orders.values()}) == len(orders)  # seed s, epoch e+1 is not seed s+1, epoch e
        assert order(loader, 1, 1) == orders[(1, 1)]  # and a resumed epoch draws what it drew the first time


def test_fp16_loss_scaling_skips_an_overflowing_step_and_checkpoints_its_scale() -> None:
    # The Optimiser train.precision=fp16 gets on a GPU; GradScaler("cpu") runs the same code path here.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    optimiser = Optimiser(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), params,
                          torch.amp.GradScaler("cpu", init_scale=1024.0))
    def update(loss: torch.Tensor) -> None:
        optimiser.backward(loss)
        optimiser.clip()
        optimiser.step()

    update(model(torch.randn(8, 4)).pow(2).mean())
    weights = model.weight.detach().clone()
    update(model(torch.randn(8, 4)).sum() * float("inf"))  # inf gradients: no update, scale halved
    assert torch.equal(model.weight, weights) and optimiser.scaler.get_scale() == 512.0
    assert optimiser.sched.last_epoch == 1  # the skipped update does not use up a step of the schedule
    update(model(torch.randn(8, 4)).pow(2).mean())
    assert not torch.equal(model.weight, weights) and optimiser.sched.last_epoch == 2
    state = optimiser.state_dict()
    fresh = Optimiser(opt, optimiser.sched, params, torch.amp.GradScaler("cpu"))
    fresh.load_state_dict(state)  # a resumed run keeps the learned scale
    assert fresh.scaler is not None and fresh.scaler.get_scale() == 512.0


def test_a_nan_gradient_under_a_finite_loss_fails_the_epoch_before_its_update(monkeypatch) -> None:
    class Kinked(torch.nn.Module):  # the loss is sqrt(0) + 1 = 1, its gradient 0/0
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, batch: dict, outputs: object, pairs: list) -> dict:
            d = (self.w - self.w.detach()) * batch["input_ids"]
            return {"loss": torch.sqrt((d ** 2).sum()) + 1.0}

    monkeypatch.setattr("kdsearch.run.loop.teacher_forward", lambda *args, **kwargs: None)
    model = Kinked()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    optimiser = Optimiser(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), list(model.parameters()))
    batch = {"input_ids": torch.ones(3)}
    with pytest.raises(FloatingPointError, match="gradients became nan"):
        _train_epoch(model, torch.nn.Identity(), [batch], optimiser, [], steps=1, ctx=WorkerContext(), epoch=0)
    assert torch.equal(model.w.detach(), torch.ones(3))  # the checkpoint of this epoch would hold no nan


@pytest.mark.slow
def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(cache: Path) -> None:
    cfg = small(cache, "distill.layer_map=none")  # CE and KL are means over rows: they split exactly
    prepared = prepare(cfg)
    loader = iter(make_loader(prepared.data["train"], batch_size=16, shuffle=False, seed=0, pad_id=prepared.pad_id))
    rows, more = next(loader), next(loader)
    halves = [{k: v[:8] for k, v in rows.items()}, {k: v[8:] for k, v in rows.items()}]
    tail = {k: v[:8] for k, v in more.items()}  # the epoch's last step: a group of one micro-batch, not two
    after = {}
    for accum, batches in ((1, [rows, tail]), (2, [*halves, tail])):
        torch.manual_seed(0)
        teacher, distiller = build_distiller(cfg, prepared, torch.device("cpu"))
        params = [p for p in distiller.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        sgd = torch.optim.SGD(params, lr=0.5)  # plain SGD, no clipping: the update is the gradient itself
        optimiser = Optimiser(sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0), params,
                              max_grad_norm=float("inf"))
        terms = _train_epoch(distiller, teacher, batches, optimiser, [], steps=2, ctx=WorkerContext(), epoch=0,
                             accum=accum)
        after[accum] = [p.detach().clone() for p in params]
        assert any(not torch.equal(a, b) for a, b in zip(after[accum], before, strict=True))
        assert math.isfinite(terms["train_loss"])
    for one, two in zip(after[1], after[2], strict=True):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bf16_autocast_runs_the_models_in_bf16_and_keeps_the_loss_terms_fp32(cache: Path) -> None:
    cfg = small(cache, "distill.bridge=ted")
    prepared = prepare(cfg)
    teacher, distiller = build_distiller(cfg, prepared, torch.device("cpu"))
    distiller.eval()  # no dropout: both precisions see the same network
    batch = next(iter(make_loader(prepared.data["train"], batch_size=16, shuffle=False, seed=0,
                                  pad_id=prepared.pad_id)))
    pairs = layer_pairs(cfg, prepared, epoch=0)

    def terms(precision: str) -> dict[str, torch.Tensor]:
        with torch.no_grad(), autocast(torch.device("cpu"), precision):  # type: ignore[arg-type]
            return distiller(batch, teacher_forward(teacher, batch, hidden=True), pairs)

    full, half = terms("fp32"), terms("bf16")
    assert half["logits"].dtype == torch.bfloat16 and full["logits"].dtype == torch.float32
    for name in ("task", "logit", "hidden", "loss"):
        assert half[name].dtype == torch.float32, name
        assert half[name].item() == pytest.approx(full[name].item(), rel=0.05, abs=1e-3), name


@pytest.mark.slow
def test_ted_stage1_filters_sit_on_the_mapped_layers_and_are_cached_by_what_they_read(cache: Path) -> None:
    # That stage 1 teaches each filter its own layer's task signal is test_bridges.py's synthetic test; this one
    # checks where the real preparation puts filters and what their cache key holds (the module's small teacher).
    cfg = small(cache, "distill.bridge=ted")
    prepared = prepare(cfg)
    filters = prepared.bridge_artifacts["teacher_filters"]
    accuracy = json.loads((Path(filters).parent / "head_accuracy.json").read_text())
    assert set(accuracy) == {"2", "4"}  # filters on the forward-mapped teacher layers; TED has none on h[0]
    assert all(0 <= a <= 1 for a in accuracy.values())
    assert Path(prepared.bridge_artifacts["student_filters"]).exists()
    again = prepare(cfg)  # content-addressed: the second preparation reuses every artifact
    assert again.bridge_artifacts == prepared.bridge_artifacts and again.teacher_dir == prepared.teacher_dir
    # keyed on what stage 1 reads: not on how stage 2 initialises its student filters, but on the batches
    assert prepare(dataclasses.replace(cfg, ted=dataclasses.replace(cfg.ted, student_filters="random"))
                   ).bridge_artifacts["teacher_filters"] == prepared.bridge_artifacts["teacher_filters"]
    smaller = prepare(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=64)))
    assert smaller.bridge_artifacts["teacher_filters"] != prepared.bridge_artifacts["teacher_filters"]


@pytest.mark.slow
def test_a_fine_tuned_student_is_where_stage1_and_distillation_start(cache: Path) -> None:
    from kdsearch.run import models
    from kdsearch.run.evaluation import evaluate
    from kdsearch.run.prepare import load_teacher, make_student

    # TED's code: both models fine-tuned first (8 epochs: in the module's 2 the 256-row fine-tune learns nothing)
    cfg = small(cache, "distill.bridge=ted", "student.finetune=true", "finetune.epochs=8")
    prepared = prepare(cfg)
    cpu = torch.device("cpu")
    _, distiller = build_distiller(cfg, prepared, cpu)
    fine_tuned = models.load_task_model(prepared.student_dir, prepared.family).state_dict()
    start = distiller.student.state_dict()
    assert all(torch.equal(start[k], v) for k, v in fine_tuned.items())
    initial = make_student(cfg, load_teacher(prepared, cpu))

    def loss(model: torch.nn.Module) -> float:  # on the rows it was fine-tuned on: 256 rows generalise little
        return evaluate(model, prepared.data["train"], spec=prepared.spec, batch_size=64,
                        pad_id=prepared.pad_id, device=cpu)["eval_loss"]

    assert loss(distiller.student) < loss(initial) - 0.01  # it did learn the task before distillation starts
    plain = prepare(dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, finetune=False)))
    assert plain.student_dir is None
    assert plain.bridge_artifacts["teacher_filters"] == prepared.bridge_artifacts["teacher_filters"]
    # stage 1 on the student it starts from
    assert plain.bridge_artifacts["student_filters"] != prepared.bridge_artifacts["student_filters"]


@pytest.mark.slow
def test_ted_continual_pretraining_trains_filters_with_the_language_modelling_objective(cache: Path,
                                                                                        tmp_path: Path) -> None:
    # A raw-text corpus (no prompts, no labels) where each word determines the next: a filter keeps what
    # predicting the next token needs, so its per-token LM head must far beat chance (1 / 12 words).
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    rng = random.Random(0)
    for split, rows in (("train", 320), ("validation", 64)):
        lines = []
        for _ in range(rows):
            start, length = rng.randrange(12), rng.randint(6, 12)
            lines.append(json.dumps({"text": " ".join(words[(start + i) % 12] for i in range(length))}))
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = small(cache, "teacher=tiny-gpt2", "task=text", f"task.data_dir={tmp_path}", "distill.bridge=ted",
                "finetune.epochs=4", "finetune.lr=3e-3", "train.epochs=1")
    prepared = prepare(cfg)
    assert prepared.spec.kind == "causal_lm" and prepared.teacher_metrics["eval_score"] > 0.5
    filters = prepared.bridge_artifacts["teacher_filters"]
    accuracy = json.loads((Path(filters).parent / "head_accuracy.json").read_text())
    assert set(accuracy) == {"2", "4"} and accuracy["4"] > 0.5  # next-token accuracy of the LM head (no h[0]: TED)
    reports = _run(cfg)
    assert reports[-1]["train_hidden"] > 0 and 0 < reports[-1]["eval_token_accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["distill.layer_map=reverse", "student.init=random"],
    ["distill.layer_map=inorder_random"],
    ["distill.bridge=units", "student.width_ratio=0.5", "student.init=random", "units.ratio=0.25"],
    ["distill.bridge=projector", "student.hidden_size=32", "student.init=random", "distill.distance=cosine"],
    ["distill.bridge=ted", "ted.filter=mlp", "distill.hidden_reduce=mean"],
    ["distill.layer_map=none", "distill.w_logit=0"],
    ["distill.layer_map=none", "distill.bridge=ted"],  # no pairs: no stage 1 to run
    ["teacher=tiny-gpt2", "distill.distance=token_mse"],  # causal LM: the task read as prompt -> answer
    ["teacher=tiny-qwen", "distill.bridge=ted"],
    ["distill.bridge=ted", "train.precision=bf16"],  # autocast in training, evaluation and the latency
    ["train.grad_accum=3", "train.batch_size=12"],  # 3 micro-batches of 4 rows per optimiser step
    ["distill.bridge=identity", "distill.distance=cka", "student.hidden_size=32", "student.init=random"],
])
def test_every_strategy_family_trains(cache: Path, strategy: list[str]) -> None:
    reports = _run(small(cache, "train.epochs=2", *strategy))
    assert all(math.isfinite(r["train_loss"]) for r in reports)
    # the strategy's own term ran and moved: hidden matching, else logit KD, else the task loss alone
    own = "task" if "distill.w_logit=0" in strategy else "logit" if "distill.layer_map=none" in strategy \
        else "hidden"
    first, last = reports[0], reports[-1]
    assert last[f"train_{own}"] > 0 and last[f"train_{own}"] != pytest.approx(first[f"train_{own}"], rel=1e-4)
    assert ("train_hidden" in last) == (own == "hidden")  # no hidden term where no pair is matched


@pytest.mark.parametrize("teacher", ["tiny-gpt2", "tiny-qwen"])
def test_a_causal_lm_export_reloads_and_rescores_to_its_reported_score(cache: Path, tmp_path: Path,
                                                                       teacher: str) -> None:
    """The export of a causal-LM student (classification read as prompt -> answer): AutoModelForCausalLM loads
    it with its tokenizer, and `kdsearch.evaluate` scores it to the token accuracy and the generated answers'
    scores the run reported."""
    from transformers import AutoModelForCausalLM

    from kdsearch.evaluate import score_model
    from kdsearch.run.loop import export_student

    cfg = small(cache, f"teacher={teacher}", "train.epochs=1")
    reports = _run(cfg, store=tmp_path / "checkpoints")
    out = export_student(cfg, prepare(cfg), tmp_path / "checkpoints" / "epoch1", tmp_path / "student")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == cfg.student.layers
    scores = score_model(str(out), cfg, "validation", torch.device("cpu"))
    assert scores["eval_token_accuracy"] == pytest.approx(reports[-1]["eval_token_accuracy"], abs=1e-6)
    assert scores["eval_score"] == pytest.approx(reports[-1]["eval_score"], abs=1e-6) and scores["rows"] == 128
    for name in ("eval_exact_match", "eval_chrf", "eval_bleu", "eval_rouge_l"):  # the answers it generates too
        assert scores[name] == pytest.approx(reports[-1][name], abs=1e-6)


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_ray_train_workers_agree_with_one(cache: Path, tmp_path: Path, ray_runtime) -> None:
    """Same global batches (DistributedSampler halves them), so 2 DDP workers that each accumulate 2
    micro-batches per step track 1 worker closely: DDP skips the gradient sync on the first micro-batch and syncs
    on the second, the branch every micro-batch takes without accumulation, so both paths run.

    Not bit-identical: hidden distances average over each worker's real tokens, so per-worker means weight
    tokens slightly differently from one global mean.
    """
    from kdsearch.run.trainer import make_trainer

    finals = {}
    for workers, accum in ((1, 1), (2, 2)):
        cfg = small(cache, "train.epochs=1", f"resources.num_workers={workers}", "resources.cpus_per_trial=2",
                    "train.max_steps_per_epoch=8", f"train.grad_accum={accum}")
        result = make_trainer(cfg, prepare(cfg), name=f"agree-{workers}x{accum}",
                              storage_path=str(tmp_path)).fit()
        assert result.error is None
        finals[workers, accum] = result.metrics
    assert finals[2, 2]["train_loss"] == pytest.approx(finals[1, 1]["train_loss"], rel=0.02)
    assert finals[2, 2]["eval_loss"] == pytest.approx(finals[1, 1]["eval_loss"], rel=0.02)
    assert abs(finals[2, 2]["eval_score"] - finals[1, 1]["eval_score"]) <= 0.03


@pytest.mark.slow
def test_a_diverging_two_worker_run_fails_at_once_rather_than_after_ray_trains_retries(
        cache: Path, tmp_path: Path, ray_runtime) -> None:
    from kdsearch.run.trainer import diverged, make_trainer

    cfg = small(cache, "train.lr=1e12", "train.warmup_ratio=0", "train.epochs=1", "resources.num_workers=2",
                "resources.cpus_per_trial=2", "train.max_steps_per_epoch=4")
    # a worker error would be a TrainingFailedError after max_failures restarts of the worker group
    result = make_trainer(cfg, prepare(cfg), name="diverge", storage_path=str(tmp_path), max_failures=2).fit()
    assert result.error is None and "lower train.lr" in (diverged(result) or "")
    # the same run started again (a Tune trial retried) restores the marker and reports it, training nothing
    again = make_trainer(cfg, prepare(cfg), name="diverge", storage_path=str(tmp_path), max_failures=2).fit()
    assert diverged(again) == diverged(result)


@pytest.mark.slow
def test_train_command_writes_a_student_that_from_pretrained_loads(cache: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "kdsearch.train", *SMALL, f"cache_dir={cache}",
                           f"output_dir={out}", "resources.cpus_per_trial=1"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "epoch=2" in console  # kdsearch's own epoch lines, not buried under library progress bars
    assert not [m for m in ("it/s]", "examples/s]", "Reporting training result") if m in console]
    assert proc.stdout.strip().splitlines()[-1] == f"student saved to {out / 'student'}"
    modes = {f.name: f.stat().st_mode & 0o777 for f in (out / "student").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"]  # readable like the rest of the folder
    rerun = load_config([f"config={out / 'student' / CONFIG_FILE}"])  # the run's whole config, beside it
    assert rerun.train.batch_size == 16 and rerun.task.train_size == 256
    model = AutoModelForSequenceClassification.from_pretrained(out / "student").eval()
    assert model.config.num_hidden_layers == 2
    # the task's class names travel with it: a pipeline answers in them, not LABEL_0 / LABEL_1
    assert model.config.id2label == {0: "negative", 1: "positive"}
    from transformers import pipeline

    assert pipeline("text-classification", model=str(out / "student"))("a fine film")[0]["label"] in (
        "negative", "positive")
    # its own tokenizer beside it; the backbone alone loads to the same states
    encoded = AutoTokenizer.from_pretrained(out / "student")(["a fine film", "dull"], padding=True,
                                                               return_tensors="pt")
    with torch.no_grad():
        assert model(**encoded).logits.shape == (2, 2)
        torch.testing.assert_close(AutoModel.from_pretrained(out / "student").eval()(**encoded).last_hidden_state,
                                   model.base_model(**encoded).last_hidden_state)
    # scored again from the folder alone, it gets the validation score the run reported
    from kdsearch.evaluate import main as evaluate

    reported = float(re.findall(r"final: eval_score=([0-9.]+)", console)[-1])
    assert evaluate([f"model={out / 'student'}", "split=validation", f"out={tmp_path / 'val.json'}",
                     f"cache_dir={cache}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]) == 0
    rescored = json.loads((tmp_path / "val.json").read_text())["scores"]["student"]["eval_score"]
    assert rescored == pytest.approx(reported, abs=1e-4)  # printed to 4 decimals


def test_ctrl_c_while_the_teacher_fine_tunes_is_one_line_and_status_130(tmp_path: Path) -> None:
    import signal
    import time

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdsearch.train", "finetune.epochs=50", f"cache_dir={tmp_path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "teacher fine-tune epoch 1/50" in line:  # well inside the fine-tuning loop, before Ray starts
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err, err[-2000:]
