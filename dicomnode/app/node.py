"""The node: SCP, completeness scheduler, job workers and delivery, wired together.

Lifecycle (uvicorn-style): :meth:`Node.start` recovers from any crash (partial files,
running jobs, outbox rows in flight) and starts everything; :meth:`Node.stop` stops
accepting associations, lets in-flight stores finish, lets workers finish the job in hand
and leaves queued work in the index for the next start.  Workers run in their own
processes (``workers`` >= 1) so a slow model never blocks receiving; ``workers = 0`` runs
one worker thread in-process (tests, small installs).

Metrics (:class:`~dicomnode.app.metrics.NodeMetrics`) belong to the node: the SCP and the
deliverer report to it, and each worker process sends its job phases over its own pipe,
read by the node's ``metrics`` thread (docs/operations.md).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from importlib.util import find_spec
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import TYPE_CHECKING

from dicomnode.app.logformat import LogFormat
from dicomnode.app.metrics import NodeMetrics
from dicomnode.app.preflight import preflight
from dicomnode.app.receiver import Shared, make_scp, make_spool, receiver_main
from dicomnode.app.worker import run_jobs, worker_main
from dicomnode.audit import AuditLog
from dicomnode.config import Config
from dicomnode.db import Database
from dicomnode.delivery.deliverer import Deliverer
from dicomnode.delivery.store import Outbox
from dicomnode.errors import DicomNodeError, MissingExtraError
from dicomnode.feedback.collect import FeedbackCollector
from dicomnode.jobs.scheduler import Scheduler, SenderCounts
from dicomnode.jobs.store import DONE, JobStore
from dicomnode.outputs.layout import job_folder, results_root
from dicomnode.spool.index import Index
from dicomnode.spool.query import Catalog
from dicomnode.web.app import WebContext, create_app
from dicomnode.web.dicomweb import dicomweb_routes
from dicomnode.web.pages import page_routes
from dicomnode.web.server import HttpServer

if TYPE_CHECKING:
    from dicomnode.app.rayjobs import RayJobs

log = logging.getLogger(__name__)


def _ray_installed() -> bool:
    try:
        return find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None: importing it is refused
        return False


class Node:
    def __init__(self, config: Config, log_format: LogFormat = "text") -> None:
        self.config = config
        self.log_format = log_format
        self.metrics = NodeMetrics()
        self.preflight = preflight(config)  # before anything is created or bound
        if config.node.worker_backend == "ray" and not _ray_installed():
            raise MissingExtraError('worker_backend = "ray"', "ray")
        for warning in self.preflight.warnings:
            log.warning("%s", warning)
        self.db = Database(config.node.data_dir)
        self.index = Index(self.db)
        self.jobs = JobStore(self.db, config.jobs)
        #: Settles the segmentations sent back (corrections become training data).
        self.feedback = FeedbackCollector(self.db, self.jobs)
        self.outbox = Outbox(self.db, self.jobs, config.delivery)
        self.audit = AuditLog(config.node.audit_path)
        #: What the receiving processes share (``receivers`` > 1): the limits of
        #: ``max_associations`` and of the free-space watermark are the node's, whichever
        #: process a connection lands on.
        self._shared = Shared.make(config.node.receivers, config.node.data_dir)
        self.spool = make_spool(config, self.index, 0, self._shared)
        self.catalog = Catalog(self.index, results_root(config.node.data_dir), self._job_state)
        self.scp = make_scp(config, self.spool, self.audit, self.catalog, shared=self._shared)
        self.scheduler = Scheduler(
            self.index,
            self.jobs,
            config.routes,
            config.completeness.quiet_period_s,
            self.audit,
            counts=self._sender_counts(),
        )
        self.deliverer = Deliverer(config, self.outbox, audit=self.audit)
        self.scp.observer = self.metrics
        self.deliverer.observer = self.metrics
        self._metric_pipes: dict[str, Connection] = {}
        self._receivers: dict[int, BaseProcess] = {}
        self._receivers_stopping = False
        self.http: HttpServer | None = None
        self._last_purge = 0.0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[BaseProcess] = []
        self._ray: RayJobs | None = None

    @property
    def port(self) -> int:
        return self.scp.port

    def _sender_counts(self) -> SenderCounts | None:
        """Completion by count: ask the senders that are configured remotes (``ask_sender``)."""
        completeness = self.config.completeness
        if not completeness.ask_sender or not self.config.remotes:
            return None
        return SenderCounts(
            self.index,
            self.config.remotes,
            self.config.node.ae_title,
            completeness.lull_s,
            self.config.node.tls,
            audit=self.audit,
        )

    def _job_state(self, job_id: int) -> str | None:
        """A job's state, shown by Query/Retrieve as its results' processing state."""
        try:
            return str(self.jobs.get(job_id).state)
        except KeyError:
            return None

    def start(self) -> None:
        removed = self.spool.cleanup_tmp()
        restored = self.spool.recover()
        try:
            self.spool.receive_log()  # its first segment is written now, not at the first store
        except DicomNodeError as exc:  # a full disk: the stores say so (0xA700)
            log.error("receive log: %s", exc)
        jobs, items = self.recover()
        if removed or restored or jobs or items:
            log.warning(
                "recovered after an unclean stop: %d partial file(s) removed, %d instance(s) "
                "restored from the receive log, %d job(s) re-queued, %d outbox item(s) re-sent",
                removed,
                restored,
                jobs,
                items,
            )
        self.scp.start()
        for number in range(1, self.config.node.receivers):
            self._receivers[number] = self._start_receiver(number)
        for number in self._receivers:  # listening before the node says it has started
            self._await_ready(number)
        if self.config.http.enabled:
            self.http = self._start_http()
        self._spawn_thread(self._housekeeping, "housekeeping")
        if self.config.node.worker_backend == "ray":
            self._start_ray_workers()
        elif self.config.node.workers == 0:
            self._spawn_thread(self._work_in_thread, "worker")
        for i in range(self.config.node.workers if self._ray is None else 0):
            self._workers.append(self._start_worker(i))
        if self._workers or self._receivers:
            self._spawn_thread(self._drain_metrics, "metrics")

    def _drain_metrics(self) -> None:
        self.metrics.drain(lambda: list(self._metric_pipes.values()), self._stop)

    def recover(self) -> tuple[int, int]:
        """After a crash, in one transaction: running jobs go back to the queue, outbox
        items in flight are re-sent, studies still receiving get their quiet period
        restarted (their senders could not send while the node was down).  Returns the
        jobs re-queued and the items re-sent."""
        with self.db.transaction() as conn:
            jobs = self.jobs.recover(conn)
            items = self.outbox.recover(conn)
            self.index.restart_quiet_periods(conn, time.time())
        return jobs, items

    def readiness(self) -> list[str]:
        """Why the node cannot do its work now ([] when it can): ``/readyz``."""
        reasons = []
        try:
            self.db.version  # noqa: B018 (a query: is the index reachable?)
        except Exception as exc:  # sqlite3.Error, OSError: anything is "not ready"
            reasons.append(f"index not reachable: {exc}")
        try:
            self.spool.check_space()
        except DicomNodeError as exc:
            reasons.append(str(exc))
        dead = [p.name for p in [*self._workers, *self._receivers.values()] if not p.is_alive()]
        if dead:
            reasons.append(f"worker(s) not running: {', '.join(dead)}")
        local_thread = self.config.node.workers == 0 and self._ray is None
        if local_thread and not any(t.name == "worker" and t.is_alive() for t in self._threads):
            reasons.append("the worker thread is not running")
        stopped = [t.name for t in self._threads if t.name.startswith("ray-") and not t.is_alive()]
        if stopped:
            reasons.append(f"job loop(s) not running: {', '.join(stopped)}")
        if self._stop.is_set():
            reasons.append("stopping")
        return reasons

    def _start_http(self) -> HttpServer:
        ctx = WebContext(
            self.config,
            self.index,
            self.jobs,
            self.outbox,
            self.audit,
            self.readiness,
            self.metrics.registry,
            catalog=self.catalog,
            spool=self.spool,
        )
        http = self.config.http
        routes = [*dicomweb_routes(ctx), *page_routes(ctx)]
        server = HttpServer(create_app(ctx, routes), http.bind_address, http.port)
        server.start()
        return server

    def _start_ray_workers(self) -> None:
        """Jobs on the Ray cluster of ``[ray]`` (app/rayjobs.py): one job loop thread per
        actor; ``[node].workers`` is not used."""
        from dicomnode.app.rayjobs import RayJobs

        self._ray = RayJobs(self.config)
        for number in range(len(self._ray.actors)):
            self._spawn_thread(partial(self._ray.run, number, self._stop), f"ray-worker-{number}")

    def _work_in_thread(self) -> None:
        run_jobs(self.config, self._stop, self.metrics)

    def _start_worker(self, number: int) -> BaseProcess:
        context = mp.get_context("spawn")
        reader, writer = context.Pipe(duplex=False)
        p = context.Process(
            target=worker_main,
            args=(self.config, self.config.node.log_level, os.getpid(), writer, self.log_format),
            name=f"dicomnode-worker-{number}",
            daemon=False,
        )
        p.start()
        writer.close()  # the worker holds the sending end: its death ends the pipe
        self._metric_pipes[f"worker-{number}"] = reader
        return p

    def _start_receiver(self, number: int) -> BaseProcess:
        """Receiver process ``number`` on the node's port (app/receiver.py)."""
        context = mp.get_context("spawn")
        reader, writer = context.Pipe(duplex=False)
        p = context.Process(
            target=receiver_main,
            args=(
                self.config,
                number,
                self.port,
                os.getpid(),
                writer,
                self._shared,
                self.log_format,
            ),
            name=f"dicomnode-receiver-{number}",
            daemon=False,
        )
        p.start()
        writer.close()
        self._metric_pipes[f"receiver-{number}"] = reader
        return p

    def _await_ready(self, number: int, timeout: float = 120.0) -> None:
        pipe = self._metric_pipes[f"receiver-{number}"]
        try:
            if pipe.poll(timeout) and pipe.recv() == ("ready", number):
                return
        except (EOFError, OSError):
            pass
        raise DicomNodeError(f"receiver {number} did not start listening in {timeout:.0f} s")

    def _check_receivers(self) -> None:
        """A receiver that died is replaced; the new one replays its receive log first."""
        for number, p in list(self._receivers.items()):
            if p.is_alive() or self._stop.is_set() or self._receivers_stopping:
                continue
            log.error(
                "receiver %s (pid %s) died with exit code %s; starting a new one",
                p.name,
                p.pid,
                p.exitcode,
            )
            self.audit.record("receiver", outcome="died", pid=p.pid, exitcode=p.exitcode)
            self._receivers[number] = self._start_receiver(number)

    def _check_workers(self) -> None:
        """A worker that died is replaced; the job it was running goes back to the queue."""
        for i, p in enumerate(self._workers):
            if p.is_alive() or self._stop.is_set() or p.pid is None:
                continue
            released = self.jobs.release_worker(p.pid)
            log.error(
                "worker %s (pid %d) died with exit code %s; %d job(s) re-queued, "
                "starting a new worker",
                p.name,
                p.pid,
                p.exitcode,
                released,
            )
            self.audit.record(
                "worker", outcome="died", pid=p.pid, exitcode=p.exitcode, jobs_requeued=released
            )
            self._workers[i] = self._start_worker(i)

    def _spawn_thread(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _housekeeping(self) -> None:
        interval = self.config.completeness.poll_interval_s
        while not self._stop.is_set():
            try:
                self.scheduler.tick()
                self.deliverer.run_once()
                self._check_workers()
                self._check_receivers()
                self.purge_expired()
                for note in self.feedback.collect():
                    log.info("feedback %d settled: %s %s", note.id, note.state, note.reason)
            except Exception:
                log.exception("housekeeping failed; retrying")
            self._stop.wait(interval)

    def purge_expired(self, now: float | None = None) -> list[str]:
        """Retention: delete spooled studies older than ``retention_days`` once every job
        of theirs is done (results delivered); studies with open or failed jobs are kept."""
        days = self.config.node.retention_days
        now = time.time() if now is None else now
        if days <= 0 or (now - self._last_purge < 60.0 and now >= self._last_purge):
            return []
        self._last_purge = now
        purged = []
        results = results_root(self.config.node.data_dir)
        for study in self.index.finished_before(now - days * 86400.0):
            jobs = self.jobs.for_study(study)
            if any(j.state != DONE for j in jobs):
                continue
            files = self.spool.purge_study(study)
            for job in jobs:
                shutil.rmtree(job_folder(results, job.id), ignore_errors=True)
            job_ids = [j.id for j in jobs]
            self.audit.record(
                "purge", study_instance_uid=study, files=files, jobs=job_ids, retention_days=days
            )
            purged.append(study)
        if purged:
            log.info("retention: purged %d delivered stud(ies)", len(purged))
        return purged

    def stop(self, timeout: float = 120.0) -> None:
        """Graceful stop: no new associations, in-flight stores and jobs finish."""
        log.info("stopping: no new associations; finishing in-flight work")
        self._receivers_stopping = True
        for p in self._receivers.values():
            if p.is_alive():
                p.terminate()  # SIGTERM: stops accepting, finishes its associations
        self.scp.stop()
        self.spool.close()
        for p in self._receivers.values():
            p.join(timeout)
            if p.is_alive():
                log.error("receiver %s did not stop in %.0f s; killing it", p.name, timeout)
                p.kill()
        if self.http is not None:
            self.http.stop()
        self._stop.set()
        for p in self._workers:
            if p.is_alive() and p.pid is not None:
                p.terminate()  # SIGTERM: the worker finishes the job in hand
        for p in self._workers:
            p.join(timeout)
            if p.is_alive():
                log.error("worker %s did not stop in %.0f s; killing it", p.name, timeout)
                p.kill()
        for t in self._threads:
            t.join(timeout)
        if self._ray is not None:
            self._ray.close()
        self.scheduler.close()
        self.deliverer.shutdown()
        log.info("stopped; queued work stays in %s", self.db.path)

    def kill_workers(self) -> None:
        for p in [*self._workers, *self._receivers.values()]:
            p.kill()

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; a second signal forces an immediate exit."""
        done = threading.Event()
        count = 0

        def on_signal(signum: int, frame: FrameType | None) -> None:
            nonlocal count
            count += 1
            if count > 1:
                log.error("second signal: forcing exit")
                self.kill_workers()
                raise SystemExit(1)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        done.wait()
        self.stop()
