"""The local Ray runtime that kdsearch starts (`kdsearch.train.init_ray`) listens on 127.0.0.1 only.

Started in a subprocess (its own session and temp dir), so that neither the Ray of other tests nor another Ray
on this machine is touched; every process left in that session is killed by PID afterwards. No `ray stop`: it
kills every Ray process on the machine.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# Runs in the subprocess, which leads its own session: Ray's processes (the driver itself, GCS, raylet, dashboard,
# agents, workers) are the session's. psutil comes with ray (ray/thirdparty_files, on sys.path once ray is
# imported). A task and an actor start worker processes, whose own gRPC servers must listen on loopback too.
_CHILD = textwrap.dedent("""
    import json, os, sys, time
    from kdsearch.train import init_ray
    import ray, psutil

    init_ray(num_cpus=1, _temp_dir=sys.argv[1])

    @ray.remote
    def node_ip():
        return ray.util.get_node_ip_address()

    @ray.remote
    class Echo:
        def echo(self, x):
            return x

    worker_ip = ray.get(node_ip.remote())
    echo = Echo.remote()  # held, so that its worker still listens below
    assert ray.get(echo.echo.remote(1)) == 1
    time.sleep(2)  # a moment for the agents to bind every server they start
    names = {}
    for p in psutil.process_iter(["name"]):
        try:
            if os.getsid(p.pid) == os.getsid(0):
                names[p.pid] = p.info["name"]
        except ProcessLookupError:
            pass
    listening = [[names[c.pid], c.laddr.ip, c.laddr.port] for c in psutil.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.pid in names]
    print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "worker_ip": worker_ip,
                      "listening": listening}))
    ray.shutdown()
""")


def _session_pids(session: int) -> list[int]:
    """Every process in `session`: Ray's GCS, raylet, agents and workers stay in the session of the process that
    started them (workers get their own process groups, so a process-group kill would miss them)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        except OSError:
            continue
        if int(fields[3]) == session:
            pids.append(int(stat.parent.name))
    return pids


def _kill_session(session: int) -> None:
    """SIGKILL what is left: a clean ray.shutdown leaves nothing, a failed or hung start may leave its GCS."""
    for pid in _session_pids(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_child(temp_dir: str) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, temp_dir], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        _kill_session(proc.pid)  # the child leads its own session: its pid is the session id
        proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def _ipv4(host: str) -> str:
    """`::ffff:127.0.0.1` (an IPv6 socket that accepts only IPv4 loopback) is 127.0.0.1."""
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only() -> None:
    # Short path: Ray's Unix sockets live under the temp dir and must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="kdbind-", dir="/tmp")
    try:
        result = _run_child(temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    listening = result["listening"]
    assert isinstance(listening, list)
    names = {name for name, _, _ in listening}
    # The sockets really are this runtime's: its GCS port, its raylet, its workers.
    gcs_port = int(str(result["gcs"]).rsplit(":", 1)[1])
    assert gcs_port in {port for _, _, port in listening}
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::") for n in names), names
    public = [(name, host, port) for name, host, port in listening if _ipv4(host) != "127.0.0.1"]
    assert not public, f"listening beyond 127.0.0.1: {public}"
    # what Ray tells tasks (Ray Train's MASTER_ADDR): an address that nothing listens on would break them
    assert result["worker_ip"] == "127.0.0.1"
