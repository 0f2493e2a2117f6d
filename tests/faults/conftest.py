"""Fixtures of the fault tests: peers and facilities that skip locally and fail in CI."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Unavailable, tmpfs, tool


def unavailable(reason: str) -> None:
    """Skip on a developer machine; fail in CI (``CI`` set), where everything is installed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; required in CI", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def dcmtk() -> None:
    """dcmtk's storescu and storescp (not pynetdicom's scripts of the same names)."""
    try:
        tool("storescu")
        tool("storescp")
    except Unavailable as exc:
        unavailable(str(exc))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Call it with a size in MiB: mounts a tmpfs of that size, unmounted after the test."""
    with contextlib.ExitStack() as stack:

        def mount(size_mb: int) -> Path:
            try:
                return stack.enter_context(tmpfs(tmp_path / f"disk-{size_mb}m", size_mb))
            except Unavailable as exc:
                unavailable(str(exc))
                raise

        yield mount
