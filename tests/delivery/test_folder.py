"""Folder destinations: a result copied into a folder is durable before it counts as done."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import Config, FolderDestination, NodeSettings, RetrySettings
from dicomnode.db import Database
from dicomnode.delivery import deliverer as deliverer_module
from dicomnode.delivery.deliverer import Deliverer
from dicomnode.delivery.store import Outbox, OutboxState
from dicomnode.jobs.store import JobStore


def test_folder_copy_is_fsynced_file_and_folder_before_the_item_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job with one result queued for a folder destination
    data = tmp_path / "data"
    archive = tmp_path / "archive"
    config = Config(
        node=NodeSettings(data_dir=data), folders=(FolderDestination("archive", archive),)
    )
    db = Database(data)
    jobs = JobStore(db, RetrySettings())
    outbox = Outbox(db, jobs, RetrySettings())
    with db.transaction() as conn:
        job_id = jobs.create(conn, "1.2.3", "ct", 1, ["1.2.3.4"], ["archive"])
    assert job_id is not None and jobs.claim() is not None
    result = data / "results" / f"job-{job_id}" / "x-ct-sr.dcm"
    result.parent.mkdir(parents=True)
    result.write_bytes(b"result")
    outbox.accept_results(job_id, [("archive", result)], "{}")
    events: list[str] = []
    real_fsync_dir = deliverer_module.copy_atomically.__globals__["fsync_dir"]

    def fsync_dir(path: Path) -> None:
        events.append(f"fsync {path.relative_to(tmp_path)}")
        real_fsync_dir(path)

    real_delivered = outbox.delivered

    def delivered(item_id: int, status: int) -> None:
        events.append("done")
        real_delivered(item_id, status)

    monkeypatch.setitem(deliverer_module.copy_atomically.__globals__, "fsync_dir", fsync_dir)
    monkeypatch.setattr(outbox, "delivered", delivered)
    # When it is delivered
    Deliverer(config, outbox).deliver("archive", outbox.take_due("archive"))
    # Then the copy's folder was fsynced before the item was recorded as done
    assert events == [f"fsync archive/job-{job_id}", "done"]
    assert (archive / f"job-{job_id}" / "x-ct-sr.dcm").read_bytes() == b"result"
    assert [i.state for i in outbox.items(job_id)] == [OutboxState.DONE]
    assert jobs.get(job_id).state == "done"
