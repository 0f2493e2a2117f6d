"""HL7 results to a RIS: ORU^R01 content, and delivery through the outbox over MLLP
against python-hl7's own MLLP server (a real listener on 127.0.0.1) that acknowledges
(AA), reports an application error (AE, retried with back-off), rejects (AR,
dead-lettered), is down and comes back.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import hl7
import pytest
from hl7.mllp import start_hl7_server
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.app.node import Node
from dicomnode.config import (
    Bound,
    Config,
    Hl7Destination,
    NodeSettings,
    RetrySettings,
    TriageCondition,
    TriageRule,
)
from dicomnode.db import Database
from dicomnode.delivery.deliverer import Deliverer
from dicomnode.delivery.hl7 import ClassificationResult, SeriesResult, build_oru, encode
from dicomnode.delivery.store import Outbox
from dicomnode.inference.card import Code
from dicomnode.jobs.store import JobStore
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.outputs.sr import PRIORITY, PRIORITY_CODES
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.synthetic.phantom import Phantom


class MllpPeer:
    """A real MLLP listener: python-hl7's asyncio server, answering each message with the
    ACK code ``answers(n)`` gives the n-th one; it can stop and start on the same port."""

    def __init__(self, port: int, answers: Callable[[int], str] = lambda n: "AA") -> None:
        self.port = port
        self.answers = answers  # n-th message (from 0) -> ACK code
        self.received: list[hl7.Message] = []
        self.acked_at: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    async def _client(
        self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter
    ) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                code = self.answers(len(self.received))
                self.received.append(message)
                writer.writemessage(message.create_ack(code))
                await writer.drain()
                self.acked_at.append(time.time())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await start_hl7_server(
                    self._client, "127.0.0.1", self.port, encoding="utf-8"
                )
                ready.set()

            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "MLLP server did not start"

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        loop, server = self._loop, self._server

        async def close() -> None:
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = self._server = None


# --- the tests ---------------------------------------------------------------------------

NodeFactory = Callable[..., Node]
FAST = RetrySettings(max_attempts=50, backoff_initial_s=0.2, backoff_max_s=1.0)
TRIAGE = (
    TriageRule("urgent", TriageCondition(classification="*", probability=Bound(ge=0.9))),
    TriageRule("urgent", TriageCondition(finding="*", longest_diameter_mm=Bound(ge=10.0))),
    TriageRule("review", TriageCondition(finding="*")),
)


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _ris(port: int) -> Hl7Destination:
    return Hl7Destination("ris", "127.0.0.1", port, 5.0, "DICOMNODE", "HOSP", "RIS", "RADIOLOGY")


def _header() -> Dataset:
    ds = Dataset()
    ds.PatientID = "PAT|001"
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientName = "Doe^Jane^Q^Dr^PhD"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC^42"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101112.5"
    return ds


def test_oru_parses_back_with_patient_order_findings_priority_and_sr_reference() -> None:
    # Given a study with two lesions (largest 12.3 mm) and a positive classification
    series = SeriesResult(
        "1.2.3.4.5",
        "1.2.3.4.6",
        lesion_count=2,
        largest_diameter_mm=12.34,
        classifications=(ClassificationResult(Code("52988006", "SCT", "Lesion"), 0.93, True),),
    )
    # When the ORU is built and stored
    text = encode(build_oru(_header(), [series], "urgent", "DN7")).decode()

    # Then the library reads back every part of it, separators escaped
    message = hl7.parse(text)
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(message["MSH.12"]) == "2.5.1"
    assert str(message["MSH.10"]) == "DN7"
    assert message["PID.3.1.1"] == "PAT|001" and message["PID.3.1.4"] == "HOSP"
    assert [message[f"PID.5.1.{i}"] for i in range(1, 6)] == ["Doe", "Jane", "Q", "PhD", "Dr"]
    assert str(message["PID.7"]) == "19700101" and str(message["PID.8"]) == "F"
    assert message["OBR.3"] == "ACC^42" and str(message["OBR.25"]) == "P"
    rows = {
        (str(o(3)(1)(1)), str(o(4))): (str(o(2)), o, str(o(8))) for o in message.segments("OBX")
    }
    assert str(rows[("113014", "")][1](5)) == "1.2.3.4"
    vt, priority, flag = rows[("260870009", "")]
    assert (vt, str(priority(5)(1)(1)), flag) == ("CWE", "103391001", "AA")
    assert str(rows[("126000", "1")][1](5)(1)(1)) == "1.2.3.4.6"  # the SR
    assert str(rows[("246206008", "1")][1](5)) == "2" and rows[("246206008", "1")][2] == "A"
    assert str(rows[("103339001", "1")][1](5)) == "12.3"
    assert str(rows[("52988006", "1.1")][1](5)(1)(1)) == "52101004"
    assert str(rows[("122157", "1.1")][1](5)) == "0.9300"


def _outbox_with_oru(tmp_path: Path, destination: Hl7Destination) -> tuple[Config, Outbox, int]:
    """A real data directory with one job whose ORU waits in the outbox for ``ris``."""
    config = Config(
        node=NodeSettings(data_dir=tmp_path / "data", workers=0),
        delivery=FAST,
        hl7=(destination,),
    )
    db = Database(config.node.data_dir)
    jobs = JobStore(db, config.jobs)
    outbox = Outbox(db, jobs, config.delivery)
    with db.transaction() as conn:
        job_id = jobs.create(conn, "1.2.3.4", "ct", 1, ["1.2.3.4.5"], ["ris"])
    assert job_id is not None and jobs.claim() is not None
    path = config.node.data_dir / "results" / f"job-{job_id}" / "ct-oru.hl7"
    path.parent.mkdir(parents=True)
    series = SeriesResult("1.2.3.4.5", "1.2.3.4.6", 0, None)
    path.write_bytes(encode(build_oru(_header(), [series], "routine", f"DN{job_id}")))
    outbox.accept_results(job_id, [("ris", path)], "{}", triage_priority="routine")
    return config, outbox, job_id


class CountingObserver:
    """The node's delivery metrics, recorded (what dicomnode_delivery_* would count)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []
        self.failures: list[tuple[str, int, bool]] = []

    def attempt(self, destination: str, files: int) -> None:
        self.attempts.append((destination, files))

    def failure(self, destination: str, files: int, *, transient: bool) -> None:
        self.failures.append((destination, files, transient))

    def phase(self, pipeline: str, phase: str, seconds: float) -> None:
        pass


def _deliver_until(deliverer: Deliverer, outbox: Outbox, job_id: int, state: str) -> None:
    def settled() -> bool:
        deliverer.run_once()
        deliverer.wait_idle(30)
        return outbox.jobs.get(job_id).state == state

    _wait(settled, 30, f"job {job_id} {state}; {outbox.items(job_id)}")


@pytest.mark.parametrize(
    ("answers", "job_state", "item_state", "attempts"),
    [
        (lambda n: "AA", "done", "done", 1),
        (lambda n: "AE" if n < 2 else "AA", "done", "done", 3),  # application error: retried
        (lambda n: "AR", "failed", "dead", 1),  # application reject: dead-lettered at once
    ],
    ids=["AA", "AE-then-AA", "AR"],
)
def test_acknowledgements(
    tmp_path: Path,
    free_port: Callable[[], int],
    answers: Callable[[int], str],
    job_state: str,
    item_state: str,
    attempts: int,
) -> None:
    # Given a RIS that answers with the given ACK codes
    ris = MllpPeer(free_port(), answers)
    ris.start()
    config, outbox, job_id = _outbox_with_oru(tmp_path, _ris(ris.port))
    deliverer = Deliverer(config, outbox)
    counted = CountingObserver()
    deliverer.observer = counted
    try:
        # When the outbox is delivered
        _deliver_until(deliverer, outbox, job_id, job_state)
    finally:
        deliverer.shutdown()
        ris.stop()
    # Then the item ends as the code says, after as many attempts
    (item,) = outbox.items(job_id)
    assert (item.state, item.attempts) == (item_state, attempts), item
    # and every attempt and refusal is counted for the metrics
    assert len(counted.attempts) == attempts
    refusals = {"AA": [], "done": [("ris", 1, True)] * 2, "dead": [("ris", 1, False)]}
    expected = refusals["AA" if attempts == 1 and item_state == "done" else item_state]
    assert counted.failures == expected
    assert len(ris.received) == attempts
    # And the receiver saw the header addressed to it
    first = ris.received[0]
    assert first["MSH.5"] == "RIS" and first["MSH.4"] == "HOSP"
    assert [str(s[0]) for s in first] == ["MSH", "PID", "OBR", *["OBX"] * 4]
    if item_state == "dead":
        assert "answered AR" in item.last_error
        assert "answered AR" in outbox.jobs.get(job_id).last_error
    # And the audit trail names the code but no patient data
    audit = config.node.audit_path
    assert not audit.exists() or "PAT" not in audit.read_text()


def test_ris_down_then_back_retries_with_back_off(
    tmp_path: Path, free_port: Callable[[], int]
) -> None:
    # Given a RIS that is down
    ris = MllpPeer(free_port())
    config, outbox, job_id = _outbox_with_oru(tmp_path, _ris(ris.port))
    deliverer = Deliverer(config, outbox)
    counted = CountingObserver()
    deliverer.observer = counted
    try:
        # When delivery runs for 2.5 s
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            deliverer.run_once()
            deliverer.wait_idle(30)
            time.sleep(0.02)
        # Then it backs off (0.2, 0.4, 0.8 s ...) instead of retrying at every poll
        (item,) = outbox.items(job_id)
        assert item.state == "pending" and 2 <= item.attempts <= 5, item
        assert "cannot send" in item.last_error
        assert counted.failures == [("ris", 1, True)] * item.attempts

        # When the RIS comes back on the same port
        ris.start()
        _deliver_until(deliverer, outbox, job_id, "done")
    finally:
        deliverer.shutdown()
        ris.stop()
    # Then it gets the message exactly once
    assert len(ris.received) == 1


def test_a_study_through_the_node_gets_triaged_and_reported_to_the_ris(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    free_port: Callable[[], int],
) -> None:
    # Given a node with triage rules, the PACS and a RIS
    ris = MllpPeer(free_port())
    ris.start()
    base = node_factory(pacs_port=folder_scp.port, start=False, delivery=FAST)
    pipeline = replace(base.config.pipelines[0], triage=TRIAGE)
    route = replace(base.config.routes[0], destinations=("pacs", "ris"))
    config = replace(base.config, pipelines=(pipeline,), routes=(route,), hl7=(_ris(ris.port),))
    node = Node(config)
    node.start()
    try:
        # When a study arrives
        results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
        assert all(r.status == 0 for r in results)

        # Then the PACS gets SEG + SR, the RIS one ORU, and the job is done
        returned = folder_scp.wait_for(2, 60)
        pacs_acked = time.time()
        _wait(lambda: ris.acked_at, 60, "ORU acknowledged")
        _wait(lambda: node.jobs.list_jobs()[0].state == "done", 30, "job done")
    finally:
        node.stop()
        ris.stop()
    (job,) = node.jobs.list_jobs()
    sr_path = next(p for p in returned if dcmread(p).Modality == "SR")
    sr = dcmread(sr_path)
    # And the priority is recorded with the job, in the SR and in the ORU
    assert job.triage_priority in ("urgent", "review") and job.triage_priority != ""
    assert json.loads(job.summary)["priority"] == job.triage_priority
    report = hd.sr.srread(sr_path)
    assert _sr_priority(report) == job.triage_priority
    assert run_dciodvfy(sr_path).errors == []
    # And the RIS heard of the results only after the PACS had acknowledged them
    assert ris.acked_at[0] >= pacs_acked - 0.5
    (message,) = ris.received
    assert message["PID.3.1.1"] == phantom.datasets[0].PatientID
    assert message["OBR.3"] == phantom.datasets[0].AccessionNumber
    obx = {str(o(3)(1)(1)): o for o in message.segments("OBX")}
    assert str(obx["126000"](5)(1)(1)) == sr.SOPInstanceUID
    assert str(obx["113014"](5)) == phantom.datasets[0].StudyInstanceUID
    expected = {"urgent": "103391001", "review": "394849002"}[job.triage_priority]
    assert str(obx["260870009"](5)(1)(1)) == expected
    # And the ORU went to the RIS only, the SEG and SR to the PACS only
    items = {(i.destination, i.path.suffix) for i in node.outbox.items(job.id)}
    assert items == {("pacs", ".dcm"), ("ris", ".hl7")}
    print(f"PACS results -> RIS ACK: {ris.acked_at[0] - pacs_acked:+.3f} s")


def _sr_priority(report: Dataset) -> str | None:
    names = {c.value: k for k, c in PRIORITY_CODES.items()}
    for item in report.ContentSequence[-1].ContentSequence:
        for entry in item.ContentSequence:
            if entry.ConceptNameCodeSequence[0].CodeValue == PRIORITY.value:
                return names[entry.ConceptCodeSequence[0].CodeValue]
    return None
