"""DICOMweb on the HTTP port: QIDO-RS, WADO-RS, STOW-RS with dicomweb-client and plain HTTP."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dicomnode.app.node import Node
from dicomnode.config import HttpSettings
from dicomnode.net.scu import Peer, send_files

UNMATCHED = ({"Modality": "MR"},)  # no route runs: the catalog holds only what was sent


@pytest.fixture
def node(node_factory: Callable[..., Node]) -> Iterator[Node]:
    base = node_factory(start=False, match=UNMATCHED).config
    config = dataclasses.replace(base, http=HttpSettings(enabled=True, port=0))
    started = Node(config)
    started.start()
    yield started
    started.stop(timeout=30)


def client_of(node: Node) -> DICOMwebClient:
    assert node.http is not None
    return DICOMwebClient(url=f"http://127.0.0.1:{node.http.port}/dicomweb")


def request(
    node: Node, path: str, body: bytes | None = None, content_type: str = "", accept: str = ""
) -> tuple[int, bytes]:
    assert node.http is not None
    req = urllib.request.Request(f"http://127.0.0.1:{node.http.port}{path}", data=body)
    if accept:
        req.add_header("Accept", accept)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def copies_in_new_study(paths: list[Path]) -> list[Dataset]:
    """The files as another study (new study, series and instance UIDs)."""
    study, series = generate_uid(), generate_uid()
    datasets: list[Dataset] = []
    for path in paths:
        ds = dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        datasets.append(ds)
    return datasets


def value(item: Mapping[str, Any], tag: str) -> object:
    return item[tag]["Value"][0]


def test_search_and_retrieve_what_arrived_by_c_store(node: Node, phantom_files: list[Path]) -> None:
    # Given a study received by C-STORE
    assert all(
        r.ok for r in send_files(Peer("DICOMNODE", "127.0.0.1", node.port), phantom_files, "PACS")
    )
    first = dcmread(phantom_files[0])
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    client = client_of(node)

    # When it is searched, Then the filters, includefield, limit and offset apply
    (found,) = client.search_for_studies(search_filters={"PatientID": str(first.PatientID)})
    assert value(found, "0020000D") == study
    assert value(found, "00201208") == len(phantom_files)  # NumberOfStudyRelatedInstances
    assert "00081030" not in found  # StudyDescription: only when asked for
    (with_field,) = client.search_for_studies(fields=["StudyDescription"])
    assert "00081030" in with_field
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []
    assert client.search_for_studies(search_filters={"ModalitiesInStudy": "CT"})
    (found_series,) = client.search_for_series(study, search_filters={"Modality": "CT"})
    assert value(found_series, "0020000E") == series
    pages = [
        client.search_for_instances(study, series, limit=10, offset=offset)
        for offset in (0, 10, 20)
    ]
    assert [len(p) for p in pages] == [10, 10, len(phantom_files) - 20]
    uids = {value(i, "00080018") for p in pages for i in p}
    assert uids == {str(dcmread(p).SOPInstanceUID) for p in phantom_files}

    # And retrieved: the stored instance, metadata without pixels, a rendered frame
    sop = str(first.SOPInstanceUID)
    instance = client.retrieve_instance(study, series, sop)
    assert instance.SOPInstanceUID == sop
    assert instance.PixelData == first.PixelData
    metadata = client.retrieve_series_metadata(study, series)
    assert len(metadata) == len(phantom_files)
    assert all("7FE00010" not in m for m in metadata)
    png = client.retrieve_instance_frames_rendered(
        study, series, sop, [1], media_types=("image/png",)
    )
    assert png.startswith(b"\x89PNG")
    assert len(client.retrieve_study(study)) == len(phantom_files)

    # And plain HTTP gets 400 for a malformed UID or query, 404 for an unknown study
    code, body = request(node, "/dicomweb/studies/not-a-uid/metadata")
    assert code == 400 and b"not a valid UID" in body
    code, body = request(node, "/dicomweb/studies?StudyDate=2020")
    assert code == 400 and b"StudyDate" in body
    assert request(node, "/dicomweb/studies/1.2.3.4/metadata")[0] == 404
    code, body = request(node, f"/dicomweb/studies?StudyInstanceUID={study}&includefield=all")
    assert code == 200 and "00081030" in json.loads(body)[0]
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert request(node, f"/dicomweb/studies/{study}", accept=jpeg)[0] == 406

    # And each request is audited without patient data
    assert node.audit.path is not None
    audit = node.audit.path.read_text()
    assert '"service":"QIDO-RS"' in audit and '"service":"WADO-RS"' in audit
    assert str(first.PatientID) not in audit


def multipart(parts: list[bytes], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return body + b"--" + boundary.encode() + b"--\r\n", content_type


def test_stow_follows_the_receive_rules(node: Node, phantom_files: list[Path]) -> None:
    # Given instances of a new study, stored with STOW-RS
    datasets = copies_in_new_study(phantom_files[:3])
    study = str(datasets[0].StudyInstanceUID)
    client = client_of(node)
    answer = client.store_instances(datasets)

    # Then each is referenced, stored in the spool and indexed, and can be searched
    assert len(answer.ReferencedSOPSequence) == 3 and "FailedSOPSequence" not in answer
    assert all(study in item.RetrieveURL for item in answer.ReferencedSOPSequence)
    assert len(node.index.instance_paths(study)) == 3
    assert all(p.exists() for p in node.index.instance_paths(study))
    (found,) = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert value(found, "00201208") == 3

    # When the same instances come again, Then they are accepted as duplicates
    again = client.store_instances(datasets[:1], study_instance_uid=study)
    assert len(again.ReferencedSOPSequence) == 1
    assert len(node.index.instance_paths(study)) == 3

    # When a part is malformed, Then it fails with 0xC210 and the others are stored (202)
    good = phantom_files[3].read_bytes()
    body, content_type = multipart([good, b"DICM not really a dataset"])
    code, raw = request(node, "/dicomweb/studies", body, content_type)
    assert code == 202
    result = Dataset.from_json(json.loads(raw))
    assert len(result.ReferencedSOPSequence) == 1
    (failed,) = result.FailedSOPSequence
    assert failed.FailureReason == 0xC210
    # none stored: 409; not multipart: 415
    body, content_type = multipart([b"garbage"])
    assert request(node, "/dicomweb/studies", body, content_type)[0] == 409
    assert request(node, "/dicomweb/studies", b"{}", "application/json")[0] == 415
