"""DICOMweb on the node's HTTP port, under ``/dicomweb`` (PS3.18): QIDO-RS, WADO-RS, STOW-RS.

- QIDO-RS searches the :class:`~dicomnode.spool.query.Catalog` that answers C-FIND, with the
  same matching rules; answers are DICOM JSON (PS3.18 F.2).
- WADO-RS returns stored files as they are (``multipart/related; type="application/dicom"``),
  their metadata as DICOM JSON and frames rendered as PNG or JPEG.
- STOW-RS is a second way in that follows the receive rules exactly: every part goes
  through :meth:`dicomnode.spool.store.Spool.store` (acknowledged only after fsync and
  index, duplicates accepted), and its failure reason is the C-STORE status
  :func:`dicomnode.net.status.status_for` gives.

What is supported is listed in docs/conformance.md ("DICOMweb").
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator, Mapping
from email.message import Message
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from dicomnode.net import status
from dicomnode.net.receive import receive_instance
from dicomnode.spool.index import InstanceHeader
from dicomnode.spool.query import Catalog, QueryError, StoredObject
from dicomnode.spool.store import Spool
from dicomnode.web.app import WebContext
from dicomnode.web.render import RENDERED_FORMATS, render_frame

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
DICOM_JSON = "application/dicom+json"
#: The calling "AE" STOW-RS stores under (the client's host is recorded beside it).
STOW_CALLING_AE = "DICOMWEB"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})
#: Attributes each QIDO-RS level returns without ``includefield`` (PS3.18 Table 10.6.3-3 ff.,
#: as far as the catalog holds them).
DEFAULT_FIELDS = {
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "StudyInstanceUID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStatus",
    ),
    "IMAGE": (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "NumberOfFrames",
    ),
}


class RequestError(Exception):
    """A request the service refuses: HTTP ``code`` and a message that names the fault."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _check_uid(name: str, value: str) -> str:
    if len(value) > 64 or not _UID.match(value):
        raise RequestError(400, f"{name} is not a valid UID")
    return value


def _path_keys(request: Request) -> dict[str, str]:
    names = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "sop": "SOPInstanceUID"}
    return {
        names[k]: _check_uid(names[k], str(v)) for k, v in request.path_params.items() if k in names
    }


def _keyword(name: str) -> str:
    """A query parameter's attribute: a keyword or a tag (``0020000D``)."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(name) is not None:
        return name
    raise RequestError(400, f"unknown attribute {name[:40]!r} in the query")


def _int_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None:
        return None
    if not raw.isdigit():
        raise RequestError(400, f"{name} must be a non-negative integer")
    return int(raw)


# --- QIDO-RS ------------------------------------------------------------------------------


def search(catalog: Catalog, level: str, path_keys: dict[str, str], request: Request) -> list[Any]:
    """The DICOM JSON answers of a QIDO-RS search at ``level``."""
    keys = dict(path_keys)
    includes: set[str] = set()
    every = False
    for name, value in request.query_params.multi_items():
        if name in _CONTROL:
            if name == "includefield":
                for field in value.split(","):
                    if field.strip() == "all":
                        every = True
                    elif field.strip():
                        includes.add(_keyword(field.strip()))
            continue
        keyword = _keyword(name)
        if str(dictionary_VR(keyword)) == "UI":
            value = value.replace(",", "\\")
        keys[keyword] = value
    limit = _int_param(request.query_params, "limit")
    offset = _int_param(request.query_params, "offset") or 0
    try:
        records = catalog.find(level, keys)
    except QueryError as exc:
        raise RequestError(400, str(exc)) from exc
    unique = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID"}.get(
        level, "SOPInstanceUID"
    )
    records.sort(key=lambda r: r.get(unique, ""))
    window = records[offset : None if limit is None else offset + limit]
    wanted = set(DEFAULT_FIELDS[level]) | includes | set(keys)
    return [_json_of(r, None if every else wanted) for r in window]


def _json_of(record: Mapping[str, str], wanted: set[str] | None) -> dict[str, Any]:
    ds = Dataset()
    for keyword, value in record.items():
        if keyword == "QueryRetrieveLevel" or (wanted is not None and keyword not in wanted):
            continue
        try:
            vr = str(dictionary_VR(keyword))
        except KeyError:
            continue
        values: Any = value.split("\\") if "\\" in value else value
        ds.add_new(keyword, vr, values if value else None)
    return ds.to_json_dict()


# --- WADO-RS ------------------------------------------------------------------------------


def _level_of(keys: Mapping[str, str]) -> str:
    if "SOPInstanceUID" in keys:
        return "IMAGE"
    return "SERIES" if "SeriesInstanceUID" in keys else "STUDY"


def _locate(ctx: WebContext, keys: Mapping[str, str]) -> list[StoredObject]:
    catalog = _catalog(ctx)
    try:
        found = catalog.locate(_level_of(keys), keys)
    except QueryError as exc:
        raise RequestError(400, str(exc)) from exc
    if not found:
        raise RequestError(404, f"no {_level_of(keys).lower()} with these UIDs is stored here")
    return found


def _catalog(ctx: WebContext) -> Catalog:
    if ctx.catalog is None:
        raise RequestError(503, "the node has no catalog to search")
    return ctx.catalog


def _check_accept(request: Request, objects: list[StoredObject]) -> None:
    """Refuse (406) an ``Accept`` the stored files cannot satisfy: no transcoding."""
    accept = request.headers.get("accept", "*/*")
    if not any(
        kind in accept for kind in ("*/*", "multipart/related", "application/dicom", "multipart/*")
    ):
        raise RequestError(406, 'only multipart/related; type="application/dicom" is served')
    match = re.search(r"transfer-syntax\s*=\s*\"?([0-9.*]+)", accept)
    wanted = match.group(1) if match else "*"
    if wanted != "*" and any(o.transfer_syntax_uid != wanted for o in objects):
        raise RequestError(406, "stored objects are served in their stored transfer syntax only")


def _multipart(objects: list[StoredObject], boundary: str) -> Iterator[bytes]:
    for obj in objects:
        head = (
            f"--{boundary}\r\nContent-Type: application/dicom; "
            f"transfer-syntax={obj.transfer_syntax_uid}\r\n\r\n"
        )
        yield head.encode() + Path(obj.path).read_bytes() + b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _metadata(obj: StoredObject, base: str) -> dict[str, Any]:
    """An instance's DICOM JSON; large binary values point to the instance's URL."""
    ds = dcmread(obj.path, stop_before_pixels=True)
    url = _instance_url(
        base, str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
        obj.sop_instance_uid,
    )  # fmt: skip
    return ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _e: url)


# --- STOW-RS ------------------------------------------------------------------------------


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/related`` body: (content type, bytes) each (RFC 2046)."""
    header = Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/related":
        raise RequestError(415, 'the request must be multipart/related; type="application/dicom"')
    kind = str(header.get_param("type") or "application/dicom")
    if kind.lower() != "application/dicom":
        raise RequestError(415, f"part type {kind[:40]!r} is not supported (application/dicom)")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise RequestError(400, "the multipart content type names no boundary")
    delimiter = b"--" + boundary.encode()
    segments = body.split(delimiter)
    if len(segments) < 3:
        raise RequestError(400, "the multipart body has no parts")
    parts = []
    for segment in segments[1:-1]:
        segment = segment.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, sep, content = segment.partition(b"\r\n\r\n")
        if not sep:
            head, content = b"", segment.removeprefix(b"\r\n")
        part_type = "application/dicom"
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                part_type = value.split(";")[0].strip().lower()
        parts.append((part_type, content))
    return parts


def store_part(
    spool: Spool, ctx: WebContext, part_type: str, encoded: bytes, host: str, study: str | None
) -> tuple[Dataset, str | None]:
    """Store one part exactly as C-STORE does (:func:`dicomnode.net.receive.receive_instance`):
    (sequence item, the instance's WADO-RS path below the prefix when stored, else None)."""
    item = Dataset()

    def in_this_study(header: InstanceHeader) -> tuple[int, str] | None:
        if study is not None and header.study_instance_uid != study:
            return status.ERROR_CANNOT_UNDERSTAND, "the instance belongs to another study"
        return None

    if part_type != "application/dicom":
        item.FailureReason = status.ERROR_CANNOT_UNDERSTAND
        log.warning("STOW-RS from %s: a part of type %r refused", host, part_type[:40])
        return item, None
    receipt = receive_instance(
        spool,
        ctx.audit,
        encoded,
        calling_ae=STOW_CALLING_AE,
        host=host,
        via=f"STOW-RS from {host}",
        check=in_this_study,
    )
    if receipt.header is not None:
        item.ReferencedSOPClassUID = receipt.header.sop_class_uid
        item.ReferencedSOPInstanceUID = receipt.header.sop_instance_uid
    if not receipt.ok or receipt.header is None:
        item.FailureReason = receipt.status
        return item, None
    header = receipt.header
    path = _instance_url(
        "", header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
    )
    return item, path


# --- the routes ---------------------------------------------------------------------------


def _error(exc: RequestError) -> Response:
    return PlainTextResponse(str(exc), exc.code)


class DicomWeb:
    """The endpoints, bound to the node's context."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def _host(self, request: Request) -> str:
        return request.client.host if request.client else ""

    def _base(self, request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX

    async def qido(self, request: Request) -> Response:
        path = request.url.path.removesuffix("/")
        level = {"studies": "STUDY", "series": "SERIES"}.get(path.rsplit("/", 1)[-1], "IMAGE")
        try:
            keys = _path_keys(request)
            catalog = _catalog(self.ctx)
            answers = await run_in_threadpool(search, catalog, level, keys, request)
            restricting = sorted(
                {*keys, *(_keyword(n) for n in request.query_params if n not in _CONTROL)}
            )
        except RequestError as exc:
            return _error(exc)
        self.ctx.audit.record(
            "dicomweb", service="QIDO-RS", level=level, keys=restricting, matches=len(answers),
            host=self._host(request),
        )  # fmt: skip
        return _json_response(answers)

    async def retrieve(self, request: Request) -> Response:
        try:
            keys = _path_keys(request)
            objects = await run_in_threadpool(_locate, self.ctx, keys)
            _check_accept(request, objects)
        except RequestError as exc:
            return _error(exc)
        self._audit_wado(request, keys, "instances", len(objects))
        boundary = uuid.uuid4().hex
        media = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(_multipart(objects, boundary), media_type=media)

    async def metadata(self, request: Request) -> Response:
        try:
            keys = _path_keys(request)
            objects = await run_in_threadpool(_locate, self.ctx, keys)
        except RequestError as exc:
            return _error(exc)
        base = self._base(request)

        def read_all() -> list[dict[str, Any]]:
            return [_metadata(o, base) for o in objects]

        answers = await run_in_threadpool(read_all)
        self._audit_wado(request, keys, "metadata", len(answers))
        return _json_response(answers)

    async def rendered(self, request: Request) -> Response:
        accept = request.headers.get("accept", "image/png")
        media = (
            "image/jpeg" if "image/jpeg" in accept and "image/png" not in accept else "image/png"
        )
        frames = str(request.path_params.get("frames", "1"))
        try:
            keys = _path_keys(request)
            if not frames.isdigit() or int(frames) < 1:
                raise RequestError(400, "one frame number (1, 2, ...) can be rendered at a time")
            if not any(m in accept for m in (*RENDERED_FORMATS, "image/*", "*/*")):
                raise RequestError(406, "rendered frames are served as image/png or image/jpeg")
            (obj,) = (await run_in_threadpool(_locate, self.ctx, keys))[:1]
            picture = await run_in_threadpool(render_frame, obj.path, int(frames), media)
        except RequestError as exc:
            return _error(exc)
        except IndexError as exc:
            return PlainTextResponse(str(exc), 404)
        except ValueError as exc:
            return PlainTextResponse(f"cannot render this instance: {exc}", 400)
        self._audit_wado(request, keys, "rendered", 1)
        return Response(picture, media_type=media)

    async def stow(self, request: Request) -> Response:
        host = self._host(request)
        try:
            study = _path_keys(request).get("StudyInstanceUID")
            parts = split_multipart(request.headers.get("content-type", ""), await request.body())
            if self.ctx.spool is None:
                raise RequestError(503, "the node has no spool to store into")
        except RequestError as exc:
            return _error(exc)
        spool = self.ctx.spool
        result = Dataset()
        if study:
            result.RetrieveURL = f"{self._base(request)}/studies/{study}"
        stored, failed = [], []
        for part_type, content in parts:
            item, path = await run_in_threadpool(
                store_part, spool, self.ctx, part_type, content, host, study
            )
            if path is not None:
                item.RetrieveURL = self._base(request) + path
                stored.append(item)
            else:
                failed.append(item)
        if stored:
            result.ReferencedSOPSequence = stored
        if failed:
            result.FailedSOPSequence = failed
        code = 200 if not failed else (202 if stored else 409)
        return Response(_dumps(result.to_json_dict()), code, media_type=DICOM_JSON)

    def _audit_wado(self, request: Request, keys: Mapping[str, str], kind: str, n: int) -> None:
        self.ctx.audit.record(
            "dicomweb",
            service="WADO-RS",
            resource=kind,
            level=_level_of(keys),
            study_instance_uid=keys.get("StudyInstanceUID", ""),
            objects=n,
            host=self._host(request),
        )


def _instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_response(value: Any) -> Response:
    return Response(_dumps(value), 200, media_type=DICOM_JSON)


def dicomweb_routes(ctx: WebContext) -> list[BaseRoute]:
    """The DICOMweb routes under :data:`PREFIX`."""
    web = DicomWeb(ctx)
    study = PREFIX + "/studies/{study}"
    series = study + "/series/{series}"
    instance = series + "/instances/{sop}"
    searches = (
        PREFIX + "/studies",
        PREFIX + "/series",
        PREFIX + "/instances",
        study + "/series",
        study + "/instances",
        series + "/instances",
    )
    return [
        Route(PREFIX + "/studies", web.stow, methods=["POST"]),
        Route(study, web.stow, methods=["POST"]),
        *(Route(path, web.qido, methods=["GET"]) for path in searches),
        *(Route(path, web.retrieve, methods=["GET"]) for path in (study, series, instance)),
        *(
            Route(path + "/metadata", web.metadata, methods=["GET"])
            for path in (study, series, instance)
        ),
        Route(instance + "/rendered", web.rendered, methods=["GET"]),
        Route(instance + "/frames/{frames}/rendered", web.rendered, methods=["GET"]),
    ]
