"""Sustained load: many concurrent associations against a node with one worker.

Shared by ``tests/faults/test_load.py`` and ``benchmarks/soak.py --load-seconds``.
See :func:`load_campaign`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.synthetic.phantom import PhantomSpec

from .harness import (
    TINY,
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

# --- load (shared by the suite and benchmarks/soak.py) -------------------------------


@dataclass
class LoadReport:
    associations: int
    seconds: float
    acknowledged: int
    failed: list[str]
    studies: list[str]
    instance_bytes: int
    samples: list[tuple[float, int, int, int]]  # (t, acknowledged, node KiB, worker KiB)
    warm: tuple[float, int, int, int]
    end: tuple[float, int, int, int]
    drained: tuple[int, int]  # RSS (node, worker) KiB after the drain
    drain_seconds: float
    not_processed: list[str]

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0

    def growth_kib(self) -> int:
        """Node RSS growth from the end of the warm-up to the end of the load."""
        return self.end[2] - self.warm[2]

    def bytes_after_warm_up(self) -> int:
        return (self.end[1] - self.warm[1]) * self.instance_bytes

    def summary(self) -> str:
        return (
            f"load: {self.associations} associations for {self.seconds:.1f} s: "
            f"{self.acknowledged} instances acknowledged ({self.rate:.0f}/s), "
            f"{len(self.failed)} failed stores, {len(self.studies)} studies\n"
            f"node RSS: {self.warm[2] / 1024:.1f} MiB after warm-up ({self.warm[1]} instances), "
            f"{self.end[2] / 1024:.1f} MiB at the end ({self.end[1]} instances; "
            f"{self.bytes_after_warm_up() / 2**20:.1f} MiB received in between), "
            f"{self.drained[0] / 1024:.1f} MiB after the drain\n"
            f"worker RSS: {self.warm[3] / 1024:.1f} MiB after warm-up, "
            f"{self.drained[1] / 1024:.1f} MiB after the drain\n"
            f"drain: every study processed in {self.drain_seconds:.1f} s after the load; "
            f"{len(self.not_processed)} not processed"
        )


def _node_and_worker_rss(node: NodeProcess) -> tuple[int, int]:
    rss = node.rss_kib()
    children = [v for p, v in rss.items() if p != node.pid]
    return rss.get(node.pid, 0), max(children, default=0)


def load_campaign(
    work: Path,
    seconds: float,
    associations: int,
    *,
    segmentation: Path,
    classification: Path,
    spec: PhantomSpec = TINY,
    quiet_period_s: float = 3.0,
    warm_up: float = 0.3,
    drain_timeout: float = 300.0,
    progress: Callable[[str], None] | None = None,
) -> LoadReport:
    """``associations`` storescu processes, each sending fresh studies back to back.

    The node (one worker process) must acknowledge every instance; node and worker RSS
    are sampled every half second; the load stops after ``seconds`` and the node must
    then process every study.  ``warm_up`` is the fraction of the load period after
    which the reference RSS is taken.
    """
    work.mkdir(parents=True, exist_ok=True)
    factory = StudyFactory(work / "studies", spec)
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
        max_associations=associations + 2,
        log_level="WARNING",
    ).write(work / "node.toml")
    node = NodeProcess(config, port, work / "node.log")
    index = IndexView(data)
    lock = threading.Lock()
    acknowledged = 0
    failed: list[str] = []
    studies: list[str] = []
    samples: list[tuple[float, int, int, int]] = []
    try:
        node.start()
        started = time.monotonic()
        stop_at = started + seconds

        def send(sender: int) -> None:
            nonlocal acknowledged
            while time.monotonic() < stop_at:
                files = factory.copy()
                uid = study_uid(files[0])
                outcome = storescu(port, files, calling_ae=f"LOAD{sender:02d}", timeout=120)
                with lock:
                    studies.append(uid)
                    acknowledged += len(outcome.acknowledged)
                    failed.extend(
                        f"{f.name} of {uid}: {outcome.statuses.get(f, 'no response')} "
                        f"(storescu exit {outcome.returncode})"
                        for f in files
                        if f not in outcome.acknowledged
                    )
                for f in files:
                    f.unlink()

        threads = [
            threading.Thread(target=send, args=(i,), daemon=True) for i in range(associations)
        ]
        for t in threads:
            t.start()
        next_report = started + 5
        while any(t.is_alive() for t in threads):
            now = time.monotonic()
            with lock:
                count = acknowledged
            samples.append((now - started, count, *_node_and_worker_rss(node)))
            if progress is not None and now >= next_report:
                progress(
                    f"{now - started:5.0f} s: {count} acknowledged, node RSS "
                    f"{samples[-1][2] / 1024:.0f} MiB, worker {samples[-1][3] / 1024:.0f} MiB"
                )
                next_report += 5
            time.sleep(0.5)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        end = (elapsed, acknowledged, *_node_and_worker_rss(node))
        warm = next(s for s in samples if s[0] >= warm_up * seconds) if samples else end
        drain_start = time.monotonic()
        wait_until(
            lambda: index.drained(studies),
            drain_timeout,
            f"the node to drain; jobs {index.job_states()}",
            interval=0.25,
        )
        drain_seconds = time.monotonic() - drain_start
        drained = _node_and_worker_rss(node)
        code = node.stop()
        if code != 0:
            raise AssertionError(f"the node exited with {code} on SIGTERM:\n{node.tail()}")
    finally:
        node.kill()
        pacs.stop()
    latest = index.latest_jobs()
    not_processed = [u for u in studies if u not in latest or latest[u]["state"] != "done"]
    return LoadReport(
        associations,
        elapsed,
        acknowledged,
        failed,
        studies,
        factory.instance_bytes,
        samples,
        warm,
        end,
        drained,
        drain_seconds,
        not_processed,
    )
