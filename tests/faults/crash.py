"""The crash campaign: SIGKILL the node at every stage of its work, restart, check.

Shared by ``tests/faults/test_crash.py`` (20 kill points) and ``benchmarks/soak.py``
(``--kills 100``).  See :func:`crash_campaign`.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread

from .harness import (
    Destination,
    IndexView,
    NodeConfig,
    NodeProcess,
    Pacs,
    StudyFactory,
    free_port,
    storescu,
    study_uid,
    wait_until,
)


@dataclass
class KillRecord:
    """One SIGKILL: when, what the sender was doing, and what the index held."""

    number: int
    target: str
    phases: set[str]
    sending: bool
    in_doubt: list[tuple[int, str, str]] = field(default_factory=list)
    running_jobs: list[int] = field(default_factory=list)


class StudySender:
    """Sends studies one after the other with storescu, re-sending what was not acknowledged.

    Runs in a thread: it keeps trying while the node is down (a PACS retries too) and
    records every acknowledged file.  ``sending`` is true while storescu is running.
    """

    def __init__(self, port: int, studies: list[list[Path]]) -> None:
        self.port = port
        self.pending: list[list[Path]] = [list(s) for s in studies]
        self.acknowledged: set[Path] = set()
        self.attempts = 0
        self.sending = threading.Event()
        self.idle = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="study-sender", daemon=True)
        self.current: subprocess.Popen[str] | None = None

    def add(self, study: list[Path]) -> None:
        with self._lock:
            self.pending.append(list(study))
            self.idle.clear()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _next(self) -> list[Path] | None:
        with self._lock:
            while self.pending and all(f in self.acknowledged for f in self.pending[0]):
                self.pending.pop(0)
            if not self.pending:
                self.idle.set()
                return None
            return [f for f in self.pending[0] if f not in self.acknowledged]

    def _run(self) -> None:
        while not self._stop.is_set():
            files = self._next()
            if files is None:
                self._stop.wait(0.02)
                continue
            self.sending.set()

            def keep(p: subprocess.Popen[str]) -> None:
                self.current = p

            try:
                outcome = storescu(self.port, files, popen=keep, timeout=60)
            finally:
                self.current = None
                self.sending.clear()
            self.attempts += 1
            with self._lock:
                self.acknowledged.update(outcome.acknowledged)
            if len(outcome.acknowledged) < len(files):
                self._stop.wait(0.05)  # the node is down or restarting: try again soon


# --- the crash campaign (shared by the suite and benchmarks/soak.py) -----------------

TARGETS = ("receive", "assembly", "inference", "delivery")


@dataclass
class CrashReport:
    kills: list[KillRecord]
    studies: list[str]
    sent: list[Path]
    acknowledged: list[Path]
    missing: list[str]  # acknowledged but not in the spool intact
    not_processed: list[str]  # studies whose latest job is not done with every slice
    expected: dict[str, list[str]]
    retried: set[str]  # results the node had to try more than once (in doubt or failed)
    receptions: Counter[str]
    unexpected: list[str]  # received by the PACS, not a result of any job
    undelivered: list[str]  # results never received
    duplicates: dict[str, int]  # SOP Instance UID -> receptions (> 1)
    in_doubt_paths: set[str]
    in_doubt_uids: set[str]
    problems: list[str]  # index / spool consistency
    seconds: float
    node_log: Path

    def phase_counts(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for k in self.kills:
            counts.update(k.phases)
        return counts

    def _dups(self, which: Callable[[str], bool]) -> int:
        return sum(n - 1 for u, n in self.duplicates.items() if which(u))

    def unexplained_duplicates(self) -> list[str]:
        """Results received twice although the node sent them only once (must be none)."""
        return sorted(u for u in self.duplicates if u not in self.retried)

    def summary(self) -> str:
        phases = ", ".join(f"{p} {n}" for p, n in sorted(self.phase_counts().items()))
        dup = sum(n - 1 for n in self.duplicates.values())
        return (
            f"kill points survived: {len(self.kills)} (work in progress at the kill: {phases})\n"
            f"studies: {len(self.studies)} sent, {len(self.studies) - len(self.not_processed)} "
            f"processed\n"
            f"instances: {len(self.sent)} sent, {len(self.acknowledged)} acknowledged, "
            f"{len(self.acknowledged) - len(self.missing)} found intact in the spool\n"
            f"results: {sum(len(v) for v in self.expected.values())} expected, "
            f"{len(set(self.receptions))} distinct received, {len(self.undelivered)} missing, "
            f"{len(self.unexpected)} unexpected\n"
            f"results in doubt at a kill (sent, answer not recorded): {len(self.in_doubt_uids)}\n"
            f"duplicate receptions (same SOP Instance UID again): {dup}: "
            f"{self._dups(lambda u: u in self.in_doubt_uids)} of results in doubt at a kill "
            f"(sent, not yet confirmed), "
            f"{self._dups(lambda u: u in self.retried and u not in self.in_doubt_uids)} of "
            f"results re-sent after a failed association, "
            f"{self._dups(lambda u: u not in self.retried)} of results sent once\n"
            f"index problems: {len(self.problems)}\n"
            f"time: {self.seconds:.1f} s"
        )


def _aim(
    target: str,
    index: IndexView,
    sender: StudySender,
    study: str,
    slices: int,
    quiet: float,
    rng: Any,
    timeout: float,
) -> bool:
    """Wait until ``target`` is under way (True) or the timeout passed (False)."""
    deadline = time.monotonic() + timeout

    def until(condition: Callable[[], bool]) -> bool:
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.003)
        return False

    if target == "receive":
        need = rng.randint(1, slices - 1)
        return until(lambda: sender.sending.is_set() and index.instance_count(study) >= need)
    if target == "assembly":
        hit = until(
            lambda: (
                index.instance_count(study) >= slices
                and bool(
                    index.query(
                        "SELECT 1 FROM studies WHERE study_instance_uid = ? "
                        "AND state = 'receiving'",
                        study,
                    )
                )
            )
        )
        time.sleep(rng.uniform(0, quiet * 1.2))
        return hit
    if target == "inference":
        hit = until(lambda: bool(index.query("SELECT 1 FROM jobs WHERE state = 'running'")))
        time.sleep(rng.uniform(0, 0.4))
        return hit
    hit = until(
        lambda: bool(
            index.query("SELECT 1 FROM outbox WHERE state IN ('pending', 'sending') LIMIT 1")
        )
    )
    time.sleep(rng.uniform(0, 0.03))
    return hit


def crash_campaign(
    work: Path,
    kills: int,
    *,
    segmentation: Path,
    classification: Path,
    seed: int = 0,
    quiet_period_s: float = 0.5,
    drain_timeout: float = 180.0,
    progress: Callable[[str], None] | None = None,
) -> CrashReport:
    """Send studies, SIGKILL the node ``kills`` times aiming at each stage in turn, drain.

    Every kill is followed by a restart over the same data directory; the sender keeps
    re-sending whatever was not acknowledged.  After the last restart everything is sent
    and processed, the node is stopped with SIGTERM and the spool, the index and the PACS
    are checked.
    """
    rng = random.Random(seed)
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    factory = StudyFactory(work / "studies")
    pacs = Pacs(free_port(), work / "pacs")
    pacs.start()
    port = free_port()
    data = work / "data"
    config = NodeConfig(
        port,
        data,
        segmentation,
        classification,
        [Destination("pacs", pacs.port)],
        quiet_period_s=quiet_period_s,
    ).write(work / "node.toml")
    node = NodeProcess(config, port, work / "node.log")
    index = IndexView(data)
    sender = StudySender(port, [])
    records: list[KillRecord] = []
    studies: list[list[Path]] = []
    try:
        node.start()
        sender.start()
        for k in range(kills):
            target = TARGETS[k % len(TARGETS)]
            files = factory.copy()
            studies.append(files)
            sender.add(files)
            hit = _aim(
                target,
                index,
                sender,
                study_uid(files[0]),
                len(files),
                quiet_period_s,
                rng,
                timeout=30.0,
            )
            sending = sender.sending.is_set()
            node.kill()
            record = KillRecord(
                k + 1,
                target,
                index.phases() | ({"receive"} if sending else set()),
                sending,
                in_doubt=index.in_doubt(),
                running_jobs=[
                    r[0] for r in index.query("SELECT id FROM jobs WHERE state = 'running'")
                ],
            )
            records.append(record)
            if progress is not None:
                progress(
                    f"kill {k + 1}/{kills}: aimed at {target} ({'hit' if hit else 'missed'}), "
                    f"under way: {', '.join(sorted(record.phases)) or 'nothing'}"
                    + (f", {len(record.in_doubt)} result(s) in doubt" if record.in_doubt else "")
                )
            node.start()
        wait_until(sender.idle.is_set, drain_timeout, "every study to be acknowledged")
        uids = [study_uid(s[0]) for s in studies]
        wait_until(
            lambda: index.drained(uids),
            drain_timeout,
            f"the node to drain; jobs {index.job_states()}, outbox {index.outbox_states()}",
            interval=0.1,
        )
        code = node.stop()
        if code != 0:
            raise AssertionError(f"the node exited with {code} on SIGTERM:\n{node.tail()}")
    finally:
        sender.stop()
        node.kill()
        pacs.stop()
    return _crash_report(
        records, studies, sender, index, pacs, time.monotonic() - started, node.log
    )


def _crash_report(
    records: list[KillRecord],
    studies: list[list[Path]],
    sender: StudySender,
    index: IndexView,
    pacs: Pacs,
    seconds: float,
    node_log: Path,
) -> CrashReport:
    sent = [f for s in studies for f in s]
    acked = [f for f in sent if f in sender.acknowledged]
    rows = {
        r["sop_instance_uid"]: index.data_dir / r["path"]
        for r in index.query("SELECT sop_instance_uid, path FROM instances")
    }
    missing = []
    for f in acked:
        ds = dcmread(f)
        spooled = rows.get(str(ds.SOPInstanceUID))
        if spooled is None or not spooled.is_file() or dcmread(spooled) != ds:
            missing.append(str(f))
    study_uids = [study_uid(s[0]) for s in studies]
    latest = index.latest_jobs()
    not_processed = []
    for uid, files in zip(study_uids, studies, strict=True):
        job = latest.get(uid)
        slices = (
            [s.get("slices") for s in json.loads(job["summary"] or "{}").get("series", [])]
            if job
            else []
        )
        if job is None or job["state"] != "done" or slices != [len(files)]:
            not_processed.append(uid)
    results = index.results()
    expected: dict[str, list[str]] = {}
    for destination, uid, _, _ in results:
        expected.setdefault(destination, []).append(uid)
    receptions = pacs.receptions()
    wanted = {u for v in expected.values() for u in v}
    in_doubt_paths = {p for k in records for (_, _, p) in k.in_doubt}
    in_doubt_uids = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in in_doubt_paths
    }
    return CrashReport(
        kills=records,
        studies=study_uids,
        sent=sent,
        acknowledged=acked,
        missing=missing,
        not_processed=not_processed,
        expected=expected,
        retried={uid for _, uid, attempts, _ in results if attempts > 1},
        receptions=receptions,
        unexpected=sorted(set(receptions) - wanted),
        undelivered=sorted(wanted - set(receptions)),
        duplicates={u: n for u, n in receptions.items() if n > 1},
        in_doubt_paths=in_doubt_paths,
        in_doubt_uids=in_doubt_uids,
        problems=index.consistency_problems(),
        seconds=seconds,
        node_log=node_log,
    )
