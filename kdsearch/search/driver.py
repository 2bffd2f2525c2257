"""The search driver: Ray Tune trials sampled by Optuna, each a run of the shared loop.

The only module that imports Ray Tune and Optuna's sampler. A trial with one worker runs the shared loop
in the trial process itself (with reuse_actors: no per-trial actor start-up, ~0.3 s between trials); a trial
with several workers launches a Ray Train run of the same loop, named after the trial so retries restore.
Trial drivers take no CPU (the `kdsearch_driver` resource), so they never starve the Train workers.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import optuna
import pyarrow.fs
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from kdsearch.config.paths import claim
from kdsearch.core.console import quiet_libraries
from kdsearch.core.errors import ConfigError
from kdsearch.core.provenance import code_version
from kdsearch.run import sizing
from kdsearch.run.loop import WorkerContext, run_distillation
from kdsearch.run.prepare import check_teacher, prepare
from kdsearch.run.trainer import DIVERGED, diverged, init_ray, make_trainer
from kdsearch.run.validate import validate
from kdsearch.search import space_model
from kdsearch.search.callbacks import MlflowTrials, ProgressTable
from kdsearch.search.settings import (
    SearchSettings,
    check_objectives,
    objectives_of,
)
from kdsearch.search.warm_start import WarmStart
from kdsearch.tracking import UNFINISHED_TAG, find_search, search_names


def _tune_report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def run_trial(params: dict[str, Any], *, space: space_model.Space, search: str, storage: str) -> None:
    """One trial: the space's base + this trial's params, validated, prepared (cached), then trained."""
    quiet_libraries()
    cfg = space_model.trial_config(space, params)
    validate(cfg)
    prepared = prepare(cfg)
    if cfg.resources.num_workers == 1:
        torch.set_num_threads(max(1, int(cfg.resources.cpus_per_trial)))
        checkpoint = tune.get_checkpoint()
        ctx = WorkerContext(device=torch.device("cuda" if cfg.resources.use_gpu else "cpu"), report=_tune_report,
                            log=lambda line: None)
        if checkpoint is None:
            run_distillation(cfg, prepared, ctx)
        else:
            with checkpoint.as_directory() as directory:
                ctx.checkpoint = Path(directory)
                run_distillation(cfg, prepared, ctx)
        return
    trial_id = tune.get_context().get_trial_id()
    trainer = make_trainer(cfg, prepared, name=f"{search}-{trial_id}", storage_path=storage,
                           callbacks=[_ReportAllButLast(last_epoch=cfg.train.epochs)])
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if diverged(result):
        raise FloatingPointError(diverged(result))
    last = result.metrics or {}
    if last.get("epoch") == cfg.train.epochs:  # the held-back last epoch
        tune.report({**last, **({CHECKPOINT_PATH_KEY: result.checkpoint.path} if result.checkpoint else {})})


class _ReportAllButLast(TuneReportCallback):
    """Forwards each epoch's rank-0 metrics to Tune, except the last: `run_trial` reports that one once `fit()`
    has returned (and except a diverged run's report, which `run_trial` raises as the trial's error).

    Tune stops a trial as soon as it sees the epoch that reaches max_t, which kills the trial actor and the Train
    controller it owns while the controller is still shutting down: its autoscaler request is never cancelled,
    and on an autoscaling cluster the run's worker nodes stay up ~3 min more (Train's request expiry, 180 s)
    instead of idle_timeout_minutes. (A trial that ASHA stops early still ends that way.)
    """

    def __init__(self, *, last_epoch: int) -> None:
        super().__init__()
        self.last_epoch = last_epoch

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics[0].get("epoch") != self.last_epoch and DIVERGED not in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _trial_resources(space: space_model.Space, cluster: dict[str, float]):
    """Per-trial request: the whole trial in-process (1 worker), or only a driver that holds no CPU."""
    driver = sizing.driver_resources(cluster)

    def request(config: dict[str, Any]) -> tune.PlacementGroupFactory:
        res = space_model.trial_config(space, config).resources
        if res.num_workers == 1:
            bundle = {"CPU": res.cpus_per_trial, **({"GPU": res.gpus_per_trial} if res.use_gpu else {})}
            return tune.PlacementGroupFactory([bundle])
        return tune.PlacementGroupFactory([{k: v for k, v in driver.items() if v > 0}])

    return request


def _storage(settings: SearchSettings, space: space_model.Space) -> str:
    configured = space_model.base_value(space, "storage_path")
    return configured or str(Path(settings.results_dir, "ray").resolve())


def _search_alg(settings: SearchSettings, space: space_model.Space, objectives: list[tuple[str, str]],
                warm: WarmStart | None = None) -> OptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" each search
    with warnings.catch_warnings():  # group=True is chosen on purpose (conditional params): no warning each run
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed, multivariate=True, group=True,
                                             constant_liar=True,
                                             n_startup_trials=min(8, max(2, space.budget.num_samples // 3)))
    metric: Any = [m for m, _ in objectives] if len(objectives) > 1 else objectives[0][0]
    mode: Any = [d for _, d in objectives] if len(objectives) > 1 else objectives[0][1]
    storage = space_model.warm_storage(space, warm.known, [d for _, d in objectives], settings.search_name) \
        if warm and warm.known else None
    points = space_model.initial_points(space)
    points += [p for p in (space_model.complete_point(space, p) for p in (warm.points if warm else [])) if
               p not in points]  # another task's best configurations, after the papers' points
    return OptunaSearch(space=space_model.define_by_run(space), metric=metric, mode=mode, sampler=sampler,
                        points_to_evaluate=points or None, storage=storage, study_name=settings.search_name)


def _concurrency(space: space_model.Space) -> int:
    if space.budget.max_concurrent_trials:
        return int(space.budget.max_concurrent_trials)
    res = space_model.trial_config(space, {}).resources
    cluster = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return sizing.max_concurrent_trials(cluster, res.num_workers, res.cpus_per_trial, res.gpus_per_trial)


def _reuse_actors(space: space_model.Space) -> bool:
    """Reuse trial actors only when every trial runs in-process (1 worker).

    A multi-worker trial's thread is still inside `TorchTrainer.fit()` (tearing its worker group down) when Tune
    stops it at max_t or by ASHA; Tune's reset waits 2 s (TUNE_FUNCTION_THREAD_TIMEOUT_S) for it, then fails the
    *next* trial ("Trainable runner reuse requires reset_config()...") without calling any callback. Reuse saves
    nothing there anyway: the Train worker group is started afresh per trial.
    """
    return (space_model.trial_config(space, {}).resources.num_workers == 1
            and "resources.num_workers" not in space.params)


def make_tuner(settings: SearchSettings, space: space_model.Space, tracker_args: dict[str, Any],
               warm: WarmStart | None = None) -> tune.Tuner:
    objectives = objectives_of(settings, space)
    storage = _storage(settings, space)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, search=settings.search_name, storage=storage),
        _trial_resources(space, ray.cluster_resources()))
    callbacks = [MlflowTrials(space=space, **tracker_args), ProgressTable(objectives=objectives)]
    run_config = tune.RunConfig(name=settings.search_name, storage_path=storage, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=1), verbose=0,
                                # all, until the search ends: see drop_superseded_checkpoints
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=None))
    if settings.resume:
        return tune.Tuner.restore(os.path.join(storage, settings.search_name), trainable=trainable,
                                  resume_errored=True)
    metric, mode = objectives[0]
    scheduler = ASHAScheduler(time_attr="epoch", metric=metric, mode=mode, max_t=space_model.max_epochs(space),
                              grace_period=space.budget.grace_period,
                              reduction_factor=space.budget.reduction_factor)
    tune_config = tune.TuneConfig(search_alg=_search_alg(settings, space, objectives, warm), scheduler=scheduler,
                                  num_samples=space.budget.num_samples, reuse_actors=_reuse_actors(space),
                                  max_concurrent_trials=_concurrency(space),
                                  time_budget_s=space.budget.time_budget_s)
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _can_restore(storage: str, name: str) -> bool:
    """Whether Tune has an experiment `name` under `storage` (local, s3:// or gs://); unreadable storage is a
    ConfigError, before Ray starts."""
    try:
        return tune.Tuner.can_restore(os.path.join(storage, name))
    except OSError as err:
        raise ConfigError(f"storage_path={storage}: cannot be read ({str(err).splitlines()[0]})") from None


def resolve_name(settings: SearchSettings, space: space_model.Space) -> SearchSettings:
    """The search's name, such that a new search never writes into an earlier one's runs and results.

    Unnamed, a new search takes kdsearch-<space>, else the first free kdsearch-<space>-2, -3, ...; `resume=true`
    unnamed continues the newest of those. A given name that is taken needs resume=true (or another name).
    """
    base = settings.search_name
    searches = search_names(uri=settings.tracking_uri, experiment=settings.experiment)
    if settings.resume:
        numbers = [int(m.group(1) or 1) for n in searches if (m := re.fullmatch(rf"{re.escape(base)}(?:-(\d+))?", n))]
        newest = max(numbers, default=1)
        return settings if settings.name or newest == 1 else dataclasses.replace(settings, name=f"{base}-{newest}")
    storage = _storage(settings, space)

    def taken(name: str) -> bool:
        return name in searches or _can_restore(storage, name) or Path(settings.results_dir, name).exists()

    if not taken(base):
        return settings
    if settings.name:
        raise ConfigError(f"name={base}: a search of that name exists (MLflow experiment {settings.experiment}, "
                          f"{storage}, or {Path(settings.results_dir, base)}); resume=true continues it, another "
                          "name= starts a new one")
    n = 2
    while taken(f"{base}-{n}"):
        n += 1
    return dataclasses.replace(settings, name=f"{base}-{n}")


def claim_name(settings: SearchSettings, space: space_model.Space) -> SearchSettings:
    """`resolve_name`, then take the name by creating its results folder, atomically: of two identical commands
    started together one gets the name and the other the next free one (named: the error), so they never share
    an MLflow parent or a Tune folder. A resumed search owns its folder already."""
    while True:
        named = resolve_name(settings, space)
        if named.resume or claim(Path(named.results_dir, named.search_name)):
            if named.search_name != settings.search_name and not named.resume:
                print(f"[kdsearch.tune] a search named {settings.search_name} exists: this one is "
                      f"{named.search_name}", flush=True)
            return named


def check_resumable(settings: SearchSettings, space: space_model.Space) -> None:
    """With resume=true: ConfigError unless Tune can restore the named search."""
    storage = _storage(settings, space)
    if settings.resume and not _can_restore(storage, settings.search_name):
        raise ConfigError(f"resume=true: no search named {settings.search_name} under {storage} to resume")


class SearchRun(NamedTuple):
    results: tune.ResultGrid
    seconds: float  # the trials' part (Tuner.fit): what time_budget_s counts


def run_search(settings: SearchSettings, space: space_model.Space, warm: WarmStart | None = None) -> SearchRun:
    """Prepare the shared artifacts, start Ray, run every trial, stop Ray; Tune's ResultGrid and how long it took.

    Every trial lands in MLflow under one parent run (named settings.search_name), left open for the caller
    to close (`export_best` here, the study table in kdsearch.report). ConfigError before any trial runs.
    """
    check_resumable(settings, space)
    # Prepare the shared artifacts (teacher fine-tuning, tokenised data) once, before trials race for them.
    base = space_model.trial_config(space, {})
    prepared = prepare(base)
    check_teacher(base, prepared)
    check_objectives(settings, space, prepared.spec)
    init_ray(resources={sizing.DRIVER_RESOURCE: sizing.HEAD_DRIVER_UNITS})
    tracker_args = {"uri": settings.tracking_uri, "experiment": settings.experiment,
                    "search": settings.search_name, "space_name": space.name, "code_version": code_version(),
                    "objectives": objectives_of(settings, space)}
    tuner = make_tuner(settings, space, tracker_args, warm)
    began = time.monotonic()
    try:
        results = tuner.fit()
    finally:
        ray.shutdown()  # flush the trials' logs now, so that the caller's summary is the last thing printed
    seconds = time.monotonic() - began
    drop_superseded_checkpoints(results)
    return SearchRun(results, seconds)


def drop_superseded_checkpoints(results: Any) -> None:
    """Delete each trial's checkpoints older than its latest, from which Tune's final snapshot restores it.

    `results` is Tune's ResultGrid. Tune keeps every checkpoint while the search runs (num_to_keep=None). With
    pruning on, Tune deletes the old checkpoint as it registers a new one, but its experiment snapshot reaches
    storage later. A driver killed in between left the resumed search restoring a trial from a checkpoint that no
    longer exists, and the trial failed. A newer checkpoint that Tune never registered (the driver stopped as it
    arrived) is kept. Multi-worker trials keep their checkpoints in their Train run, which saves its state before
    it prunes.
    """
    for result in results:
        if result.checkpoint is None:
            continue
        filesystem, path = result.checkpoint.filesystem, result.checkpoint.path.rstrip("/")
        trial_dir, latest = path.rsplit("/", 1)
        for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(trial_dir)):
            if (entry.type == pyarrow.fs.FileType.Directory and entry.base_name.startswith("checkpoint_")
                    and entry.base_name < latest):
                filesystem.delete_dir(entry.path)


def unfinished_trials(settings: SearchSettings) -> int | None:
    """Trials that `resume=true` would still run (UNFINISHED_TAG, written as the search's driver ended): 0 after a
    search that ran to its end, more after Ctrl-C or an expired time budget; None when no driver ended it (one
    killed, or still running) or it has no MLflow run."""
    try:
        parent = find_search(uri=settings.tracking_uri, experiment=settings.experiment, search=settings.search_name)
    except ConfigError:
        return None
    tag = parent.tags.get(UNFINISHED_TAG, "")
    return int(tag) if tag.isdigit() else None
