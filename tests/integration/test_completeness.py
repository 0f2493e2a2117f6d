"""Study completeness over the network: association close is not study completion.

A study sent over several associations with pauses shorter than the quiet period is one
study and one job (the MONAI gateway split such studies into several jobs); an instance
arriving after the study was processed triggers a re-run (``late_arrivals = "rerun"``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from dicomnode.app.node import Node
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import Phantom

from .peers import describe_jobs, wait_until

NodeFactory = Callable[..., Node]


def _send(node: Node, files: list[Path]) -> None:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "MODALITY")
    assert all(r.status == 0 for r in results), [r.error for r in results]


def _done_jobs(node: Node, count: int) -> bool:
    jobs = node.jobs.list_jobs()
    return len(jobs) == count and all(j.state == "done" for j in jobs)


def test_study_over_several_associations_is_one_job(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
) -> None:
    # Given a node with a 1 s quiet period
    node = node_factory(quiet_period_s=1.0, pacs_port=folder_scp.port)

    # When the study arrives in three associations with pauses shorter than that
    for part in (phantom_files[:8], phantom_files[8:16], phantom_files[16:]):
        _send(node, part)
        time.sleep(0.3)  # the pause is the scenario, not a wait for an event

    # Then it is completed once, as one job over all its instances
    wait_until(lambda: _done_jobs(node, 1), 60, f"one done job; {describe_jobs(node)}")
    job = node.jobs.list_jobs()[0]
    summary = json.loads(job.summary)["series"]
    assert [s["slices"] for s in summary] == [len(phantom_files)]
    assert len(folder_scp.received) == 2


def test_late_instance_reruns_the_study(
    node_factory: NodeFactory,
    folder_scp: FolderSCP,
    phantom: Phantom,
    phantom_files: list[Path],
    tmp_path: Path,
) -> None:
    # Given a study processed and delivered
    node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)
    _send(node, phantom_files)
    wait_until(lambda: _done_jobs(node, 1), 60, f"first job done; {describe_jobs(node)}")
    folder_scp.wait_for(2, timeout=10)

    # When a corrected instance of it arrives afterwards
    ds = dcmread(phantom_files[0])
    ds.SeriesDescription = "CORRECTED"
    late = tmp_path / "late.dcm"
    ds.save_as(late, enforce_file_format=True)
    _send(node, [late])

    # Then the study runs again as generation 2 and new results are delivered
    wait_until(lambda: _done_jobs(node, 2), 60, f"second job done; {describe_jobs(node)}")
    assert sorted(j.generation for j in node.jobs.list_jobs()) == [1, 2]
    received = folder_scp.wait_for(4, timeout=10)
    assert len(received) == 4
    assert len({dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received}) == 4
