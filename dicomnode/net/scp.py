"""The C-ECHO / C-STORE SCP.

The C-STORE handler takes the encoded bytes as received (no decoding), hands them to the
spool, and answers with the status :func:`dicomnode.net.status.status_for` gives.  What the
node changes in pynetdicom's acceptor (TCP_NODELAY and timeouts on accepted sockets, the
caller's host check, the guards against malformed input) is in
:mod:`dicomnode.net.patches`; start-up refuses a pynetdicom they were not tested with.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.audit import AuditLog
from dicomnode.config import NodeSettings, Remote
from dicomnode.net import patches, status
from dicomnode.net.qr import QueryRetrieveSCP
from dicomnode.net.receive import (
    Check,
    Receipt,
    receive_file,
    receive_instance,
    receive_logged,
)
from dicomnode.net.tls import server_context
from dicomnode.net.ul import AssociateRequest, FastPath
from dicomnode.shared import ProcessCounts
from dicomnode.spool.index import InstanceHeader
from dicomnode.spool.journal import RecordBuffer
from dicomnode.spool.query import Catalog
from dicomnode.spool.store import ReceivedFile, Spool, StoreOutcome

log = logging.getLogger(__name__)


@dataclass
class ReceiveCounters:
    stored: int = 0
    duplicates: int = 0
    new_versions: int = 0
    failed: int = 0


@dataclass
class AssociationSummary:
    """What one association brought, for its closing log line and the metrics."""

    calling_ae: str
    host: str
    started: float = field(default_factory=time.monotonic)
    outcome: str = "open"  # released, aborted, rejected
    instances: int = 0
    bytes: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    studies: set[str] = field(default_factory=set)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        statuses = ", ".join(f"0x{s:04X} x{n}" for s, n in sorted(self.statuses.items()))
        return (
            f"association from {self.calling_ae} at {self.host} {self.outcome} after "
            f"{self.seconds:.1f} s: {self.instances} instance(s), "
            f"{self.bytes / 1e6:.1f} MB, statuses: {statuses or 'none'}"
        )


class ReceiveObserver(Protocol):
    """Told of every C-STORE answered and every association that ends (the metrics).

    The SCP also logs one INFO line per association when it ends (caller, host,
    instances, bytes, seconds, statuses)."""

    def instance(self, calling_ae: str, outcome: str, size: int, status: int) -> None: ...

    def association(self, summary: AssociationSummary) -> None: ...


class _NodeAE(AE):
    """pynetdicom's AE whose association limit is the node's: its acceptor rejects when its
    own associations exceed ``maximum_associations``, so that is the configured limit less
    the connections open elsewhere (the fast path, the other receiving processes)."""

    #: Connections open on the port that are not this process's pynetdicom acceptors.
    elsewhere: Callable[[], int] | None = None

    @property
    def limit(self) -> int:
        """The configured limit (``max_associations``)."""
        return self._maximum_associations

    @property
    def maximum_associations(self) -> int:
        limit = self._maximum_associations
        return limit if self.elsewhere is None else limit - self.elsewhere()

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]


class StorageSCP:
    """Runs the node's listening AE: C-ECHO, C-STORE into the spool and, given a
    ``catalog``, Query/Retrieve (C-FIND, C-GET, C-MOVE to ``remotes``: :mod:`.qr`)."""

    #: Told of every instance and association (the node's metrics).
    observer: ReceiveObserver | None = None
    #: The quiet period, named in each association's closing INFO line, so that the wait
    #: before processing starts is not mistaken for a failed send.
    completes_after_s: float | None = None

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        audit: AuditLog | None = None,
        *,
        catalog: Catalog | None = None,
        remotes: tuple[Remote, ...] = (),
        reuse_port: bool = False,
        count: ProcessCounts | None = None,
    ) -> None:
        """``count``: the associations open in the node's receiving processes, this one's
        among them (``max_associations`` is the node's limit); without it, this SCP's own."""
        patches.check_pynetdicom()
        self.reuse_port = reuse_port
        #: Connections open on the port, both paths, every receiving process.
        self.count = count or ProcessCounts()
        self._slow = 0  # of them, this process's pynetdicom associations
        self.settings = settings
        self.spool = spool
        self.audit = audit or AuditLog(None)
        self.qr = (
            None
            if catalog is None
            else QueryRetrieveSCP(settings, catalog, remotes, self.audit, self._caller_allowed)
        )
        self.counters = ReceiveCounters()
        self._lock = threading.Lock()
        self._associations: dict[object, AssociationSummary] = {}
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self.ae: _NodeAE = self._make_ae()
        #: The receive fast path (:mod:`.ul`), off with TLS or ``fast_receive = false``.
        self.fast: FastPath | None = None
        if settings.fast_receive and not settings.tls.enabled:
            self.fast = FastPath(
                self,
                max_pdu=settings.max_pdu,
                max_instance_bytes=settings.max_instance_mb * 2**20,
                memory_bytes=settings.receive_in_memory_mb * 2**20,
                timeout=settings.network_timeout_s,
                acse_timeout=lambda: float(self.ae.acse_timeout or 30.0),
                count=self.count,
            )

    def _make_ae(self) -> _NodeAE:
        s = self.settings
        ae = _NodeAE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.elsewhere = lambda: self.count.total - self._slow
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.network_timeout_s
        ae.acse_timeout = min(30.0, s.network_timeout_s)
        ae.dimse_timeout = s.network_timeout_s
        ae.require_called_aet = s.require_called_ae
        if s.allowed_callers:
            ae.require_calling_aet = [c.ae_title for c in s.allowed_callers]
        # With Q/R, a C-GET caller may take the SCP role for storage (PS3.7 D.3.3.4).
        role = {"scu_role": True, "scp_role": True} if self.qr is not None else {}
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES, **role)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self.qr is not None:
            for sop_class in self.qr.sop_classes():
                ae.add_supported_context(sop_class, self.qr.transfer_syntaxes())
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in a background thread (port 0 picks a free port)."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_CONN_OPEN, self._log_open),
            (evt.EVT_REJECTED, self._log_rejected),
            (evt.EVT_ACCEPTED, self._log_association),
            (evt.EVT_RELEASED, self._log_association),
            (evt.EVT_ABORTED, self._log_association),
        ]
        if self.qr is not None:
            handlers += [
                (evt.EVT_C_FIND, self.qr.handle_find),
                (evt.EVT_C_MOVE, self.qr.handle_move),
                (evt.EVT_C_GET, self.qr.handle_get),
            ]
        tls = self.settings.tls
        server = patches.make_server(
            self.ae,
            (self.settings.bind_address, self.settings.port),
            handlers,
            ssl_context=server_context(tls) if tls.enabled else None,
            divert=self.fast.try_serve if self.fast is not None else None,
            reuse_port=self.reuse_port,
        )
        stamp = datetime.now().strftime("%H%M%S")
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"scp-acceptor-{stamp}", daemon=True
        )
        self._thread.start()
        self._server = server
        log.info(
            "listening as %s on %s:%d",
            self.settings.ae_title,
            self.settings.bind_address,
            self.port,
        )

    def stop(self) -> None:
        """Stop accepting, then wait for in-flight associations to finish their stores."""
        server = self._server
        if server is None:
            return
        server.shutdown()  # stops the accept loop; running associations keep going
        for assoc in list(server.active_associations):
            assoc.join(timeout=self.settings.network_timeout_s)
        if self.fast is not None:
            self.fast.wait_idle(self.settings.network_timeout_s)
        server.server_close()
        self._server = None
        log.info("SCP stopped")

    # --- handlers (tiny: check, store, answer) -------------------------------------

    def _caller_allowed(self, ae_title: str, host: str) -> bool:
        callers = self.settings.allowed_callers
        if not callers:
            return True
        return any(c.ae_title == ae_title and (not c.hosts or host in c.hosts) for c in callers)

    def _handle_echo(self, event: Event) -> int:
        return status.SUCCESS

    def _handle_store(self, event: Event) -> int:
        requestor = event.assoc.requestor
        req: Any = event.request
        try:
            encoded = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # pynetdicom could not assemble the dataset's bytes
            encoded = b""
            log.warning("C-STORE: no dataset bytes: %s", exc)
        code, _ = self.store(
            event.assoc,
            str(requestor.ae_title).strip(),
            str(requestor.address),
            str(req.AffectedSOPClassUID),
            str(req.AffectedSOPInstanceUID),
            encoded,
            None,
        )
        return code

    # --- both paths: pynetdicom's associations and the fast path (:mod:`.ul`) ---------

    def store(
        self,
        key: object,
        calling_ae: str,
        host: str,
        sop_class: str,
        sop_instance: str,
        encoded: bytes | RecordBuffer | ReceivedFile,
        sha256: str | None,
        spooled: Callable[[], None] | None = None,
    ) -> tuple[int, str]:
        """Check, log or spool one instance and count it: (status, reason when refused).

        A :class:`RecordBuffer` (the fast path, with its ``sha256``) is answered once the
        receive log holds the instance; the spool file and index row follow (``spooled``
        is called then).  Bytes, and a :class:`ReceivedFile` (the fast path's instances
        too large for memory), are stored before the answer."""
        size = len(encoded) if isinstance(encoded, bytes) else encoded.length
        if not self._caller_allowed(calling_ae, host):
            if isinstance(encoded, RecordBuffer):
                self.spool.buffers.give(encoded)
            elif isinstance(encoded, ReceivedFile):
                encoded.discard()
            reason = "caller not allowed"
            log.warning("C-STORE refused: %s at %s is not an allowed caller", calling_ae, host)
            self.audit.record(
                "instance",
                outcome="refused",
                status=status.REFUSED_NOT_AUTHORIZED,
                calling_ae=calling_ae,
                host=host,
                reason=reason,
            )
            receipt = Receipt(status.REFUSED_NOT_AUTHORIZED, "refused", None, reason)
        elif isinstance(encoded, ReceivedFile):
            receipt = receive_file(
                self.spool,
                self.audit,
                encoded,
                calling_ae=calling_ae,
                host=host,
                via=f"C-STORE from {calling_ae}",
                check=_matches(sop_class, sop_instance),
                sha256=sha256 or "",
            )
        elif isinstance(encoded, bytes):
            receipt = receive_instance(
                self.spool,
                self.audit,
                encoded,
                calling_ae=calling_ae,
                host=host,
                via=f"C-STORE from {calling_ae}",
                check=_matches(sop_class, sop_instance),
            )
        else:

            def done(result: Receipt) -> None:
                self._counted(calling_ae, size, result)
                if spooled is not None:
                    spooled()

            receipt = receive_logged(
                self.spool,
                self.audit,
                encoded,
                calling_ae=calling_ae,
                host=host,
                via=f"C-STORE from {calling_ae}",
                check=_matches(sop_class, sop_instance),
                sha256=hashlib.sha256(encoded.body).hexdigest() if sha256 is None else sha256,
                spooled=done,
            )
        if not receipt.ok or not isinstance(encoded, RecordBuffer):
            self._counted(calling_ae, size, receipt)
        study = receipt.header.study_instance_uid if receipt.ok and receipt.header else ""
        with self._lock:
            summary = self._associations.setdefault(key, AssociationSummary(calling_ae, host))
            summary.instances += 1
            summary.bytes += size
            summary.statuses[receipt.status] += 1
            if study:
                summary.studies.add(study)
        return receipt.status, receipt.reason

    def _counted(self, calling_ae: str, size: int, receipt: Receipt) -> None:
        """The counters and the metrics, once the outcome is known."""
        with self._lock:
            if not receipt.ok:
                self.counters.failed += 1
            elif receipt.outcome == StoreOutcome.DUPLICATE.value:
                self.counters.duplicates += 1
            else:
                self.counters.stored += 1
                if receipt.outcome == StoreOutcome.NEW_VERSION.value:
                    self.counters.new_versions += 1
        if self.observer is not None:
            self.observer.instance(calling_ae, receipt.outcome, size, receipt.status)

    def refuse(
        self, key: object, calling_ae: str, host: str, size: int, status_: int, reason: str
    ) -> None:
        """An instance refused before it reached the spool (over ``max_instance_mb``)."""
        log.warning("C-STORE from %s refused with 0x%04X: %s", calling_ae, status_, reason)
        self.audit.record(
            "instance",
            outcome="refused",
            status=status_,
            calling_ae=calling_ae,
            host=host,
            reason=reason,
        )
        self._counted(calling_ae, size, Receipt(status_, "refused", None, reason))
        with self._lock:
            summary = self._associations.setdefault(key, AssociationSummary(calling_ae, host))
            summary.instances += 1
            summary.bytes += size
            summary.statuses[status_] += 1

    def receive_into_file(self) -> ReceivedFile:
        return self.spool.receive_into_file()

    def take_buffer(self) -> RecordBuffer:
        return self.spool.buffers.take()

    def give_buffer(self, buffer: RecordBuffer) -> None:
        self.spool.buffers.give(buffer)

    def admit(self, request: AssociateRequest, host: str) -> tuple[int, int, int, str] | None:
        """The fast path's association checks, pynetdicom's order and answers."""
        own = self.settings.ae_title
        called, calling = request.called_ae, request.calling_ae
        refusal: tuple[int, int, int, str] | None = None
        if not self._caller_allowed(calling, host):
            refusal = (1, 1, 3, f"calling AE title {calling!r} at {host} is not an allowed caller")
        elif self.settings.require_called_ae and called != own:
            refusal = (1, 1, 7, f"called AE title {called!r} is not this node's ({own!r})")
        elif self.count.total > self.ae.limit:
            refusal = (2, 3, 2, self._too_many())
        if refusal is not None:
            self._rejected(calling, host, called, refusal[3])
        return refusal

    def _too_many(self) -> str:
        limit = self.ae.limit
        if not self.reuse_port:
            return f"too many associations (max_associations = {limit})"
        return (
            f"too many associations (max_associations = {limit}, all receiving processes; "
            f"{self.count.own} in this one)"
        )

    def _count_slow(self, assoc: Any) -> None:
        """Count a pynetdicom association from its connection until its thread ends
        (called before the thread starts)."""
        with self._lock:
            self._slow += 1
        self.count.change(1)
        run = assoc.run

        def counted_run() -> None:
            try:
                run()
            finally:
                self.count.change(-1)
                with self._lock:
                    self._slow -= 1

        assoc.run = counted_run

    def association_event(self, key: object, calling_ae: str, host: str, outcome: str) -> None:
        """An association accepted, released or aborted: audit, closing line, metrics."""
        self.audit.record(
            "association",
            outcome=outcome,
            calling_ae=calling_ae,
            host=host,
            tls=self.settings.tls.enabled,
        )
        if outcome == "accepted":
            with self._lock:
                self._associations.setdefault(key, AssociationSummary(calling_ae, host))
            return
        with self._lock:
            summary = self._associations.pop(key, None)
        if summary is None:  # ended twice (aborted after release), or never accepted
            return
        summary.outcome = outcome
        line = summary.describe()
        if summary.studies and self.completes_after_s is not None:
            line += (
                f"; {len(summary.studies)} study(ies) receiving, processed after "
                f"{self.completes_after_s:g} s without new instances"
            )
        log.info("%s", line)
        if self.observer is not None:
            self.observer.association(summary)

    def _log_open(self, event: Event) -> None:
        """Runs before the association starts: install the host check and the guards
        against malformed input (:mod:`dicomnode.net.patches`), log the connection."""
        self._count_slow(event.assoc)
        if any(c.hosts for c in self.settings.allowed_callers):
            patches.check_caller_host(event.assoc, self._caller_allowed)
        patches.guard_association(event.assoc, self.settings.max_pdu)
        address: Any = getattr(event, "address", ("?", "?"))
        log.debug("connection from %s:%s", address[0], address[1])

    def _rejection_reason(self, event: Event) -> tuple[str, str]:
        """(called AE title asked for, why the association was rejected): pynetdicom's
        acceptor does not pass its reason on, so its checks are made again here."""
        assoc = event.assoc
        request: Any = assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        calling = str(assoc.requestor.ae_title).strip()
        host = str(assoc.requestor.address)
        own = self.settings.ae_title
        if self.settings.require_called_ae and called and called != own:
            return called, f"called AE title {called!r} is not this node's ({own!r})"
        if not self._caller_allowed(calling, host):
            return called, f"calling AE title {calling!r} at {host} is not an allowed caller"
        if self.count.total > self.ae.limit:
            return called, self._too_many()
        return called, "refused in negotiation (user identity)"

    def _log_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        called, reason = self._rejection_reason(event)
        with self._lock:
            self._associations.pop(event.assoc, None)
        self._rejected(str(requestor.ae_title).strip(), str(requestor.address), called, reason)

    def _rejected(self, calling_ae: str, host: str, called: str, reason: str) -> None:
        summary = AssociationSummary(calling_ae, host, outcome="rejected")
        log.warning(
            "association from %s at %s to %s rejected: %s",
            summary.calling_ae,
            summary.host,
            called or "?",
            reason,
        )
        self.audit.record(
            "association",
            outcome="rejected",
            calling_ae=summary.calling_ae,
            host=summary.host,
            called_ae=called,
            reason=reason,
        )
        if self.observer is not None:
            self.observer.association(summary)

    def _log_association(self, event: Event) -> None:
        requestor = event.assoc.requestor
        outcome = {
            "EVT_ACCEPTED": "accepted",
            "EVT_RELEASED": "released",
            "EVT_ABORTED": "aborted",
        }.get(event.event.name, event.event.name)
        self.association_event(
            event.assoc, str(requestor.ae_title).strip(), str(requestor.address), outcome
        )


def _matches(sop_class: str, sop_instance: str) -> Check:
    """The check that the data set is the one its C-STORE request announced."""

    def check(header: InstanceHeader) -> tuple[int, str] | None:
        if sop_instance != header.sop_instance_uid:
            return (
                status.ERROR_CANNOT_UNDERSTAND,
                "SOP Instance UID of the dataset differs from the C-STORE request",
            )
        if sop_class != header.sop_class_uid:
            return (
                status.ERROR_DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP class differs from the request",
            )
        return None

    return check


class FolderSCP:
    """A minimal storage SCP that writes what it receives into a folder (demo, tests)."""

    def __init__(
        self, ae_title: str, folder: Path, bind_address: str = "127.0.0.1", port: int = 0
    ) -> None:
        patches.check_pynetdicom()
        self.folder = folder
        self.received: list[Path] = []
        self._cond = threading.Condition()
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self._address = (bind_address, port)
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        server = patches.make_server(
            self.ae,
            self._address,
            [(evt.EVT_C_STORE, self._handle), (evt.EVT_C_ECHO, lambda e: 0)],
        )
        threading.Thread(target=server.serve_forever, name="folder-scp", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, event: Event) -> int:
        req: Any = event.request
        uid = str(req.AffectedSOPInstanceUID)
        path = self.folder / f"{uid}.dcm"
        path.write_bytes(event.encoded_dataset(include_meta=True))
        with self._cond:
            self.received.append(path)
            self._cond.notify_all()
        return status.SUCCESS

    def wait_for(self, count: int, timeout: float) -> list[Path]:
        """Block until ``count`` instances arrived (or the timeout passed)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.received) >= count, timeout=timeout)
            return list(self.received)
