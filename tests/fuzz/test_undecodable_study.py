"""A study whose compressed pixel data cannot be decoded, through the whole node.

The handler accepts it (no decoding at receive); its job fails at once (ImagingError is
permanent) with a reason naming the file and the transfer syntax; the worker survives, so
the next study is processed and its SEG + SR delivered.  The RLE case uses a fragment on
which pylibjpeg-rle panics (pyo3 PanicException, a BaseException) when the installed
version does: before the fix that ended the worker thread and every later job waited.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicomnode.app.node import Node
from dicomnode.net.scp import FolderSCP
from dicomnode.net.scu import Peer, send_files
from dicomnode.synthetic.phantom import PhantomSpec, generate_phantom

from .harness import NODE_AE, SEND_TIMEOUT_S, Tally, watching

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _decode_fails(ds: Dataset, frame: bytes) -> tuple[bool, bool]:
    """(decoding ``frame`` fails, it fails with a BaseException that is no Exception)."""
    trial = Dataset()
    trial.update(ds)
    trial.file_meta = ds.file_meta
    trial.PixelData = encapsulate([frame])
    try:
        trial.pixel_array  # noqa: B018
    except Exception:
        return True, False
    except BaseException:  # pyo3's PanicException
        return True, True
    return False, False


def _undecodable_frame(ds: Dataset, rng: random.Random, want_panic: bool) -> bytes:
    """Random bytes inside the frame that fail to decode (a decoder panic if wanted and
    the installed decoder still panics on one of 200 tries)."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    fallback = None
    quiet = logging.getLogger("pydicom")
    level, quiet.level = quiet.level, logging.CRITICAL  # each failed try logs a traceback
    try:
        for _ in range(200):
            damaged = bytearray(frame)
            start = rng.randrange(8 if len(frame) > 64 else 0, len(frame) // 2)
            damaged[start : start + rng.randint(8, 256)] = rng.randbytes(rng.randint(8, 256))
            damaged += b"\0" * (len(damaged) % 2)
            fails, panics = _decode_fails(ds, bytes(damaged))
            if fails and (panics or not want_panic):
                return bytes(damaged)
            if fails and fallback is None:
                fallback = bytes(damaged)
    finally:
        quiet.level = level
    assert fallback is not None, "no undecodable variant found"
    return fallback


def _broken_study(syntax: str, folder: Path, seed: int) -> list[Path]:
    spec = PhantomSpec(
        rows=64,
        columns=64,
        slices=6,
        pixel_spacing=(5.0, 5.0),
        n_lesions=0,
        transfer_syntax=syntax,
        seed=seed,
    )
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    paths = []
    for ds in generate_phantom(spec).datasets:
        ds.PixelData = encapsulate([_undecodable_frame(ds, rng, syntax == RLELossless)])
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send(node: Node, files: list[Path]) -> list[int | None]:
    peer = Peer(NODE_AE, "127.0.0.1", node.port, timeout_s=SEND_TIMEOUT_S)
    return [r.status for r in send_files(peer, files, "MODALITY")]


def _wait_for_jobs(node: Node, states: list[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = node.jobs.list_jobs()
        if sorted(j.state for j in jobs) == sorted(states):
            return
        time.sleep(0.05)
    found = [(j.id, j.state, j.last_error[:120]) for j in node.jobs.list_jobs()]
    raise AssertionError(f"timed out waiting for jobs {states}; found {found}")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["RLE", "JPEG2000"])
def test_undecodable_study_fails_its_job_and_the_next_study_succeeds(
    syntax: str,
    node_factory: Callable[..., Node],
    folder_scp: FolderSCP,
    phantom_files: list[Path],
    tmp_path: Path,
    tally: Tally,
) -> None:
    broken = _broken_study(syntax, tmp_path / "broken", seed=11)
    with watching(tally):
        # Given a node (quiet period 0.5 s, the fixture models) and a study whose
        # compressed fragments hold random bytes
        node = node_factory(quiet_period_s=0.5, pacs_port=folder_scp.port)

        # When it is sent, it is acknowledged: the handler does not decode
        assert _send(node, broken) == [0] * len(broken)

        # Then its job fails at once with a clear ImagingError naming file and syntax
        _wait_for_jobs(node, ["failed"])
        job = node.jobs.list_jobs()[0]
        assert job.last_error.startswith("ImagingError: "), job.last_error
        assert "cannot decode pixel data" in job.last_error and syntax in job.last_error
        assert job.attempts == 1
        tally.add("undecodable study through the node", f"job failed: {job.last_error[:13]}")

        # And the next study is processed and its SEG + SR delivered
        assert _send(node, phantom_files) == [0] * len(phantom_files)
        _wait_for_jobs(node, ["failed", "done"])
        assert len(folder_scp.wait_for(2, timeout=SEND_TIMEOUT_S)) == 2
        classes = {
            str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in folder_scp.received
        }
        assert classes == {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.34"}
        tally.add("undecodable study through the node", "next study done")
