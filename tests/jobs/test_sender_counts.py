"""Completion by count: the sender says how many instances a study holds (C-FIND), the
study is complete once the node holds them all; a sender that does not say leaves the
study to the quiet period and is not asked again before its back-off.

The sender's answers come from a stand-in for :func:`dicomnode.net.scu.count_study_instances`
(the real C-FIND is tested against Orthanc in tests/integration/test_complete_by_count.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicomnode.audit import AuditLog, read_audit
from dicomnode.config import Remote, RetrySettings, Route
from dicomnode.db import Database
from dicomnode.jobs.scheduler import ASK_RETRY, Scheduler, SenderCounts
from dicomnode.jobs.store import JobStore
from dicomnode.net.scu import Peer, StudyCount
from dicomnode.routing.rules import parse_rule
from dicomnode.spool.index import Index, StudyState
from dicomnode.spool.store import Spool
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

ROUTES = (Route("ct", "lesion", ("pacs",), parse_rule([{"Modality": "CT"}])),)
REMOTES = (Remote("pacs", "PACS", "127.0.0.1", 9, 5.0),)
QUIET = 120.0
LULL = 2.0


@dataclass
class Sender:
    """Answers the node's questions with ``answers`` in turn (the last one repeats)."""

    answers: list[StudyCount]
    asked: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, peer: Peer, calling_ae: str, study_uid: str) -> StudyCount:
        with self.lock:
            self.asked.append((peer.ae_title, calling_ae, study_uid))
            return self.answers[min(len(self.asked), len(self.answers)) - 1]


@dataclass
class Setup:
    spool: Spool
    jobs: JobStore
    scheduler: Scheduler
    counts: SenderCounts
    audit_path: Path

    def store(self, data: list[bytes], calling_ae: str = "PACS") -> None:
        for item in data:
            self.spool.store(item, calling_ae=calling_ae, calling_host="127.0.0.1")

    def tick(self, now: float | None = None) -> list[int]:
        """One scheduler tick, then the sender's answers awaited (for the next tick)."""
        created = self.scheduler.tick(now)
        self.counts.wait_for_answers(5.0)
        return created

    def study(self) -> tuple[str, StudyState, str]:
        study = self.spool.index.studies()[0]
        return study.study_instance_uid, study.state, study.note

    def audit(self, event: str) -> list[dict[str, object]]:
        return [r for r in read_audit(self.audit_path) if r["event"] == event]


@pytest.fixture
def study(tmp_path: Path) -> list[bytes]:
    return phantom_study(tmp_path / "in")


Make = Callable[[Sender], Setup]


def phantom_study(folder: Path, seed: int = 0) -> list[bytes]:
    spec = PhantomSpec(rows=32, columns=32, slices=6, lesions=(), seed=seed)
    files = write_phantom(generate_phantom(spec), folder)
    return [p.read_bytes() for p in files]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[SenderCounts] = []

    def build(sender: Sender) -> Setup:
        index = Index(Database(tmp_path / "data"))
        jobs = JobStore(index.db, RetrySettings())
        spool = Spool(tmp_path / "data", index, min_free_bytes=0, rerun_late=True)
        audit = AuditLog(tmp_path / "audit.jsonl")
        counts = SenderCounts(index, REMOTES, "DICOMNODE", LULL, count=sender, audit=audit)
        made.append(counts)
        scheduler = Scheduler(index, jobs, ROUTES, QUIET, audit, counts=counts)
        return Setup(spool, jobs, scheduler, counts, tmp_path / "audit.jsonl")

    yield build
    for counts in made:
        counts.close()


def test_partial_study_waits_and_the_last_instance_completes_it_by_count(
    make: Make, study: list[bytes]
) -> None:
    # Given a sender that holds 6 instances of the study, 3 of them received
    sender = Sender([StudyCount(6)])
    node = make(sender)
    node.store(study[:3])

    # When the scheduler ticks (it asks once), the study is not complete with 3 of 6
    assert node.tick() == []
    assert node.tick() == []
    assert node.study()[1] == StudyState.RECEIVING
    assert len(sender.asked) == 1
    uid = node.study()[0]
    assert sender.asked == [("PACS", "DICOMNODE", uid)]

    # When the other 3 arrive, the next tick completes it, long before the quiet period
    node.store(study[3:])
    (job_id,) = node.tick()
    _, state, note = node.study()
    assert state == StudyState.COMPLETE
    assert note.endswith("completed by count (PACS holds 6 instances, the node 6)")
    assert node.jobs.get(job_id).study_instance_uid == uid
    (record,) = node.audit("study")
    assert record["completed_by"] == "count" and record["sender_instances"] == 6
    assert [r["outcome"] for r in node.audit("study_count")] == ["answered"]
    assert len(sender.asked) == 1  # no lull, no second question


def test_more_instances_held_than_counted_completes(make: Make, study: list[bytes]) -> None:
    # Given a sender that counts 4 instances while the node holds all 6
    node = make(Sender([StudyCount(4)]))
    node.store(study)

    # When the scheduler asks and then ticks again, the study is complete
    assert node.tick() == []
    assert len(node.tick()) == 1
    assert node.study()[1] == StudyState.COMPLETE


def test_a_refusal_leaves_the_quiet_period_and_backs_off(
    make: Make, study: list[bytes], tmp_path: Path
) -> None:
    # Given a sender that does not take C-FIND
    sender = Sender([StudyCount(None, "Study Root C-FIND not accepted", refused=True)])
    node = make(sender)
    node.store(study[:3])
    start = time.time()

    # When it refused the first question
    assert node.tick(start) == []
    assert len(sender.asked) == 1

    # Then neither a lull after new arrivals nor the next tick ask it again...
    node.store(study[3:])
    refused_at = time.time() + LULL  # the tick that takes the refusal
    assert node.tick(refused_at) == []
    assert node.tick(refused_at + 1) == []
    assert len(sender.asked) == 1
    assert node.study()[1] == StudyState.RECEIVING

    # ...the quiet period completes the study...
    assert len(node.tick(time.time() + QUIET + 1)) == 1
    _, state, note = node.study()
    assert state == StudyState.COMPLETE
    assert note.endswith(f"completed after the {QUIET:g} s quiet period")
    (record,) = node.audit("study")
    assert record["completed_by"] == "quiet_period"
    assert [r["outcome"] for r in node.audit("study_count")] == ["refused"]

    # ...and the sender is asked about its next study only once its back-off is over
    node.store(phantom_study(tmp_path / "next", seed=1))
    assert node.tick(refused_at + ASK_RETRY.backoff_initial_s - 1) == []
    assert len(sender.asked) == 1
    assert node.tick(refused_at + ASK_RETRY.backoff_initial_s + 1) == []
    assert len(sender.asked) == 2


def test_a_lull_with_new_arrivals_asks_again(make: Make, study: list[bytes]) -> None:
    # Given a sender still receiving the study: it counts 9 at first, then 5
    sender = Sender([StudyCount(9), StudyCount(5)])
    node = make(sender)
    node.store(study[:3])
    assert node.tick() == []

    # When 2 more arrive and nothing after them for the lull
    node.store(study[3:5])
    assert node.tick() == []  # no lull yet: not asked
    assert len(sender.asked) == 1
    assert node.tick(time.time() + LULL) == []  # the lull: asked again, answer taken next

    # Then the new count (5) completes the study at the next tick
    assert len(sender.asked) == 2
    assert len(node.tick(time.time() + LULL)) == 1
    assert node.study()[1] == StudyState.COMPLETE
    assert len(sender.asked) == 2


def test_a_lull_without_new_arrivals_does_not_ask_again(make: Make, study: list[bytes]) -> None:
    # Given a sender that counts more than it sends
    sender = Sender([StudyCount(10)])
    node = make(sender)
    node.store(study)
    assert node.tick() == []

    # When ticks go on after the lull without new instances, it is asked once only
    for extra in (LULL, 2 * LULL, 3 * LULL):
        assert node.tick(time.time() + extra) == []
    assert len(sender.asked) == 1
    assert node.study()[1] == StudyState.RECEIVING


def test_a_study_unknown_to_the_sender_does_not_back_it_off(make: Make, study: list[bytes]) -> None:
    # Given a sender that does not (yet) know the study
    sender = Sender([StudyCount(None, "no match"), StudyCount(6)])
    node = make(sender)
    node.store(study[:3])
    assert node.tick() == []

    # When more instances and a lull follow, it is asked again (no back-off) and counts
    node.store(study[3:])
    assert node.tick(time.time() + LULL) == []
    assert len(node.tick(time.time() + LULL)) == 1
    assert len(sender.asked) == 2
    assert node.counts._refusals == {}


def test_a_sender_that_is_not_a_configured_remote_is_not_asked(
    make: Make, study: list[bytes]
) -> None:
    sender = Sender([StudyCount(6)])
    node = make(sender)
    node.store(study, calling_ae="MODALITY")
    assert node.tick() == []
    assert node.tick() == []
    assert sender.asked == []
    assert len(node.tick(time.time() + QUIET + 1)) == 1


def test_one_question_at_a_time_per_remote_and_none_after_its_refusal(
    make: Make, study: list[bytes], tmp_path: Path
) -> None:
    # Given two studies from the same sender, arrived together; the sender refuses
    sender = Sender([StudyCount(None, "association rejected", refused=True)])
    node = make(sender)
    node.store(study)
    node.store(phantom_study(tmp_path / "second", seed=2))

    # When the scheduler ticks on, the remote gets one question, not one per study
    for _ in range(3):
        assert node.tick() == []
    assert len(sender.asked) == 1
    assert [r["outcome"] for r in node.audit("study_count")] == ["refused"]
