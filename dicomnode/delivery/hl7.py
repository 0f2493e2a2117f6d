"""HL7 v2.5.1 ORU^R01 result messages to a RIS or worklist, over MLLP.

Built and framed with python-hl7 (``hl7``): the message is a tree of its containers, each
value escaped by the library, never a concatenated string.  :func:`build_oru` is called
by the study processor when a job's results are written: the message is stored as
``<route>-oru.hl7`` next to the SEG and SR and queued, through the outbox, for the HL7
destinations only.  :func:`send_messages` sends the stored messages of one destination
over one MLLP connection, stamping the header (MSH-3..7) for that destination, and reads
each acknowledgement (original mode, HL7 v2.5.1 chapter 2.9, table 0008):

- ``AA`` (or ``CA``): accepted: the outbox item is done;
- ``AE`` (or ``CE``): application error, the receiver could not process it now: retried
  with back-off, dead-lettered once the attempts are used;
- ``AR`` (or ``CR``): application reject (message type, version, processing ID or
  content refused): dead-lettered at once, a resend would be refused again;
- no connection, a timeout, a malformed answer or one for another message: retried.

The message carries patient identification (PID) by design; logs and the audit trail name
only the job, the file and the acknowledgement code.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import hl7  # type: ignore[import-untyped]
from hl7.mllp import open_hl7_connection  # type: ignore[import-untyped]
from pydicom.dataset import Dataset

from dicomnode.config import Hl7Destination
from dicomnode.inference.card import Code

VERSION = "2.5.1"
#: (code, text, coding system) of each observation (OBX-3) and coded value (OBX-5).
STUDY = Code("113014", "DCM", "Study")
REPORT = Code("126000", "DCM", "Imaging Measurement Report")
LESION_COUNT = Code("246206008", "SCT", "Number of lesions")
LONG_AXIS = Code("103339001", "SCT", "Long axis")
PROBABILITY = Code("122157", "DCM", "Probability")
PRIORITY = Code("260870009", "SCT", "Priority")
PRIORITY_VALUES = {
    "urgent": Code("103391001", "SCT", "Urgent"),
    "review": Code("394849002", "SCT", "High priority"),
    "routine": Code("50811001", "SCT", "Routine"),
}
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
MILLIMETER = Code("mm", "UCUM", "millimeter")
NO_UNITS = Code("1", "UCUM", "no units")
#: Abnormal flags (OBX-8, HL7 table 0078) of the priority observation.
PRIORITY_FLAGS = {"urgent": "AA", "review": "A", "routine": "N"}
#: Acknowledgement codes (MSA-1, HL7 table 0008) and what they make of an outbox item.
ACCEPTED = frozenset({"AA", "CA"})
RETRIED = frozenset({"AE", "CE"})
REJECTED = frozenset({"AR", "CR"})


@dataclass(frozen=True)
class ClassificationResult:
    finding: Code
    probability: float
    positive: bool


@dataclass(frozen=True)
class SeriesResult:
    """What one series' results say, for the ORU (no pixel data, no masks)."""

    series_instance_uid: str
    report_sop_instance_uid: str
    lesion_count: int | None  # None: no segmentation model
    largest_diameter_mm: float | None
    classifications: tuple[ClassificationResult, ...] = ()


def _cwe(segment: hl7.Segment, field: int, code: Code) -> None:
    segment.assign_field(code.value, field, 1, 1)
    segment.assign_field(code.meaning, field, 1, 2)
    segment.assign_field(code.scheme, field, 1, 3)


def _text(message: hl7.Message, value: object) -> str:
    return str(hl7.util.escape(message, str(value)))


def _segment(message: hl7.Message, name: str) -> hl7.Segment:
    segment = message.create_segment([message.create_field([name])])
    message.append(segment)
    return segment


def _timestamp(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def _pid(message: hl7.Message, header: Dataset) -> None:
    pid = _segment(message, "PID")
    pid.assign_field("1", 1)
    pid.assign_field(_text(message, header.get("PatientID", "")), 3, 1, 1)
    issuer = str(header.get("IssuerOfPatientID", ""))
    if issuer:
        pid.assign_field(_text(message, issuer), 3, 1, 4)
    name = str(header.get("PatientName", "")).split("^")
    # DICOM PN family^given^middle^prefix^suffix -> XPN family^given^middle^suffix^prefix
    for component, index in ((1, 0), (2, 1), (3, 2), (4, 4), (5, 3)):
        if index < len(name) and name[index]:
            pid.assign_field(_text(message, name[index]), 5, 1, component)
    pid.assign_field(_text(message, header.get("PatientBirthDate", "")), 7)
    sex = str(header.get("PatientSex", "")).upper()
    pid.assign_field(sex if sex in ("M", "F", "O") else "U", 8)


def _obx(
    message: hl7.Message,
    value_type: str,
    observation: Code,
    sub_id: str,
    when: str,
    *,
    flag: str = "",
    units: Code | None = None,
) -> hl7.Segment:
    obx = _segment(message, "OBX")
    obx.assign_field(str(len(message.segments("OBX"))), 1)
    obx.assign_field(value_type, 2)
    _cwe(obx, 3, observation)
    obx.assign_field(sub_id, 4)
    if units is not None:
        _cwe(obx, 6, units)
    obx.assign_field(flag, 8)
    obx.assign_field("P", 11)  # preliminary: the SR is UNVERIFIED
    obx.assign_field(when, 14)
    return obx


def _series_observations(
    message: hl7.Message, index: int, series: SeriesResult, when: str, application: str
) -> None:
    sub = str(index)
    obx = _obx(message, "RP", REPORT, sub, when)
    obx.assign_field(_text(message, series.report_sop_instance_uid), 5, 1, 1)
    obx.assign_field(_text(message, application), 5, 1, 2)
    obx.assign_field("AP", 5, 1, 3)
    obx.assign_field("DICOM", 5, 1, 4)
    if series.lesion_count is not None:
        flag = "A" if series.lesion_count else "N"
        obx = _obx(message, "NM", LESION_COUNT, sub, when, flag=flag, units=NO_UNITS)
        obx.assign_field(str(series.lesion_count), 5)
    if series.largest_diameter_mm is not None:
        obx = _obx(message, "NM", LONG_AXIS, sub, when, flag="A", units=MILLIMETER)
        obx.assign_field(f"{series.largest_diameter_mm:.1f}", 5)
    for k, item in enumerate(series.classifications, start=1):
        flag = "A" if item.positive else "N"
        obx = _obx(message, "CWE", item.finding, f"{index}.{k}", when, flag=flag)
        _cwe(obx, 5, PRESENT if item.positive else ABSENT)
        obx = _obx(message, "NM", PROBABILITY, f"{index}.{k}", when, units=NO_UNITS)
        obx.assign_field(f"{item.probability:.4f}", 5)


def build_oru(
    header: Dataset,
    series: Sequence[SeriesResult],
    priority: str,
    control_id: str,
    *,
    application: str = "DICOMNODE",
    when: dt.datetime | None = None,
) -> hl7.Message:
    """An ORU^R01 (v2.5.1) for a study's results.

    Parameters
    ----------
    header
        A source image's header: patient (PID-3, 5, 7, 8), AccessionNumber (OBR-3 filler
        order number, OBR-18), StudyInstanceUID (an OBX (113014, DCM, "Study")), study date.
    series
        One entry per series processed: a reference to its SR (OBX type RP, (126000, DCM,
        "Imaging Measurement Report")), lesion count, largest diameter, classifications and
        probabilities, each OBX with its abnormal flag (table 0078).
    priority
        The triage priority: an OBX (260870009, SCT, "Priority") flagged AA, A or N.
    control_id
        MSH-10; the same for every attempt, so a receiver can recognise a resend.
    """
    if priority not in PRIORITY_VALUES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITY_VALUES)}: {priority!r}")
    stamp = _timestamp(when or dt.datetime.now(dt.UTC))
    message = hl7.Message("\r", [])
    msh = _segment(message, "MSH")
    msh.assign_field("|", 1)
    msh.assign_field("^~\\&", 2)
    msh.assign_field(_text(message, application), 3)
    msh.assign_field(stamp, 7)
    for i, part in enumerate(("ORU", "R01", "ORU_R01"), start=1):
        msh.assign_field(part, 9, 1, i)
    msh.assign_field(_text(message, control_id), 10)
    msh.assign_field("P", 11)
    msh.assign_field(VERSION, 12)
    msh.assign_field("UNICODE UTF-8", 18)
    _pid(message, header)
    accession = _text(message, header.get("AccessionNumber", ""))
    obr = _segment(message, "OBR")
    obr.assign_field("1", 1)
    obr.assign_field(accession, 3)
    _cwe(obr, 4, Code("AI", "99DICOMNODE", "AI analysis of imaging study"))
    study_date = str(header.get("StudyDate", "")) + str(header.get("StudyTime", ""))[:6]
    obr.assign_field(_text(message, study_date), 7)
    obr.assign_field(accession, 18)
    obr.assign_field(stamp, 22)
    obr.assign_field("P", 25)  # preliminary: results not yet verified by a reader
    obx = _obx(message, "ST", STUDY, "", stamp)
    obx.assign_field(_text(message, header.get("StudyInstanceUID", "")), 5)
    obx = _obx(message, "CWE", PRIORITY, "", stamp, flag=PRIORITY_FLAGS[priority])
    _cwe(obx, 5, PRIORITY_VALUES[priority])
    for index, item in enumerate(series, start=1):
        _series_observations(message, index, item, stamp, application)
    return message


# --- sending -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Acknowledgement:
    """The answer to one message: ``code`` (MSA-1) or ``error`` when there was none."""

    code: str
    text: str = ""
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.code in ACCEPTED

    @property
    def transient(self) -> bool:
        """Worth retrying: AE/CE, or no usable answer."""
        return self.code not in REJECTED


def _addressed(text: str, destination: Hl7Destination) -> tuple[hl7.Message, str]:
    """A stored message with the header of ``destination`` (MSH-3..7); and its MSH-10."""
    message = hl7.parse(text)
    msh = message.segment("MSH")
    for field, value in (
        (3, destination.sending_application),
        (4, destination.sending_facility),
        (5, destination.receiving_application),
        (6, destination.receiving_facility),
    ):
        msh.assign_field(_text(message, value), field)
    msh.assign_field(_timestamp(dt.datetime.now(dt.UTC)), 7)
    return message, str(message["MSH.10"])


def _acknowledgement(answer: hl7.Message, control_id: str) -> Acknowledgement:
    try:
        code = str(answer["MSA.1"]).strip().upper()
        answered = str(answer["MSA.2"]).strip()
        text = str(answer["MSA.3"]) if len(answer.segment("MSA")) > 3 else ""
    except (KeyError, IndexError) as exc:
        return Acknowledgement("", error=f"the answer has no MSA segment ({exc})")
    if answered != control_id:
        return Acknowledgement(
            "", error=f"the answer acknowledges {answered!r}, not {control_id!r}"
        )
    if code not in ACCEPTED | RETRIED | REJECTED:
        return Acknowledgement("", error=f"unknown acknowledgement code {code!r}")
    return Acknowledgement(code, text=text)


async def _exchange(
    destination: Hl7Destination,
    messages: Sequence[str],
    on_answer: Callable[[int, Acknowledgement], None],
) -> None:
    timeout = destination.timeout_s
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(destination.host, destination.port, encoding="utf-8"), timeout
    )
    try:
        for i, text in enumerate(messages):
            message, control_id = _addressed(text, destination)
            writer.writemessage(message)
            await asyncio.wait_for(writer.drain(), timeout)
            answer = await asyncio.wait_for(reader.readmessage(), timeout)
            on_answer(i, _acknowledgement(answer, control_id))
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), timeout)


def send_messages(
    destination: Hl7Destination,
    paths: Sequence[Path],
    on_answer: Callable[[int, Acknowledgement], None],
) -> None:
    """Send the stored messages over one MLLP connection, one at a time, each after the
    previous one's acknowledgement; ``on_answer(i, ack)`` is called for each answer.

    Raises ``OSError`` or ``TimeoutError`` (no connection, or an answer that never came):
    the messages not yet answered are to be retried."""
    messages = [p.read_bytes().decode("utf-8") for p in paths]  # CR separators kept
    asyncio.run(_exchange(destination, messages, on_answer))


def encode(message: hl7.Message) -> bytes:
    """The stored form of a message: UTF-8, segments ending in CR."""
    return str(message).encode("utf-8")
