"""A real local Ray cluster for the tests and ``benchmarks/ray_batch.py``: a head and a
second node (``ray start --block``, each in its own session, so that killing the session
kills that node's raylet, agents and actors and nothing else).

Everything runs in a network namespace of its own with only a loopback interface
(``unshare -n``, or ``unshare -rn`` when not root), entered with ``nsenter``: Ray binds the
machine's address otherwise, and these tests' traffic must stay on loopback.  Where no
namespace can be made, the cluster binds 127.0.0.1 (``--node-ip-address``) on free ports.
The drivers (``dicomnode batch --ray``, ``dicomnode serve``) and the peers they talk to run
in the same namespace, through :meth:`RayCluster.command`.

Nothing here imports pytest: a cluster that cannot start raises :class:`RayUnavailable`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

VENV_BIN = Path(sys.executable).parent
#: Ray 2.60 asks for a token unless told otherwise; fast detection of a dead node.
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


#: Each node's object store (the default, 30% of the memory, is not needed here).
OBJECT_STORE_BYTES = 256 * 2**20


class RayUnavailable(RuntimeError):
    """Ray is not installed or a cluster cannot be started here."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_members(sid: int) -> list[int]:
    """The processes whose session is ``sid`` (from ``/proc/<pid>/stat``)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After "(comm)": state, ppid, pgrp, session, ...
        if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
            members.append(int(entry.name))
    return members


class LoopbackNamespace:
    """A network namespace holding only ``lo`` (up), kept alive by a ``sleep`` process."""

    def __init__(self) -> None:
        root = os.geteuid() == 0
        unshare = ["unshare", "-n"] if root else ["unshare", "-rn"]
        self.holder = subprocess.Popen(
            [*unshare, "--", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "up":
            error = self.holder.stderr.read() if self.holder.stderr else ""
            self.close()
            raise OSError(f"no network namespace: {error.strip()}")
        enter = ["nsenter", "-t", str(self.holder.pid), "-n"]
        self.prefix = enter if root else [*enter, "-U", "--preserve-credentials"]
        check = subprocess.run([*self.prefix, "true"], capture_output=True, text=True)
        if check.returncode != 0:
            self.close()
            raise OSError(f"cannot enter the namespace: {check.stderr.strip()}")

    def close(self) -> None:
        if self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait()


class RayCluster:
    """A head and (:meth:`start_second`) a second node, each with its own resources:
    ``head`` and ``second`` (custom resources), ``num_cpus`` logical CPUs each."""

    def __init__(self, logs: Path, num_cpus: int = 2) -> None:
        if shutil.which("ray", path=str(VENV_BIN)) is None:
            raise RayUnavailable("ray is not installed: pip install 'dicomnode[ray]'")
        self.logs = logs
        self.num_cpus = num_cpus
        logs.mkdir(parents=True, exist_ok=True)
        # Unix socket paths must stay short: the session folder goes under this.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="dnray", dir="/tmp"))
        self.namespace: LoopbackNamespace | None = None
        try:
            self.namespace = LoopbackNamespace()
            self.port = 6379
            self.isolation = "network namespace (loopback only)"
        except OSError as exc:
            self.port = _free_port()
            self.isolation = f"no network namespace ({exc}); Ray bound to 127.0.0.1"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self._log_files: list[IO[bytes]] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def prefix(self) -> list[str]:
        return self.namespace.prefix if self.namespace else []

    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **RAY_ENV, **extra}
        env.pop("RAY_ADDRESS", None)
        return env

    def command(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the cluster's network (a session of its own)."""
        kwargs.setdefault("env", self.env())
        return subprocess.Popen([*self.prefix, *argv], start_new_session=True, **kwargs)

    def run(
        self, argv: list[str], timeout: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the cluster's network to its end (killed after ``timeout``)."""
        p = self.command(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            out, err = p.communicate()
            raise AssertionError(f"{argv[:3]} ran past {timeout} s:\n{out}\n{err}") from None
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    @staticmethod
    def kill(p: subprocess.Popen[Any]) -> None:
        """SIGKILL every process of ``p``'s session (it was started in its own): Ray's
        workers put themselves in process groups of their own, but stay in the session
        of the ``ray start`` that spawned them."""
        if p.poll() is None:
            for pid in session_members(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        p.wait()

    def _start(self, name: str, args: list[str], timeout: float = 90.0) -> None:
        log_path = self.logs / f"{name}-{len(self._log_files)}.log"
        log = log_path.open("wb")
        self._log_files.append(log)
        argv = [str(VENV_BIN / "ray"), "start", "--block", *args]
        argv += ["--temp-dir", str(self.temp_dir), "--disable-usage-stats"]
        argv += ["--object-store-memory", str(OBJECT_STORE_BYTES)]
        if self.namespace is None:
            argv += ["--node-ip-address", "127.0.0.1"]
        p = self.command(argv, stdout=log, stderr=subprocess.STDOUT)
        self.nodes[name] = p
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Ray runtime started" in log_path.read_text(errors="replace"):
                return
            if p.poll() is not None:
                break
            time.sleep(0.2)
        self.kill(p)
        raise RayUnavailable(f"ray start ({name}) failed:\n{log_path.read_text()[-3000:]}")

    def start_head(self) -> None:
        args = ["--head", "--port", str(self.port), "--num-cpus", str(self.num_cpus)]
        args += ["--resources", json.dumps({"head": 100}), "--include-dashboard=false"]
        if self.namespace is None:
            args += ["--ray-client-server-port", str(_free_port())]
            args += ["--dashboard-port", str(_free_port())]
        self._start("head", args)

    def start_second(self) -> None:
        """Start the second node and wait until work can be scheduled on it (the cluster's
        view of its resources lags its registration a little)."""
        args = ["--address", self.address, "--num-cpus", str(self.num_cpus)]
        self._start("second", [*args, "--resources", json.dumps({"second": 100})])
        script = (
            "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "probe = ray.remote(lambda: ray.get_runtime_context().get_node_id()); "
            "print(ray.get(probe.options(resources={'second': 1}).remote(), timeout=60))"
        )
        done = self.run([sys.executable, "-c", script, self.address], timeout=90)
        if done.returncode != 0:
            raise RayUnavailable(f"the second node takes no work: {done.stderr[-2000:]}")

    def kill_second(self) -> None:
        """SIGKILL every process of the second node (raylet, agents, its actors)."""
        self.kill(self.nodes.pop("second"))

    def node_ids(self) -> dict[str, str]:
        """Node id of the ``head`` and ``second`` node (those alive)."""
        script = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(json.dumps({('head' if 'head' in n['Resources'] else 'second'): n['NodeID'] "
            "for n in ray.nodes() if n['Alive']}))"
        )
        done = self.run([sys.executable, "-c", script, self.address], timeout=60)
        if done.returncode != 0:
            raise RayUnavailable(f"cannot list the nodes: {done.stderr[-2000:]}")
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    def stop(self) -> None:
        for name in list(self.nodes):
            self.kill(self.nodes.pop(name))
        for log in self._log_files:
            log.close()
        if self.namespace is not None:
            self.namespace.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
