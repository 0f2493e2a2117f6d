"""The study page shows the heat map and the key images a pipeline returned."""

from __future__ import annotations

import dataclasses
import io
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.uid import (
    KeyObjectSelectionDocumentStorage,
    ParametricMapStorage,
    SegmentationStorage,
)

from dicomnode.app.node import Node
from dicomnode.config import HttpSettings
from dicomnode.net.scp import FolderSCP

from .test_pages import page, request, send_and_wait_done


def test_the_study_page_shows_the_heat_map_and_key_images(
    node_factory: Callable[..., Node], folder_scp: FolderSCP, phantom_files: list[Path]
) -> None:
    # Given a node whose lesion pipeline makes heat maps, and a PACS for the results
    base = node_factory(start=False, pacs_port=folder_scp.port).config
    pipelines = tuple(
        dataclasses.replace(p, heat_maps=True, key_images=True) for p in base.pipelines
    )
    node = Node(
        dataclasses.replace(base, pipelines=pipelines, http=HttpSettings(enabled=True, port=0))
    )
    node.start()
    try:
        # When a study with lesions is processed
        study_uid = send_and_wait_done(node, phantom_files)
        study = page(node, f"/studies/{study_uid}")
        # Then the page lists the key image of each finding ...
        assert "Key images (Key Object Selection)" in study
        keys = re.findall(r"<li>([^<]*: image \d+[^<]*)</li>", study)
        assert keys and all("tracking UID" in k for k in keys)
        # ... and shows the heat map over its CT, red where the model saw a lesion
        (src,) = re.findall(r'src="(/jobs/\d+/heatmap/[^"]+\.png)"', study)
        status, png, headers = request(node, urllib.parse.unquote(src))
        assert status == 200 and headers["content-type"] == "image/png"
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        assert rgb.shape[1] >= 384
        hot = (rgb[..., 0] > 200) & (rgb[..., 2] < 80)  # red to yellow, not grey
        assert hot.sum() > 50
        # And the PACS received the heat map and key images besides the SEG and SR
        classes = {
            str(dcmread(p, stop_before_pixels=True).SOPClassUID) for p in folder_scp.received
        }
        assert {ParametricMapStorage, KeyObjectSelectionDocumentStorage, SegmentationStorage} <= (
            classes
        )
        status, _, _ = request(node, "/jobs/999/heatmap/1.2.3.png")
        assert status == 404
    finally:
        node.stop(timeout=30)
