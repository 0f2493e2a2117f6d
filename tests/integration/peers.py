"""Helpers for the integration tests: waiting on conditions and driving real peers.

Peers run as child processes with ``TCP_NODELAY=1`` in their environment (dcmtk and Orthanc
keep Nagle's algorithm on otherwise and stall ~45 ms per instance).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from pynetdicom import AE, _config

from dicomnode.app.node import Node
from dicomnode.config import Remote

T = TypeVar("T")

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def peer_environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def describe_jobs(node: Node) -> str:
    return repr([(j.id, j.state, j.attempts, j.last_error) for j in node.jobs.list_jobs()])


def job_states(node: Node) -> list[str]:
    return [j.state for j in node.jobs.list_jobs()]


def run_storescu(
    storescu: str,
    port: int,
    files: Sequence[Path],
    proposal: Sequence[str] = (),
    *,
    calling_ae: str = "STORESCU",
    called_ae: str = "DICOMNODE",
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """storescu (dcmtk) proposing only the files' SOP classes (``-R``) plus ``proposal``."""
    cmd = [
        storescu,
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-R",
        *proposal,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else peer_environment(),
        check=False,
    )


class StoreSCP:
    """dcmtk storescp on a given port, writing into ``folder`` (a PACS that can be down)."""

    def __init__(self, executable: str, port: int, folder: Path, ae_title: str = "PACS") -> None:
        self.executable = executable
        self.port = port
        self.folder = folder
        self.ae_title = ae_title
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.executable,
                "-aet",
                self.ae_title,
                "--output-directory",
                str(self.folder),
                "+xa",  # accept all supported transfer syntaxes
                str(self.port),
            ],
            env=peer_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


class Orthanc:
    """An Orthanc server in ``folder`` on the given DICOM and HTTP ports (no plugins)."""

    def __init__(
        self,
        executable: str,
        folder: Path,
        dicom_port: int,
        http_port: int,
        modalities: dict[str, list[Any]],
        ae_title: str = "ORTHANC",
        lua: str = "",
        stable_age_s: int = 60,
    ) -> None:
        self.executable = executable
        self.folder = folder
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.ae_title = ae_title
        self.modalities = modalities
        self.lua = lua
        self.stable_age_s = stable_age_s
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicomnode-integration",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": self.modalities,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "LuaScripts": [str(self.folder / "rules.lua")] if self.lua else [],
            "StableAge": self.stable_age_s,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "DicomScuTimeout": 20,
        }
        if self.lua:
            (self.folder / "rules.lua").write_text(self.lua)
        path = self.folder / "config.json"
        path.write_text(json.dumps(config, indent=2))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [self.executable, str(path)],
                cwd=self.folder,
                env=peer_environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited at start-up:\n{self.log.read_text()[-3000:]}")
            try:
                return bool(self.get("/system"))
            except (urllib.error.URLError, ConnectionError, OSError):
                return False

        wait_until(ready, timeout, "Orthanc to answer GET /system", interval=0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0
    ) -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/octet-stream")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            return bytes(rsp.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path, timeout=10.0))

    def post_json(self, path: str, payload: Any, timeout: float = 120.0) -> Any:
        return json.loads(self.request("POST", path, json.dumps(payload).encode(), timeout))

    def upload(self, path: Path) -> dict[str, Any]:
        return dict(json.loads(self.request("POST", "/instances", path.read_bytes())))

    def find_instances(self, sop_class_uid: str) -> list[str]:
        found = self.post_json(
            "/tools/find", {"Level": "Instance", "Query": {"SOPClassUID": sop_class_uid}}
        )
        return [str(i) for i in found]


def write_raw_instance(
    path: Path,
    body: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
) -> Path:
    """A Part 10 file whose meta names the instance and whose dataset is ``body`` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)  # type: ignore[arg-type]
        f.write(body)
    return path


def send_raw(
    port: int,
    path: Path,
    contexts: Sequence[tuple[str, str]],
    *,
    calling_ae: str = "RAWSCU",
    called_ae: str = "DICOMNODE",
) -> int | None:
    """C-STORE the dataset bytes of ``path`` unchanged on a fresh association.

    pynetdicom's chunked mode sends the bytes after the file meta as they are, with the
    Affected SOP Class/Instance UIDs taken from the file meta, so the request and the
    dataset can be made to disagree, or the dataset to be garbage.  Returns the status
    (None when the peer gave no response).
    """
    ae = AE(ae_title=calling_ae)
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association with the node was not established"
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return int(rsp.Status) if "Status" in rsp else None


def dataset_offset(path: Path) -> int:
    """Byte offset of the dataset after the file meta of a Part 10 file."""
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    return int(offset)


def header(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, ""))


@contextlib.contextmanager
def orthanc_with_node(
    executable: str,
    folder: Path,
    free_port: Callable[[], int],
    node_factory: Callable[..., Node],
    *,
    remote_timeout_s: float = 20.0,
    lua: str = "",
    stable_age_s: int = 60,
    **node_options: Any,
) -> Iterator[tuple[Orthanc, Node]]:
    """Orthanc as the PACS (AE ORTHANC, in ``folder``) knowing the node as the modality
    ``dicomnode``, and a node (``node_factory(**node_options)``) knowing Orthanc as its
    remote ``orthanc`` and sending results to ``@sender``; Orthanc stops on exit."""
    dicom_port = free_port()
    node = node_factory(
        remotes=[Remote("orthanc", "ORTHANC", "127.0.0.1", dicom_port, remote_timeout_s)],
        destinations=("@sender",),
        **node_options,
    )
    orthanc = Orthanc(
        executable,
        folder,
        dicom_port,
        free_port(),
        {"dicomnode": ["DICOMNODE", "127.0.0.1", node.port]},
        lua=lua,
        stable_age_s=stable_age_s,
    )
    orthanc.start()
    try:
        yield orthanc, node
    finally:
        orthanc.stop()
