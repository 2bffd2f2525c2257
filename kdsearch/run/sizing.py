"""Concurrency sizing: does a trial's Train worker fit a node type, and how many trials run at once.

Pure arithmetic on Ray-style resource dicts ({"CPU": 8, "GPU": 1, ...}); imports nothing from Ray, so the
cluster-config tests, the README's numbers and the search driver share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

DRIVER_RESOURCE = "kdsearch_driver"
"""Custom resource that only the head advertises: Tune trial drivers ask for it, so they (and the Train
controllers, which Ray attaches to the driver's node) run on the CPU head and never take a GPU node's CPUs."""
HEAD_DRIVER_UNITS = 1000
"""Units the head advertises (cluster/*.yaml, KubeRay rayStartParams); one per running trial driver."""
DRIVER_UNITS_PER_TRIAL = 1
LOCAL_DRIVER_CPUS = 0.5
"""Without the custom resource (one machine) a driver takes half a CPU: Ray rejects an all-zero request."""

_EPS = 1e-9  # 8 / 3 * 3 must still fit on 8 CPUs


def driver_resources(cluster_resources: Mapping[str, float]) -> dict[str, float]:
    """Resources of one Tune trial driver on this cluster (for `tune.with_resources`).

    On a cluster whose head advertises DRIVER_RESOURCE the driver takes 0 CPU and one unit of it; elsewhere
    it takes LOCAL_DRIVER_CPUS (requesting an absent custom resource would wait forever).
    """
    if cluster_resources.get(DRIVER_RESOURCE, 0) >= DRIVER_UNITS_PER_TRIAL:
        return {"CPU": 0.0, DRIVER_RESOURCE: float(DRIVER_UNITS_PER_TRIAL)}
    return {"CPU": LOCAL_DRIVER_CPUS}


def worker_bundle(num_workers: int, cpus_per_trial: float, gpus_per_trial: float) -> dict[str, float]:
    """One Train worker's share of a trial: the trial's CPUs and GPUs split evenly over its workers.

    `num_workers=0` (Train local mode) runs the whole trial in one process: one bundle of everything.
    """
    if num_workers < 0 or cpus_per_trial < 0 or gpus_per_trial < 0:
        raise ValueError(
            f"resources.num_workers={num_workers}, resources.cpus_per_trial={cpus_per_trial}, "
            f"resources.gpus_per_trial={gpus_per_trial}: none may be negative"
        )
    workers = max(num_workers, 1)
    bundle = {"CPU": cpus_per_trial / workers}
    if gpus_per_trial > 0:
        bundle["GPU"] = gpus_per_trial / workers
    return bundle


def bundles_per_node(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of `bundle` one node of this type holds (a bundle never spans nodes)."""
    counts = [math.floor(node.get(name, 0) / amount + _EPS) for name, amount in bundle.items() if amount > 0]
    return min(counts) if counts else 0


def fits(
    worker_types: Mapping[str, Mapping[str, float]],
    num_workers: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> bool:
    """True if one Train worker of this trial fits on at least one worker node type.

    `worker_types` maps a node type name to what one node advertises, e.g. {"gpu": {"CPU": 8, "GPU": 1}}.
    The autoscaler adds as many nodes of that type as the trial's workers need (up to its max_workers).
    """
    bundle = worker_bundle(num_workers, cpus_per_trial, gpus_per_trial)
    return any(bundles_per_node(node, bundle) >= 1 for node in worker_types.values())


def max_concurrent_trials(
    cluster_resources: Mapping[str, float],
    num_workers: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
) -> int:
    """Trials that fit at once by the cluster's CPU and GPU totals (e.g. `ray.cluster_resources()`); >= 1.

    Totals ignore how bundles pack onto nodes, so this is an upper bound; `bundles_per_node` gives the exact
    count per node type. A trial that asks for nothing is not bounded by the cluster and counts as 1.
    """
    per_trial = {"CPU": cpus_per_trial, "GPU": gpus_per_trial}
    limits = [
        math.floor(cluster_resources.get(name, 0) / amount + _EPS)
        for name, amount in per_trial.items()
        if amount > 0
    ]
    return max(min(limits), 1) if limits else 1
