"""Fixtures of the Ray tests: one real local Ray cluster (head + second node) per session."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from faults.harness import Unavailable, tool

from .cluster import RayCluster, RayUnavailable


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head and a second node, each with 2 logical CPUs; stopped (every process killed)
    after the session.  Skips when Ray is not installed (fails in CI, where it is)."""
    if importlib.util.find_spec("ray") is None:
        unavailable("ray is not installed (pip install 'dicomnode[ray]')")
    cluster = RayCluster(tmp_path_factory.mktemp("ray-logs"))
    try:
        cluster.start_head()
        cluster.start_second()
    except RayUnavailable as exc:
        cluster.stop()
        unavailable(f"a local Ray cluster cannot start here: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def two_nodes(ray_cluster: RayCluster) -> RayCluster:
    """The session's cluster with its second node running (started again if a test
    killed it)."""
    if "second" not in ray_cluster.nodes:
        ray_cluster.start_second()
    return ray_cluster


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI (``CI`` set), where everything is installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; required in CI", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def storescu() -> str:
    """dcmtk's storescu (not pynetdicom's script of the same name)."""
    try:
        return tool("storescu")
    except Unavailable as exc:
        unavailable(str(exc))
        raise
