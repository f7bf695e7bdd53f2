"""Conformance fixtures. `blk_peer` (tests/conftest.py) runs each case against vhostmem and
qemu-storage-daemon; `ring_peer` also against vhostmem on packed rings; `num_queues` runs the
I/O cases against a 1-queue and a 2-queue export."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import PeerFactory, _peer_factory


@pytest.fixture(params=[1, 2], ids=lambda n: f"nq{n}")
def num_queues(request: pytest.FixtureRequest) -> int:
    return request.param


# The ring-layout axis: qemu-storage-daemon serves split rings only (its vhost-user library has
# no packed layout), so packed cases run against vhostmem alone, named as such.
# vhostmem-workers: the request cases once more with the rings in two worker processes (the
# whole suite runs in that mode with VHOSTMEM_TEST_WORKERS=2: `make test-workers`).
# vhostmem-nbd: the request cases with the disk on an NBD server (nbdkit's file plugin on the
# image), split and packed rings.
RING_PEERS = [("vhostmem", False), ("vhostmem", True), ("qsd", False),
              ("vhostmem-workers", False), ("vhostmem-nbd", False), ("vhostmem-nbd", True)]


@pytest.fixture(params=RING_PEERS, ids=lambda p: f"{p[0]}-{'packed' if p[1] else 'split'}")
def ring_peer(request: pytest.FixtureRequest) -> Iterator[tuple[PeerFactory, bool]]:
    """(peer factory, packed): every peer on split rings, plus vhostmem on packed rings (open
    the device with ``packed=packed``)."""
    kind, packed = request.param
    for factory in _peer_factory(kind, f"vhm-{kind[:3]}-{kind[-1]}"):
        yield factory, packed


@pytest.fixture
def vhostmem_peer() -> Iterator[PeerFactory]:
    """vhostmem alone: for packed-ring cases (qemu-storage-daemon has no packed layout)."""
    yield from _peer_factory("vhostmem", "vhm-vhm-")
