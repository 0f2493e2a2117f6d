"""Shared helpers of the fault tests and ``benchmarks/soak.py``.

The node runs as ``dicomnode serve`` in its own process group (so that SIGKILL takes the
worker processes too, as a crash of the host or container would); the PACS is dcmtk's
``storescp -v``, whose log has one ``storing DICOM file`` line per reception, so a result
delivered twice shows up as two lines for one SOP Instance UID; studies are sent with dcmtk's
``storescu -v``, whose log says which files were acknowledged with Success.  The index is
read with plain SQLite queries while the node is down or running (WAL readers never block).

Nothing here imports pytest: a missing peer raises :class:`Unavailable`, which the tests turn
into a skip (a failure in CI) and the benchmark into an error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicomnode.errors import DicomNodeError
from dicomnode.net.scu import Peer, echo
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom
from integration.peers import peer_environment, wait_until

NODE_AE = "DICOMNODE"
#: A tiny study: 64 x 64 x 10 slices (8 KiB per instance).
TINY = PhantomSpec(
    rows=64, columns=64, slices=10, pixel_spacing=(5.6, 5.6), slice_thickness=5.0, n_lesions=1
)


class Unavailable(RuntimeError):
    """A peer tool or facility (tmpfs mount) the test needs is missing."""


def tool(name: str) -> str:
    """Full path of a dcmtk tool, ignoring pynetdicom's same-named scripts in the venv."""
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise Unavailable(f"{name} is not installed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- studies -------------------------------------------------------------------------


def write_study(folder: Path, seed: int, spec: PhantomSpec = TINY) -> list[Path]:
    """A fresh study (new UIDs) written to ``folder``."""
    spec = PhantomSpec(**{**spec.__dict__, "seed": seed})
    return write_phantom(generate_phantom(spec), folder)


class StudyFactory:
    """Fresh copies of one template study at almost no CPU cost (for load).

    The template is written once; each copy replaces its UIDs (study, series, frame of
    reference, every SOP instance) in the file bytes with new UIDs of the same length, so
    no element length changes and no dataset is encoded again.
    """

    def __init__(self, folder: Path, spec: PhantomSpec = TINY) -> None:
        self.folder = folder
        files = write_phantom(generate_phantom(spec), folder / "template")
        self.template = [p.read_bytes() for p in files]
        first = dcmread(files[0], stop_before_pixels=True)
        self._shared = [
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            str(first.FrameOfReferenceUID),
        ]
        self._own = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
        self._count = 0
        self._lock = threading.Lock()
        self.instance_bytes = len(self.template[0])

    @staticmethod
    def _uid_like(uid: str) -> str:
        """A new UID of the same length: the root kept, the last component random."""
        root, _, last = uid.rpartition(".")
        return f"{root}.{secrets.randbelow(9 * 10 ** (len(last) - 1)) + 10 ** (len(last) - 1)}"

    def copy(self) -> list[Path]:
        with self._lock:
            self._count += 1
            folder = self.folder / f"copy-{self._count:05d}"
        folder.mkdir(parents=True)
        shared = [(u.encode(), self._uid_like(u).encode()) for u in self._shared]
        paths = []
        for k, (data, own) in enumerate(zip(self.template, self._own, strict=True)):
            for old, new in [*shared, (own.encode(), self._uid_like(own).encode())]:
                data = data.replace(old, new)
            path = folder / f"IM_{k + 1:05d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        return paths


def study_uid(path: Path) -> str:
    return str(
        dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID
    )


# --- the node as a process -----------------------------------------------------------


@dataclass
class Destination:
    name: str
    port: int
    ae_title: str = "PACS"
    timeout_s: float = 10.0


@dataclass
class NodeConfig:
    """What goes into the node's TOML file (only the keys the fault tests vary)."""

    port: int
    data_dir: Path
    segmentation: Path
    classification: Path
    destinations: Sequence[Destination] = ()
    quiet_period_s: float = 0.5
    workers: int = 1
    min_free_disk_mb: int = 0
    max_associations: int = 8
    job_attempts: int = 50
    delivery_attempts: int = 1000
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 1.0
    log_level: str = "INFO"

    def write(self, path: Path) -> Path:
        remotes = "".join(
            f'[[remotes]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\nhost = "127.0.0.1"\n'
            f"port = {d.port}\ntimeout_s = {d.timeout_s}\n"
            for d in self.destinations
        )
        names = json.dumps([d.name for d in self.destinations])
        path.write_text(f"""
[node]
ae_title = "{NODE_AE}"
port = {self.port}
data_dir = "{self.data_dir}"
workers = {self.workers}
min_free_disk_mb = {self.min_free_disk_mb}
max_associations = {self.max_associations}
network_timeout_s = 20
log_level = "{self.log_level}"
[completeness]
quiet_period_s = {self.quiet_period_s}
poll_interval_s = 0.05
[jobs]
max_attempts = {self.job_attempts}
backoff_initial_s = 0.2
backoff_max_s = 1.0
[delivery]
max_attempts = {self.delivery_attempts}
backoff_initial_s = {self.backoff_initial_s}
backoff_max_s = {self.backoff_max_s}
{remotes}
[[pipelines]]
name = "lesion"
bundles.segmentation = "{self.segmentation}"
bundles.classification = "{self.classification}"
batch_size = 16
providers = ["cpu"]
[[routes]]
name = "ct"
pipeline = "lesion"
destinations = {names}
[[routes.match]]
Modality = "CT"
""")
        return path


class NodeProcess:
    """``dicomnode serve --config`` in a new session (process group) of its own."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n===== start {self.starts + 1} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        wait_until(self._listening, timeout, "the node to listen", interval=0.02)

    def _listening(self) -> bool:
        """C-ECHO answered (a bare TCP probe would hold up a graceful stop: ACSE timeout)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the node exited at start-up:\n{self.tail()}")
        try:
            return echo(Peer(NODE_AE, "127.0.0.1", self.port, 5.0), "PROBE") == 0
        except DicomNodeError:
            return False

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: the node and its worker processes."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_until(lambda: not _group_alive(self.proc.pid), 10, "the process group to die")  # type: ignore[union-attr]
        self.proc = None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful stop); returns the exit status."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the node did not stop on SIGTERM:\n{self.tail()}") from None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # nothing should be left; make sure
        self.proc = None
        return code

    def rss_kib(self) -> dict[int, int]:
        """VmRSS (KiB) of the node and of each of its child processes, by pid."""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        return {p: _vm_rss(p) for p in pids}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies of the group count as dead.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    return True
    return False


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    return []


def _vm_rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- the PACS: dcmtk storescp that logs every reception ------------------------------

#: ``storing DICOM file: <folder>/<modality prefix>.<SOP Instance UID>`` (e.g. ``SR3.1.2...``).
_STORING = re.compile(r"storing DICOM file: (?:.*/)?[^/.]+\.([0-9.]+)\s*$")


class Pacs:
    """dcmtk ``storescp -v`` on a fixed port; :meth:`receptions` counts per SOP Instance UID.

    Files are named after their SOP Instance UID (a second reception overwrites the first),
    and each reception is one ``storing DICOM file`` line in the log, which survives
    restarts of the PACS (the log is appended to).
    """

    def __init__(self, port: int, folder: Path, ae_title: str = "PACS") -> None:
        self.executable = tool("storescp")
        self.port = port
        self.folder = folder
        self.ae_title = ae_title
        self.log = folder.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "-v",
                    "-aet",
                    self.ae_title,
                    "-od",
                    str(self.folder),
                    "+xa",
                    str(self.port),
                ],
                env=peer_environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, 20, f"storescp on port {self.port}")

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"storescp exited: {self.log.read_text()[-2000:]}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def receptions(self) -> Counter[str]:
        if not self.log.is_file():
            return Counter()
        found = (
            _STORING.search(line) for line in self.log.read_text(errors="replace").splitlines()
        )
        return Counter(m.group(1) for m in found if m)


# --- sending with storescu -----------------------------------------------------------


@dataclass
class SendOutcome:
    acknowledged: list[Path]
    statuses: dict[Path, str]
    returncode: int
    output: str


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling_ae: str = "MODALITY",
    timeout: float = 120.0,
    popen: Callable[[subprocess.Popen[str]], None] | None = None,
) -> SendOutcome:
    """Send ``files`` with ``storescu -v`` on one association; parse the per-file statuses.

    A file counts as acknowledged only when storescu logged ``Received Store Response
    (Success)`` for it.  ``popen`` is called with the running process (to watch or kill it).
    """
    cmd = [
        tool("storescu"),
        "-v",
        "-aet",
        calling_ae,
        "-aec",
        NODE_AE,
        "-R",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    proc = subprocess.Popen(
        cmd, env=peer_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if popen is not None:
        popen(proc)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return parse_storescu(output, files, proc.returncode)


def parse_storescu(output: str, files: Sequence[Path], returncode: int) -> SendOutcome:
    by_name = {str(f): f for f in files}
    statuses: dict[Path, str] = {}
    current: Path | None = None
    for line in output.splitlines():
        if "Sending file: " in line:
            current = by_name.get(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response" in line and current is not None:
            m = re.search(r"Received Store Response(?: \(([^)]*)\))?", line)
            statuses[current] = m.group(1) if m and m.group(1) else line.strip()
            current = None
    acked = [f for f in files if statuses.get(f) == "Success"]
    return SendOutcome(acked, statuses, returncode, output)


# --- the index, read from outside ----------------------------------------------------


class IndexView:
    """Read-only questions about a node's data directory (node up or down)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "index.sqlite3"

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        if not self.path.is_file():
            return []
        try:
            with self._conn() as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def phases(self) -> set[str]:
        """The pipeline stages with work in them now: receive/assembly, inference, delivery."""
        found = set()
        if self.query("SELECT 1 FROM studies WHERE state = 'receiving' LIMIT 1"):
            found.add("assembly")
        if self.query("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1"):
            found.add("queued")
        if self.query("SELECT 1 FROM jobs WHERE state = 'running' LIMIT 1"):
            found.add("inference")
        if self.query("SELECT 1 FROM outbox WHERE state IN ('pending', 'sending') LIMIT 1"):
            found.add("delivery")
        return found

    def in_doubt(self) -> list[tuple[int, str, str]]:
        """Outbox rows marked sending: sent or not, the node cannot know (id, destination, path)."""
        rows = self.query("SELECT id, destination, path FROM outbox WHERE state = 'sending'")
        return [(r["id"], r["destination"], str(self.data_dir / r["path"])) for r in rows]

    def instance_count(self, study: str | None = None) -> int:
        if study is None:
            return (
                int(self.query("SELECT COUNT(*) FROM instances")[0][0])
                if self.path.is_file()
                else 0
            )
        rows = self.query("SELECT COUNT(*) FROM instances WHERE study_instance_uid = ?", study)
        return int(rows[0][0]) if rows else 0

    def job_states(self) -> Counter[str]:
        return Counter(r[0] for r in self.query("SELECT state FROM jobs"))

    def outbox_states(self) -> Counter[str]:
        return Counter(r[0] for r in self.query("SELECT state FROM outbox"))

    def drained(self, studies: Sequence[str]) -> bool:
        """Every study complete, every job finished, nothing left in the outbox."""
        rows = self.query("SELECT study_instance_uid, state FROM studies")
        states = {r[0]: r[1] for r in rows}
        if any(states.get(s) != "complete" for s in studies):
            return False
        jobs = self.job_states()
        outbox = self.outbox_states()
        return set(jobs) <= {"done", "failed"} and set(outbox) <= {"done", "dead"}

    def results(self) -> list[tuple[str, str, int, str]]:
        """Every result in the outbox: (destination, SOP Instance UID, attempts, state)."""
        return [
            (
                r["destination"],
                str(dcmread(self.data_dir / r["path"], stop_before_pixels=True).SOPInstanceUID),
                r["attempts"],
                r["state"],
            )
            for r in self.query("SELECT destination, path, attempts, state FROM outbox ORDER BY id")
        ]

    def latest_jobs(self) -> dict[str, sqlite3.Row]:
        """Per study, its job of the highest generation."""
        latest: dict[str, sqlite3.Row] = {}
        for r in self.query("SELECT * FROM jobs ORDER BY generation"):
            latest[r["study_instance_uid"]] = r
        return latest

    def consistency_problems(self) -> list[str]:
        """What is wrong with the index and the spool (empty list: consistent).

        Every instance row has its file with the indexed size and sha256 and the file
        parses; no job is running; no outbox row is sending; no file in the spool lacks a
        row; the tmp folder is empty.
        """
        problems = []
        indexed = set()
        for r in self.query("SELECT sop_instance_uid, path, sha256, size FROM instances"):
            path = self.data_dir / r["path"]
            indexed.add(path)
            if not path.is_file():
                problems.append(f"instance {r['sop_instance_uid']}: {path} is missing")
                continue
            data = path.read_bytes()
            if len(data) != r["size"] or hashlib.sha256(data).hexdigest() != r["sha256"]:
                problems.append(f"instance {r['sop_instance_uid']}: {path} differs from index")
                continue
            try:
                ds = dcmread(path)
                _ = ds.PixelData
            except Exception as exc:
                problems.append(f"instance {r['sop_instance_uid']}: does not parse: {exc!r}")
        spool = self.data_dir / "spool"
        if spool.is_dir():
            extra = [p for p in spool.rglob("*") if p.is_file() and p not in indexed]
            problems += [f"spooled file without index row: {p}" for p in extra]
        tmp = self.data_dir / "tmp"
        if tmp.is_dir():
            problems += [f"left in tmp: {p.name}" for p in tmp.iterdir()]
        for r in self.query("SELECT id FROM jobs WHERE state = 'running'"):
            problems.append(f"job {r[0]} still running")
        for r in self.query("SELECT id FROM outbox WHERE state = 'sending'"):
            problems.append(f"outbox row {r[0]} still sending")
        return problems


def jobs_cli(config: Path, *args: str) -> str:
    """``dicomnode jobs ... --config`` as a process; returns its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", "jobs", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"dicomnode jobs {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


# --- a fixed-size file system --------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size_mb: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_mb`` MiB at ``mountpoint`` (needs root); unmount after."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        raise Unavailable("mount/umount are not installed")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs (root needed): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run([umount, "-l", str(mountpoint)], check=False, capture_output=True)


def fill(path: Path, leave_free: int, chunk: int = 1 << 20) -> int:
    """Write a ballast file at ``path`` until only ``leave_free`` bytes are free; its size."""
    written = 0
    with open(path, "wb") as f:
        while True:
            free = shutil.disk_usage(path.parent).free
            want = free - leave_free
            if want <= 0:
                break
            block = min(chunk, want)
            try:
                f.write(b"\0" * block)
                f.flush()
            except OSError:
                break
            written += block
    return written


# --- destinations that misbehave -----------------------------------------------------


class AnsweringSCP:
    """A pynetdicom storage SCP that answers every C-STORE with ``status`` (changeable).

    Records the SOP Instance UID of every request it answered with success.
    """

    def __init__(self, status: int, ae_title: str = "PACS") -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.status = status
        self.accepted: list[str] = []
        self.answered: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._handle)]
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handle(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            code = self.status
            self.answered.append((uid, code))
            if code == 0:
                self.accepted.append(uid)
        return code

    def stop(self) -> None:
        self._server.shutdown()


class SilentListener:
    """A TCP port that accepts connections (kernel backlog) and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()
