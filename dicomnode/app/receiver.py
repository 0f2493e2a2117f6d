"""The receiving side of the node (spool and SCP), and extra receiving processes.

With ``[node] receivers = N`` the node runs its SCP in N processes on one port: the node's
own and N - 1 receiver processes, each bound with ``SO_REUSEPORT`` (the kernel spreads
new connections over them).  They share the spool folder and the index (SQLite WAL is safe
across processes); each writes its own receive log (``receive-log/<n>-...``), so a
receiver that dies leaves a log that the next one of its number replays before it
accepts anything.  Several processes let concurrent associations use more than one core
(the GIL); one association is served by one process.  Receivers report to the node's
metrics over a pipe, as workers do; the node restarts a receiver that died.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable, MutableSequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

from dicomnode.app.logformat import LogFormat, configure_logging
from dicomnode.app.metrics import PipeReceiveObserver
from dicomnode.app.worker import die_with_parent
from dicomnode.audit import AuditLog
from dicomnode.config import Config
from dicomnode.db import Database
from dicomnode.jobs.store import JobStore
from dicomnode.net.scp import StorageSCP
from dicomnode.outputs.layout import results_root
from dicomnode.routing.select import explicit_sop_classes
from dicomnode.shared import ProcessCounts, ProcessLock
from dicomnode.spool.index import Index, InstanceHeader
from dicomnode.spool.query import Catalog
from dicomnode.spool.store import Spool
from dicomnode.uids import is_image_storage, is_own_uid

log = logging.getLogger(__name__)

#: The file the receiving processes lock while they check and hold free space.
HELD_LOCK = "held-space.lock"


def driving_rule(config: Config) -> Callable[[InstanceHeader], bool]:
    """Which received instances drive processing: images, and the SOP classes a route asks
    for by name; never the node's own results (its UID root).  Everything else is stored
    and acknowledged only (docs/conformance.md)."""
    explicit = explicit_sop_classes(config.routes)

    def drives(header: InstanceHeader) -> bool:
        if is_own_uid(header.sop_instance_uid):
            return False
        return header.sop_class_uid in explicit or is_image_storage(header.sop_class_uid)

    return drives


@dataclasses.dataclass(frozen=True)
class Shared:
    """What the node's receiving processes share (made by the node when ``[node].receivers``
    is over 1, handed to each receiver as it starts): per process, the associations open
    (``max_associations`` is the node's limit) and the free space held for instances
    acknowledged and not yet spooled (the watermark is the node's), and the file each
    process locks while it checks and holds free space (:class:`ProcessLock`: released by
    the kernel when a receiver dies holding it)."""

    associations: MutableSequence[int]
    held_bytes: MutableSequence[int]
    held_lock: Path

    @staticmethod
    def make(receivers: int, data_dir: Path) -> Shared | None:
        if receivers < 2:
            return None
        context = mp.get_context("spawn")
        data_dir.mkdir(parents=True, exist_ok=True)
        return Shared(
            context.RawArray("i", receivers),
            context.RawArray("q", receivers),
            data_dir / HELD_LOCK,
        )


def make_spool(
    config: Config, index: Index, number: int = 0, shared: Shared | None = None
) -> Spool:
    """The spool of receiver ``number`` (the node's own is 0)."""
    return Spool(
        config.node.data_dir,
        index,
        min_free_bytes=config.node.min_free_disk_mb * 2**20,
        rerun_late=config.completeness.late_arrivals == "rerun",
        drives=driving_rule(config),
        log_owner=str(number),
        buffer_limit=4 * config.node.max_associations,
        # A receiver started again keeps what its predecessor held until it has replayed
        # that one's receive log (Spool.recover resets it).
        held=None
        if shared is None
        else ProcessCounts(shared.held_bytes, number, ProcessLock(shared.held_lock), clear=False),
    )


def make_scp(
    config: Config,
    spool: Spool,
    audit: AuditLog,
    catalog: Catalog,
    *,
    port: int | None = None,
    number: int = 0,
    shared: Shared | None = None,
) -> StorageSCP:
    """The SCP of receiver ``number`` (the node's own is 0); with more than one
    receiver, bound with ``SO_REUSEPORT`` and counting its associations in ``shared``."""
    settings = config.node if port is None else dataclasses.replace(config.node, port=port)
    scp = StorageSCP(
        settings,
        spool,
        audit=audit,
        catalog=catalog,
        remotes=config.remotes,
        reuse_port=config.node.receivers > 1,
        count=None if shared is None else ProcessCounts(shared.associations, number),
    )
    scp.completes_after_s = config.completeness.quiet_period_s
    return scp


def receiver_main(
    config: Config,
    number: int,
    port: int,
    parent: int,
    metrics: Connection,
    shared: Shared,
    log_format: LogFormat = "text",
) -> None:
    """Entry point of receiver process ``number``: the SCP on ``port`` until SIGTERM, then
    a graceful stop (associations in progress finish, the spool checkpoints)."""
    die_with_parent(parent)
    configure_logging(config.node.log_level, log_format)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    db = Database(config.node.data_dir)
    index = Index(db)
    jobs = JobStore(db, config.jobs)
    spool = make_spool(config, index, number, shared)
    restored = spool.recover(str(number))
    if restored:
        log.warning("receiver %d: %d instance(s) restored from its receive log", number, restored)
    spool.receive_log()

    def job_state(job_id: int) -> str | None:
        try:
            return str(jobs.get(job_id).state)
        except KeyError:
            return None

    catalog = Catalog(index, results_root(config.node.data_dir), job_state)
    audit = AuditLog(config.node.audit_path)
    scp = make_scp(config, spool, audit, catalog, port=port, number=number, shared=shared)
    observer = PipeReceiveObserver(metrics)
    scp.observer = observer
    scp.start()
    observer.ready(number)
    stop.wait()
    scp.stop()
    spool.close()
