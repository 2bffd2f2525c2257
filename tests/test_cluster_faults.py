"""Faults and autoscaling on real multi-node Ray clusters on this machine: a head and worker nodes (raylets).

(a) A worker node dies while a 2-worker Train trial trains: Train restores from its last checkpoint on a
replacement node, the search completes, one FINISHED MLflow run per trial. (b) The search driver is killed:
`resume=true` completes the rest and leaves finished trials alone. (A trial that fails alone is in
test_tune.py.) (d) Ray's fake multi-node autoscaler adds worker nodes for a trial the head cannot hold and
removes them when idle. Each cluster runs in its own PID + network namespace (tests/cluster_utils.py), so
every process it starts dies with it; drivers attach with RAY_ADDRESS, as on a real cluster.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_utils import (
    PYTHON,
    Node,
    Sandbox,
    cmdline,
    kill_session,
    sandbox_unavailable,
    wait_for,
)

from kdsearch.core.errors import ConfigError
from kdsearch.run.sizing import DRIVER_RESOURCE, max_concurrent_trials
from kdsearch.tracking import RunRecord, find_search, list_trials, open_client

pytestmark = pytest.mark.slow

SPACE = """
description: cluster fault test
base:
  teacher: tiny-bert
  student: {layers: 2}
  task: {name: default, train_size: 256, eval_size: 128}
  train: {epochs: EPOCHS, max_steps_per_epoch: 6, batch_size: 16}
  finetune: {epochs: 1}
  resources: {num_workers: WORKERS, cpus_per_trial: CPUS, gpus_per_trial: 0}
metric: eval_loss
mode: min
budget: {num_samples: NUM, grace_period: EPOCHS, reduction_factor: 2}  # ASHA stops nothing early
params:
  train.lr: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
"""


@pytest.fixture(scope="module", autouse=True)
def _sandbox_possible() -> None:
    reason = sandbox_unavailable()
    if reason:
        pytest.skip(f"needs a private PID + network namespace to keep Ray processes contained: {reason}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the fine-tuned teacher and tokenised data, shared by the tests


def _search_args(tmp: Path, cache: Path, name: str, *, epochs: int, workers: int, cpus: int, num: int) -> list[str]:
    space = tmp / f"{name}.yaml"
    space.write_text(SPACE.replace("EPOCHS", str(epochs)).replace("WORKERS", str(workers))
                     .replace("CPUS", str(cpus)).replace("NUM", str(num)))
    return [PYTHON, "-m", "kdsearch.tune", f"space={space}", f"name={name}",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"results_dir={tmp}/results", f"cache_dir={cache}"]


class _Runs:
    """The trial runs of one search, polled through one MLflow client (a new client per poll costs ~0.4 s of
    CPU, which the cluster under test needs more). Final checks use kdsearch.tracking's own queries."""

    def __init__(self, tmp: Path, search: str) -> None:
        self.uri, self.search = f"sqlite:///{tmp}/mlflow.db", search
        self.db = tmp / "mlflow.db"
        self.client: Any = None

    def poll(self) -> list[Any]:
        """MLflow Run objects, [] until the driver has created the store and experiment."""
        if self.client is None:
            if not self.db.exists():
                return []
            try:
                self.client, self.experiment_id = open_client(self.uri, "kdsearch", create=False)
            except ConfigError:
                return []
        query = f"tags.`kdsearch.search` = '{self.search}' AND tags.`kdsearch.role` = 'trial'"
        return self.client.search_runs([self.experiment_id], query)

    def trials(self) -> list[RunRecord]:
        parent = find_search(uri=self.uri, experiment="kdsearch", search=self.search)
        return list_trials(uri=self.uri, experiment="kdsearch", search_run_id=parent.run_id)

    def history(self, run_id: str, key: str) -> list[int]:
        """Steps at which `key` was logged, in logging order."""
        client, _ = open_client(self.uri, "kdsearch", create=False)
        return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def _tune_snapshot(tmp: Path) -> dict[str, str]:
    """Trial id -> status in Tune's newest experiment snapshot under `tmp`: what a resumed search restores."""
    states = sorted(tmp.rglob("experiment_state*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        trials = [json.loads(trial) for trial, _ in json.loads(states[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, FileNotFoundError):  # Tune is rewriting it: the caller polls again
        return {}
    return {t["trial_id"]: t["status"] for t in trials}


@dataclass
class Cluster:
    """A 0-CPU head that hosts the trial drivers (DRIVER_RESOURCE) and 1-CPU worker nodes, in a sandbox."""

    sb: Sandbox
    head: Node
    workers: list[Node]
    resources: dict[str, float] = field(default_factory=dict)

    def ready(self, count: int = 2) -> Cluster:
        """Replace dead worker nodes (a test that kills one may have failed before replacing it), wait for all."""
        self.workers = [node for node in self.workers if node.proc.alive()]
        while len(self.workers) < count:
            self.workers.append(self.sb.start_worker(self.head, f"worker{len(self.sb.procs)}", num_cpus=1))
        self.resources = self.sb.wait_nodes(self.head.address, count + 1)["resources"]
        return self


class TestStaticCluster:
    """Faults on a head + two 1-CPU worker nodes, one cluster for the class (it starts in ~20 s on 2 cores)."""

    @pytest.fixture(scope="class")
    def cluster(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        with Sandbox(tmp_path_factory.mktemp("cluster")) as sb:
            cluster = Cluster(sb, sb.start_head(num_cpus=0, resources={DRIVER_RESOURCE: 100}), [])
            yield cluster
        assert not sb.pids()  # everything the class started is gone

    def test_train_restores_on_a_new_node_when_a_worker_node_dies(self, cluster: Cluster, tmp_path: Path,
                                                                   cache_dir: Path) -> None:
        epochs, runs, sb, nodes = 4, _Runs(tmp_path, "nodes"), cluster.sb, cluster.ready().workers
        # the real cluster's totals size the search: 2 CPUs / (2 workers x 1 CPU) = one trial at a time
        assert cluster.resources["CPU"] == 2 and cluster.resources[DRIVER_RESOURCE] == 100
        assert max_concurrent_trials(cluster.resources, 2, 2, 0) == 1
        args = _search_args(tmp_path, cache_dir, "nodes", epochs=epochs, workers=2, cpus=2, num=2)
        driver = sb.spawn("driver-nodes", args, env={"RAY_ADDRESS": cluster.head.address})
        try:
            def training() -> list:
                assert driver.alive(), driver.tail()
                return [r for r in runs.poll()
                        if r.info.status == "RUNNING" and 1 <= r.data.metrics.get("epoch", 0) < epochs - 1]

            wait_for(training, timeout=240, what="a trial past its first epoch in MLflow", every=0.5)
            # a 2-worker trial on 1-CPU nodes has one Train worker on each worker node
            assert all(node.hosts("RayTrainWorker") for node in nodes), [n.processes() for n in nodes]
            assert len(nodes[0].kill()) >= 3  # `ray start`, the raylet, its agents and the Train worker
            [victim] = [r for r in runs.poll() if r.info.status == "RUNNING"]
            killed_at_epoch = victim.data.metrics["epoch"]
            # Train needs 2 x 1 CPU again: one survivor and a replacement (what an autoscaler would add)
            nodes.append(sb.start_worker(cluster.head, "replacement", num_cpus=1))
            rc = driver.wait(timeout=300)
            log = driver.tail(500_000)
            assert rc == 0, log[-6000:]
        finally:
            kill_session(driver.pid)

        trials = runs.trials()
        ids = [t.tags["kdsearch.trial_id"] for t in trials]
        assert len(ids) == len(set(ids)) == 2  # exactly one run per trial, none lost
        assert all(t.status == "FINISHED" and t.metrics["epoch"] == epochs for t in trials), trials
        # restored from its checkpoint, not restarted: every epoch reported once (a restart from scratch would
        # report epoch 1 again); the last step is logged twice by design (the final metrics, end_trial)
        steps = runs.history(victim.info.run_id, "epoch")
        assert steps == [*range(1, epochs + 1), epochs], steps
        resumed = [int(k) for k in re.findall(r"resuming after epoch (\d+)", log)]
        assert len(resumed) == 1 and killed_at_epoch <= resumed[0] < epochs, (resumed, log[-6000:])
        # one trial at a time, as sized from the cluster: the runs do not overlap
        first, second = sorted(trials, key=lambda t: t.start_time or 0)
        assert first.end_time is not None and second.start_time is not None
        assert first.end_time <= second.start_time

    def test_resume_after_the_search_driver_is_killed(self, cluster: Cluster, tmp_path: Path,
                                                      cache_dir: Path) -> None:
        # 8 trials, two at a time: under load the driver may write a wave's MLflow updates late, so the kill
        # must still leave trials to resume when it lands a wave or two after the first finished trial.
        num, runs, sb = 8, _Runs(tmp_path, "driver"), cluster.ready().sb
        # 1-worker trials run in the trial process; 2 CPUs / 1 CPU per trial = two at a time
        assert max_concurrent_trials(cluster.resources, 1, 1, 0) == 2
        args = _search_args(tmp_path, cache_dir, "driver", epochs=3, workers=1, cpus=1, num=num)
        # Tune snapshots its state every 10 s or more (what `resume=true` restores): here every second, so that
        # the driver dies soon after the first trial is in a snapshot as ended, with most of the search to do
        env = {"RAY_ADDRESS": cluster.head.address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
        driver = sb.spawn("driver-killed", args, env=env)
        try:
            def one_ended_in_a_snapshot() -> bool:
                assert driver.alive(), driver.tail()
                return "TERMINATED" in _tune_snapshot(tmp_path).values()

            wait_for(one_ended_in_a_snapshot, timeout=240, what="a trial ended in Tune's snapshot", every=0.5)
        finally:
            kill_session(driver.pid)  # SIGKILL: no chance to save anything or close runs
        before = {t.tags["kdsearch.trial_id"]: t for t in runs.trials()}
        assert 1 <= sum(t.status == "FINISHED" for t in before.values()) < num, [
            (t.name, t.status) for t in before.values()]
        # A trial that ended after Tune's last snapshot is legitimately continued from its checkpoint by the
        # resumed search; the trials the snapshot holds as ended must stay untouched.
        snapshot = _tune_snapshot(tmp_path)
        finished = {k: t for k, t in before.items() if t.status == "FINISHED" and snapshot.get(k) == "TERMINATED"}
        assert finished, (snapshot, [(t.name, t.status) for t in before.values()])
        resumed = sb.spawn("driver-resumed", [*args, "resume=true"], env=env)
        try:
            assert resumed.wait(timeout=300) == 0, resumed.tail(6000)
        finally:
            kill_session(resumed.pid)

        trials = runs.trials()
        ids = [t.tags["kdsearch.trial_id"] for t in trials]
        assert len(ids) == len(set(ids)), ids  # one run per trial
        done = [t for t in trials if t.status == "FINISHED"]
        assert len(done) == num, [(t.name, t.status) for t in trials]  # the resumed search completed the rest
        # A trial the killed driver started after Tune's last experiment snapshot (taken every >= 10 s) is
        # unknown to the resumed search (Optuna samples another): its run is closed KILLED, not left RUNNING.
        lost = [t for t in trials if t.status != "FINISHED"]
        assert all(t.status == "KILLED" and t.name in before for t in lost), [(t.name, t.status) for t in lost]
        for trial_id, old in finished.items():  # finished before the kill: not rerun by the resumed search
            new = next(t for t in trials if t.tags["kdsearch.trial_id"] == trial_id)
            assert new.end_time == old.end_time and new.metrics == old.metrics
            assert runs.history(new.run_id, "epoch") == [1, 2, 3, 3]
        # sized from the cluster (no max_concurrent_trials in the space): two trials overlapped, never three
        spans = [(t.start_time or 0, t.end_time or 0) for t in done]
        assert max(sum(s <= start < e for s, e in spans) for start, _ in spans) == 2, spans


def _autoscaling_config(path: Path, *, head: dict[str, Any], worker: dict[str, Any], max_workers: int) -> Path:
    """A full launcher config for Ray's fake multi-node provider: worker nodes are raylets on this machine."""
    empty: dict[str, list] = {key: [] for key in (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands", "setup_commands",
        "head_setup_commands", "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")}
    config = {
        "cluster_name": "kdsearch-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
        "available_node_types": {
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": {"resources": worker, "node_config": {}, "min_workers": 0,
                               "max_workers": max_workers}},
        "head_node_type": "ray.head.default", **empty}
    path.write_text(yaml.safe_dump(config))
    return path


def test_autoscaler_adds_worker_nodes_for_a_train_trial_and_removes_them_when_idle(tmp_path: Path,
                                                                                   cache_dir: Path) -> None:
    head_resources = {"CPU": 0, DRIVER_RESOURCE: 100}
    config = _autoscaling_config(tmp_path / "autoscaler.yaml", head=head_resources, worker={"CPU": 1},
                                 max_workers=2)
    with Sandbox(tmp_path) as sb:
        def raylets() -> int:
            return sum("raylet/raylet " in cmdline(pid) for pid in sb.pids())

        # the fake provider only joins nodes to a GCS on the default port: fine in the private network namespace
        head = sb.start_head(num_cpus=0, resources={DRIVER_RESOURCE: 100}, port=6379,  # as head_resources
                             extra=[f"--autoscaling-config={config}"],
                             env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                  "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "180"})
        found = sb.wait_nodes(head.address, 1)
        assert found["resources"].get("CPU", 0) == 0  # the head cannot hold a single Train worker
        args = _search_args(tmp_path, cache_dir, "scale", epochs=1, workers=2, cpus=2, num=1)
        driver = sb.spawn("driver", args, env={"RAY_ADDRESS": head.address})
        started, peak, scaled_at = time.monotonic(), 1, 0.0
        while driver.launcher.poll() is None:
            assert time.monotonic() - started < 300, f"search still running after 300 s: {driver.tail()}"
            if (count := raylets()) > peak:
                peak, scaled_at = count, time.monotonic() - started
            time.sleep(0.5)
        assert driver.launcher.returncode == 0, driver.tail(6000)
        # the 2 x 1-CPU Train workers needed 2 new worker nodes (on a loaded machine the autoscaler may also
        # replace a node that was slow to report, so more raylets can exist for a moment)
        assert peak >= 3, peak
        ended = time.monotonic()
        # idle_timeout_minutes 0.1: gone well before Train's autoscaler request would expire (180 s)
        wait_for(lambda: raylets() == 1, timeout=90, what="idle worker nodes to be removed")
        print(f"\nautoscaler: {peak} nodes {scaled_at:.0f} s after the driver started; back to the head alone "
              f"{time.monotonic() - ended:.0f} s after the search ended")
    assert not sb.pids()  # the head, the nodes the autoscaler added and the driver are gone

    [trial] = _Runs(tmp_path, "scale").trials()
    assert trial.status == "FINISHED" and trial.metrics["epoch"] == 1
