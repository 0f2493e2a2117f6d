"""Complete by count (issue 13, item 2): a sender that answers C-FIND says how many
instances the study holds and the study is processed as soon as the node holds them all,
not after the quiet period; a sender that does not answer leaves it to the quiet period.

Real peers on loopback: Orthanc as the PACS that routes the study (and answers the
Study Root C-FIND), dcmtk's storescu as a sender whose configured remote is a dcmtk
storescp (storage only: it refuses C-FIND).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.net.scu import Peer, StudyCount, count_study_instances
from dicomnode.spool.index import StudyState
from dicomnode.synthetic.phantom import Phantom

from .peers import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    Orthanc,
    StoreSCP,
    describe_jobs,
    orthanc_with_node,
    run_storescu,
    wait_until,
)

pytestmark = pytest.mark.peer

#: Far longer than the test may take: completion within it can only be by count.
LONG_QUIET_S = 60.0


def _audit(node: Node, event: str) -> list[dict[str, Any]]:
    return [r for r in read_audit(node.config.node.audit_path) if r["event"] == event]


@pytest.fixture
def orthanc_node(
    tmp_path: Path,
    free_port: Callable[[], int],
    node_factory: Callable[..., Node],
    require_tool: Callable[[str], str],
) -> Iterator[tuple[Orthanc, Node]]:
    """Orthanc (AE ORTHANC) knows the node; the node knows Orthanc as a remote and has a
    quiet period longer than the test."""
    with orthanc_with_node(
        require_tool("Orthanc"),
        tmp_path / "orthanc",
        free_port,
        node_factory,
        remote_timeout_s=10.0,
        quiet_period_s=LONG_QUIET_S,
    ) as pair:
        yield pair


def test_orthanc_routed_study_completes_by_count_long_before_the_quiet_period(
    orthanc_node: tuple[Orthanc, Node],
    phantom: Phantom,
    phantom_files: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    orthanc, node = orthanc_node
    # Given the study stored in Orthanc, which answers C-FIND with its instance count
    uploaded = [orthanc.upload(f) for f in phantom_files]
    study_id = uploaded[0]["ParentStudy"]
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port, 10.0)
    assert count_study_instances(peer, "DICOMNODE", study_uid) == StudyCount(len(phantom_files))

    # When Orthanc sends it to the node (as a routing rule would)
    answer = orthanc.post_json(
        "/modalities/dicomnode/store", {"Resources": [study_id], "Synchronous": True}
    )
    sent = time.monotonic()
    assert int(answer.get("FailedInstancesCount", 0)) == 0, answer

    # Then the SEG and SR are back in Orthanc well before the 60 s quiet period is over
    def results() -> bool:
        found = (
            orthanc.find_instances(SEG_CLASS),
            orthanc.find_instances(COMPREHENSIVE_3D_SR_CLASS),
        )
        return all(found)

    wait_until(results, LONG_QUIET_S / 2, f"SEG and SR in Orthanc; {describe_jobs(node)}", 0.1)
    took = time.monotonic() - sent
    study = node.index.study(study_uid)
    assert study is not None and study.completed_at is not None
    waited = study.completed_at - study.last_received_at
    print(f"\nby count: last instance -> complete {waited:.2f} s, -> results in PACS {took:.2f} s")
    assert took < LONG_QUIET_S / 2

    # ...and the note, the log and the audit trail say it completed by count
    n = len(phantom_files)
    assert study.note.endswith(f"completed by count (ORTHANC holds {n} instances, the node {n})")
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith(f"study {study_uid} complete: 1 series, {n} instances, by count")
        for m in messages
    ), messages
    (record,) = _audit(node, "study")
    assert (record["completed_by"], record["sender_instances"]) == ("count", n)
    assert "answered" in [r["outcome"] for r in _audit(node, "study_count")]


def test_orthanc_knows_nothing_of_an_unknown_study(orthanc_node: tuple[Orthanc, Node]) -> None:
    orthanc, _ = orthanc_node
    peer = Peer("ORTHANC", "127.0.0.1", orthanc.dicom_port, 10.0)
    answer = count_study_instances(peer, "DICOMNODE", "1.2.3.4.5.6.7.8.9")
    assert answer.instances is None and not answer.refused


def test_a_sender_that_refuses_c_find_gets_the_quiet_period(
    tmp_path: Path,
    free_port: Callable[[], int],
    node_factory: Callable[..., Node],
    require_tool: Callable[[str], str],
    phantom: Phantom,
    phantom_files: list[Path],
) -> None:
    # Given a sender (AE PACS) whose configured remote is a storage-only dcmtk storescp
    storescu = require_tool("storescu")
    pacs = StoreSCP(require_tool("storescp"), free_port(), tmp_path / "pacs")
    pacs.start()
    quiet = 3.0
    try:
        node = node_factory(quiet_period_s=quiet, pacs_port=pacs.port)
        wait_until(lambda: _listening(pacs), 10, "storescp to listen")

        # When the sender sends the study
        result = run_storescu(storescu, node.port, phantom_files, calling_ae="PACS")
        assert result.returncode == 0, result.stderr
        study_uid = str(phantom.datasets[0].StudyInstanceUID)

        # Then the node asked, was refused, and completed the study after the quiet period
        def finished() -> bool:
            study = node.index.study(study_uid)
            return study is not None and study.state != StudyState.RECEIVING

        wait_until(finished, quiet + 20, f"study complete; {describe_jobs(node)}", 0.1)
        study = node.index.study(study_uid)
        assert study is not None and study.completed_at is not None
        waited = study.completed_at - study.last_received_at
        print(f"\nquiet period {quiet:g} s: last instance -> complete {waited:.2f} s")
        assert waited >= quiet
        assert study.note.endswith(f"completed after the {quiet:g} s quiet period")
        (record,) = _audit(node, "study")
        assert record["completed_by"] == "quiet_period"
        refusals = [r for r in _audit(node, "study_count") if r["outcome"] == "refused"]
        assert refusals and "C-FIND not accepted" in refusals[0]["reason"]
    finally:
        pacs.stop()


def _listening(pacs: StoreSCP) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", pacs.port)) == 0
