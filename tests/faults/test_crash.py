"""Crash anywhere: SIGKILL the node while it receives, assembles, infers and delivers.

The node runs as ``dicomnode serve`` (one worker process) and is killed with its whole
process group 20 times, aiming at each stage in turn, then restarted over the same data
directory while storescu keeps re-sending what was not acknowledged.  Afterwards every
acknowledged instance is in the spool, intact; every study was processed with all its
slices; every result reached the PACS (dcmtk storescp) and the index is consistent.

Exactly once: result UIDs are deterministic per job generation, so the PACS ends up with
one object per result.  A result can still be *transmitted* twice: when the node dies (or
an association is lost) after the PACS stored it and before the node recorded the answer,
the node cannot know and sends it again.  The test requires that only such in-doubt
results are ever received twice, and prints how many were.  ``benchmarks/soak.py
--kills 100`` runs the long version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .crash import TARGETS, crash_campaign

KILLS = 20


@pytest.mark.slow
@pytest.mark.peer
def test_sigkill_at_any_stage_loses_nothing_and_delivers_each_result(
    dcmtk: None, model_bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    seg, cls = model_bundles
    # Given a node that is killed 20 times while studies flow through it
    report = crash_campaign(
        tmp_path / "crash", KILLS, segmentation=seg, classification=cls, seed=20
    )
    print(report.summary())
    context = f"\n{report.summary()}\nnode log: {report.node_log}"

    # Then every stage was hit more than once
    phases = report.phase_counts()
    assert len(report.kills) == KILLS
    for stage in TARGETS:
        assert phases[stage] >= 2, f"the kills hit {stage} {phases[stage]} time(s){context}"

    # And every acknowledged instance is in the spool, intact (sha256, parses, same data)
    assert len(report.acknowledged) == len(report.sent), context
    assert report.missing == [], context

    # And every study was processed, with all its slices, and the index is consistent
    assert report.not_processed == [], context
    assert report.problems == [], context

    # And every result reached the PACS; only results in doubt were received again
    assert report.undelivered == [], context
    assert report.unexpected == [], context
    assert report.unexplained_duplicates() == [], context
