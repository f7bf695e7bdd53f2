"""Hostile-guest fixtures: one in-process server for the package, bounds checks on, and the
after-checks every case must pass (second queue and second device serve, nothing leaked,
nothing touched outside guest memory or the targeted sectors)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.hostile.env import (
    Image,
    ServerThread,
    assert_no_bounds_violations,
    guarded_ram,
    memfd_mappings,
    open_guest,
    real_io,
)
from tests.hostile.guarded import GuardedRam
from vhostmem import bounds
from vhostmem.frontend import VhostUserBlk
from vhostmem.server import Endpoint

# The server-side sectors the after-checks write (hostile cases stay below them).
CHECK_SECTOR_A = 4096
CHECK_SECTOR_B = 2048


@pytest.fixture(scope="package", autouse=True)
def bounds_checks() -> Iterator[None]:
    """Every guest-memory view is checked against its region while this package runs (what
    VHOSTMEM_DEBUG_BOUNDS=1 does at import), and only then: other packages keep the fast path."""
    was_on = bounds.enabled
    bounds.enable()
    yield
    if not was_on:
        bounds.disable()


@pytest.fixture(scope="package")
def server() -> Iterator[ServerThread]:
    srv = ServerThread()
    yield srv
    srv.close()


@dataclass
class Guest:
    srv: ServerThread
    ram: GuardedRam
    dev: VhostUserBlk
    endpoint: Endpoint
    image: Image


@pytest.fixture(params=["inline", "thread"])
def guest(server: ServerThread, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A frontend with queues 0 (the victim) and 1 (must keep serving) on device A (requests
    served on the loop) or device T (requests served by a thread pool)."""
    yield from _guest(server, request.param, packed=False)


@pytest.fixture(params=["inline", "thread"])
def packed_guest(server: ServerThread, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """``guest`` on packed rings (VIRTIO_F_RING_PACKED negotiated)."""
    yield from _guest(server, request.param, packed=True)


def _guest(server: ServerThread, mode: str, packed: bool) -> Iterator[Guest]:
    bounds.violations.clear()
    endpoint, image = (server.a, server.images["a"]) if mode == "inline" else \
        (server.t, server.images["t"])
    ram = guarded_ram()
    dev = open_guest(server.path(endpoint), ram, queues=2, packed=packed)
    assert dev.packed is packed
    g = Guest(server, ram, dev, endpoint, image)
    yield g
    try:
        after_checks(g)
    finally:
        dev.close()
        ram.close()
    server.wait_disconnected(endpoint)
    assert server.call(server.registry.chunks) == [], "registrations left after disconnect"
    assert not memfd_mappings(), "guest memory still mapped after disconnect"
    assert_no_bounds_violations()
    server.assert_no_crashes()


def after_checks(g: Guest) -> None:
    srv = g.srv
    real_io(g.dev, 1, g.image, CHECK_SECTOR_A)
    other_ram = guarded_ram()
    try:
        with open_guest(srv.path(srv.b), other_ram) as other:
            real_io(other, 0, srv.images["b"], CHECK_SECTOR_B)
    finally:
        other_ram.close()
    srv.wait_disconnected(srv.b)
    assert not g.ram.damaged_guards(), "a guard region of guest RAM changed"
    for name, image in srv.images.items():
        assert image.unchanged_elsewhere(), f"image {name} changed outside the targeted sectors"
    assert_no_bounds_violations()
