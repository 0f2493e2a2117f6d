"""Pieces of the pages: orientation letters, scale bars, states and priorities."""

from __future__ import annotations

import dataclasses

from dicomnode.jobs.store import Job, JobState
from dicomnode.spool.index import StudyRecord, StudyState
from dicomnode.web.render import edge_letters, orientation_letter, scale_bar_mm
from dicomnode.web.views import display_state, priority_of, study_priority


def test_axial_images_have_r_l_a_p_at_their_edges() -> None:
    # Given the usual axial orientation (rows run to the patient's left, columns posterior)
    letters = edge_letters([1, 0, 0, 0, 1, 0])
    # Then the viewer's left is the patient's right, as radiologists read
    assert letters == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert edge_letters([0, 1, 0, 0, 0, -1])["bottom"] == "F"  # sagittal
    assert orientation_letter([0.7, 0.7, 0.0]) == "LP"


def test_the_scale_bar_is_a_round_length_within_a_quarter_of_the_width() -> None:
    assert scale_bar_mm(358.4) == 50
    assert scale_bar_mm(100.0) == 20
    assert scale_bar_mm(10.0) == 5


STUDY = StudyRecord("1.2", StudyState.COMPLETE, 1, 0.0, 0.0, 1.0, "PACS", "h", "", 0, 0.0, "")


def job(state: JobState, **fields: object) -> Job:
    base = Job(1, "1.2", "ct", 1, ("1.2.3",), ("pacs",), state, 1, 0.0, "", 0.0, 0.0, None, "{}")
    return dataclasses.replace(base, state=state, **fields)  # type: ignore[arg-type]


def test_the_worklist_state_combines_study_and_jobs() -> None:
    receiving = dataclasses.replace(STUDY, state=StudyState.RECEIVING)
    assert display_state(receiving, [])[0] == "receiving"
    ignored = dataclasses.replace(STUDY, state=StudyState.IGNORED, note="no route matched")
    assert display_state(ignored, []) == ("ignored", "no route matched")
    assert display_state(STUDY, [])[0] == "complete"
    assert display_state(STUDY, [job(JobState.RUNNING)])[0] == "processing"
    assert display_state(STUDY, [job(JobState.SENDING)])[0] == "sending"
    assert display_state(STUDY, [job(JobState.FAILED, last_error="x")]) == ("failed", "x")
    assert display_state(STUDY, [job(JobState.DONE)])[0] == "done"
    # jobs of an earlier generation do not count once the study has a newer one
    old = job(JobState.FAILED, generation=0)
    assert display_state(STUDY, [old, job(JobState.DONE)])[0] == "done"


def test_priority_is_routine_unless_the_job_says_otherwise() -> None:
    plain = job(JobState.QUEUED)
    assert priority_of(plain) in ("routine",)

    @dataclasses.dataclass(frozen=True)
    class Prioritised:
        priority: str

    assert priority_of(Prioritised("STAT")) == "stat"  # type: ignore[arg-type]
    assert study_priority([plain, Prioritised("HIGH")]) == "high"  # type: ignore[list-item]


def test_urgent_findings_rank_with_stat_requests_on_the_worklist() -> None:
    from dicomnode.web.views import Header, StudyRow

    def row(uid: str, priority: str, triage: str, received: float) -> StudyRow:
        record = StudyRecord(
            uid, StudyState.COMPLETE, 1, received, received, received, "PACS", "h", "", 0, 0, ""
        )
        return StudyRow(record, Header(), "done", "", priority, triage, [], [])

    rows = [
        row("routine-new", "routine", "routine", 5.0),
        row("urgent-old", "routine", "urgent", 1.0),
        row("stat-urgent", "stat", "urgent", 2.0),
        row("review", "routine", "review", 3.0),
        row("stat-clear", "stat", "routine", 4.0),
    ]
    ordered = [r.study.study_instance_uid for r in sorted(rows, key=lambda r: r.sort_key)]
    assert ordered == ["stat-urgent", "stat-clear", "urgent-old", "review", "routine-new"]
