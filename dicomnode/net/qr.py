"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET in the Patient and Study Root models.

The handlers only translate: the request's identifier becomes a level and a mapping of
keyword -> match value for :class:`dicomnode.spool.query.Catalog`, whose answers become
pending responses (C-FIND) or C-STORE sub-operations (C-MOVE to a configured remote, C-GET
on the same association).  Allowed callers (AE title and host) and TLS are the storage
SCP's: the association is checked when it is accepted and each request again here.  Every
request leaves one ``query`` or ``retrieve`` audit record: caller, model, level, the
keywords that restricted the match (never their values), the number of matches, status.

Statuses (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4):

- 0xFF00 pending (one per match), 0x0000 success, 0xFE00 cancelled;
- 0xA900 identifier does not match SOP class: QueryRetrieveLevel missing, unknown, or
  not in the model (PATIENT in Study Root);
- 0xC000 unable to process: a malformed match value (UID, date, time, integer), a range
  on a key that has none; 0xC001 any other failure (logged);
- 0x0124 refused, not authorised (a caller that is not allowed: defence in depth);
- 0xA801 move destination unknown (not a ``[[remotes]]`` AE title, or it cannot be
  reached).  A C-MOVE that fails before its sub-operations answers pynetdicom's 0xC514
  (unable to process).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_context
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.audit import AuditLog
from dicomnode.config import NodeSettings, Remote
from dicomnode.errors import ConfigError
from dicomnode.net.tls import client_context
from dicomnode.spool.query import (
    Catalog,
    InvalidKeyError,
    QueryError,
    StoredObject,
    UnsupportedLevelError,
)

log = logging.getLogger(__name__)

PENDING = 0xFF00
CANCEL = 0xFE00
SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
UNABLE_TO_PROCESS_UNEXPECTED = 0xC001

#: SOP class UID -> information model (the top level).
MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def status_for(exc: BaseException) -> int:
    """The failure status of a query or retrieve that raised ``exc``."""
    if isinstance(exc, UnsupportedLevelError):
        return IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidKeyError | QueryError):
        return UNABLE_TO_PROCESS
    return UNABLE_TO_PROCESS_UNEXPECTED


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def parse_identifier(identifier: Dataset) -> tuple[str, dict[str, str]]:
    """(QueryRetrieveLevel, keyword -> match value) of a request identifier; sequences
    and private elements are left out (sequence matching is not supported)."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    keys = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_KEYS or element.VR == "SQ":
            continue
        try:
            keys[keyword] = _text(element.value)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidKeyError(f"{keyword}: not a valid {element.VR} value") from exc
    return level, keys


def _response(identifier: Dataset, record: dict[str, str], ae_title: str, level: str) -> Dataset:
    """The identifier of a pending response: every requested key, with the match's value
    (empty when unknown), plus QueryRetrieveLevel and RetrieveAETitle."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    ds.RetrieveAETitle = ae_title
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_KEYS:
            continue
        if element.VR == "SQ":
            ds.add_new(element.tag, "SQ", [])
            continue
        value = record.get(keyword, "")
        try:
            ds.add_new(element.tag, element.VR, value)
        except (ValueError, TypeError, OverflowError):
            ds.add_new(element.tag, element.VR, None)
    return ds


def retrieve_contexts(objects: Sequence[StoredObject]) -> list[PresentationContext]:
    """Contexts to propose for C-STORE sub-operations: each SOP class with the files' own
    transfer syntax, then the uncompressed ones, one context per syntax when they fit."""
    proposed: dict[str, list[str]] = {}
    for obj in objects:
        syntaxes = proposed.setdefault(obj.sop_class_uid, [])
        for ts in (obj.transfer_syntax_uid, *_UNCOMPRESSED):
            if ts and ts not in syntaxes:
                syntaxes.append(ts)
    separate = sum(len(s) for s in proposed.values()) <= 128
    contexts: list[PresentationContext] = []
    for sop_class, syntaxes in proposed.items():
        if separate:
            contexts.extend(build_context(sop_class, ts) for ts in syntaxes)
        else:
            contexts.append(build_context(sop_class, syntaxes))
    return contexts[:128]


class QueryRetrieveSCP:
    """The C-FIND, C-MOVE and C-GET handlers of the node's AE."""

    def __init__(
        self,
        settings: NodeSettings,
        catalog: Catalog,
        remotes: Sequence[Remote],
        audit: AuditLog,
        caller_allowed: Callable[[str, str], bool],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.remotes = tuple(remotes)
        self.audit = audit
        self.caller_allowed = caller_allowed

    @staticmethod
    def sop_classes() -> list[str]:
        return list(MODELS)

    @staticmethod
    def transfer_syntaxes() -> list[str]:
        return list(DEFAULT_TRANSFER_SYNTAXES)

    def _caller(self, event: Event) -> tuple[str, str]:
        requestor = event.assoc.requestor
        return str(requestor.ae_title).strip(), str(requestor.address)

    def _request(self, event: Event) -> tuple[str, Dataset, str, dict[str, str]]:
        """(model, identifier, level, keys); raises QueryError for an unusable one."""
        req: Any = event.request
        model = MODELS.get(str(req.AffectedSOPClassUID), "STUDY")
        try:
            identifier = event.identifier
        except Exception as exc:  # undecodable identifier
            raise QueryError(f"the identifier cannot be decoded: {type(exc).__name__}") from exc
        level, keys = parse_identifier(identifier)
        return model, identifier, level, keys

    def _record(self, event_name: str, operation: str, event: Event, **fields: Any) -> None:
        ae_title, host = self._caller(event)
        self.audit.record(event_name, operation=operation, calling_ae=ae_title, host=host, **fields)

    @staticmethod
    def _restricting(keys: dict[str, str]) -> list[str]:
        return sorted(k for k, v in keys.items() if v.strip("\0 "))

    # --- C-FIND ---------------------------------------------------------------------------

    def handle_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        ae_title, host = self._caller(event)
        if not self.caller_allowed(ae_title, host):
            log.warning("C-FIND refused: %s at %s is not an allowed caller", ae_title, host)
            self._record("query", "C-FIND", event, status=REFUSED_NOT_AUTHORIZED)
            yield REFUSED_NOT_AUTHORIZED, None
            return
        level = model = ""
        keys: dict[str, str] = {}
        try:
            model, identifier, level, keys = self._request(event)
            matches = self.catalog.find(level, keys, model)
        except Exception as exc:
            code = status_for(exc)
            log.warning("C-FIND from %s failed with 0x%04X: %s", ae_title, code, exc)
            self._record(
                "query",
                "C-FIND",
                event,
                model=model,
                level=level[:16],
                keys=self._restricting(keys),
                status=code,
                reason=str(exc)[:200],
            )
            yield code, None
            return
        self._record(
            "query",
            "C-FIND",
            event,
            model=model,
            level=level,
            keys=self._restricting(keys),
            matches=len(matches),
            status=SUCCESS,
        )
        for record in matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, _response(identifier, record, self.settings.ae_title, level)

    # --- C-MOVE and C-GET ---------------------------------------------------------------

    def _locate(self, event: Event) -> tuple[str, str, dict[str, str], list[StoredObject]]:
        model, _, level, keys = self._request(event)
        return model, level, keys, self.catalog.locate(level, keys, model)

    def _datasets(self, event: Event, objects: Sequence[StoredObject]) -> Iterator[tuple[int, Any]]:
        for obj in objects:
            if event.is_cancelled:
                yield CANCEL, None
                return
            try:
                ds = dcmread(obj.path)
            except Exception as exc:  # gone or unreadable: a failed sub-operation
                log.warning("cannot read %s for a retrieve: %s", obj.path.name, exc)
                yield PENDING, obj.sop_instance_uid  # not a dataset: counted as failed
                continue
            yield PENDING, ds

    def handle_move(self, event: Event) -> Iterator[Any]:
        ae_title, host = self._caller(event)
        req: Any = event.request
        destination = str(req.MoveDestination or "").strip()
        if not self.caller_allowed(ae_title, host):
            self._record("retrieve", "C-MOVE", event, status=REFUSED_NOT_AUTHORIZED)
            raise PermissionError(f"{ae_title} at {host} is not an allowed caller")
        try:
            model, level, keys, objects = self._locate(event)
        except Exception as exc:
            code = status_for(exc)
            log.warning("C-MOVE from %s failed: %s", ae_title, exc)
            self._record(
                "retrieve",
                "C-MOVE",
                event,
                destination=destination,
                status=code,
                reason=str(exc)[:200],
            )
            raise
        remote = next((r for r in self.remotes if r.ae_title == destination), None)
        fields = {"model": model, "level": level, "keys": self._restricting(keys)}
        if remote is None:
            log.warning("C-MOVE from %s: unknown destination %r", ae_title, destination[:16])
            self._record(
                "retrieve",
                "C-MOVE",
                event,
                destination=destination[:16],
                status=MOVE_DESTINATION_UNKNOWN,
                **fields,
            )
            yield None, None
            return
        options: dict[str, Any] = {"contexts": retrieve_contexts(objects)}
        if remote.tls:
            try:
                options["tls_args"] = (client_context(self.settings.tls), remote.host)
            except ConfigError as exc:
                log.error("C-MOVE to %s: %s", destination, exc)
                yield None, None
                return
        self._record(
            "retrieve",
            "C-MOVE",
            event,
            destination=destination,
            instances=len(objects),
            outcome="started",
            **fields,
        )
        yield remote.host, remote.port, options
        yield len(objects)
        yield from self._datasets(event, objects)

    def handle_get(self, event: Event) -> Iterator[Any]:
        ae_title, host = self._caller(event)
        if not self.caller_allowed(ae_title, host):
            self._record("retrieve", "C-GET", event, status=REFUSED_NOT_AUTHORIZED)
            yield 1
            yield REFUSED_NOT_AUTHORIZED, None
            return
        try:
            model, level, keys, objects = self._locate(event)
        except Exception as exc:
            code = status_for(exc)
            log.warning("C-GET from %s failed with 0x%04X: %s", ae_title, code, exc)
            self._record("retrieve", "C-GET", event, status=code, reason=str(exc)[:200])
            yield 1
            yield code, None
            return
        self._record(
            "retrieve",
            "C-GET",
            event,
            model=model,
            level=level,
            keys=self._restricting(keys),
            instances=len(objects),
            outcome="started",
        )
        yield len(objects)
        yield from self._datasets(event, objects)
