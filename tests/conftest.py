"""Fixtures shared by the whole suite: free ports, peers, a node built in code, a phantom.

Peer tools (dcmtk, dicom3tools, Orthanc) are looked up with :func:`require_tool`: a missing
tool skips the test on a developer machine and fails it in CI (``CI`` set), where the
peers are installed by ``.ci/run`` and a skip would hide a broken setup.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dicomnode.app.node import Node
from dicomnode.config import (
    CompletenessSettings,
    Config,
    FolderDestination,
    NodeSettings,
    PipelineSettings,
    Remote,
    RetrySettings,
    Route,
)
from dicomnode.net.scp import FolderSCP
from dicomnode.routing.rules import parse_rule
from dicomnode.synthetic.phantom import Phantom, PhantomSpec, generate_phantom, write_phantom
from fixtures_models import max_classifier, threshold_segmenter

#: Debian package of each peer tool, for the message of a missing one.
TOOL_PACKAGES = {
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "dcmcjpeg": "dcmtk",
    "dcmcjpls": "dcmtk",
    "dcmcrle": "dcmtk",
    "dcmconv": "dcmtk",
    "dsrdump": "dcmtk",
    "dciodvfy": "dicom3tools",
    "Orthanc": "orthanc",
}

PACS_AE = "PACS"
NODE_AE = "DICOMNODE"


def _search_path() -> str:
    """PATH without the virtual environment's folders, plus sbin (where Orthanc lives).

    pynetdicom installs its own ``storescu``, ``storescp``, ``echoscu`` ... scripts into the
    venv; with the venv activated they would shadow dcmtk's and the interoperability tests
    would talk to pynetdicom instead of a real peer.
    """
    prefixes = {Path(p).resolve() for p in (sys.prefix, sys.exec_prefix)}
    folders = [
        f
        for f in os.environ.get("PATH", "").split(os.pathsep)
        if f and not any(Path(f).resolve().is_relative_to(p) for p in prefixes)
    ]
    return os.pathsep.join([*folders, "/usr/sbin", "/usr/local/sbin"])


def require_tool(name: str) -> str:
    """Full path of the peer tool ``name``; skip without it, or fail when ``CI`` is set."""
    path = shutil.which(name, path=_search_path())
    if path is None:
        message = f"{name} is not installed (apt-get install {TOOL_PACKAGES.get(name, name)})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; peers are required in CI", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(autouse=True)
def _logging_as_before() -> Iterator[None]:
    """A test that runs the CLI in this process configures the root logger (level INFO, the
    node's stderr handler): take that back afterwards, or the threads of later tests' nodes
    print their INFO lines into the test run's own output."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in before and h.get_name() == "dicomnode"]:
        root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    """:func:`require_tool` for tests (conftest functions are not importable)."""
    return require_tool


_handed_out: set[int] = set()


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now and not handed out before."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out and port not in (104, 4242, 8042, 11112):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


@pytest.fixture
def free_port() -> Callable[[], int]:
    """Call it for a fresh free port on 127.0.0.1 (for peers that need one up front)."""
    return _free_port


@pytest.fixture(scope="session")
def model_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny real ONNX bundles: (threshold segmenter, max classifier)."""
    root = tmp_path_factory.mktemp("bundles")
    return threshold_segmenter(root / "seg"), max_classifier(root / "cls")


NodeFactory = Callable[..., Node]


@pytest.fixture
def node_factory(tmp_path: Path, model_bundles: tuple[Path, Path]) -> Iterator[NodeFactory]:
    """Build a :class:`Config` in code and start a :class:`Node`; every node is stopped after.

    Keyword arguments: ``data_dir`` (default ``tmp_path/node``; pass the same one to restart
    over the same spool), ``quiet_period_s`` (1.0), ``pacs_port`` (adds the remote ``pacs``
    = AE ``PACS`` on 127.0.0.1), ``remotes``, ``folders``, ``destinations`` (``("pacs",)``),
    ``match`` (route rule tables, default ``Modality = CT``), ``min_free_disk_mb`` (0),
    ``delivery`` (:class:`RetrySettings`, fast back-off), ``late_arrivals``, ``start``.
    """
    seg, cls = model_bundles
    nodes: list[Node] = []

    def make(
        *,
        data_dir: Path | None = None,
        quiet_period_s: float = 1.0,
        pacs_port: int | None = None,
        remotes: Sequence[Remote] = (),
        folders: Sequence[FolderDestination] = (),
        destinations: Sequence[str] = ("pacs",),
        match: Sequence[Mapping[str, Any]] = ({"Modality": "CT"},),
        min_free_disk_mb: int = 0,
        delivery: RetrySettings | None = None,
        late_arrivals: str = "rerun",
        start: bool = True,
    ) -> Node:
        all_remotes = list(remotes)
        if pacs_port is None and "pacs" in destinations and all(r.name != "pacs" for r in remotes):
            pacs_port = 9  # the configured PACS is down (discard port): results wait in the outbox
        if pacs_port is not None:
            all_remotes.append(Remote("pacs", PACS_AE, "127.0.0.1", pacs_port, 10.0))
        config = Config(
            node=NodeSettings(
                ae_title=NODE_AE,
                bind_address="127.0.0.1",
                port=0,
                network_timeout_s=20.0,
                data_dir=data_dir or tmp_path / "node",
                min_free_disk_mb=min_free_disk_mb,
                workers=0,
                log_level="INFO",
            ),
            completeness=CompletenessSettings(
                quiet_period_s=quiet_period_s,
                late_arrivals=late_arrivals,  # type: ignore[arg-type]
                poll_interval_s=0.1,
            ),
            jobs=RetrySettings(max_attempts=2, backoff_initial_s=0.2, backoff_max_s=1.0),
            delivery=delivery
            or RetrySettings(max_attempts=50, backoff_initial_s=0.2, backoff_max_s=0.5),
            remotes=tuple(all_remotes),
            folders=tuple(folders),
            pipelines=(
                PipelineSettings(
                    "lesion",
                    {"segmentation": seg, "classification": cls},
                    batch_size=8,
                    providers=("cpu",),
                ),
            ),
            routes=(
                Route(
                    "ct",
                    "lesion",
                    tuple(destinations),
                    parse_rule(list(match), where="routes[0].match"),
                ),
            ),
        )
        node = Node(config)
        if start:
            node.start()
            nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.scp._server is not None or not node._stop.is_set():
            node.stop(timeout=30.0)


@pytest.fixture
def folder_scp(tmp_path: Path) -> Iterator[FolderSCP]:
    """A storage SCP (AE ``PACS``) writing what it receives to ``tmp_path/pacs``."""
    scp = FolderSCP(PACS_AE, tmp_path / "pacs")
    scp.start()
    yield scp
    scp.stop()


PHANTOM_SPEC = PhantomSpec(
    rows=128, columns=128, slices=24, pixel_spacing=(2.8, 2.8), slice_thickness=2.5, seed=3
)


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    """A small CT phantom (128 x 128, 24 slices) with known lesions; do not modify it."""
    return generate_phantom(PHANTOM_SPEC)


@pytest.fixture
def phantom_files(phantom: Phantom, tmp_path: Path) -> list[Path]:
    """The phantom written as Explicit VR Little Endian files in ``tmp_path/study``."""
    return write_phantom(phantom, tmp_path / "study")
