"""Query and retrieve over everything the node holds (PS3.4 C.2.2.2, C.6.1, C.6.2).

:class:`Catalog` answers C-FIND (and, later, QIDO-RS) without pynetdicom: a query is a
level (``PATIENT``, ``STUDY``, ``SERIES``, ``IMAGE``) and a mapping of DICOM keyword to
match value in the standard's syntax; the answer is one mapping of keyword to value per
match.  Matching, per key (PS3.4 C.2.2.2):

- empty value: universal matching (the key is only returned);
- UI: single value or a list of UIDs separated by ``\\`` (each must be a valid UID);
- DA, TM, DT: single value or a range (``A-B``, ``A-``, ``-B``); values must be well
  formed;
- IS: a single integer (a range is refused);
- other string VRs: ``*`` and ``?`` wildcards, single value, or a list of values
  separated by ``\\`` (any may match); PN matching ignores case; a multi-valued attribute
  (ModalitiesInStudy) matches when any of its values matches.

Keys the catalog does not know are returned empty and do not restrict the match; keys of
a level below the one asked are ignored.  Unique keys of the levels above may be given
(the hierarchical model's) but are not required.

The attribute values come from the ``query_instances`` table (owned by
:class:`dicomnode.spool.index.Index`).  It is filled lazily by :meth:`Catalog.refresh`, which
each query runs first: received instances indexed since the last pass (the newest version of
each) and result files written under ``results/job-<id>/`` since then are read, headers
only, so the C-STORE handler never decodes anything.  The node's own results carry the
state of the job that made them in PerformedProcedureStepStatus (IN PROGRESS, COMPLETED,
DISCONTINUED) and PerformedProcedureStepDescription (``dicomnode job 7: sending``).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue

from dicomnode.errors import DicomNodeError
from dicomnode.spool.index import Index, QueryRow

log = logging.getLogger(__name__)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: The unique key of each level (PS3.4 C.6.1.1, C.6.2.1).
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
#: Keys read from each stored object, by level.
STORED_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex"),
    "STUDY": (
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
    ),
    "SERIES": (
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
    ),
    "IMAGE": (
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
        "NumberOfFrames",
    ),
}
#: Keys the catalog computes, by level.
COMPUTED_KEYS: dict[str, tuple[str, ...]] = {
    "PATIENT": (
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ),
    "STUDY": (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": (
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStatus",
        "PerformedProcedureStepDescription",
    ),
    "IMAGE": ("PerformedProcedureStepStatus", "PerformedProcedureStepDescription"),
}
#: Return keys only: a value given for them does not restrict the match.
_RETURN_ONLY = frozenset(k for k in sum(COMPUTED_KEYS.values(), ()) if k.startswith("NumberOf"))
_READ_TAGS = ["SpecificCharacterSet", *sum(STORED_KEYS.values(), ())]
#: Job state -> PerformedProcedureStepStatus (PS3.3 C.4.14: enumerated values).
STEP_STATUS = {
    "queued": "IN PROGRESS",
    "running": "IN PROGRESS",
    "sending": "IN PROGRESS",
    "done": "COMPLETED",
    "failed": "DISCONTINUED",
}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_DT = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_IS = re.compile(r"^\s*[+-]?\d{1,12}\s*$")


class QueryError(DicomNodeError):
    """A query the catalog cannot run; the message says why (no value of the query)."""


class UnsupportedLevelError(QueryError):
    """The Query/Retrieve Level is missing, unknown or not in the information model."""


class InvalidKeyError(QueryError):
    """A match value breaks its key's rules: a malformed UID, date or time, a range on a
    key that has none, a wildcard in a UID."""


@dataclass(frozen=True)
class StoredObject:
    """One object to retrieve: its file and what a C-STORE of it needs."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def key_vr(keyword: str) -> str:
    """The VR of a keyword by pydicom's dictionary ("" when unknown)."""
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return ""


def levels_of(level: str, model: str = "STUDY") -> tuple[str, ...]:
    """The levels from the top of ``model`` (PATIENT or STUDY root) down to ``level``."""
    if level not in LEVELS:
        raise UnsupportedLevelError(f"unknown QueryRetrieveLevel {level[:16]!r}")
    top = LEVELS.index("PATIENT" if model == "PATIENT" else "STUDY")
    if LEVELS.index(level) < top:
        raise UnsupportedLevelError(f"level {level} is not in the {model.lower()} root model")
    return LEVELS[: LEVELS.index(level) + 1]


# --- matching of one key ------------------------------------------------------------------


def _check_value(keyword: str, vr: str, value: str) -> None:
    if vr == "UI":
        if value == "*":
            return
        for uid in value.split("\\"):
            if len(uid) > 64 or not _UID.match(uid):
                raise InvalidKeyError(f"{keyword}: not a valid UID (or list of UIDs)")
    elif vr in ("DA", "TM", "DT"):
        pattern = {"DA": _DA, "TM": _TM, "DT": _DT}[vr]
        parts = value.split("-", 1) if vr != "DT" else _split_dt_range(value)
        if len(parts) == 2 and not any(parts):
            raise InvalidKeyError(f"{keyword}: a range needs at least one end")
        for part in parts:
            if part and not pattern.match(part.strip()):
                raise InvalidKeyError(f"{keyword}: not a valid {vr} value or range")
    elif vr == "IS":
        if not _IS.match(value):
            raise InvalidKeyError(f"{keyword}: an integer is needed (no ranges on IS keys)")
    elif vr in ("US", "UL", "SS", "SL", "FL", "FD", "DS", "SQ") and value:
        raise InvalidKeyError(f"{keyword}: matching on {vr} keys is not supported")


def _split_dt_range(value: str) -> list[str]:
    """A DT range splits at the hyphen whose both sides are DT values (or empty): a
    hyphen inside a value is a UTC offset."""
    for i, ch in enumerate(value):
        left, right = value[:i], value[i + 1 :]
        if ch == "-" and (not left or _DT.match(left)) and (not right or _DT.match(right)):
            return [left, right]
    return [value]


def _pad(vr: str, value: str, high: bool) -> str:
    """A DA/TM/DT value padded to full precision for comparison (upper bounds with 9s)."""
    value = value.strip()
    if vr == "DA":
        return value
    full = "000000.000000" if vr == "TM" else "00000000000000.000000"
    if high:
        full = "235959.999999" if vr == "TM" else "99991231235959.999999"
    value = value[:21] if vr == "DT" else value
    digits = value.split(".")[0]
    fraction = value.split(".")[1] if "." in value else ""
    whole = digits + full[len(digits) : full.index(".")]
    frac = fraction + full[full.index(".") + 1 + len(fraction) :]
    return f"{whole}.{frac}"


def _matches_one(keyword: str, vr: str, query: str, actual: str) -> bool:
    if vr == "UI":
        return query == "*" or actual in query.split("\\")
    if vr in ("DA", "TM", "DT"):
        value = actual.strip()
        if not value:
            return False
        parts = query.split("-", 1) if vr != "DT" else _split_dt_range(query)
        if len(parts) == 1:
            return _pad(vr, value, False) == _pad(vr, parts[0], False)
        low, high = parts
        padded = _pad(vr, value, False)
        return (not low or padded >= _pad(vr, low, False)) and (
            not high or padded <= _pad(vr, high, True)
        )
    if vr == "IS":
        try:
            return int(actual) == int(query)
        except ValueError:
            return False
    values = actual.split("\\") if actual else [""]
    for alternative in query.split("\\"):
        for value in values:
            if _text_matches(vr, alternative, value):
                return True
    return False


def _text_matches(vr: str, query: str, value: str) -> bool:
    if vr == "PN":
        query, value = query.strip().rstrip("^").upper(), value.strip().rstrip("^").upper()
    else:
        value = value.strip()
        query = query.strip()
    if query == "*":
        return True
    if "*" in query or "?" in query:
        pattern = fnmatch.translate(query.replace("[", "[[]"))
        return re.match(pattern, value, re.DOTALL) is not None
    return query == value


# --- the catalog --------------------------------------------------------------------------


class Catalog:
    """C-FIND matching and C-MOVE/C-GET lookup over received instances and own results.

    ``results_root`` is the folder of the node's result files (``results/``); ``job_state``
    gives the state of a job by id (None when unknown), shown as the results' processing
    state.
    """

    def __init__(
        self,
        index: Index,
        results_root: Path | None = None,
        job_state: Callable[[int], str | None] | None = None,
    ) -> None:
        self.index = index
        self.results_root = results_root
        self.job_state = job_state

    # --- filling the query table ----------------------------------------------------------

    def refresh(self) -> int:
        """Record the attributes of objects stored since the last pass; returns how many.

        Received instances (newest version of each) and result files whose modification
        time changed are read, headers only; rows of result files that are gone are
        removed."""
        count = 0
        for source_id, record in self.index.instances_without_query_row():
            # unreadable: findable by its UIDs only (the job reports why)
            attributes = _read_attributes(record.path) or {}
            self.index.put_query_row(
                QueryRow(
                    sop_instance_uid=record.sop_instance_uid,
                    study_instance_uid=record.study_instance_uid,
                    series_instance_uid=record.series_instance_uid,
                    sop_class_uid=record.sop_class_uid,
                    transfer_syntax_uid=record.transfer_syntax_uid,
                    path=self.index.db.relative(record.path),
                    job_id=None,
                    source_id=source_id,
                    attributes=attributes,
                )
            )
            count += 1
        return count + self._refresh_results()

    def _refresh_results(self) -> int:
        if self.results_root is None or not self.results_root.is_dir():
            known: dict[str, int] = self.index.result_query_files()
            if known:
                self.index.remove_query_rows_of_files(list(known))
            return 0
        known = self.index.result_query_files()
        seen: set[str] = set()
        count = 0
        for folder in sorted(self.results_root.glob("job-*")):
            try:
                job_id = int(folder.name.removeprefix("job-"))
            except ValueError:
                continue
            for path in sorted(folder.glob("*.dcm")):
                relative = self.index.db.relative(path)
                seen.add(relative)
                try:
                    mtime = path.stat().st_mtime_ns
                except OSError:
                    continue
                if known.get(relative) == mtime:
                    continue
                if self._index_result(path, relative, job_id, mtime):
                    count += 1
        gone = [p for p in known if p not in seen]
        if gone:
            self.index.remove_query_rows_of_files(gone)
        return count

    def _index_result(self, path: Path, relative: str, job_id: int, mtime: int) -> bool:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta_ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception as exc:  # a file being replaced, or not DICOM
            log.warning("result file %s not indexed for queries: %s", path.name, exc)
            return False
        attributes = _attributes_of(ds)
        self.index.put_query_row(
            QueryRow(
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                sop_class_uid=str(ds.get("SOPClassUID", "")),
                transfer_syntax_uid=meta_ts,
                path=relative,
                job_id=job_id,
                source_id=mtime,
                attributes=attributes,
            )
        )
        return True

    # --- queries ------------------------------------------------------------------------

    def find(
        self, level: str, keys: Mapping[str, str], model: str = "STUDY"
    ) -> list[dict[str, str]]:
        """The matches of a query at ``level``: one mapping keyword -> value each, holding
        every key the catalog knows at that level and the levels above it.

        Objects stored since the last query are indexed first (:meth:`refresh`).
        Raises :class:`UnsupportedLevelError` or :class:`InvalidKeyError`."""
        levels = levels_of(level, model)
        self.refresh()
        known = {k for lv in levels for k in (*STORED_KEYS[lv], *COMPUTED_KEYS[lv])}
        matching = self._matching_keys(keys, known)
        rows = self._rows(matching)
        groups: dict[str, list[QueryRow]] = {}
        for row in rows:
            groups.setdefault(_level_value(row, level), []).append(row)
        answers = []
        for members in groups.values():
            record = self._record(level, levels, members)
            if all(_matches_one(k, vr, v, record.get(k, "")) for k, (vr, v) in matching.items()):
                answers.append(record)
        return answers

    def locate(
        self, level: str, keys: Mapping[str, str], model: str = "STUDY"
    ) -> list[StoredObject]:
        """The stored objects a C-MOVE or C-GET at ``level`` asks for (by the unique keys of
        that level and those above; the level's own unique key is required)."""
        levels = levels_of(level, model)
        unique = UNIQUE_KEYS[level]
        if not str(keys.get(unique, "")).strip():
            raise InvalidKeyError(f"a retrieve at level {level} needs {unique}")
        self.refresh()
        wanted = {
            UNIQUE_KEYS[lv]: keys[UNIQUE_KEYS[lv]] for lv in levels if UNIQUE_KEYS[lv] in keys
        }
        matching = self._matching_keys(wanted, set(wanted))
        found = []
        for row in self._rows(matching):
            record = {**row.attributes, **_uids(row)}
            if all(_matches_one(k, vr, v, record.get(k, "")) for k, (vr, v) in matching.items()):
                found.append(
                    StoredObject(
                        self.index.db.resolve(row.path),
                        row.sop_class_uid,
                        row.sop_instance_uid,
                        row.transfer_syntax_uid,
                    )
                )
        return found

    @staticmethod
    def _matching_keys(keys: Mapping[str, str], known: set[str]) -> dict[str, tuple[str, str]]:
        """Keyword -> (VR, value) of the keys that restrict the match (values checked)."""
        matching = {}
        for keyword, raw in keys.items():
            value = "" if raw is None else str(raw)
            if keyword not in known or keyword in _RETURN_ONLY or not value.strip("\0 "):
                continue
            vr = key_vr(keyword)
            value = value.strip("\0") if vr in ("UI",) else value
            _check_value(keyword, vr, value.strip() if vr != "PN" else value)
            matching[keyword] = (vr, value.strip() if vr != "PN" else value)
        return matching

    def _rows(self, matching: Mapping[str, tuple[str, str]]) -> list[QueryRow]:
        """Candidate rows: narrowed in SQL by UID lists, newest first; a result of the node
        also received back is kept once (as the result)."""
        uids = {
            k: v.split("\\")
            for k, (vr, v) in matching.items()
            if vr == "UI"
            and v != "*"
            and k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        }
        rows = self.index.query_rows(uids)
        results = {r.sop_instance_uid for r in rows if r.job_id is not None}
        return [r for r in rows if r.job_id is not None or r.sop_instance_uid not in results]

    def _record(self, level: str, levels: Iterable[str], members: list[QueryRow]) -> dict[str, str]:
        first = members[0]
        record: dict[str, str] = {}
        for lv in levels:
            for keyword in STORED_KEYS[lv]:
                record[keyword] = first.attributes.get(keyword, "")
        record.update({k: v for k, v in _uids(first).items() if k in record})
        series = {m.series_instance_uid for m in members}
        if level == "PATIENT":
            record["NumberOfPatientRelatedStudies"] = str(
                len({m.study_instance_uid for m in members})
            )
            record["NumberOfPatientRelatedSeries"] = str(len(series))
            record["NumberOfPatientRelatedInstances"] = str(len(members))
        if level == "STUDY":
            modalities = sorted({m.attributes.get("Modality", "") for m in members} - {""})
            record["ModalitiesInStudy"] = "\\".join(modalities)
            record["SOPClassesInStudy"] = "\\".join(sorted({m.sop_class_uid for m in members}))
            record["NumberOfStudyRelatedSeries"] = str(len(series))
            record["NumberOfStudyRelatedInstances"] = str(len(members))
        if level == "SERIES":
            record["NumberOfSeriesRelatedInstances"] = str(len(members))
        if level in ("SERIES", "IMAGE"):
            record.update(self._processing_state(first.job_id))
        record["QueryRetrieveLevel"] = level
        record["InstanceAvailability"] = "ONLINE"
        return record

    def _processing_state(self, job_id: int | None) -> dict[str, str]:
        """PerformedProcedureStepStatus and -Description of the node's own results."""
        if job_id is None:
            return {"PerformedProcedureStepStatus": "", "PerformedProcedureStepDescription": ""}
        state = self.job_state(job_id) if self.job_state is not None else None
        return {
            "PerformedProcedureStepStatus": STEP_STATUS.get(state or "", ""),
            "PerformedProcedureStepDescription": f"dicomnode job {job_id}: {state or 'unknown'}",
        }


def _uids(row: QueryRow) -> dict[str, str]:
    return {
        "StudyInstanceUID": row.study_instance_uid,
        "SeriesInstanceUID": row.series_instance_uid,
        "SOPInstanceUID": row.sop_instance_uid,
        "SOPClassUID": row.sop_class_uid,
    }


def _level_value(row: QueryRow, level: str) -> str:
    if level == "PATIENT":
        return row.attributes.get("PatientID", "")
    if level == "STUDY":
        return row.study_instance_uid
    if level == "SERIES":
        return row.series_instance_uid
    return row.sop_instance_uid


def _read_attributes(path: Path) -> dict[str, str] | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_READ_TAGS)
    except Exception as exc:  # pydicom raises many types on corrupt input
        log.warning("%s not indexed for queries: %s", path.name, exc)
        return None
    return _attributes_of(ds)


def _attributes_of(ds: Any) -> dict[str, str]:
    """The stored keys of a dataset as strings (multiple values joined with ``\\``)."""
    attributes = {}
    for keyword in _READ_TAGS[1:]:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if isinstance(value, MultiValue | list):
            attributes[keyword] = "\\".join(str(v) for v in value)
        else:
            attributes[keyword] = str(value)
    return attributes
