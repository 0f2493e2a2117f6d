"""count_study_instances: the C-FIND SCU that asks a remote how many instances a study
holds.  Every way the question can go unanswered is an answer without a count, never an
exception; those that should stop the node asking for a while say ``refused``.

Peers: a scripted pynetdicom Study Root C-FIND SCP (answers chosen per test), the node's
storage-only folder SCP and a closed port; Orthanc answers it in
tests/integration/test_complete_by_count.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, StudyCount, count_study_instances

Answer = tuple[int, Dataset | None]


class FindSCP:
    """A Study Root C-FIND SCP that answers every query with ``answers`` and records the
    identifiers it was asked."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.queries: list[Dataset] = []
        self.ae = AE(ae_title="FINDSCP")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server: Any = None

    def handle(self, event: Event) -> Iterator[Answer]:
        self.queries.append(event.identifier)
        yield from self.answers

    def __enter__(self) -> int:
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, self.handle)]
        )
        return int(self.server.server_address[1])

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def _identifier(study_uid: str, count: str | None) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    if count is not None:
        ds.NumberOfStudyRelatedInstances = count
    return ds


def _ask(port: int, study_uid: str) -> StudyCount:
    return count_study_instances(
        Peer("FINDSCP", "127.0.0.1", port, timeout_s=5.0), "DICOMNODE", study_uid
    )


def test_the_count_of_a_matching_study_is_returned() -> None:
    uid = generate_uid()
    scp = FindSCP([(0xFF00, _identifier(uid, "24")), (0x0000, None)])
    with scp as port:
        answer = _ask(port, uid)
    assert answer == StudyCount(24)
    # the question: STUDY level, the UID, the count asked for (empty)
    (query,) = scp.queries
    assert query.QueryRetrieveLevel == "STUDY"
    assert query.StudyInstanceUID == uid
    assert "NumberOfStudyRelatedInstances" in query
    assert query.NumberOfStudyRelatedInstances in (None, "")


def test_no_match_is_no_count_but_not_a_refusal() -> None:
    with FindSCP([(0x0000, None)]) as port:
        answer = _ask(port, generate_uid())
    assert answer.instances is None and not answer.refused
    assert "no match" in answer.problem


def test_a_count_of_zero_is_no_count_but_not_a_refusal() -> None:
    uid = generate_uid()
    with FindSCP([(0xFF00, _identifier(uid, "0")), (0x0000, None)]) as port:
        answer = _ask(port, uid)
    assert answer.instances is None and not answer.refused


@pytest.mark.parametrize("count", [None, ""])
def test_a_match_without_the_count_is_a_refusal(count: str | None) -> None:
    uid = generate_uid()
    with FindSCP([(0xFF00, _identifier(uid, count)), (0x0000, None)]) as port:
        answer = _ask(port, uid)
    assert answer.instances is None and answer.refused
    assert "no NumberOfStudyRelatedInstances" in answer.problem


def test_a_failure_status_is_a_refusal() -> None:
    with FindSCP([(0xC000, None)]) as port:
        answer = _ask(port, generate_uid())
    assert answer.instances is None and answer.refused
    assert "0xC000" in answer.problem


def test_a_storage_only_peer_is_a_refusal(tmp_path: Path) -> None:
    scp = FolderSCP("FINDSCP", tmp_path / "pacs")
    scp.start()
    try:
        answer = _ask(scp.port, generate_uid())
    finally:
        scp.stop()
    assert answer == StudyCount(None, "Study Root C-FIND not accepted", refused=True)


def test_a_closed_port_is_a_refusal(free_port: Callable[[], int]) -> None:
    answer = _ask(free_port(), generate_uid())
    assert answer.instances is None and answer.refused
    assert "cannot associate" in answer.problem


def test_a_peer_that_does_not_answer_in_time_is_a_refusal() -> None:
    release = threading.Event()

    class SlowSCP(FindSCP):
        def handle(self, event: Event) -> Iterator[Answer]:
            release.wait(10)
            yield from super().handle(event)

    uid = generate_uid()
    with SlowSCP([(0xFF00, _identifier(uid, "3")), (0x0000, None)]) as port:
        answer = count_study_instances(
            Peer("FINDSCP", "127.0.0.1", port, timeout_s=0.5), "DICOMNODE", uid
        )
        release.set()
    assert answer.instances is None and answer.refused
