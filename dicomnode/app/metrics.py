"""The node's Prometheus metrics: one :class:`NodeMetrics` per node, never module globals.

Counters of the node process (receiving, associations, delivery) are kept in the node's
own :class:`~prometheus_client.CollectorRegistry`.  Job phases (load, inference, encoding)
run in worker *processes*: each worker sends ``(pipeline, phase, seconds)`` and the
execution providers its sessions use over its own pipe (:class:`PipeJobObserver`), and a
thread of the node (:meth:`NodeMetrics.drain`) observes them in the node's registry.  So
one process serves every metric, several nodes can run in one process (tests), and no
``PROMETHEUS_MULTIPROC_DIR`` (a process-wide environment variable, files to clean) is
needed.  Job, outbox and study counts and free disk are read from the database at scrape
time (:mod:`dicomnode.web.app`), so they are true across processes and restarts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dicomnode.inference.runner import BundleRunner
from dicomnode.net.scp import AssociationSummary

log = logging.getLogger(__name__)

#: Phases of a job, in order.
PHASES = ("load", "inference", "encoding", "delivery")

#: Job phase buckets (seconds): from a small series on a GPU to a large one on a CPU.
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: Every metric name the node exposes (docs/operations.md lists them with their labels).
METRIC_NAMES = (
    "dicomnode_received_instances_total",
    "dicomnode_received_bytes_total",
    "dicomnode_c_store_responses_total",
    "dicomnode_associations_total",
    "dicomnode_job_phase_seconds",
    "dicomnode_delivery_attempts_total",
    "dicomnode_delivery_failures_total",
    "dicomnode_execution_provider",
    "dicomnode_jobs",
    "dicomnode_outbox_items",
    "dicomnode_studies",
    "dicomnode_disk_free_bytes",
)


class JobObserver(Protocol):
    """What a job loop reports: phase durations and the providers its models run on."""

    def phase(self, pipeline: str, phase: str, seconds: float) -> None: ...

    def provider(self, pipeline: str, model: str, provider: str) -> None: ...


class NodeMetrics:
    """The metrics of one node, in its own registry (``ctx.registry`` of the web app).

    It is the SCP's receive observer, the deliverer's observer and, for in-process
    workers, the job observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances = Counter(
            "dicomnode_received_instances",
            "Instances received by calling AE title and outcome "
            "(stored, duplicate, new_version, refused)",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.received_bytes = Counter(
            "dicomnode_received_bytes",
            "Bytes of instances received by calling AE title and outcome",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.store_statuses = Counter(
            "dicomnode_c_store_responses",
            "C-STORE statuses the node answered (hexadecimal)",
            ["status"],
            registry=r,
        )
        self.associations = Counter(
            "dicomnode_associations",
            "Associations by calling AE title and how they ended (released, aborted, rejected)",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.job_phase = Histogram(
            "dicomnode_job_phase_seconds",
            "Seconds a job spent per pipeline and phase (load, inference, encoding, delivery)",
            ["pipeline", "phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.delivery_attempts = Counter(
            "dicomnode_delivery_attempts",
            "Result files the node tried to deliver, by destination",
            ["destination"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "dicomnode_delivery_failures",
            "Failed delivery attempts by destination and kind (transient, permanent)",
            ["destination", "kind"],
            registry=r,
        )
        self.execution_provider = Gauge(
            "dicomnode_execution_provider",
            "1 for the ONNX Runtime execution provider each pipeline's model runs on",
            ["pipeline", "model", "provider"],
            registry=r,
        )
        self._providers: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    # --- SCP (dicomnode.net.scp.ReceiveObserver) ---------------------------------------

    def instance(self, calling_ae: str, outcome: str, size: int, status: int) -> None:
        self.instances.labels(calling_ae, outcome).inc()
        self.received_bytes.labels(calling_ae, outcome).inc(size)
        self.store_statuses.labels(f"0x{status:04X}").inc()

    def association(self, summary: AssociationSummary) -> None:
        self.associations.labels(summary.calling_ae, summary.outcome).inc()

    # --- delivery (dicomnode.delivery.deliverer.DeliveryObserver) ----------------------

    def attempt(self, destination: str, files: int) -> None:
        self.delivery_attempts.labels(destination).inc(files)

    def failure(self, destination: str, files: int, *, transient: bool) -> None:
        kind = "transient" if transient else "permanent"
        self.delivery_failures.labels(destination, kind).inc(files)

    # --- jobs (JobObserver) ------------------------------------------------------------

    def phase(self, pipeline: str, phase: str, seconds: float) -> None:
        self.job_phase.labels(pipeline, phase).observe(seconds)

    def provider(self, pipeline: str, model: str, provider: str) -> None:
        with self._lock:
            before = self._providers.get((pipeline, model))
            if before == provider:
                return
            if before is not None:  # fell back (GPU -> CPU): only the one in use shows 1
                self.execution_provider.remove(pipeline, model, before)
            self._providers[(pipeline, model)] = provider
            self.execution_provider.labels(pipeline, model, provider).set(1)

    def apply(self, message: tuple[Any, ...]) -> None:
        """Observe one message of a worker or receiver process (:class:`PipeJobObserver`,
        :class:`PipeReceiveObserver`)."""
        kind, *args = message
        if kind == "phase":
            self.phase(str(args[0]), str(args[1]), float(args[2]))
        elif kind == "provider":
            self.provider(str(args[0]), str(args[1]), str(args[2]))
        elif kind == "instance":
            self.instance(str(args[0]), str(args[1]), int(args[2]), int(args[3]))
        elif kind == "association":
            self.association(AssociationSummary(str(args[0]), "", outcome=str(args[1])))

    def drain(self, pipes: Callable[[], Iterable[Connection]], stop: threading.Event) -> None:
        """Observe worker messages until ``stop`` is set (run in a thread of the node).

        ``pipes`` returns the receiving ends of the live workers' pipes (they change when
        a worker is replaced); a pipe whose worker died is dropped at its end of file."""
        closed: set[int] = set()
        while not stop.is_set():
            ready = [c for c in pipes() if id(c) not in closed]
            if not ready:
                stop.wait(0.2)
                continue
            for conn in wait(ready, timeout=0.5):
                assert isinstance(conn, Connection)
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    closed.add(id(conn))
                    continue
                except Exception:  # a message cut short by a killed worker
                    log.debug("unreadable metrics message from a worker", exc_info=True)
                    continue
                if isinstance(message, tuple) and message:
                    self.apply(message)


class PipeJobObserver:
    """A worker process's :class:`JobObserver`: sends each observation to the node."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _send(self, *message: object) -> None:
        with contextlib.suppress(OSError, ValueError):  # the node is gone: best effort
            self.conn.send(message)

    def phase(self, pipeline: str, phase: str, seconds: float) -> None:
        self._send("phase", pipeline, phase, seconds)

    def provider(self, pipeline: str, model: str, provider: str) -> None:
        self._send("provider", pipeline, model, provider)


class PipeReceiveObserver:
    """A receiver process's :class:`~dicomnode.net.scp.ReceiveObserver`: sends each
    instance and association to the node's metrics."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._lock = threading.Lock()  # associations and the spooler send from threads

    def _send(self, *message: object) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):  # the node is gone
            self.conn.send(message)

    def instance(self, calling_ae: str, outcome: str, size: int, status: int) -> None:
        self._send("instance", calling_ae, outcome, size, status)

    def ready(self, number: int) -> None:
        """The receiver listens (the node waits for this at start)."""
        self._send("ready", number)

    def association(self, summary: AssociationSummary) -> None:
        self._send("association", summary.calling_ae, summary.outcome)


class NullJobObserver:
    """Observes nothing (batch conversion, ``jobs`` commands)."""

    def phase(self, pipeline: str, phase: str, seconds: float) -> None:
        pass

    def provider(self, pipeline: str, model: str, provider: str) -> None:
        pass


def runners_of(pipeline: object) -> list[BundleRunner]:
    """The ONNX Runtime runners a built pipeline holds as attributes (or in a dict or list
    attribute): the pipeline protocol does not name them, its kinds' dataclasses do."""
    found: list[BundleRunner] = []
    for value in getattr(pipeline, "__dict__", {}).values():
        if isinstance(value, dict):
            candidates = list(value.values())
        elif isinstance(value, list | tuple):
            candidates = list(value)
        else:
            candidates = [value]
        found += [v for v in candidates if isinstance(v, BundleRunner) and v not in found]
    return found
