"""dcmtk storescu sends a study to the node, once per transfer syntax the node accepts.

Each study is encoded by a real tool (dcmtk's dcmconv/dcmcjpeg/dcmcjpls/dcmcrle; JPEG 2000 by
pydicom's openjpeg plugin since dcmtk has no JPEG 2000 codec), sent by storescu proposing only
the files' SOP class with the matching transfer syntax flag, and must land in the spool as
sent: one index row per instance, the file's dataset equal to what storescu sent, the pixel
data still encoded and, for the lossless syntaxes, decoding to the original pixels.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicomnode.net.scp import FolderSCP
from dicomnode.outputs.validate import run_dciodvfy
from dicomnode.synthetic.phantom import Phantom

from .peers import (
    COMPREHENSIVE_3D_SR_CLASS,
    SEG_CLASS,
    dataset_offset,
    describe_jobs,
    run_storescu,
    wait_until,
)

pytestmark = pytest.mark.peer

Encoder = Callable[[list[Path], Path, Callable[[str], str]], list[Path]]


def _with_tool(tool: str, *args: str) -> Encoder:
    """Convert each file with a dcmtk tool (``tool [args] in out``)."""

    def encode(files: list[Path], out: Path, require_tool: Callable[[str], str]) -> list[Path]:
        executable = require_tool(tool)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for f in files:
            target = out / f.name
            subprocess.run([executable, *args, str(f), str(target)], check=True, timeout=60)
            written.append(target)
        return written

    return encode


def _unchanged(files: list[Path], out: Path, require_tool: Callable[[str], str]) -> list[Path]:
    return files


def _jpeg2000(files: list[Path], out: Path, require_tool: Callable[[str], str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in files:
        ds = dcmread(f)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(out / f.name, enforce_file_format=True)
        written.append(out / f.name)
    return written


@dataclass(frozen=True)
class Syntax:
    name: str
    uid: str
    proposal: tuple[str, ...]  # storescu's flag proposing this transfer syntax
    encode: Encoder
    lossless: bool = True


SYNTAXES = [
    Syntax("explicit", ExplicitVRLittleEndian, ("-xe",), _unchanged),
    Syntax("implicit", ImplicitVRLittleEndian, ("-xi",), _with_tool("dcmconv", "+ti")),
    Syntax("deflate", DeflatedExplicitVRLittleEndian, ("-xd",), _with_tool("dcmconv", "+td")),
    # dcmcjpeg scales the 12-bit CT to 8 bits for baseline and adjusts the rescale slope.
    Syntax("jpeg-baseline", JPEGBaseline8Bit, ("-xy",), _with_tool("dcmcjpeg", "+eb"), False),
    Syntax("jpeg-lossless-sv1", JPEGLosslessSV1, ("-xs",), _with_tool("dcmcjpeg", "+e1")),
    Syntax("jpeg-ls-lossless", JPEGLSLossless, ("-xt",), _with_tool("dcmcjpls")),
    Syntax("jpeg2000-lossless", JPEG2000Lossless, ("-xv",), _jpeg2000),
    Syntax("rle", RLELossless, ("-xr",), _with_tool("dcmcrle")),
]


def _study_uid(phantom: Phantom) -> str:
    return str(phantom.datasets[0].StudyInstanceUID)


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[s.name for s in SYNTAXES])
def test_storescu_study_is_spooled_as_sent(
    syntax: Syntax,
    phantom: Phantom,
    phantom_files: list[Path],
    node_factory: Callable[..., object],
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    # Given a node (processing deferred: only the receive is under test) and the phantom
    # study encoded in the transfer syntax by a real tool
    storescu = require_tool("storescu")
    node = node_factory(quiet_period_s=3600.0, pacs_port=9)  # type: ignore[operator]
    files = syntax.encode(phantom_files, tmp_path / syntax.name, require_tool)
    sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert all(
        str(dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax.uid
        for f in files
    ), "the encoder did not produce the transfer syntax under test"

    # When storescu sends it, proposing that transfer syntax
    proc = run_storescu(storescu, node.port, files, syntax.proposal)

    # Then storescu succeeds and every instance is indexed once, in that syntax
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Error" not in proc.stderr, proc.stderr
    rows = node.index.latest_instances(_study_uid(phantom))
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    assert all(r.version == 1 for r in rows)
    assert {r.transfer_syntax_uid for r in rows} == {syntax.uid}
    assert node.scp.counters.stored == len(files) and node.scp.counters.failed == 0
    originals = {str(ds.SOPInstanceUID): ds for ds in phantom.datasets}
    for row in rows:
        # the file on disk is what the index says it is...
        data = row.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256 and len(data) == row.size
        stored = dcmread(row.path)
        source = dcmread(sent[row.sop_instance_uid])
        # ...carries what storescu sent, pixel data still encoded...
        assert str(stored.file_meta.TransferSyntaxUID) == syntax.uid
        assert stored == source
        assert stored.PixelData == source.PixelData
        if not UID(syntax.uid).is_deflated:
            sent_body = sent[row.sop_instance_uid].read_bytes()
            assert (
                data[dataset_offset(row.path) :]
                == sent_body[dataset_offset(sent[row.sop_instance_uid]) :]
            )
        # ...and decodes: exactly to the original pixels when lossless
        pixels = stored.pixel_array
        assert pixels.shape == (128, 128)
        if syntax.lossless:
            original = originals[row.sop_instance_uid]
            np.testing.assert_array_equal(pixels, original.pixel_array)


def test_storescu_study_comes_back_as_seg_and_sr(
    phantom: Phantom,
    phantom_files: list[Path],
    node_factory: Callable[..., object],
    folder_scp: FolderSCP,
    require_tool: Callable[[str], str],
    tmp_path: Path,
) -> None:
    # Given a node routing CT to the PACS and the study encoded as JPEG-LS lossless by dcmtk
    storescu = require_tool("storescu")
    require_tool("dciodvfy")
    node = node_factory(pacs_port=folder_scp.port)  # type: ignore[operator]
    syntax = next(s for s in SYNTAXES if s.name == "jpeg-ls-lossless")
    files = syntax.encode(phantom_files, tmp_path / "jls", require_tool)

    # When storescu sends it
    proc = run_storescu(storescu, node.port, files, syntax.proposal)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # Then after the quiet period the job runs and the SEG + SR reach the PACS
    received = folder_scp.wait_for(2, timeout=60)
    assert len(received) == 2, describe_jobs(node)  # type: ignore[arg-type]
    wait_until(
        lambda: [j.state for j in node.jobs.list_jobs()] == ["done"],  # type: ignore[attr-defined]
        20,
        "the job to be done",
    )
    by_class = {str(dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in received}
    assert set(by_class) == {SEG_CLASS, COMPREHENSIVE_3D_SR_CLASS}
    seg = hd.seg.segread(by_class[SEG_CLASS])
    sr = hd.sr.srread(by_class[COMPREHENSIVE_3D_SR_CLASS])
    source_series = str(phantom.datasets[0].SeriesInstanceUID)
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == _study_uid(phantom)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series
    for path in by_class.values():
        report = run_dciodvfy(path)
        assert report.errors == [], report.output
