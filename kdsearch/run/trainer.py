"""Ray Train around the shared loop: the per-worker function, the TorchTrainer, Ray's start-up.

The only module of a run that imports Ray Train. It fills a `WorkerContext` with Ray's DDP wrapping, data
sharding, reporting and checkpoints, and runs the framework-free loop in `kdsearch.run.loop` on every worker.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from kdsearch.config.schema import Config
from kdsearch.core.console import quiet_libraries
from kdsearch.run.loop import WorkerContext, run_distillation, step_losses
from kdsearch.run.prepare import Prepared
from kdsearch.run.sizing import worker_bundle
from kdsearch.run.step import leaves_parameters_unused


def _gather(obj: Any) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _log(line: str) -> None:
    # Not print(): Ray Train patches print on workers to log each line twice (stdout and its logger).
    sys.stdout.write(f"[kdsearch.train] {line}\n")
    sys.stdout.flush()


def _report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


DIVERGED = "kdsearch_diverged"
"""A diverged run's last report: its error, with a checkpoint that holds only that error (DIVERGED_FILE). Ray
Train retries every worker error (FailureConfig.max_failures), and a diverged loss would diverge again from the
same checkpoint after each new worker-group start; reported instead, the run ends at once, and a restore of
the same run (a Tune trial retried) finds the marker and reports it again without training."""


DIVERGED_FILE = "diverged.txt"


def diverged(result: Any) -> str | None:
    """The error of a run whose loss diverged (Ray Train counts it as finished), else None."""
    return (result.metrics or {}).get(DIVERGED)


def _report_diverged(error: str, rank: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, DIVERGED_FILE).write_text(error)
        ray.train.report({DIVERGED: error}, checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker: the shared loop with Ray's hooks."""
    quiet_libraries()
    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    rank = context.get_world_rank()

    def run(checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None and (checkpoint_dir / DIVERGED_FILE).is_file():  # restored after diverging
            _report_diverged((checkpoint_dir / DIVERGED_FILE).read_text(), rank)
            return
        ctx = WorkerContext(
            rank=rank, world_size=context.get_world_size(), device=ray.train.torch.get_device(),
            report=_report, gather=_gather, checkpoint=checkpoint_dir,
            wrap_model=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={
                "find_unused_parameters": leaves_parameters_unused(step_losses(loop_config["cfg"].distill).weights)}),
            wrap_loader=ray.train.torch.prepare_data_loader,
            log=_log)
        try:
            run_distillation(loop_config["cfg"], loop_config["prepared"], ctx)
        except FloatingPointError as err:  # raised by every worker at the same step (the loop decides together)
            _report_diverged(str(err), rank)

    if checkpoint is None:
        run(None)
    else:
        with checkpoint.as_directory() as directory:
            run(Path(directory))


def make_trainer(cfg: Config, prepared: Prepared, *, name: str, storage_path: str,
                 callbacks: Sequence[Any] = (), max_failures: int = 2,
                 loop: Callable[[dict[str, Any]], None] = train_loop_per_worker) -> TorchTrainer:
    """A TorchTrainer for one run; the same (storage_path, name) restores from its latest checkpoint."""
    resources = cfg.resources
    return TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "prepared": prepared},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=worker_bundle(resources.num_workers,
                                                                        resources.cpus_per_trial,
                                                                        resources.gpus_per_trial)),
        run_config=RunConfig(name=name, storage_path=storage_path, callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
    )


def storage_for(cfg: Config) -> str:
    return cfg.storage_path or str(Path(cfg.output_dir, "ray").resolve())


def init_ray(**kwargs: Any) -> None:
    """Attach to RAY_ADDRESS when set (cluster, `ray job submit`), else start a local runtime on 127.0.0.1 only.

    A local runtime otherwise listens on every interface (GCS, raylet, object manager, agents, each worker's
    gRPC port): anyone on the network could reach a machine that only meant to search on itself.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    from ray._private import ray_constants

    # Ray 2.60 replaces _node_ip_address="127.0.0.1" by the host's address unless its single-machine mode is
    # on (the macOS/Windows default, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once when ray is imported); with
    # the node on 127.0.0.1 every Ray process binds loopback (tests/test_local_bind.py). Only for this start:
    # attaching to a cluster and `ray start` need it off, and the started node keeps its address.
    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
