"""Study completeness and job creation.

A study is complete once no instance of it has arrived for the quiet period (association
close alone never completes a study: some PACS open one association per image).  The
timer is the study's ``last_received_at`` in the index, so it survives a restart.  At
completion the study's series are matched against the routes and one job per matching
route is created, in the same transaction that marks the study complete; a study that no
route matches is recorded as ignored with the reasons.

When the study's headers cannot be read (a spooled file missing or unreadable, a full
file system), that is not "no route matched": the study stays ``receiving`` with the error
recorded and is tried again with back-off, so the cause is visible and nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence

from dicomnode.audit import AuditLog
from dicomnode.config import RetrySettings
from dicomnode.jobs.store import REQUEST_RANKS, JobStore
from dicomnode.routing.rules import SeriesInfo
from dicomnode.routing.select import (
    RouteLike,
    explain,
    match_routes,
    request_priority,
    series_infos,
)
from dicomnode.spool.index import Index, InstanceRecord, StudyState

log = logging.getLogger(__name__)

#: Back-off of a study whose headers could not be read: 2 s doubling up to 5 minutes.
ROUTING_RETRY = RetrySettings(max_attempts=1_000_000, backoff_initial_s=2.0, backoff_max_s=300.0)


def inputs_digest(instances: Sequence[InstanceRecord], series_uids: Sequence[str]) -> str:
    """A digest of the instances (UID and version) of the given series: equal digests mean
    a job would read exactly the same images."""
    wanted = set(series_uids)
    keys = sorted(
        f"{i.series_instance_uid}/{i.sop_instance_uid}/{i.version}"
        for i in instances
        if i.series_instance_uid in wanted
    )
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


class Scheduler:
    def __init__(
        self,
        index: Index,
        jobs: JobStore,
        routes: Sequence[RouteLike],
        quiet_period_s: float,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit or AuditLog(None)
        self.index = index
        self.jobs = jobs
        self.routes = routes
        self.quiet_period_s = quiet_period_s

    def _route_priority(self, name: str) -> str:
        """The route's own least priority (``priority = "STAT"`` in its configuration)."""
        route = next((r for r in self.routes if r.name == name), None)
        return str(getattr(route, "priority", "ROUTINE"))

    def tick(self, now: float | None = None) -> list[int]:
        """Complete every quiet study; returns the ids of the jobs created."""
        created: list[int] = []
        for study_uid in self.index.quiet_studies(self.quiet_period_s, now):
            created.extend(self.complete(study_uid, now))
        return created

    def _read_series(self, study_uid: str) -> tuple[list[InstanceRecord], list[SeriesInfo]] | None:
        instances = self.index.latest_instances(study_uid, driving=True)
        try:
            infos = series_infos((i.series_instance_uid, i.path) for i in instances)
        except Exception as exc:  # an unreadable header must not stall the scheduler
            error = f"cannot read the study's headers: {type(exc).__name__}: {exc}"
            delay = self.index.routing_failed(study_uid, error, ROUTING_RETRY.delay)
            log.error("study not routed yet (%s); trying again in %.0f s", error, delay)
            self.audit.record(
                "study", outcome="routing_failed", study_instance_uid=study_uid, error=error[:300]
            )
            return None
        return instances, infos

    def complete(self, study_uid: str, now: float | None = None) -> list[int]:
        read = self._read_series(study_uid)
        if read is None:
            return []
        instances, infos = read
        count = len(instances)
        matches = match_routes(self.routes, infos)
        created: list[int] = []
        unchanged: list[str] = []
        cutoff = (time.time() if now is None else now) - self.quiet_period_s
        with self.index.db.transaction() as conn:
            study = self.index.study(study_uid, conn)
            if (
                study is None
                or study.state != StudyState.RECEIVING
                or study.last_received_at > cutoff
            ):
                return []  # an instance arrived meanwhile: wait for the next quiet period
            for m in matches:
                digest = inputs_digest(instances, m.series_uids)
                earlier = self.jobs.ran_with_inputs(conn, study_uid, m.route, digest)
                if earlier is not None:
                    unchanged.append(f"{m.route} (no new images since job {earlier})")
                    continue
                selected = [i for i in infos if i.series_instance_uid in m.series_uids]
                rank = max(
                    REQUEST_RANKS[request_priority(selected)],
                    REQUEST_RANKS[self._route_priority(m.route)],
                )
                job_id = self.jobs.create(
                    conn,
                    study_uid,
                    m.route,
                    study.generation,
                    list(m.series_uids),
                    list(m.destinations),
                    digest,
                    request_priority=rank,
                )
                if job_id is not None:
                    created.append(job_id)
            if matches:
                note = "routes: " + ", ".join(m.route for m in matches)
                if unchanged:
                    note += "; unchanged: " + ", ".join(unchanged)
                state = StudyState.COMPLETE
            else:
                reasons = [
                    f"{e.route}: {r}"
                    for e in explain(self.routes, infos)
                    for r in e.verdict.reasons
                ]
                note = "no route matched" + (": " + "; ".join(reasons[:6]) if reasons else "")
                state = StudyState.IGNORED
            self.index.finish_study(conn, study_uid, state, note)
        self.audit.record(
            "study",
            outcome=str(state),
            study_instance_uid=study_uid,
            instances=count,
            jobs=created,
            note=note[:300],
        )
        series = len({i.series_instance_uid for i in instances})
        if matches:
            routed = "; ".join(
                f"route {m.route} -> pipeline {m.pipeline} ({len(m.series_uids)} series)"
                for m in matches
            )
            log.info(
                "study %s complete: %d series, %d instances; %s; job(s) %s%s",
                study_uid,
                series,
                count,
                routed,
                ", ".join(map(str, created)) or "none",
                f"; unchanged: {', '.join(unchanged)}" if unchanged else "",
            )
        else:
            log.info(
                "study %s complete: %d series, %d instances; ignored: %s",
                study_uid,
                series,
                count,
                note,
            )
        return created
