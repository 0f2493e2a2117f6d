"""Late instances: the study is processed again and the new SR supersedes the first one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def reports(paths: list[Path]) -> list[object]:
    return [ds for ds in map(dcmread, paths) if ds.SOPClassUID == SR_CLASS]


def test_late_instance_reruns_and_new_report_lists_the_old_one_as_predecessor(
    node_factory: Callable[..., object], folder_scp: FolderSCP, phantom_files: list[Path]
) -> None:
    # Given a node that processed a study missing its last slice
    node = node_factory(pacs_port=folder_scp.port, quiet_period_s=0.5)
    peer = Peer("DICOMNODE", "127.0.0.1", node.port)  # type: ignore[attr-defined]
    assert all(r.ok for r in send_files(peer, phantom_files[:-1], "PACS"))
    first = reports(folder_scp.wait_for(2, timeout=60))
    assert len(first) == 1
    # When the last slice arrives late
    assert all(r.ok for r in send_files(peer, phantom_files[-1:], "PACS"))
    # Then the study is processed again and the new report supersedes the first
    received = folder_scp.wait_for(4, timeout=60)
    assert len(received) == 4
    (second,) = [ds for ds in reports(received) if ds.SOPInstanceUID != first[0].SOPInstanceUID]
    assert second.InstanceNumber == 2
    predecessors = [
        sop.ReferencedSOPInstanceUID
        for study in second.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert predecessors == [first[0].SOPInstanceUID]
