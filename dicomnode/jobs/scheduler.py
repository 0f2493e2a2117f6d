"""Study completeness and job creation.

A study is complete once no instance of it has arrived for the quiet period (association
close alone never completes a study: some PACS open one association per image).  The
timer is the ``last_received_at`` column of the index, so it survives a restart.  At
completion the study's series are matched against the routes and one job per matching
route is created, in the same transaction that marks the study complete; a study that no
route matches is recorded as ignored with the reasons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from dicomnode.audit import AuditLog
from dicomnode.jobs.queue import JobQueue
from dicomnode.routing.select import RouteLike, explain, match_routes, series_infos
from dicomnode.spool.index import Index

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        index: Index,
        queue: JobQueue,
        routes: Sequence[RouteLike],
        quiet_period_s: float,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit or AuditLog(None)
        self.index = index
        self.queue = queue
        self.routes = routes
        self.quiet_period_s = quiet_period_s

    def tick(self, now: float | None = None) -> list[int]:
        """Complete every quiet study; returns the ids of the jobs created."""
        created: list[int] = []
        for study_uid in self.index.quiet_studies(self.quiet_period_s, now):
            created.extend(self.complete(study_uid, now))
        return created

    def complete(self, study_uid: str, now: float | None = None) -> list[int]:
        instances = self.index.latest_instances(study_uid)
        try:
            infos = series_infos((i.series_instance_uid, i.path) for i in instances)
        except Exception as exc:  # an unreadable header must not stall the scheduler
            log.error("study could not be routed: %s", exc)
            infos = []
        matches = match_routes(self.routes, infos)
        created: list[int] = []
        cutoff = (time.time() if now is None else now) - self.quiet_period_s
        with self.index.transaction() as conn:
            row = conn.execute(
                "SELECT state, generation, last_received_at FROM studies "
                "WHERE study_instance_uid = ?",
                (study_uid,),
            ).fetchone()
            if row is None or row["state"] != "receiving" or row["last_received_at"] > cutoff:
                return []  # an instance arrived meanwhile: wait for the next quiet period
            for m in matches:
                job_id = self.queue.create(
                    conn,
                    study_uid,
                    m.route,
                    row["generation"],
                    list(m.series_uids),
                    list(m.destinations),
                )
                if job_id is not None:
                    created.append(job_id)
            if matches:
                note = "routes: " + ", ".join(m.route for m in matches)
                state = "complete"
            else:
                reasons = [
                    f"{e.route}: {r}"
                    for e in explain(self.routes, infos)
                    for r in e.verdict.reasons
                ]
                note = "no route matched" + (": " + "; ".join(reasons[:6]) if reasons else "")
                state = "ignored"
            conn.execute(
                "UPDATE studies SET state = ?, completed_at = ?, note = ? "
                "WHERE study_instance_uid = ?",
                (state, time.time(), note[:2000], study_uid),
            )
        self.audit.record(
            "study",
            outcome=state,
            study_instance_uid=study_uid,
            instances=len(instances),
            jobs=created,
            note=note[:300],
        )
        if matches:
            log.info("study complete (%d instances): jobs %s", len(instances), created)
        else:
            log.info("study complete (%d instances) and ignored: %s", len(instances), note)
        return created
