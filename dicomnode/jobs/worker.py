"""The job loop: claim, process, record; errors back off or dead-letter.

``process`` is handed in by the caller (the node wires it to :mod:`dicomnode.processing`),
so this layer knows nothing of images or models.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dicomnode.audit import AuditLog
from dicomnode.errors import DicomNodeError
from dicomnode.jobs.queue import FAILED, Job, JobQueue

log = logging.getLogger(__name__)

ProcessFn = Callable[[Job], tuple[list[tuple[str, Path]], str]]


def run_one(queue: JobQueue, process: ProcessFn, audit: AuditLog | None = None) -> Job | None:
    """Claim and run one due job, if any; returns it (as claimed) or None."""
    audit = audit or AuditLog(None)
    job = queue.claim()
    if job is None:
        return None
    audit.record(
        "job",
        job_id=job.id,
        state="running",
        attempt=job.attempts,
        route=job.route,
        study_instance_uid=job.study_instance_uid,
        generation=job.generation,
    )
    log.info(
        "job %d: %s generation %d, attempt %d", job.id, job.route, job.generation, job.attempts
    )
    try:
        outputs, summary = process(job)
    except DicomNodeError as exc:
        state = queue.fail(job.id, f"{type(exc).__name__}: {exc}", transient=exc.transient)
        (log.error if state == FAILED else log.warning)("job %d: %s -> %s", job.id, exc, state)
        audit.record("job", job_id=job.id, state=state, error=f"{type(exc).__name__}: {exc}"[:300])
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise  # the process is being stopped: recover() re-queues the job at next start
    except BaseException as exc:  # e.g. a native decoder's panic (pyo3 PanicException)
        log.exception("job %d crashed", job.id)
        state = queue.fail(job.id, f"unexpected {type(exc).__name__}: {exc}", transient=True)
        log.warning("job %d -> %s", job.id, state)
        audit.record("job", job_id=job.id, state=state, error=f"{type(exc).__name__}"[:300])
    else:
        queue.finish_processing(job.id, outputs, summary)
        log.info("job %d: %d file(s) queued for delivery", job.id, len(outputs))
        audit.record(
            "job", job_id=job.id, state="sending" if outputs else "done", outputs=len(outputs)
        )
    return job


def work(
    queue: JobQueue,
    process: ProcessFn,
    stop: threading.Event,
    poll_s: float = 0.2,
    audit: AuditLog | None = None,
) -> None:
    """Run jobs until ``stop`` is set; a job in progress is always finished first."""
    while not stop.is_set():
        if run_one(queue, process, audit) is None:
            stop.wait(poll_s)
