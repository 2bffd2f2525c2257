"""Helpers for tests that run a real multi-node Ray cluster on this machine (imported, not a conftest).

Every process runs inside a `Sandbox`: a private PID namespace (and network namespace, so no port can clash
with another Ray on this machine, and the fake autoscaler may take its fixed GCS port 6379) made by `unshare`.
Closing the sandbox kills everything in it and checks that nothing is left. Never `ray stop`: it kills every
Ray process on the machine, other people's test runs included.

A "node" is one `ray start --block` session (its own --temp-dir and ports): Ray puts its workers in their own
process groups but in the node's session, so killing a node means SIGKILL to every process of that session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
T = TypeVar("T")

# The nodes' and drivers' environment: no token auth (2.60 turns it on for local clusters), no network.
BASE_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
# A killed raylet is declared dead after period x threshold (default 3 s x 5); fail faster in tests. A killed
# raylet refuses the check at once, so the per-check timeout keeps its default (10 s): a live node that a loaded
# machine stalls for a few seconds is not declared dead.
FAST_FAILURE_ENV = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}

# PID 1 of the sandbox: brings loopback up in the new network namespace, then reaps orphans forever.
_INIT = textwrap.dedent("""
    import os, subprocess, sys, time
    if sys.argv[1] == "net":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print("ready", flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(0.2)
""")


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, every: float = 1.0) -> T:
    """Poll `predicate` until it returns something truthy (returned); TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, sid) of a process, in the host's numbering; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    if fields[0] == "Z":
        return None  # a zombie holds no resources and will be reaped by the sandbox's init
    return int(fields[1]), int(fields[2]), int(fields[3])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def session_pids(sid: int) -> list[int]:
    """Live processes of the session led by `sid` (host numbering)."""
    return [pid for pid in _all_pids() if (st := _stat(pid)) is not None and st[2] == sid]


def kill_session(sid: int, *, timeout: float = 30) -> list[int]:
    """SIGKILL every process of a session (its process group and the groups Ray gives its workers); returns
    the pids once all are gone."""
    pids = session_pids(sid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(_stat(pid) for pid in pids), timeout=timeout, what=f"session {sid} to die",
             every=0.1)
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def sandbox_unavailable(*, net: bool = True) -> str | None:
    """Why a sandbox cannot be made here (a pytest skip reason), or None."""
    for tool in ("unshare", "nsenter", "setsid") + (("ip",) if net else ()):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    flags = ["--pid", "--fork", "--mount-proc"] + (["--net"] if net else [])
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare {' '.join(flags)}` is not permitted here: {probe.stderr.strip()}"
    return None


@dataclass
class Proc:
    """A process started in the sandbox; `pid` (host numbering) leads its own session."""

    name: str
    pid: int
    launcher: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return _stat(self.pid) is not None

    def wait(self, timeout: float) -> int:
        """Exit status (nsenter passes its child's on)."""
        return self.launcher.wait(timeout=timeout)

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@dataclass
class Node:
    proc: Proc
    temp_dir: str
    address: str  # the head's GCS address, 127.0.0.1:<port>

    def processes(self) -> list[int]:
        return session_pids(self.proc.pid)

    def hosts(self, needle: str) -> bool:
        """True if a process of this node has `needle` in its title, e.g. ray::RayTrainWorker."""
        return any(needle in cmdline(pid) for pid in self.processes())

    def kill(self) -> list[int]:
        return kill_session(self.proc.pid)


@dataclass
class Sandbox:
    """A PID (+ network) namespace; `spawn` runs a command in it, `close` kills all and checks none is left."""

    root: Path
    net: bool = True
    procs: list[Proc] = field(default_factory=list)
    temp_dirs: list[str] = field(default_factory=list)
    _init: subprocess.Popen | None = None
    _init_pid: int = 0
    _ns: str = ""
    _next_port: int = 20000

    def __enter__(self) -> Sandbox:
        flags = ["--pid", "--fork", "--mount-proc", "--kill-child"] + (["--net"] if self.net else [])
        init = self._init = subprocess.Popen(["unshare", *flags, PYTHON, "-c", _INIT, "net" if self.net else "host"],
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert init.stdout is not None
        line = init.stdout.readline()
        assert line.strip() == "ready", f"sandbox did not start: {line}{init.stdout.read()}"
        pid = wait_for(lambda: self._child_of(init.pid), timeout=10, what="sandbox init", every=0.05)
        assert pid is not None
        self._init_pid = pid
        self._ns = os.readlink(f"/proc/{self._init_pid}/ns/pid")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _child_of(parent: int) -> int | None:
        kids = [pid for pid in _all_pids() if (st := _stat(pid)) is not None and st[0] == parent]
        return kids[0] if kids else None

    def port(self) -> int:
        """A port for one Ray service; in a private network namespace every port is free."""
        if self.net:
            self._next_port += 1
            return self._next_port
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def spawn(self, name: str, args: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Proc:
        """Start `args` in the sandbox as the leader of a new session; output goes to <root>/<name>.log."""
        log = self.root / f"{name}.log"
        ns = [f"--target={self._init_pid}", "--pid", "--mount"] + (["--net"] if self.net else [])
        with open(log, "ab") as out:
            launcher = subprocess.Popen(["nsenter", *ns, "--", "setsid", *args], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env={**os.environ, **BASE_ENV, **(env or {})}, cwd=cwd or self.root)
        pid = wait_for(lambda: self._child_of(launcher.pid) or launcher.poll() is not None, timeout=10,
                       what=f"{name} to start", every=0.02)
        if pid is True:
            raise RuntimeError(f"{name} exited at once: {log.read_text(errors='replace')[-2000:]}")
        proc = Proc(name, pid, launcher, log)
        self.procs.append(proc)
        return proc

    def run(self, name: str, args: list[str], *, env: dict[str, str] | None = None, timeout: float) -> str:
        """Run a command in the sandbox to completion; its output, or AssertionError with it."""
        proc = self.spawn(name, args, env=env)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_session(proc.pid)
            raise
        assert rc == 0, f"{name} exited {rc}: {proc.tail()}"
        return proc.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        """Host pids of every live process in the namespace, init included."""
        found = []
        for pid in _all_pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") == self._ns and _stat(pid) is not None:
                    found.append(pid)
            except OSError:
                pass
        return found

    def close(self) -> None:
        """Kill the namespace's init (the kernel then kills every process in it); assert nothing survives."""
        if self._init is None:
            return
        try:
            os.kill(self._init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._init.wait(timeout=30)
        for proc in self.procs:
            try:
                proc.launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.launcher.kill()
        self._init = None
        wait_for(lambda: not self.pids(), timeout=30, what="sandbox processes to exit", every=0.2)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)

    # -- Ray nodes

    def _temp_dir(self, prefix: str) -> str:
        """A node's --temp-dir, removed by `close`: short, since Ray's socket paths must fit in 107 bytes."""
        self.temp_dirs.append(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        return self.temp_dirs[-1]

    def _node_args(self, temp_dir: str, num_cpus: float, resources: dict[str, float] | None) -> list[str]:
        args = [f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
                f"--node-manager-port={self.port()}", f"--object-manager-port={self.port()}",
                f"--metrics-export-port={self.port()}", f"--runtime-env-agent-port={self.port()}",
                f"--dashboard-agent-listen-port={self.port()}", f"--dashboard-agent-grpc-port={self.port()}",
                "--object-store-memory=100000000", "--disable-usage-stats"]
        low = 30000 + 1000 * len(self.procs)  # disjoint worker port ranges: raylets do not coordinate them
        args += [f"--min-worker-port={low}", f"--max-worker-port={low + 999}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return args

    def start_head(self, *, num_cpus: float = 0, resources: dict[str, float] | None = None,
                   port: int | None = None, env: dict[str, str] | None = None,
                   extra: Sequence[str] = ()) -> Node:
        """A head with its dashboard on 127.0.0.1 (Train V2 needs the State API); returns once launched."""
        temp_dir = self._temp_dir("kdh")
        gcs = port or self.port()
        args = [RAY, "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={self.port()}",
                f"--ray-client-server-port={self.port()}", *self._node_args(temp_dir, num_cpus, resources), *extra]
        proc = self.spawn("head", args, env={**FAST_FAILURE_ENV, **(env or {})})
        return Node(proc, temp_dir, f"127.0.0.1:{gcs}")

    def start_worker(self, head: Node, name: str, *, num_cpus: float = 1,
                     resources: dict[str, float] | None = None) -> Node:
        temp_dir = self._temp_dir("kdw")
        args = [RAY, "start", "--block", f"--address={head.address}",
                *self._node_args(temp_dir, num_cpus, resources)]
        return Node(self.spawn(name, args, env=FAST_FAILURE_ENV), temp_dir, head.address)

    def wait_nodes(self, address: str, count: int, *, timeout: float = 120) -> dict[str, Any]:
        """Block until `count` nodes are alive; returns {"nodes": [...], "resources": cluster totals}."""
        probe = textwrap.dedent(f"""
            import json, time, ray
            ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)
            deadline = time.monotonic() + {timeout}
            while True:
                alive = [n for n in ray.nodes() if n["Alive"]]
                if len(alive) == {count} or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            time.sleep(1)  # let the resource view catch up with the node table
            print("PROBE" + json.dumps({{"nodes": [n["Resources"] for n in alive],
                                        "resources": ray.cluster_resources()}}))
        """)
        out = self.run(f"probe{len(self.procs)}", [PYTHON, "-c", probe], timeout=timeout + 60)
        found = json.loads(out[out.rindex("PROBE") + 5:].splitlines()[0])
        assert len(found["nodes"]) == count, f"expected {count} alive nodes, got {found}"
        return found
