"""Delivers the outbox: C-STORE to remote AEs or copies into folders, with back-off.

Delivery owns the destinations: it resolves a route's names (``@sender``) and folder
copies are durable (file and folder fsynced) before an item is marked done.

Each destination is served by its own task in a small thread pool, so a destination that
is down (and waiting out its back-off) never holds up the others.  Transient failures
(connection refused, association aborted or rejected transiently, out-of-resources
statuses) are retried with exponential back-off; permanent rejections are dead-lettered
with the status the destination gave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Protocol

from dicomnode.audit import AuditLog
from dicomnode.config import SENDER, Config, Hl7Destination
from dicomnode.delivery.hl7 import Acknowledgement, send_messages
from dicomnode.delivery.store import Outbox, OutboxItem, OutboxState
from dicomnode.errors import ConfigError, DeliveryError
from dicomnode.fsutil import copy_atomically
from dicomnode.net import status
from dicomnode.net.scu import Peer, SendResult, send_files
from dicomnode.net.tls import client_context
from dicomnode.outputs.layout import job_folder

log = logging.getLogger(__name__)


class DeliveryObserver(Protocol):
    """Told of every delivery attempt and failure, and of the seconds a job's files took
    (the node's metrics: ``phase(pipeline, "delivery", seconds)``)."""

    def attempt(self, destination: str, files: int) -> None: ...

    def failure(self, destination: str, files: int, *, transient: bool) -> None: ...

    def phase(self, pipeline: str, phase: str, seconds: float) -> None: ...


def resolve_destinations(config: Config, destinations: Sequence[str], sender_ae: str) -> list[str]:
    """Destination names of a route, with ``@sender`` replaced by the remote whose AE title
    sent the study; raises a permanent :class:`DeliveryError` when it is not configured."""
    names = []
    for d in destinations:
        if d != SENDER:
            names.append(d)
            continue
        remote = config.remote_by_ae(sender_ae)
        if remote is None:
            raise DeliveryError(
                f"the study's sender {sender_ae!r} is not a configured remote; "
                "add it to [[remotes]] to send results back to it",
                transient=False,
            )
        names.append(remote.name)
    return names


class Deliverer:
    """Delivers due outbox items; logs one line per attempt (``attempt n of N``, the
    next try's local time, or that the item was dead-lettered)."""

    #: Told of attempts, failures and delivery durations (the node's metrics).
    observer: DeliveryObserver | None = None

    def __init__(
        self, config: Config, outbox: Outbox, max_parallel: int = 4, audit: AuditLog | None = None
    ) -> None:
        self.audit = audit or AuditLog(None)
        self.config = config
        self.outbox = outbox
        # One thread per destination at least: a destination that hangs until its timeout
        # holds a thread, and must not hold up the others (no starvation).
        destinations = len(config.remotes) + len(config.folders) + len(config.hl7)
        self._pool = ThreadPoolExecutor(
            max_workers=max(max_parallel, destinations), thread_name_prefix="delivery"
        )
        self._busy: dict[str, Future[None]] = {}
        self._lock = threading.Lock()

    def run_once(self) -> None:
        """Start a delivery task for every destination with due items and none running."""
        for destination in self.outbox.due_destinations():
            with self._lock:
                running = self._busy.get(destination)
                if running is not None and not running.done():
                    continue
                self._busy[destination] = self._pool.submit(self._deliver_due, destination)

    def wait_idle(self, timeout: float | None = None) -> None:
        with self._lock:
            futures = list(self._busy.values())
        for f in futures:
            f.result(timeout=timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _deliver_due(self, destination: str) -> None:
        try:
            items = self.outbox.take_due(destination)
            if items:
                if self.observer is not None:
                    self.observer.attempt(destination, len(items))
                started = time.monotonic()
                self.deliver(destination, items)
                self._observe_delivery(items, time.monotonic() - started)
        except Exception:
            log.exception("delivery to %s crashed; items stay in the outbox", destination)

    def _observe_delivery(self, items: list[OutboxItem], seconds: float) -> None:
        """The delivery phase of each job of a batch (its share of the batch's seconds)."""
        if self.observer is None:
            return
        for job_id, files in Counter(item.job_id for item in items).items():
            try:
                route_name = self.outbox.jobs.get(job_id).route
            except KeyError:
                continue
            route = next((r for r in self.config.routes if r.name == route_name), None)
            pipeline = route.pipeline if route is not None else "unknown"
            self.observer.phase(pipeline, "delivery", seconds * files / len(items))

    def _failed(
        self,
        destination: str,
        items: list[OutboxItem],
        error: str,
        *,
        transient: bool,
        status: int | None = None,
    ) -> None:
        """Record a failed attempt of ``items`` (back-off or dead-letter); one log line."""
        if not items:
            return
        states = {
            self.outbox.delivery_failed(item.id, error, transient=transient, status=status)
            for item in items
        }
        attempt, limit = items[0].attempts + 1, self.outbox.retry.max_attempts
        jobs = ", ".join(str(j) for j in sorted({i.job_id for i in items}))
        what = f"job {jobs}: delivery of {len(items)} file(s) to {destination} failed"
        if OutboxState.PENDING in states:
            due = datetime.fromtimestamp(time.time() + self.outbox.retry.delay(attempt))
            log.warning(
                "%s (attempt %d of %d): %s; next try at %s",
                what,
                attempt,
                limit,
                error,
                due.strftime("%H:%M:%S"),
            )
        else:
            log.error(
                "%s (attempt %d of %d): %s; %s, not retried (`dicomnode jobs retry %s`)",
                what,
                attempt,
                limit,
                error,
                "gave up" if transient else "permanent",
                jobs.replace(",", ""),
            )
        if self.observer is not None:
            self.observer.failure(destination, len(items), transient=transient)

    def deliver(self, destination: str, items: list[OutboxItem]) -> None:
        hl7_destination = self.config.hl7_by_name(destination)
        if hl7_destination is not None:
            self._deliver_hl7(hl7_destination, items)
            return
        folder = self.config.folder_by_name(destination)
        if folder is not None:
            for item in items:
                try:
                    copy_atomically(item.path, job_folder(folder.path, item.job_id))
                    self.outbox.delivered(item.id, status.SUCCESS)
                    self.audit.record(
                        "delivery",
                        outcome="sent",
                        destination=destination,
                        job_id=item.job_id,
                        file=item.path.name,
                    )
                except OSError as exc:
                    self._failed(destination, [item], f"copy failed: {exc}", transient=True)
            log.info("delivered %d file(s) to folder %s", len(items), destination)
            return
        remote = self.config.remote_by_name(destination)
        if remote is None:
            error = f"destination {destination!r} is not configured"
            self._failed(destination, items, error, transient=False)
            return
        try:
            context = client_context(self.config.node.tls) if remote.tls else None
        except ConfigError as exc:
            self._failed(destination, items, str(exc), transient=False)
            return
        peer = Peer(remote.ae_title, remote.host, remote.port, remote.timeout_s, context)
        answered: set[int] = set()
        sent = 0

        def record(i: int, result: SendResult) -> None:
            # Recorded before the next file goes out: a crash leaves one file in doubt.
            nonlocal sent
            answered.add(i)
            sent += self._record(destination, items[i], result)

        try:
            send_files(peer, [i.path for i in items], self.config.node.ae_title, record)
        except (DeliveryError, OSError, ValueError) as exc:
            transient = exc.transient if isinstance(exc, DeliveryError) else True
            self.audit.record(
                "delivery",
                outcome="failed",
                destination=destination,
                transient=transient,
                reason=str(exc)[:300],
                files=len(items) - len(answered),
            )
            failed = [item for i, item in enumerate(items) if i not in answered]
            self._failed(destination, failed, f"cannot send: {exc}", transient=transient)
            return
        jobs = ", ".join(str(j) for j in sorted({i.job_id for i in items}))
        log.info(
            "job %s: delivered %d/%d file(s) to %s (attempt %d)",
            jobs,
            sent,
            len(items),
            destination,
            items[0].attempts + 1,
        )

    def _deliver_hl7(self, destination: Hl7Destination, items: list[OutboxItem]) -> None:
        """ORU messages over MLLP: AA done, AE back-off, AR dead-letter (delivery/hl7.py)."""
        answered: set[int] = set()

        def record(i: int, ack: Acknowledgement) -> None:
            item = items[i]
            answered.add(i)
            self.audit.record(
                "delivery",
                outcome="sent" if ack.accepted else "refused",
                destination=destination.name,
                job_id=item.job_id,
                file=item.path.name,
                ack=ack.code,
                reason=ack.error,
            )
            if ack.accepted:
                self.outbox.delivered(item.id, 0)
                return
            why = ack.error or f"{destination.name} answered {ack.code}"
            state = self.outbox.delivery_failed(item.id, why, transient=ack.transient)
            if self.observer is not None:
                self.observer.failure(destination.name, 1, transient=ack.transient)
            log.warning(
                "job %d: HL7 message to %s: %s -> %s", item.job_id, destination.name, why, state
            )

        try:
            send_messages(destination, [i.path for i in items], record)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = f"cannot send: {type(exc).__name__}: {exc}"
            log.warning("HL7 delivery to %s failed: %s", destination.name, reason)
            self.audit.record(
                "delivery",
                outcome="failed",
                destination=destination.name,
                transient=True,
                reason=reason[:300],
                files=len(items) - len(answered),
            )
            for i, item in enumerate(items):
                if i not in answered:
                    self.outbox.delivery_failed(item.id, reason, transient=True)
            if self.observer is not None:
                self.observer.failure(destination.name, len(items) - len(answered), transient=True)
            return
        log.info("delivered %d HL7 message(s) to %s", len(items), destination.name)

    def _record(self, destination: str, item: OutboxItem, result: SendResult) -> int:
        """Record one C-STORE answer in the outbox; returns 1 if it was delivered."""
        self.audit.record(
            "delivery",
            outcome="sent" if result.ok else "refused",
            destination=destination,
            job_id=item.job_id,
            file=item.path.name,
            status=result.status,
            reason=result.error,
        )
        if result.ok:
            assert result.status is not None
            self.outbox.delivered(item.id, result.status)
            return 1
        if result.status is None:
            self._failed(destination, [item], result.error, transient=False)
        else:
            self._failed(
                destination,
                [item],
                f"{destination} answered {status.describe(result.status)}",
                transient=status.is_transient(result.status),
                status=result.status,
            )
        return 0
