"""Fixtures of the fuzz tests and the per-category counts printed after the run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from dicomnode.app.node import Node

from .harness import RawStoreClient, Seed, Tally, make_seeds, write_instance

TALLY = Tally()


@pytest.fixture(scope="session")
def seeds() -> list[Seed]:
    """One small valid CT instance per transfer syntax in SEED_SYNTAXES."""
    return make_seeds()


@pytest.fixture
def tally() -> Tally:
    return TALLY


@pytest.fixture
def fuzz_node(node_factory: Callable[..., Node]) -> Node:
    """A node that receives but does not process (the quiet period outlasts the test)."""
    return node_factory(quiet_period_s=3600.0, pacs_port=9)


@pytest.fixture
def valid_file(seeds: list[Seed], tmp_path: Path) -> Path:
    """A valid instance (Explicit VR Little Endian) for the liveness checks."""
    seed = seeds[0]
    uid = generate_uid()
    body = seed.replace({0x00080018: uid.encode() + b"\0" * (len(uid) % 2)})
    return write_instance(
        tmp_path / "valid.dcm", body, sop_instance_uid=uid, syntax=seed.transfer_syntax
    )


@pytest.fixture
def client(fuzz_node: Node, tmp_path: Path) -> Any:
    raw = RawStoreClient(fuzz_node.port, tmp_path / "raw")
    yield raw
    raw.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLY.counts:
        terminalreporter.section("fuzz cases")
        terminalreporter.write_line(TALLY.report())
        total = sum(TALLY.counts.values())
        terminalreporter.write_line(f"total: {total} cases")
