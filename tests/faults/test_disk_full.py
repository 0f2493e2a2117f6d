"""Disk full: the data directory on a small tmpfs of fixed size.

Below the free-space watermark the node answers 0xA700 (out of resources) and writes
nothing; with no watermark the disk fills in the middle of a write (ENOSPC) and the node
answers 0xA700 too, keeping nothing partial.  Every indexed file stays intact, the tmp
folder stays empty, and once space returns the same instances are accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dicomnode.app.node import Node
from dicomnode.net import status
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom, write_phantom

from .harness import IndexView, fill

NodeFactory = Callable[..., Node]
#: 256 x 256 slices: 128 KiB of pixel data each, so a few fill the disk.
SPEC = PhantomSpec(rows=256, columns=256, slices=12, pixel_spacing=(1.4, 1.4), n_lesions=1)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_phantom(generate_phantom(SPEC), tmp_path_factory.mktemp("big"))


def _send(node: Node, files: list[Path]) -> list[int | None]:
    results = send_files(Peer("DICOMNODE", "127.0.0.1", node.port), files, "MODALITY")
    return [r.status for r in results]


def _check_spool(data_dir: Path, acknowledged: int) -> None:
    view = IndexView(data_dir)
    assert view.consistency_problems() == []
    assert view.instance_count() == acknowledged


def test_below_the_watermark_the_node_refuses_and_resumes_when_space_returns(
    small_disk: Callable[[int], Path],
    node_factory: NodeFactory,
    big_files: list[Path],
) -> None:
    # Given a node on a 24 MiB disk with an 8 MiB watermark, the disk filled to 8.6 MiB free
    disk = small_disk(24)
    data_dir = disk / "node"
    node = node_factory(data_dir=data_dir, quiet_period_s=3600.0, pacs_port=9, min_free_disk_mb=8)
    ballast = disk / "ballast"
    try:
        fill(ballast, leave_free=8 * 2**20 + 600 * 2**10)

        # When a study of 12 x 128 KiB arrives
        codes = _send(node, big_files)

        # Then the first instances are stored and the rest refused as out of resources
        stored = codes.count(status.SUCCESS)
        assert set(codes) == {status.SUCCESS, status.REFUSED_OUT_OF_RESOURCES}, codes
        assert codes[0] == status.SUCCESS and codes[-1] == status.REFUSED_OUT_OF_RESOURCES
        # And nothing refused was written; what was acknowledged is intact
        _check_spool(data_dir, stored)

        # When space returns and the sender tries again
        ballast.unlink()
        codes = _send(node, big_files)

        # Then every instance is accepted and stored once
        assert codes == [status.SUCCESS] * len(big_files)
        _check_spool(data_dir, len(big_files))
    finally:
        node.stop()


@pytest.mark.parametrize("leave_free_kib", [0, 40, 100, 200, 300])
def test_disk_filling_mid_write_answers_out_of_resources_and_keeps_nothing_partial(
    leave_free_kib: int,
    small_disk: Callable[[int], Path],
    node_factory: NodeFactory,
    big_files: list[Path],
) -> None:
    # Given a node without a watermark whose disk has only a little space left
    disk = small_disk(16)
    data_dir = disk / "node"
    node = node_factory(data_dir=data_dir, quiet_period_s=3600.0, pacs_port=9, min_free_disk_mb=0)
    ballast = disk / "ballast"
    try:
        assert _send(node, big_files[:1]) == [status.SUCCESS]
        fill(ballast, leave_free=leave_free_kib * 1024)

        # When instances arrive that do not fit
        codes = _send(node, big_files[1:4])

        # Then each is stored or refused as out of resources, never half written
        assert set(codes) <= {status.SUCCESS, status.REFUSED_OUT_OF_RESOURCES}, codes
        assert status.REFUSED_OUT_OF_RESOURCES in codes, codes
        _check_spool(data_dir, 1 + codes.count(status.SUCCESS))

        # When space returns, they are accepted
        ballast.unlink()
        assert _send(node, big_files[1:4]) == [status.SUCCESS] * 3
        _check_spool(data_dir, 4)
    finally:
        node.stop()


def test_completely_full_disk_answers_out_of_resources(
    small_disk: Callable[[int], Path],
    node_factory: NodeFactory,
    big_files: list[Path],
) -> None:
    # Given a node without a watermark whose disk (spool, index and audit log) is full
    disk = small_disk(16)
    data_dir = disk / "node"
    node = node_factory(data_dir=data_dir, quiet_period_s=3600.0, pacs_port=9, min_free_disk_mb=0)
    try:
        fill(disk / "ballast", leave_free=0)

        # When instances keep arriving (enough audit lines to need a new page)
        codes = _send(node, big_files) + _send(node, big_files) + _send(node, big_files)

        # Then every one is refused as out of resources
        assert set(codes) == {status.REFUSED_OUT_OF_RESOURCES}, sorted(set(codes))
        _check_spool(data_dir, 0)
    finally:
        node.stop()
