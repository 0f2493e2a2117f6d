"""Study completeness and job creation.

A study is complete once no instance of it has arrived for the quiet period (association
close alone never completes a study: some PACS open one association per image).  The
timer is the study's ``last_received_at`` in the index, so it survives a restart.  At
completion the study's series are matched against the routes and one job per matching
route is created, in the same transaction that marks the study complete; a study that no
route matches is recorded as ignored with the reasons.

A study can complete sooner, by count: when its sender is a configured remote that
answers C-FIND, :class:`SenderCounts` asks it (off the scheduler's thread) how many
instances the study holds, at the study's first arrival and after each lull in arrivals,
and the study is complete as soon as the node holds that many distinct instances.  A
sender that does not answer (rejected, C-FIND not accepted, a failure, no count, no answer
in time) leaves the study to the quiet period and is not asked again before a back-off.
The study note, the log line and the audit record say which of the two completed it.

When the study's headers cannot be read (a spooled file missing or unreadable, a full
file system), that is not "no route matched": the study stays ``receiving`` with the error
recorded and is tried again with back-off, so the cause is visible and nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from dicomnode.audit import AuditLog
from dicomnode.config import Remote, RetrySettings, TlsSettings
from dicomnode.jobs.store import REQUEST_RANKS, JobStore
from dicomnode.net.scu import Peer, StudyCount, count_study_instances
from dicomnode.net.tls import client_context
from dicomnode.routing.rules import SeriesInfo
from dicomnode.routing.select import (
    RouteLike,
    RouteMatch,
    explain,
    match_routes,
    request_priority,
    series_infos,
)
from dicomnode.spool.index import Index, InstanceRecord, StudyRecord, StudyState

log = logging.getLogger(__name__)

#: Back-off of a study whose headers could not be read: 2 s doubling up to 5 minutes.
ROUTING_RETRY = RetrySettings(max_attempts=1_000_000, backoff_initial_s=2.0, backoff_max_s=300.0)

#: Back-off of a remote that did not say how many instances a study holds: 30 s doubling
#: up to an hour (a storage-only sender is asked about once an hour, not once per study).
ASK_RETRY = RetrySettings(max_attempts=1_000_000, backoff_initial_s=30.0, backoff_max_s=3600.0)

#: Counts a study's instances at a remote: (peer, calling AE title, Study Instance UID).
CountFunction = Callable[[Peer, str, str], StudyCount]


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


@dataclass(frozen=True)
class CountedStudy:
    """A study the node holds completely by its sender's count."""

    study_instance_uid: str
    held: int
    expected: int
    remote: str

    @property
    def basis(self) -> str:
        return f"by count ({self.remote} holds {self.expected} instances, the node {self.held})"


@dataclass
class _Inquiry:
    """What was asked about one generation of a study, and the latest count."""

    generation: int
    remote: Remote
    asked_for: float | None = None  # the study's last_received_at when last asked
    expected: int | None = None


@dataclass
class _Refusals:
    """A remote that did not answer: how often in a row, and when to ask it again."""

    count: int = 0
    retry_at: float = 0.0


class SenderCounts:
    """Asks a study's sender how many instances the study holds, and says which studies
    the node holds completely.

    The sender is the configured remote whose AE title (preferably also host) sent the
    study's latest instance.  It is asked (:func:`~dicomnode.net.scu.count_study_instances`,
    in a small thread pool: the scheduler's loop never waits on the network) at the study's
    first tick and again after each lull: ``lull_s`` without arrivals, if instances arrived
    since the last question; one question at a time per remote.  A remote that does not
    answer with a count is asked nothing more before its back-off (:data:`ASK_RETRY`) is
    over.  What was asked lives in memory:
    after a restart the quiet period starts over and the sender is asked again."""

    def __init__(
        self,
        index: Index,
        remotes: Sequence[Remote],
        calling_ae: str,
        lull_s: float,
        tls: TlsSettings | None = None,
        count: CountFunction = count_study_instances,
        audit: AuditLog | None = None,
        threads: int = 2,
    ) -> None:
        self.index = index
        self.remotes = tuple(remotes)
        self.calling_ae = calling_ae
        self.lull_s = lull_s
        self.tls = tls
        self._count = count
        self._inquiries: dict[str, _Inquiry] = {}
        self._refusals: dict[str, _Refusals] = {}
        #: remote name -> the question it is asked (study, inquiry, answer to come)
        self._asking: dict[str, tuple[str, _Inquiry, Future[StudyCount]]] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="study-count")
        self.audit = audit or AuditLog(None)

    def close(self) -> None:
        """Stop asking: questions not started are dropped (those under way end by their
        remote's timeout)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait_for_answers(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the questions under way (the next
        :meth:`complete_studies` takes their answers)."""
        wait([future for _, _, future in self._asking.values()], timeout)

    def remote_of(self, study: StudyRecord) -> Remote | None:
        """The configured remote that sent the study, by calling AE title (a remote with
        the calling host too, when several share the title)."""
        named = [r for r in self.remotes if r.ae_title == study.calling_ae]
        same_host = [r for r in named if r.host == study.calling_host]
        return next(iter(same_host or named), None)

    def complete_studies(self, now: float) -> list[CountedStudy]:
        """Studies still receiving of which the node holds every instance their sender
        counted; questions are sent and answers collected on the way."""
        for name, (uid, inquiry, future) in list(self._asking.items()):  # answers first
            if future.done():
                del self._asking[name]
                self._answered(uid, inquiry, future.result(), now)
        receiving = self.index.studies(StudyState.RECEIVING)
        current = {s.study_instance_uid for s in receiving}
        for uid in [u for u in self._inquiries if u not in current]:
            del self._inquiries[uid]  # complete (by the quiet period) or removed
        counted = [self._check(study, now) for study in receiving]
        return [c for c in counted if c is not None]

    def _check(self, study: StudyRecord, now: float) -> CountedStudy | None:
        remote = self.remote_of(study)
        if remote is None:
            return None
        uid = study.study_instance_uid
        inquiry = self._inquiries.get(uid)
        if inquiry is None or (inquiry.generation, inquiry.remote) != (study.generation, remote):
            inquiry = self._inquiries[uid] = _Inquiry(study.generation, remote)
        if inquiry.expected is not None and study.next_attempt_at <= now:
            held = self.index.instance_count(uid)
            if held >= inquiry.expected:
                return CountedStudy(uid, held, inquiry.expected, remote.ae_title)
        if self._due(study, inquiry, remote, now):
            inquiry.asked_for = study.last_received_at
            self._asking[remote.name] = (uid, inquiry, self._pool.submit(self._ask, remote, uid))
        return None

    def _due(self, study: StudyRecord, inquiry: _Inquiry, remote: Remote, now: float) -> bool:
        """The remote neither backing off nor busy with a question whose answer is not
        taken yet (one at a time), and the study never asked about or a lull since."""
        refusals = self._refusals.get(remote.name)
        if refusals is not None and refusals.retry_at > now:
            return False
        if remote.name in self._asking:
            return False
        if inquiry.asked_for is None:
            return True
        lull = now - study.last_received_at >= self.lull_s
        return lull and study.last_received_at != inquiry.asked_for

    def _ask(self, remote: Remote, study_uid: str) -> StudyCount:
        """In a pool thread: the remote's count, or why there is none."""
        try:
            context = client_context(self.tls) if remote.tls and self.tls is not None else None
            peer = Peer(remote.ae_title, remote.host, remote.port, remote.timeout_s, context)
            return self._count(peer, self.calling_ae, study_uid)
        except Exception as exc:  # the question must never stop the scheduler
            return StudyCount(None, f"{type(exc).__name__}: {exc}", refused=True)

    def _answered(self, uid: str, inquiry: _Inquiry, answer: StudyCount, now: float) -> None:
        remote = inquiry.remote
        if answer.instances is not None:
            self._refusals.pop(remote.name, None)
            inquiry.expected = answer.instances
            log.info(
                "study %s: %s holds %d instance(s); complete once the node holds them all",
                uid,
                remote.ae_title,
                answer.instances,
            )
            self.audit.record(
                "study_count",
                outcome="answered",
                study_instance_uid=uid,
                remote=remote.name,
                instances=answer.instances,
            )
            return
        self.audit.record(
            "study_count",
            outcome="refused" if answer.refused else "no_count",
            study_instance_uid=uid,
            remote=remote.name,
            reason=answer.problem[:300],
        )
        if not answer.refused:
            log.info("study %s: %s gave no count (%s)", uid, remote.ae_title, answer.problem)
            return
        refusals = self._refusals.setdefault(remote.name, _Refusals())
        refusals.count += 1
        delay = ASK_RETRY.delay(refusals.count)
        refusals.retry_at = now + delay
        log.info(
            "%s does not say how many instances a study holds (%s); its studies complete "
            "after the quiet period; asking it again in %.0f s",
            remote.ae_title,
            answer.problem,
            delay,
        )


class Scheduler:
    def __init__(
        self,
        index: Index,
        jobs: JobStore,
        routes: Sequence[RouteLike],
        quiet_period_s: float,
        audit: AuditLog | None = None,
        counts: SenderCounts | None = None,
    ) -> None:
        self.audit = audit or AuditLog(None)
        self.index = index
        self.jobs = jobs
        self.routes = routes
        self.quiet_period_s = quiet_period_s
        self.counts = counts

    def close(self) -> None:
        """Stop asking senders (the node is stopping)."""
        if self.counts is not None:
            self.counts.close()

    def _route_priority(self, name: str) -> str:
        """The route's own least priority (``priority = "STAT"`` in its configuration)."""
        route = next((r for r in self.routes if r.name == name), None)
        return str(getattr(route, "priority", "ROUTINE"))

    def tick(self, now: float | None = None) -> list[int]:
        """Complete every quiet study, and every study the node holds completely by its
        sender's count; returns the ids of the jobs created."""
        now = time.time() if now is None else now
        created: list[int] = []
        for study_uid in self.index.quiet_studies(self.quiet_period_s, now):
            created.extend(self.complete(study_uid, now))
        if self.counts is not None:
            for counted in self.counts.complete_studies(now):
                created.extend(self.complete(counted.study_instance_uid, now, counted))
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

    def _still_due(
        self,
        conn: sqlite3.Connection,
        study: StudyRecord,
        now: float,
        counted: CountedStudy | None,
    ) -> bool:
        """Inside the completing transaction: the study is receiving and either quiet, or
        (by count) holds just what was counted: an instance that arrived meanwhile sends it
        to the next tick, so the headers read are those of every instance."""
        if study.state != StudyState.RECEIVING:
            return False
        if counted is None:
            return study.last_received_at <= now - self.quiet_period_s
        return self.index.instance_count(study.study_instance_uid, conn) == counted.held

    def _create_jobs(
        self,
        conn: sqlite3.Connection,
        study: StudyRecord,
        instances: list[InstanceRecord],
        infos: list[SeriesInfo],
        matches: list[RouteMatch],
    ) -> tuple[list[int], list[str]]:
        """One job per matching route whose inputs changed: (job ids, unchanged routes)."""
        created: list[int] = []
        unchanged: list[str] = []
        study_uid = study.study_instance_uid
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
        return created, unchanged

    def complete(
        self, study_uid: str, now: float | None = None, counted: CountedStudy | None = None
    ) -> list[int]:
        """Route a study and create its jobs, if it is still due: quiet, or (``counted``)
        held completely by its sender's count."""
        now = time.time() if now is None else now
        read = self._read_series(study_uid)
        if read is None:
            return []
        instances, infos = read
        matches = match_routes(self.routes, infos)
        basis = counted.basis if counted else f"after the {self.quiet_period_s:g} s quiet period"
        with self.index.db.transaction() as conn:
            study = self.index.study(study_uid, conn)
            if study is None or not self._still_due(conn, study, now, counted):
                return []  # an instance arrived meanwhile: wait for the next tick
            created, unchanged = self._create_jobs(conn, study, instances, infos, matches)
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
            self.index.finish_study(conn, study_uid, state, f"{note}; completed {basis}")
        self.audit.record(
            "study",
            outcome=str(state),
            study_instance_uid=study_uid,
            instances=len(instances),
            jobs=created,
            completed_by="count" if counted else "quiet_period",
            sender_instances=counted.expected if counted else None,
            note=note[:300],
        )
        self._log_complete(study_uid, instances, matches, created, unchanged, basis, note)
        return created

    @staticmethod
    def _log_complete(
        study_uid: str,
        instances: list[InstanceRecord],
        matches: list[RouteMatch],
        created: list[int],
        unchanged: list[str],
        basis: str,
        note: str,
    ) -> None:
        series = len({i.series_instance_uid for i in instances})
        if matches:
            routed = "; ".join(
                f"route {m.route} -> pipeline {m.pipeline} ({len(m.series_uids)} series)"
                for m in matches
            )
            log.info(
                "study %s complete: %d series, %d instances, %s; %s; job(s) %s%s",
                study_uid,
                series,
                len(instances),
                basis,
                routed,
                ", ".join(map(str, created)) or "none",
                f"; unchanged: {', '.join(unchanged)}" if unchanged else "",
            )
        else:
            log.info(
                "study %s complete: %d series, %d instances, %s; ignored: %s",
                study_uid,
                series,
                len(instances),
                basis,
                note,
            )
