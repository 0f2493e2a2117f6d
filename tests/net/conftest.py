"""Fixtures of the net layer's tests: a small instance, the node's SCP on its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomnode.net.scp import StorageSCP

ScpFactory = Callable[..., StorageSCP]


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    """A valid 4 x 4 CT image, Explicit VR Little Endian."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\0\1" * 16
    path = tmp_path / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def scp_factory(node_factory: Callable[..., Any]) -> Iterator[ScpFactory]:
    """Start the node's :class:`StorageSCP` alone (no workers) on a free port of 127.0.0.1.

    Keyword arguments replace fields of the node's settings (``network_timeout_s``,
    ``allowed_callers``, ``tls`` ...); every SCP is stopped after the test.
    """
    started: list[StorageSCP] = []

    def make(**settings: Any) -> StorageSCP:
        node = node_factory(start=False, quiet_period_s=3600.0, pacs_port=9)
        scp = StorageSCP(dataclasses.replace(node.config.node, **settings), node.spool)
        scp.start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()
