"""Batch conversion: a folder tree of DICOM in, SEG + SR per study out.

Uses the node's own routing and :class:`~dicomnode.app.processor.Processor`, so results are
the same objects the node would send.  A study is done when its ``result.json`` exists;
a second run skips it (resume).  Non-DICOM files are skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dicomnode.app.processor import Processor
from dicomnode.config import Config
from dicomnode.errors import DicomNodeError
from dicomnode.fsutil import write_bytes_atomically
from dicomnode.outputs.layout import result_files
from dicomnode.routing.select import match_routes, scan_folder, series_infos

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _progress(stream: TextIO, done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:40]:<40}")
    stream.flush()


def run_batch(
    config: Config, input_dir: Path, output_dir: Path, stream: TextIO = sys.stderr
) -> BatchSummary:
    started = time.perf_counter()
    studies = scan_folder(input_dir)
    processor = Processor(config)
    summary = BatchSummary()
    output_dir.mkdir(parents=True, exist_ok=True)
    for n, (study_uid, series) in enumerate(sorted(studies.items()), start=1):
        _progress(stream, n - 1, len(studies), study_uid[-24:])
        study_out = output_dir / study_uid
        if (study_out / RESULT_FILE).is_file():
            summary.skipped.append(study_uid)
            continue
        try:
            infos = series_infos((uid, p) for uid, paths in series.items() for p in paths)
            matches = match_routes(config.routes, infos)
            if not matches:
                summary.ignored.append(study_uid)
                log.info("study %s: no route matched", study_uid)
                continue
            results = []
            for m in matches:
                for series_uid in m.series_uids:
                    out = processor.process_series(
                        series[series_uid],
                        m.pipeline,
                        result_files(study_out, series_uid, m.route),
                        uid_seed=f"batch/{study_uid}/{m.route}/{series_uid}",
                    )
                    results.append(
                        {
                            "route": m.route,
                            **out.summary,
                            "seg": out.segmentation.name if out.segmentation else None,
                            "sr": out.report.name,
                        }
                    )
            document = json.dumps({"results": results}, indent=2).encode()
            write_bytes_atomically(study_out / RESULT_FILE, document)
            summary.done.append(study_uid)
        except DicomNodeError as exc:
            summary.failed[study_uid] = f"{type(exc).__name__}: {exc}"
            log.error("study %s failed: %s", study_uid, exc)
        except Exception as exc:  # one broken study must not stop the batch
            summary.failed[study_uid] = f"unexpected {type(exc).__name__}: {exc}"
            log.exception("study %s crashed", study_uid)
    _progress(stream, len(studies), len(studies), "finished")
    stream.write("\n")
    summary.seconds = time.perf_counter() - started
    return summary
