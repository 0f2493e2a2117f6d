"""Where result files live: the one definition of the results-folder layout.

Node results: ``<data_dir>/results/job-<id>/<series>-<route>-seg.dcm`` (and ``-pm.dcm``, the
heat map; ``-ko.dcm``, the key images; ``-sr.dcm``);
folder destinations copy them to ``<folder>/job-<id>/``; batch conversion writes
``<out>/<study>/<series>-<route>-seg.dcm``.  The route is part of the name, so two routes
on one series never overwrite each other's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = "results"


@dataclass(frozen=True)
class ResultFiles:
    """The files one (series, route) produces in a folder."""

    segmentation: Path
    report: Path
    #: The heat map (Parametric Map), when the pipeline makes one.
    heat_map: Path
    #: The key images (Key Object Selection), when the result has findings.
    key_images: Path

    def heat_map_of(self, index: int) -> Path:
        """Heat map ``index`` (0-based): ``-pm.dcm``, then ``-pm2.dcm``, ``-pm3.dcm`` ..."""
        if index == 0:
            return self.heat_map
        return self.heat_map.with_name(self.heat_map.name.replace("-pm.dcm", f"-pm{index + 1}.dcm"))


def job_folder(root: Path, job_id: int) -> Path:
    """``root/job-<id>``: a job's results under the data directory's results folder, or
    under a folder destination."""
    return root / f"job-{job_id}"


def results_root(data_dir: Path) -> Path:
    return data_dir / RESULTS_DIR


def result_files(folder: Path, series_uid: str, route: str) -> ResultFiles:
    stem = f"{series_uid}-{route}"
    return ResultFiles(
        folder / f"{stem}-seg.dcm",
        folder / f"{stem}-sr.dcm",
        folder / f"{stem}-pm.dcm",
        folder / f"{stem}-ko.dcm",
    )


#: Notifications about a job's results (the HL7 ORU): sent once the results are answered.
NOTIFICATION_SUFFIX = ".hl7"


def notification_file(folder: Path, route: str) -> Path:
    """``<folder>/<route>-oru.hl7``: the job's result message for the RIS."""
    return folder / f"{route}-oru{NOTIFICATION_SUFFIX}"
