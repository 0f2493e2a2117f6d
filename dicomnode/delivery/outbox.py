"""Delivers the outbox: C-STORE to remote AEs or copies into folders, with back-off.

Each destination is served by its own task in a small thread pool, so a destination that
is down (and waiting out its back-off) never holds up the others.  Transient failures
(connection refused, association aborted or rejected transiently, out-of-resources
statuses) are retried with exponential back-off; permanent rejections are dead-lettered
with the status the destination gave.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dicomnode.audit import AuditLog
from dicomnode.config import Config
from dicomnode.errors import ConfigError, DeliveryError
from dicomnode.jobs.queue import JobQueue, OutboxItem
from dicomnode.net import status
from dicomnode.net.scu import Peer, SendResult, send_files
from dicomnode.net.tls import client_context

log = logging.getLogger(__name__)


def copy_atomically(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / src.name
    tmp = folder / f".{uuid.uuid4().hex}.part"
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, final)
    return final


class Deliverer:
    def __init__(
        self, config: Config, queue: JobQueue, max_parallel: int = 4, audit: AuditLog | None = None
    ) -> None:
        self.audit = audit or AuditLog(None)
        self.config = config
        self.queue = queue
        # One thread per destination at least: a destination that hangs until its timeout
        # holds a thread, and must not hold up the others (no starvation).
        destinations = len(config.remotes) + len(config.folders)
        self._pool = ThreadPoolExecutor(
            max_workers=max(max_parallel, destinations), thread_name_prefix="delivery"
        )
        self._busy: dict[str, Future[None]] = {}
        self._lock = threading.Lock()

    def run_once(self) -> None:
        """Start a delivery task for every destination with due items and none running."""
        for destination in self.queue.due_destinations():
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
            items = self.queue.take_due(destination)
            if items:
                self.deliver(destination, items)
        except Exception:
            log.exception("delivery to %s crashed; items stay in the outbox", destination)

    def deliver(self, destination: str, items: list[OutboxItem]) -> None:
        folder = self.config.folder_by_name(destination)
        if folder is not None:
            for item in items:
                try:
                    copy_atomically(item.path, folder.path / f"job-{item.job_id}")
                    self.queue.delivered(item.id, status.SUCCESS)
                    self.audit.record(
                        "delivery",
                        outcome="sent",
                        destination=destination,
                        job_id=item.job_id,
                        file=item.path.name,
                    )
                except OSError as exc:
                    self.queue.delivery_failed(item.id, f"copy failed: {exc}", transient=True)
            log.info("delivered %d file(s) to folder %s", len(items), destination)
            return
        remote = self.config.remote_by_name(destination)
        if remote is None:
            for item in items:
                self.queue.delivery_failed(
                    item.id, f"destination {destination!r} is not configured", transient=False
                )
            return
        try:
            context = client_context(self.config.node.tls) if remote.tls else None
        except ConfigError as exc:
            for item in items:
                self.queue.delivery_failed(item.id, str(exc), transient=False)
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
            log.warning("delivery to %s failed: %s", destination, exc)
            self.audit.record(
                "delivery",
                outcome="failed",
                destination=destination,
                transient=transient,
                reason=str(exc)[:300],
                files=len(items) - len(answered),
            )
            for i, item in enumerate(items):
                if i not in answered:
                    self.queue.delivery_failed(item.id, f"cannot send: {exc}", transient=transient)
            return
        log.info("delivered %d/%d file(s) to %s", sent, len(items), destination)

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
            self.queue.delivered(item.id, result.status)
            return 1
        if result.status is None:
            self.queue.delivery_failed(item.id, result.error, transient=False)
        else:
            self.queue.delivery_failed(
                item.id,
                f"{destination} answered 0x{result.status:04X}",
                transient=status.is_transient(result.status),
                status=result.status,
            )
        return 0
