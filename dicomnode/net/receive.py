"""Receiving one instance, the same way through every door (C-STORE, STOW-RS).

Check the encoded bytes (no decoding), let the caller refuse what its protocol forbids
(a C-STORE whose dataset differs from its request, a STOW part of another study), store
durably, map errors to the DICOM status (:func:`dicomnode.net.status.status_for`) and
write the audit record.  The status is 0x0000 only once the spool has the instance.  A
Segmentation the node did not make is also noted in the feedback inbox (from the UIDs
already read: :mod:`dicomnode.spool.feedback`), to be recognised as a correction later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode.audit import AuditLog
from dicomnode.net import status
from dicomnode.spool.feedback import FeedbackInbox, is_feedback_candidate
from dicomnode.spool.header import read_header
from dicomnode.spool.index import InstanceHeader
from dicomnode.spool.journal import RecordBuffer
from dicomnode.spool.store import ReceivedFile, Spool, StoreOutcome

log = logging.getLogger(__name__)

#: Why a caller refuses an instance it read: (status, reason), or None to store it.
Check = Callable[[InstanceHeader], tuple[int, str] | None]


@dataclass(frozen=True)
class Receipt:
    status: int
    #: stored, duplicate, new_version, or refused
    outcome: str
    header: InstanceHeader | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == status.SUCCESS


def receive_instance(
    spool: Spool,
    audit: AuditLog,
    encoded: bytes,
    *,
    calling_ae: str,
    host: str,
    via: str,
    check: Check | None = None,
) -> Receipt:
    """Check, store and audit one instance (file meta + encoded dataset); never raises.

    ``via`` names the door in log lines (``"C-STORE from PACS"``)."""
    header: InstanceHeader | None = None
    try:
        header = read_header(encoded)
        refused = check(header) if check is not None else None
        if refused is not None:
            code, reason = refused
            return _refuse(audit, via, calling_ae, host, code, reason, header)
        outcome = spool.store(encoded, calling_ae=calling_ae, calling_host=host, header=header)
    except Exception as exc:
        return _refuse(audit, via, calling_ae, host, status.status_for(exc), str(exc), header)
    return _stored(spool, audit, calling_ae, host, header, outcome)


def receive_file(
    spool: Spool,
    audit: AuditLog,
    received: ReceivedFile,
    *,
    calling_ae: str,
    host: str,
    via: str,
    check: Check | None,
    sha256: str,
) -> Receipt:
    """The fast path's receive of an instance too large for memory, received into a file
    (:meth:`Spool.receive_into_file`): check it, store it durably, audit; never raises.
    The file is the spool's from now on (moved into the spool or removed)."""
    header: InstanceHeader | None = None
    try:
        with received.mapped() as body:
            header = read_header(body)
        refused = check(header) if check is not None else None
        if refused is None:
            outcome = spool.store_received_file(
                received, calling_ae=calling_ae, calling_host=host, header=header, sha256=sha256
            )
    except Exception as exc:
        received.discard()
        return _refuse(audit, via, calling_ae, host, status.status_for(exc), str(exc), header)
    if refused is not None:
        received.discard()
        code, reason = refused
        return _refuse(audit, via, calling_ae, host, code, reason, header)
    return _stored(spool, audit, calling_ae, host, header, outcome)


def receive_logged(
    spool: Spool,
    audit: AuditLog,
    buffer: RecordBuffer,
    *,
    calling_ae: str,
    host: str,
    via: str,
    check: Check | None,
    sha256: str,
    spooled: Callable[[Receipt], None],
) -> Receipt:
    """The fast path's receive (:mod:`dicomnode.net.ul`): check, append to the receive log
    and answer once the log sync covers the instance; the spool file and the index row
    follow in the spool's thread, which writes the audit record and calls ``spooled``
    with the outcome (stored, duplicate, new_version).  ``buffer`` (from
    ``spool.buffers``) is the spool's from now on.  Never raises."""
    header: InstanceHeader | None = None
    try:
        header = read_header(buffer.body)
        refused = check(header) if check is not None else None
        if refused is None:
            pending = spool.log_instance(
                buffer, calling_ae=calling_ae, calling_host=host, header=header, sha256=sha256
            )
    except Exception as exc:
        spool.buffers.give(buffer)
        return _refuse(audit, via, calling_ae, host, status.status_for(exc), str(exc), header)
    if refused is not None:
        spool.buffers.give(buffer)
        code, reason = refused
        return _refuse(audit, via, calling_ae, host, code, reason, header)
    known = header

    def done(outcome: StoreOutcome) -> None:
        spooled(_stored(spool, audit, calling_ae, host, known, outcome))

    spool.spool_later(pending, done)
    try:
        spool.wait_durable(pending)
    except Exception as exc:
        return _refuse(audit, via, calling_ae, host, status.status_for(exc), str(exc), header)
    return Receipt(status.SUCCESS, "logged", header)


def _stored(
    spool: Spool,
    audit: AuditLog,
    calling_ae: str,
    host: str,
    header: InstanceHeader,
    outcome: StoreOutcome,
) -> Receipt:
    """The audit record and receipt of an instance in the spool (both doors), and its note
    in the feedback inbox when it may be a correction."""
    if is_feedback_candidate(header):
        try:
            FeedbackInbox(spool.index.db).note(header, calling_ae=calling_ae, calling_host=host)
        except Exception:  # stored is stored: the note is for later, never a refusal
            log.exception("segmentation %s: not noted as feedback", header.sop_instance_uid)
    audit.record(
        "instance",
        outcome=outcome.value,
        status=status.SUCCESS,
        calling_ae=calling_ae,
        host=host,
        sop_instance_uid=header.sop_instance_uid,
        study_instance_uid=header.study_instance_uid,
        sop_class_uid=header.sop_class_uid,
    )
    return Receipt(status.SUCCESS, outcome.value, header)


def _refuse(
    audit: AuditLog,
    via: str,
    calling_ae: str,
    host: str,
    code: int,
    reason: str,
    header: InstanceHeader | None,
) -> Receipt:
    log.warning("%s refused with 0x%04X: %s", via, code, reason)
    audit.record(
        "instance",
        outcome="refused",
        status=code,
        calling_ae=calling_ae,
        host=host,
        reason=reason[:300],
        **({"sop_instance_uid": header.sop_instance_uid} if header is not None else {}),
    )
    return Receipt(code, "refused", header, reason)
