"""Conformance fixtures. `blk_peer` (tests/conftest.py) runs each case against vhostmem and
qemu-storage-daemon; `num_queues` runs the I/O cases against a 1-queue and a 2-queue export."""

from __future__ import annotations

import pytest


@pytest.fixture(params=[1, 2], ids=lambda n: f"nq{n}")
def num_queues(request: pytest.FixtureRequest) -> int:
    return request.param
