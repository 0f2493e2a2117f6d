"""Recognise corrected segmentations and keep them as training data, with their provenance.

The receive step notes every Segmentation the node did not make
(:mod:`dicomnode.spool.feedback`); :func:`collect_feedback` settles those notes, away from
the receive path.  A note becomes training data when the SEG

- was not made by a dicomnode: its UIDs are not under the node's root (checked when it
  was noted) and its Manufacturer and Content Creator's Name are not those the node
  writes (a copy of the node's SEG re-saved under new UIDs is no correction), and
- references (Referenced Series Sequence) a source series the node processed: a job of
  the study that ran a route over that series and left a SEG in the results folder.

The SEG is then copied to ``<data_dir>/feedback/<study>/<sop>.dcm`` beside
``<sop>.json``, and the images of the series it labels to
``<data_dir>/feedback/<study>/<series>/`` (hard links to the spool files where the file
system allows, copies otherwise): the folder is a training set as ``dicomnode train
--data`` reads it (``models/data.py`` pairs each SEG with its series).  The provenance:
which study and series, which of the node's SEGs (job, route, generation, SOP Instance
UID) and model version it corrects, when and from which AE title and host it came, who
made it (manufacturer, model, software versions, content creator, segment labels), and
how many images were kept with it.  The same provenance is kept in the ``feedback`` row.
Nothing here creates a job or touches a study: a correction never re-processes its study
(it does not drive processing, ``spool.header.drives_processing``).  Other notes are
rejected with the reason.  The files stay when retention purges the study.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.db import Database
from dicomnode.errors import TransitionError
from dicomnode.fsutil import copy_atomically, fsync_dir, write_bytes_atomically
from dicomnode.jobs.store import Job, JobStore
from dicomnode.outputs.common import MANUFACTURER
from dicomnode.outputs.layout import job_folder, result_files, results_root
from dicomnode.outputs.seg import CONTENT_CREATOR
from dicomnode.spool.feedback import FeedbackInbox, FeedbackRecord, FeedbackState
from dicomnode.spool.index import Index

log = logging.getLogger(__name__)

FEEDBACK_DIR = "feedback"


def feedback_root(data_dir: Path) -> Path:
    """``<data_dir>/feedback``: the training data that came back."""
    return data_dir / FEEDBACK_DIR


@dataclass(frozen=True)
class Corrected:
    """The node's SEG a correction replaces: its job and the model that made it."""

    job: Job
    series_instance_uid: str
    segmentation: Path
    sop_instance_uid: str
    model: str
    model_version: str


def referenced_series(seg: Dataset) -> list[str]:
    """The source series a SEG names (Referenced Series Sequence, PS3.3 C.7.4.2)."""
    return [
        str(item.SeriesInstanceUID)
        for item in seg.get("ReferencedSeriesSequence", [])
        if item.get("SeriesInstanceUID")
    ]


def made_by_dicomnode(seg: Dataset) -> bool:
    """The node's own SEG, perhaps re-saved under new UIDs: its manufacturer and creator."""
    return (
        str(seg.get("Manufacturer", "")) == MANUFACTURER
        and str(seg.get("ContentCreatorName", "")) == CONTENT_CREATOR
    )


def _text(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str | int | float):
        return value if not isinstance(value, str) else value.strip()
    try:
        return [str(v) for v in value]
    except TypeError:
        return str(value)


def creator_of(seg: Dataset) -> dict[str, Any]:
    """Who made a SEG: the attributes a viewer or tool writes about itself in the data set
    (the file meta of a spooled file is the node's, written as it was received)."""
    return {
        "manufacturer": _text(seg.get("Manufacturer")),
        "manufacturer_model_name": _text(seg.get("ManufacturerModelName")),
        "software_versions": _text(seg.get("SoftwareVersions")),
        "content_creator_name": str(seg.get("ContentCreatorName", "")),
        "content_label": _text(seg.get("ContentLabel")),
        "series_description": _text(seg.get("SeriesDescription")),
        "segment_labels": [str(s.get("SegmentLabel", "")) for s in seg.get("SegmentSequence", [])],
    }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


class FeedbackCollector:
    """Settles the feedback inbox of one data directory."""

    def __init__(self, db: Database, jobs: JobStore) -> None:
        self.db = db
        self.jobs = jobs
        self.index = Index(db)
        self.inbox = FeedbackInbox(db)
        self.data_dir = db.data_dir
        self.results = results_root(db.data_dir)

    def collect(self, limit: int = 1000) -> list[FeedbackRecord]:
        """Settle every note still ``received``; returns them as settled."""
        settled = []
        for note in self.inbox.records(FeedbackState.RECEIVED, limit=limit):
            try:
                self.settle(note)
            except OSError as exc:  # the copy could not be written: tried again next time
                log.warning("feedback %d: not settled yet: %s", note.id, exc)
                continue
            except TransitionError:  # settled meanwhile by another collector (the node's
                log.debug("feedback %d: settled meanwhile", note.id)  # or a command's)
                continue
            settled.append(self.inbox.get(note.id))
        return settled

    def settle(self, note: FeedbackRecord) -> None:
        versions = self.index.instance_versions(note.sop_instance_uid)
        if not versions or not versions[-1].path.is_file():
            self._reject(note, "the segmentation is no longer in the spool")
            return
        stored = versions[-1]
        try:
            seg = dcmread(stored.path, stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError) as exc:
            self._reject(note, f"cannot be read: {exc}")
            return
        if made_by_dicomnode(seg):
            self._reject(note, "made by a dicomnode (its Manufacturer and Content Creator)")
            return
        series = referenced_series(seg)
        corrected = self.corrected(note, series)
        if corrected is None:
            named = ", ".join(series) or "none (no Referenced Series Sequence)"
            self._reject(note, f"references no series the node processed (series: {named})")
            return
        provenance = self.provenance(note, seg, corrected)
        folder = feedback_root(self.data_dir) / note.study_instance_uid
        images = self.keep_images(note.study_instance_uid, corrected.series_instance_uid, folder)
        provenance["images"] = images
        copy = folder / f"{note.sop_instance_uid}.dcm"
        write_bytes_atomically(copy, stored.path.read_bytes())
        document = json.dumps(provenance, indent=2, sort_keys=True).encode()
        write_bytes_atomically(copy.with_suffix(".json"), document)
        self.inbox.settle(
            note.id,
            FeedbackState.ACCEPTED,
            path=self.db.relative(copy),
            provenance=provenance,
        )
        log.info(
            "feedback %d: a corrected segmentation of job %d (%s %s) from %s kept as training data",
            note.id,
            corrected.job.id,
            corrected.model,
            corrected.model_version,
            note.calling_ae,
        )

    def keep_images(self, study_uid: str, series_uid: str, folder: Path) -> int:
        """Link (else copy) the images of the series into ``folder/<series>/``; returns
        how many it holds."""
        target = folder / series_uid
        target.mkdir(parents=True, exist_ok=True)
        count = 0
        for instance in self.index.latest_instances(study_uid, driving=True):
            if instance.series_instance_uid != series_uid or not instance.path.is_file():
                continue
            dest = target / f"{instance.sop_instance_uid}.dcm"
            if not dest.exists():
                try:
                    os.link(instance.path, dest)
                except FileExistsError:  # linked meanwhile by another collector
                    pass
                except OSError:  # another file system: a copy
                    copy_atomically(instance.path, target).rename(dest)
            count += 1
        fsync_dir(target)
        return count

    def corrected(self, note: FeedbackRecord, series: Sequence[str]) -> Corrected | None:
        """The node's latest SEG, made before the correction came, of a series the
        correction references; None when the node processed none of them."""
        found: list[Corrected] = []
        for job in self.jobs.for_study(note.study_instance_uid):
            for uid in series:
                if uid not in job.series_uids:
                    continue
                path = result_files(job_folder(self.results, job.id), uid, job.route).segmentation
                if not path.is_file():
                    continue
                ds = dcmread(path, stop_before_pixels=True)
                found.append(
                    Corrected(
                        job,
                        uid,
                        path,
                        str(ds.SOPInstanceUID),
                        str(ds.get("ManufacturerModelName", "")),
                        str(ds.get("SoftwareVersions", "")),
                    )
                )
        if not found:
            return None
        before = [c for c in found if c.job.created_at <= note.received_at] or found
        return max(before, key=lambda c: (c.job.created_at, c.job.id))

    def provenance(
        self, note: FeedbackRecord, seg: Dataset, corrected: Corrected
    ) -> dict[str, Any]:
        return {
            "feedback_id": note.id,
            "sop_instance_uid": note.sop_instance_uid,
            "study_instance_uid": note.study_instance_uid,
            "series_instance_uid": note.series_instance_uid,
            "source_series_instance_uid": corrected.series_instance_uid,
            "corrects": {
                "job_id": corrected.job.id,
                "route": corrected.job.route,
                "generation": corrected.job.generation,
                "segmentation_sop_instance_uid": corrected.sop_instance_uid,
                "model": corrected.model,
                "model_version": corrected.model_version,
            },
            "received": {
                "at": _iso(note.received_at),
                "calling_ae": note.calling_ae,
                "calling_host": note.calling_host,
            },
            "creator": creator_of(seg),
        }

    def _reject(self, note: FeedbackRecord, reason: str) -> None:
        self.inbox.settle(note.id, FeedbackState.REJECTED, reason=reason)
        log.info("feedback %d: not a correction of the node's work: %s", note.id, reason)
