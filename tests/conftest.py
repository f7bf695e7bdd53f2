"""Shared fixtures: `qsd`, a factory for qemu-storage-daemon peers, and `blk_peer`, the same
factory parametrized over every vhost-user-blk backend (vhostmem and qemu-storage-daemon), all
torn down after the test."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.peers import (
    PeerHandle,
    QsdHandle,
    make_image,
    start_qsd,
    start_vhostmem,
    start_vhostmem_nbd,
)

DEFAULT_IMAGE_SIZE = 16 << 20
BLK_PEERS = ["vhostmem", "qsd", "vhostmem-nbd"]

PeerFactory = Callable[..., PeerHandle]


def _peer_factory(kind: str, prefix: str) -> Iterator[PeerFactory]:
    """`start(size=..., num_queues=1, readonly=False, image=None)` starts a `kind` peer on a
    fresh raw image (random contents, kept as `handle.initial`) in a short private directory;
    `handle.kind` names the backend."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))  # short: socket paths max 107 bytes
    handles: list[PeerHandle] = []
    launch = {"vhostmem": start_vhostmem, "qsd": start_qsd,
              # vhostmem with its rings in two data-plane worker processes (--workers 2)
              "vhostmem-workers": functools.partial(start_vhostmem, workers=2),
              # vhostmem on nbdkit's file plugin serving the image (docs/conformance.md)
              "vhostmem-nbd": start_vhostmem_nbd}[kind]

    def start(size: int = DEFAULT_IMAGE_SIZE, num_queues: int = 1, readonly: bool = False,
              image: str | None = None) -> PeerHandle:
        n = len(handles)
        image_path = image or str(workdir / f"disk{n}.raw")
        initial = None if image else make_image(image_path, size)
        handle = launch(image_path, str(workdir / f"blk{n}.sock"), num_queues, readonly)
        handle.initial = initial  # type: ignore[attr-defined]
        handle.kind = kind  # type: ignore[attr-defined]
        handles.append(handle)
        return handle

    try:
        yield start
    finally:
        for handle in handles:
            handle.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def qsd() -> Iterator[Callable[..., QsdHandle]]:
    """`qsd(size=..., num_queues=1, readonly=False, image=None)` starts a daemon on a fresh raw
    image (random contents, kept as `handle.initial`) in a short private directory."""
    yield from _peer_factory("qsd", "vhm-qsd-")  # type: ignore[misc]


@pytest.fixture(params=BLK_PEERS)
def blk_peer(request: pytest.FixtureRequest) -> Iterator[PeerFactory]:
    """Like `qsd`, once per backend in BLK_PEERS: the same test runs against vhostmem and
    qemu-storage-daemon; `handle.kind` says which one it got."""
    yield from _peer_factory(request.param, f"vhm-{request.param[:3]}-")
