"""Fixtures of the frontend's unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.vhostmem.frontend.scripted import Scripted, scripted_backends


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    """`scripted(respond) -> (client, seen)`: a scripted backend connected to a frontend
    client (tests/vhostmem/frontend/scripted.py)."""
    yield from scripted_backends()
