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
import signal
import threading
from collections.abc import Callable, MutableSequence
from multiprocessing.connection import Connection
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
from dicomnode.spool.index import Index, InstanceHeader
from dicomnode.spool.query import Catalog
from dicomnode.spool.store import Spool
from dicomnode.uids import is_image_storage, is_own_uid

log = logging.getLogger(__name__)


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


def make_spool(config: Config, index: Index, owner: str = "0") -> Spool:
    return Spool(
        config.node.data_dir,
        index,
        min_free_bytes=config.node.min_free_disk_mb * 2**20,
        rerun_late=config.completeness.late_arrivals == "rerun",
        drives=driving_rule(config),
        log_owner=owner,
        buffer_limit=4 * config.node.max_associations,
    )


def make_scp(
    config: Config,
    spool: Spool,
    audit: AuditLog,
    catalog: Catalog,
    *,
    port: int | None = None,
    count_slots: MutableSequence[int] | None = None,
    number: int = 0,
) -> StorageSCP:
    """The SCP of receiver ``number`` (the node's own is 0); with more than one
    receiver, bound with ``SO_REUSEPORT`` and counting its associations in
    ``count_slots`` (one per receiver, shared memory: ``max_associations`` is the node's)."""
    settings = config.node if port is None else dataclasses.replace(config.node, port=port)
    scp = StorageSCP(
        settings,
        spool,
        audit=audit,
        catalog=catalog,
        remotes=config.remotes,
        reuse_port=config.node.receivers > 1,
        count_slots=count_slots,
        count_slot=number,
    )
    scp.completes_after_s = config.completeness.quiet_period_s
    return scp


def receiver_main(
    config: Config,
    number: int,
    port: int,
    parent: int,
    metrics: Connection,
    count_slots: MutableSequence[int],
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
    spool = make_spool(config, index, str(number))
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
    scp = make_scp(config, spool, audit, catalog, port=port, count_slots=count_slots, number=number)
    observer = PipeReceiveObserver(metrics)
    scp.observer = observer
    scp.start()
    observer.ready(number)
    stop.wait()
    scp.stop()
    spool.close()
