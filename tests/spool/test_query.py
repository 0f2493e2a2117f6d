"""The query catalog: standard matching over received instances and the node's results."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode.db import Database
from dicomnode.spool.index import Index
from dicomnode.spool.query import Catalog, InvalidKeyError, UnsupportedLevelError
from dicomnode.spool.store import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def encoded(**attributes: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 8
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = attributes.get("SOPInstanceUID") or generate_uid()
    ds.file_meta = Dataset()  # type: ignore[assignment]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture
def held(tmp_path: Path) -> tuple[Spool, Catalog, dict[str, str]]:
    """Two patients: DOE (CT study of 2024, two images) and ROE (MR study of 2023)."""
    index = Index(Database(tmp_path))
    spool = Spool(tmp_path, index, min_free_bytes=0)
    uids = {"doe": generate_uid(), "roe": generate_uid(), "doe_series": generate_uid()}
    for number in ("1", "2"):
        spool.store(
            encoded(
                PatientName="Doe^John", PatientID="P1", StudyDate="20240105", StudyTime="093000",
                AccessionNumber="A11", StudyInstanceUID=uids["doe"], InstanceNumber=number,
                SeriesInstanceUID=uids["doe_series"], SeriesNumber="3",
            ),
            calling_ae="PACS", calling_host="127.0.0.1",
        )  # fmt: skip
    spool.store(
        encoded(
            PatientName="Roe^Jane", PatientID="P2", StudyDate="20230610", StudyTime="141500",
            AccessionNumber="B22", StudyInstanceUID=uids["roe"], Modality="MR",
            SeriesInstanceUID=generate_uid(),
        ),
        calling_ae="PACS", calling_host="127.0.0.1",
    )  # fmt: skip
    states = {1: "done"}
    return spool, Catalog(index, tmp_path / "results", states.get), uids


def studies(catalog: Catalog, **keys: str) -> set[str]:
    catalog.refresh()
    return {r["AccessionNumber"] for r in catalog.find("STUDY", keys)}


def test_single_wildcard_range_and_list_matching(
    held: tuple[Spool, Catalog, dict[str, str]],
) -> None:
    _, catalog, uids = held
    assert studies(catalog) == {"A11", "B22"}  # universal
    assert studies(catalog, PatientName="doe*") == {"A11"}  # PN ignores case
    assert studies(catalog, PatientName="R?E^JANE") == {"B22"}
    assert studies(catalog, PatientID="P2") == {"B22"}
    assert studies(catalog, StudyDate="20240101-") == {"A11"}
    assert studies(catalog, StudyDate="-20231231") == {"B22"}
    assert studies(catalog, StudyDate="20230610") == {"B22"}
    assert studies(catalog, StudyDate="20230101-20241231", StudyTime="09-10") == {"A11"}
    assert studies(catalog, ModalitiesInStudy="MR\\SEG") == {"B22"}
    assert studies(catalog, StudyInstanceUID=f"{uids['doe']}\\{uids['roe']}") == {"A11", "B22"}
    assert studies(catalog, AccessionNumber="A*") == {"A11"}
    assert studies(catalog, AccessionNumber="A1") == set()
    assert studies(catalog, NumberOfStudyRelatedInstances="7") == {"A11", "B22"}  # return key

    (doe,) = catalog.find("STUDY", {"StudyInstanceUID": uids["doe"]})
    assert doe["NumberOfStudyRelatedInstances"] == "2" and doe["ModalitiesInStudy"] == "CT"
    patients = catalog.find("PATIENT", {"PatientName": "*"}, model="PATIENT")
    assert sorted(p["PatientID"] for p in patients) == ["P1", "P2"]
    images = catalog.find("IMAGE", {"StudyInstanceUID": uids["doe"], "InstanceNumber": "2"})
    assert [i["InstanceNumber"] for i in images] == ["2"]
    assert len(catalog.locate("SERIES", {"SeriesInstanceUID": uids["doe_series"]})) == 2


def test_bad_queries_raise_errors_naming_the_key(
    held: tuple[Spool, Catalog, dict[str, str]],
) -> None:
    _, catalog, _ = held
    with pytest.raises(UnsupportedLevelError):
        catalog.find("FRAME", {})
    with pytest.raises(UnsupportedLevelError):
        catalog.find("PATIENT", {}, model="STUDY")
    for keys in (
        {"StudyInstanceUID": "1.2.x"},
        {"StudyInstanceUID": "1.2*"},
        {"StudyDate": "2024-01-01"},
        {"StudyDate": "-"},
    ):
        with pytest.raises(InvalidKeyError, match=next(iter(keys))):
            catalog.find("STUDY", keys)
    with pytest.raises(InvalidKeyError, match="SeriesNumber"):
        catalog.find("SERIES", {"SeriesNumber": "1-5"})
    with pytest.raises(InvalidKeyError, match="needs StudyInstanceUID"):
        catalog.locate("STUDY", {"PatientID": "P1"})


def test_new_versions_replace_and_retention_removes(
    held: tuple[Spool, Catalog, dict[str, str]],
) -> None:
    spool, catalog, uids = held
    (first, *_) = catalog.find("IMAGE", {"StudyInstanceUID": uids["roe"]}) or [None]
    assert first is not None
    spool.store(
        encoded(
            PatientName="Roe^Jane", PatientID="P2", StudyDate="20230610", AccessionNumber="B23",
            StudyInstanceUID=uids["roe"], SOPInstanceUID=first["SOPInstanceUID"],
            SeriesInstanceUID=generate_uid(), Modality="MR",
        ),
        calling_ae="PACS", calling_host="127.0.0.1",
    )  # fmt: skip
    assert studies(catalog) == {"A11", "B23"}
    spool.purge_study(uids["roe"])
    assert studies(catalog) == {"A11"}


def test_result_files_are_found_with_their_job_state(
    held: tuple[Spool, Catalog, dict[str, str]], tmp_path: Path
) -> None:
    _, catalog, uids = held
    folder = tmp_path / "results" / "job-1"
    folder.mkdir(parents=True)
    result = folder / "series-ct-seg.dcm"
    seg_uid = generate_uid()
    result.write_bytes(
        encoded(
            StudyInstanceUID=uids["doe"], SOPClassUID=SEG, Modality="SEG",
            SOPInstanceUID=seg_uid, SeriesInstanceUID=generate_uid(), PatientID="P1",
        )
    )  # fmt: skip
    catalog.refresh()
    (seg,) = catalog.find("SERIES", {"Modality": "SEG"})
    assert seg["PerformedProcedureStepStatus"] == "COMPLETED"
    assert seg["PerformedProcedureStepDescription"] == "dicomnode job 1: done"
    (doe,) = catalog.find("STUDY", {"StudyInstanceUID": uids["doe"]})
    assert doe["ModalitiesInStudy"] == "CT\\SEG"

    # a job re-run rewrites the file with a new instance: the old one is no longer found
    new_uid = generate_uid()
    result.write_bytes(
        encoded(
            StudyInstanceUID=uids["doe"], SOPClassUID=SEG, Modality="SEG",
            SOPInstanceUID=new_uid, SeriesInstanceUID=generate_uid(), PatientID="P1",
        )
    )  # fmt: skip
    os.utime(result, ns=(1, 1))
    catalog.refresh()
    assert [i["SOPInstanceUID"] for i in catalog.find("IMAGE", {"Modality": "SEG"})] == [new_uid]
    result.unlink()
    catalog.refresh()
    assert catalog.find("IMAGE", {"Modality": "SEG"}) == []
