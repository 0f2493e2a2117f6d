"""Load: 16 concurrent associations for 15 s against a node with one worker process.

storescu processes send fresh studies (128 x 128 x 16) back to back.  No store may fail,
the node's RSS after warm-up may not grow with the instances received (a leak keeping a
quarter of their bytes would show), and every study is processed once the load stops.
``benchmarks/soak.py --load-seconds 300`` runs the long version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.synthetic.phantom import PhantomSpec

from .load import load_campaign

SPEC = PhantomSpec(
    rows=128, columns=128, slices=16, pixel_spacing=(2.8, 2.8), slice_thickness=5.0, n_lesions=1
)


@pytest.mark.slow
@pytest.mark.peer
def test_sixteen_associations_sustained_store_everything_without_growing(
    dcmtk: None, model_bundles: tuple[Path, Path], tmp_path: Path
) -> None:
    seg, cls = model_bundles
    # Given a node with one worker, when 16 associations send studies for 15 s
    report = load_campaign(
        tmp_path / "load", 15.0, 16, segmentation=seg, classification=cls, spec=SPEC
    )
    print(report.summary())
    context = f"\n{report.summary()}"

    # Then no store failed and a fair number went through
    assert report.failed == [], report.failed[:5]
    assert report.acknowledged >= 16 * SPEC.slices, context

    # And the node's memory did not follow the number of instances
    bound = max(16 * 1024, report.bytes_after_warm_up() // 1024 // 4)
    assert report.growth_kib() < bound, context
    assert report.drained[0] < report.warm[2] + bound, context

    # And every study was processed
    assert report.not_processed == [], context
