"""C-STORE / C-ECHO / C-FIND SCU: sends files to a remote AE on one association per batch,
and asks a remote how many instances a study holds (:func:`count_study_instances`).

A warning status (PS3.7 Annex C: 0x0001, 0x0107, 0x0116, 0xBxxx) means the peer stored the
file: its :class:`SendResult` is ok, and one warning line names the status and its meaning.

A failed association request raises :class:`DeliveryError` saying why; pynetdicom's own
ERROR lines for it ("Association request failed", "TCP Initialisation Error") are left out
of the log (:class:`RequestorErrorFilter`), so a retried delivery logs one line per attempt
(the deliverer's, with the attempt number and the next try).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from dicomnode.errors import DeliveryError
from dicomnode.net import patches, status

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class RequestorErrorFilter(logging.Filter):
    """Drops pynetdicom's ERROR lines about an association request that failed: the
    :class:`DeliveryError` raised for it carries the reason, and its caller logs it."""

    PREFIXES = (
        "Association request failed",
        "TCP Initialisation Error",
        "Association Rejected",
        "Association Aborted",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def _quiet_requestor_errors() -> None:
    """Install :class:`RequestorErrorFilter` on pynetdicom's loggers (once)."""
    for name in ("pynetdicom.transport", "pynetdicom.acse"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RequestorErrorFilter) for f in logger.filters):
            logger.addFilter(RequestorErrorFilter())


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
        """The peer stored the file (Success or Warning)."""
        return self.status is not None and status.is_success(self.status)

    @property
    def warning(self) -> bool:
        """The peer stored the file with a warning."""
        return self.status is not None and status.is_warning(self.status)


def _contexts(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes to propose (the file's own first, then uncompressed)."""
    proposed: dict[str, list[str]] = {}
    for sop_class, ts in headers:
        lst = proposed.setdefault(sop_class, [])
        for t in (ts, *UNCOMPRESSED):
            if t and t not in lst:
                lst.append(t)
    return proposed


def _associate(peer: Peer, calling_ae: str, contexts: dict[str, list[str]]) -> Association:
    _quiet_requestor_errors()
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
        patches.prepare_requestor(assoc)
        return assoc
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = primitive.result if primitive else None
        permanent = result == 0x01
        why = primitive.reason_str if primitive and primitive.diagnostic else ""
        raise DeliveryError(
            f"association rejected by {where} ({'permanent' if permanent else 'transient'}"
            + (f": {why}" if why else "")
            + ")",
            transient=not permanent,
        )
    raise DeliveryError(
        f"cannot associate with {where} (connection refused or timed out, or aborted)",
        transient=True,
    )


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
            result = SendResult(path, code, "" if code is not None else "no response")
            if code is not None and status.is_warning(code):
                log.warning(
                    "%s stored %s with a warning: %s",
                    peer.ae_title,
                    path.name,
                    status.describe(code),
                )
            _report(results, on_result, result)
    finally:
        if assoc.is_established:
            assoc.release()
    return results


@dataclass(frozen=True)
class StudyCount:
    """A peer's answer to "how many instances does this study hold?".

    ``instances`` is its NumberOfStudyRelatedInstances, or None with ``problem`` saying
    why not; ``refused`` is True when the peer did not take the question (no association,
    C-FIND not accepted, a failure status, no answer in time): ask it again only later."""

    instances: int | None
    problem: str = ""
    refused: bool = False


def _study_count(identifier: Dataset | None) -> int | None:
    """NumberOfStudyRelatedInstances of a pending C-FIND answer (None: not given)."""
    value = None if identifier is None else identifier.get("NumberOfStudyRelatedInstances")
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def count_study_instances(peer: Peer, calling_ae: str, study_uid: str) -> StudyCount:
    """Ask ``peer`` how many instances the study holds: a Study Root C-FIND at STUDY level
    for ``study_uid`` returning NumberOfStudyRelatedInstances (PS3.4 C.6.2.1.2, C.3.4).

    Never raises for the peer's or the network's sake: every way the question can go
    unanswered comes back as a :class:`StudyCount` without ``instances``."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = None
    model = StudyRootQueryRetrieveInformationModelFind
    # Verification too: a storage-only peer then accepts the association and the answer
    # says that C-FIND was not accepted (with no context accepted pynetdicom aborts).
    syntaxes = [str(ts) for ts in UNCOMPRESSED]
    contexts = {str(model): syntaxes, str(Verification): syntaxes}
    try:
        assoc = _associate(peer, calling_ae, contexts)
    except DeliveryError as exc:
        return StudyCount(None, str(exc), refused=True)
    except OSError as exc:  # a TLS handshake or socket error before the association
        return StudyCount(None, f"cannot associate with {peer.ae_title}: {exc}", refused=True)
    counts: list[int | None] = []
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            return StudyCount(None, "Study Root C-FIND not accepted", refused=True)
        for answer, identifier in assoc.send_c_find(query, model):
            code = int(answer.Status) if "Status" in answer else None
            if code is None:
                return StudyCount(None, "no C-FIND response in time", refused=True)
            if status.category(code) == "Pending":
                counts.append(_study_count(identifier))
            elif code != status.SUCCESS:
                return StudyCount(None, f"C-FIND failed: {status.describe(code)}", refused=True)
    finally:
        if assoc.is_established:
            assoc.release()
    given = [c for c in counts if c]
    if given:
        return StudyCount(max(given))
    if 0 in counts:  # nothing of it stored there (yet)
        return StudyCount(None, "it counts 0 instances of the study")
    if counts:  # it knows the study but does not count: asking again will not help
        return StudyCount(None, "no NumberOfStudyRelatedInstances in the answer", refused=True)
    return StudyCount(None, "the study is not known there (no match)")
