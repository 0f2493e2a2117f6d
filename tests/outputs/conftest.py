"""Fixtures for the SEG/SR builder tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .cases import GEOMETRIES, Case, make_case


@pytest.fixture(scope="session")
def case_factory() -> Callable[[str], Case]:
    """Cases by geometry name, generated once per session."""
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            cache[name] = make_case(GEOMETRIES[name])
        return cache[name]

    return get
