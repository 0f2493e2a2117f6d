"""C-STORE / C-ECHO SCU: sends files to a remote AE on one association per batch."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.errors import DeliveryError
from dicomnode.net import status

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    timeout_s: float = 30.0
    tls: ssl.SSLContext | None = None


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and status.is_success(self.status)


def _contexts(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes to propose (the file's own first, then uncompressed)."""
    proposed: dict[str, list[str]] = {}
    for sop_class, ts in headers:
        lst = proposed.setdefault(sop_class, [])
        for t in (ts, *UNCOMPRESSED):
            if t and t not in lst:
                lst.append(t)
    return proposed


def keep_stray_responses(assoc: Association) -> None:
    """Work around a pynetdicom race that loses a response and stalls ``send_c_store``.

    ``send_*`` pauses the association's reactor before sending, but it checks a flag the
    reactor sets just before pausing: when the reactor is between waking and clearing that
    flag (right after the previous ``send_*`` resumed it), the request goes out unpaused,
    the reactor takes the response off the queue as if it were a request, logs "Received
    unexpected C-STORE service message" and drops it; the sender then waits for the DIMSE
    timeout.  Seen about once in 1,000 back-to-back C-STOREs on a loaded 2-core machine.
    Here a response the reactor takes is put back for the sender.
    """
    serve = assoc._serve_request

    def serve_request(msg: Any, context_id: int) -> None:
        if getattr(msg, "MessageIDBeingRespondedTo", None) is not None:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_request  # type: ignore[method-assign]


def _associate(peer: Peer, calling_ae: str, contexts: dict[str, list[str]]) -> Association:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = peer.timeout_s
    ae.dimse_timeout = peer.timeout_s
    ae.network_timeout = peer.timeout_s
    ae.connection_timeout = min(10.0, peer.timeout_s)
    # One presentation context per transfer syntax: an acceptor picks a single syntax per
    # context, so a context proposing (RLE, Explicit, Implicit) could come back as Explicit
    # and a compressed file could not be sent as it is.  Combined when over the limit of 128.
    separate = sum(len(s) for s in contexts.values()) <= 128
    for sop_class, syntaxes in contexts.items():
        if separate:
            for syntax in syntaxes:
                ae.add_requested_context(sop_class, syntax)
        else:
            ae.add_requested_context(sop_class, syntaxes)
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if assoc.is_established:
        sock = getattr(assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keep_stray_responses(assoc)
        return assoc
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        result = assoc.acceptor.primitive.result if assoc.acceptor.primitive else None
        permanent = result == 0x01
        raise DeliveryError(
            f"association rejected by {where} ({'permanent' if permanent else 'transient'})",
            transient=not permanent,
        )
    raise DeliveryError(f"cannot associate with {where} (down or aborted)", transient=True)


def echo(peer: Peer, calling_ae: str) -> int:
    """C-ECHO the peer; returns its status or raises :class:`DeliveryError`."""
    assoc = _associate(peer, calling_ae, {Verification: list(UNCOMPRESSED)})
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if "Status" in rsp else -1
    finally:
        assoc.release()


def _report(
    results: list[SendResult],
    on_result: Callable[[int, SendResult], None] | None,
    result: SendResult,
) -> None:
    results.append(result)
    if on_result is not None:
        on_result(len(results) - 1, result)


def send_files(
    peer: Peer,
    paths: Sequence[Path],
    calling_ae: str,
    on_result: Callable[[int, SendResult], None] | None = None,
) -> list[SendResult]:
    """C-STORE each file on one association; per-file results, association errors raise.

    ``on_result(i, result)`` is called as soon as file ``i`` has its answer, so a caller
    can record it before the next file goes out (a crash then leaves at most one file in
    doubt) and keeps what was answered when the association is lost later."""
    datasets = [dcmread(p) for p in paths]
    headers = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets]
    assoc = _associate(peer, calling_ae, _contexts(headers))
    results: list[SendResult] = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            accepted = [
                cx.transfer_syntax[0]
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == ds.SOPClassUID
            ]
            if not accepted:
                _report(
                    results, on_result, SendResult(path, None, "no accepted presentation context")
                )
                continue
            native = str(ds.file_meta.TransferSyntaxUID)
            if native not in accepted and UID(native).is_compressed:
                _report(
                    results,
                    on_result,
                    SendResult(path, None, f"peer does not accept {UID(native).name}"),
                )
                continue
            rsp = assoc.send_c_store(ds)
            if not assoc.is_established and "Status" not in rsp:
                raise DeliveryError(f"association with {peer.ae_title} lost", transient=True)
            code = int(rsp.Status) if "Status" in rsp else None
            _report(
                results,
                on_result,
                SendResult(path, code, "" if code is not None else "no response"),
            )
    finally:
        if assoc.is_established:
            assoc.release()
    return results
