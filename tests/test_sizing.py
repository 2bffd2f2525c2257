"""Concurrency sizing: per-worker bundles, fitting a node type, trials at once (kdsearch.sizing)."""

from __future__ import annotations

import pytest

from kdsearch.run.sizing import (
    DRIVER_RESOURCE,
    LOCAL_DRIVER_CPUS,
    bundles_per_node,
    driver_resources,
    fits,
    max_concurrent_trials,
    worker_bundle,
)

G5_XLARGE = {"CPU": 4, "GPU": 1}
G5_12XLARGE = {"CPU": 48, "GPU": 4}


def test_bundle_splits_the_trial_evenly_over_its_workers() -> None:
    assert worker_bundle(2, 8, 2) == {"CPU": 4, "GPU": 1}
    assert worker_bundle(4, 6, 1) == {"CPU": 1.5, "GPU": 0.25}
    assert worker_bundle(1, 1, 0) == {"CPU": 1}  # no GPU key: a CPU trial must not ask for GPU nodes
    assert worker_bundle(0, 2, 1) == {"CPU": 2, "GPU": 1}  # Train local mode: one process holds it all


def test_negative_requests_name_the_config_key() -> None:
    with pytest.raises(ValueError, match="resources.cpus_per_trial=-1"):
        worker_bundle(1, -1, 0)


def test_bundles_per_node_is_bounded_by_the_scarcest_resource() -> None:
    assert bundles_per_node(G5_12XLARGE, {"CPU": 4, "GPU": 1}) == 4  # GPU-bound
    assert bundles_per_node(G5_12XLARGE, {"CPU": 16, "GPU": 1}) == 3  # CPU-bound
    assert bundles_per_node({"CPU": 8}, {"CPU": 8 / 3}) == 3  # float error must not lose a bundle
    assert bundles_per_node({"CPU": 8}, {"CPU": 1, "GPU": 1}) == 0  # a CPU node holds no GPU worker


def test_fits_needs_one_worker_type_that_holds_a_whole_bundle() -> None:
    types = {"gpu_1x_spot": G5_XLARGE, "gpu_4x": G5_12XLARGE}
    assert fits(types, 2, 8, 2)  # 4 CPU + 1 GPU per worker: both types
    assert fits(types, 1, 16, 4)  # 16 CPU + 4 GPU: only the 4-GPU type
    assert not fits(types, 1, 8, 8)  # 8 GPUs in one worker: no single node has them
    assert not fits(types, 2, 200, 2)  # 100 CPUs per worker
    assert not fits({"cpu": {"CPU": 96}}, 1, 1, 1)  # a GPU trial on CPU-only workers


def test_max_concurrent_trials_takes_the_tighter_of_cpu_and_gpu() -> None:
    cluster = {"CPU": 128, "GPU": 16, DRIVER_RESOURCE: 1000}
    assert max_concurrent_trials(cluster, 2, 8, 2) == 8  # GPU-bound: 16 / 2
    assert max_concurrent_trials(cluster, 2, 32, 2) == 4  # CPU-bound: 128 / 32
    assert max_concurrent_trials({"CPU": 2}, 1, 1, 0) == 2  # the local default: 1 CPU per trial


def test_max_concurrent_trials_is_at_least_one() -> None:
    # an autoscaling cluster starts as a 0-CPU head: the first trial's demand is what adds nodes
    assert max_concurrent_trials({"CPU": 0, DRIVER_RESOURCE: 1000}, 2, 8, 2) == 1
    assert max_concurrent_trials({"CPU": 4}, 1, 0, 0) == 1


def test_driver_uses_the_head_resource_only_where_it_exists() -> None:
    assert driver_resources({"CPU": 0, DRIVER_RESOURCE: 1000}) == {"CPU": 0, DRIVER_RESOURCE: 1}
    # on one machine the resource is absent: asking for it would leave every trial PENDING forever
    assert driver_resources({"CPU": 2}) == {"CPU": LOCAL_DRIVER_CPUS}
