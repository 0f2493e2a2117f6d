"""STAT first: jobs are claimed by request priority, then age, and aging keeps routine
studies from starving; the request priority comes from the images' request attributes."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicomnode.app.node import Node
from dicomnode.audit import read_audit
from dicomnode.config import RetrySettings
from dicomnode.db import Database
from dicomnode.jobs.store import REQUEST_RANKS, JobStore
from dicomnode.net.scu import Peer, send_files
from dicomnode.routing.select import request_priority, series_infos

NodeFactory = Callable[..., Node]


def _queue(store: JobStore, count: int, rank: int, first: int = 0) -> list[int]:
    ids = []
    with store.db.transaction() as conn:
        for i in range(first, first + count):
            job_id = store.create(conn, f"1.2.{i}", "ct", 1, ["1"], ["pacs"], "", rank)
            assert job_id is not None
            ids.append(job_id)
    return ids


def _claim_all(store: JobStore, aging_s: float = 600.0) -> list[int]:
    order = []
    while (job := store.claim(aging_s=aging_s)) is not None:
        order.append(job.id)
    return order


def test_stat_goes_before_twenty_routine_jobs_which_keep_their_order(tmp_path: Path) -> None:
    # Given twenty routine jobs queued, then a STAT one
    store = JobStore(Database(tmp_path), RetrySettings())
    routine = _queue(store, 20, REQUEST_RANKS["ROUTINE"])
    (stat,) = _queue(store, 1, REQUEST_RANKS["STAT"], first=20)
    # When workers claim them
    order = _claim_all(store)
    # Then the STAT job is first and the routine ones follow oldest first
    assert order == [stat, *routine]
    assert store.get(stat).request_priority == 2


def test_aging_lets_a_long_waiting_routine_job_go_before_a_new_stat_one(tmp_path: Path) -> None:
    # Given a routine job queued a while ago and a STAT job just now
    store = JobStore(Database(tmp_path), RetrySettings())
    (old,) = _queue(store, 1, REQUEST_RANKS["ROUTINE"])
    (high,) = _queue(store, 1, REQUEST_RANKS["HIGH"], first=1)
    time.sleep(0.3)
    (stat,) = _queue(store, 1, REQUEST_RANKS["STAT"], first=2)
    # When one priority step is worth 0.1 s of waiting (0.3 s > 2 steps)
    order = _claim_all(store, aging_s=0.1)
    # Then the routine job has aged past the STAT one (the HIGH one, as old, stays ahead)
    assert order == [high, old, stat]


def _request(priority: str | None, study_priority: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3"
    ds.Modality = "CT"
    if priority is not None:
        item = Dataset()
        item.RequestedProcedureID = "RP1"
        item.RequestedProcedurePriority = priority
        ds.RequestAttributesSequence = [item]
    if study_priority is not None:
        ds.StudyPriorityID = study_priority
    return ds


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (_request("STAT"), "STAT"),
        (_request("HIGH"), "HIGH"),
        (_request("LOW"), "ROUTINE"),
        (_request(None, study_priority="STAT"), "STAT"),
        (_request(None), "ROUTINE"),
    ],
)
def test_request_priority_is_read_from_the_headers(
    tmp_path: Path, ds: Dataset, expected: str
) -> None:
    path = tmp_path / "im.dcm"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert request_priority(series_infos([("1.2.3", path)])) == expected


def _study(files: list[Path], folder: Path, n: int, stat: bool) -> list[Path]:
    """A copy of the phantom as study number ``n`` (new UIDs), STAT in its request."""
    folder.mkdir(parents=True)
    out = []
    for path in files:
        ds = dcmread(path)
        ds.StudyInstanceUID = f"2.25.9999{n}"
        ds.SeriesInstanceUID = f"2.25.9999{n}.1"
        ds.SOPInstanceUID = f"2.25.9999{n}.1.{ds.InstanceNumber}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if stat:
            item = Dataset()
            item.RequestedProcedurePriority = "STAT"
            ds.RequestAttributesSequence = [item]
        out.append(folder / path.name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


@pytest.mark.slow
def test_a_stat_study_after_twenty_routine_ones_is_processed_next_and_all_finish(
    node_factory: NodeFactory, phantom_files: list[Path], tmp_path: Path
) -> None:
    # Given twenty routine studies, then a STAT one, all received before any is complete
    studies = [_study(phantom_files, tmp_path / f"s{n}", n, stat=n == 20) for n in range(21)]
    node = node_factory(quiet_period_s=3.0)  # the PACS is down: results wait in the outbox
    peer = Peer("DICOMNODE", "127.0.0.1", node.port)
    for files in studies:
        assert all(r.status == 0 for r in send_files(peer, files, "PACS"))

    # When the node completes and processes them
    stat_uid = "2.25.999920"

    def finished() -> bool:
        jobs = node.jobs.list_jobs()
        return len(jobs) == 21 and all(j.state in ("sending", "done") for j in jobs)

    deadline = time.monotonic() + 240
    while not finished():
        assert time.monotonic() < deadline, [
            (j.id, j.state, j.last_error[:80]) for j in node.jobs.list_jobs()
        ]
        time.sleep(0.2)

    # Then the STAT study's job is the first claimed after it was queued (the routine
    # jobs still queued then wait for it)
    (stat_job,) = [j for j in node.jobs.list_jobs() if j.study_instance_uid == stat_uid]
    assert stat_job.request_priority == REQUEST_RANKS["STAT"]
    started = [
        (datetime.fromisoformat(r["ts"]).timestamp(), r["study_instance_uid"])
        for r in read_audit(node.config.node.audit_path)
        if r["event"] == "job" and r.get("state") == "running"
    ]
    assert len(started) == 21
    after = [uid for ts, uid in started if ts >= stat_job.created_at]
    assert after[0] == stat_uid, (len(after), after.index(stat_uid))
    # And every routine study finishes
    assert len({uid for _, uid in started}) == 21
