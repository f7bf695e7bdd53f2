"""The conformance suite's `vhostmem-nbd` peer (tests/peers.py): vhostmem really serves the
image through nbdkit, and stopping the handle, or a failed start, leaves no server behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nbd.servers import needs_nbdkit
from tests.peers import PeerError, make_image, start_vhostmem_nbd

pytestmark = needs_nbdkit
SIZE = 1 << 20


def _processes_naming(path: str) -> list[int]:
    """Live processes whose command line holds `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if path.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_stop_ends_vhostmem_and_the_nbd_server(tmp_path: Path) -> None:
    image, sock = str(tmp_path / "disk.raw"), str(tmp_path / "blk.sock")
    make_image(image, SIZE)
    handle = start_vhostmem_nbd(image, sock, num_queues=2)
    try:
        assert handle.server.args[:4] == ["nbdkit", "-f", "-U", sock + ".nbd"]
        assert handle.server.args[-2:] == ["file", image]
        assert _processes_naming(sock + ".nbd")  # nbdkit, and vhostmem's --blk nbd=
    finally:
        handle.stop()
    assert handle.proc.returncode is not None and handle.server.returncode is not None
    assert not _processes_naming(sock + ".nbd")
    assert not os.path.exists(sock)
    assert f"export of {SIZE} bytes" in handle.log()


def test_failed_start_stops_the_nbd_server(tmp_path: Path) -> None:
    image, sock = str(tmp_path / "disk.raw"), str(tmp_path / "blk.sock")
    make_image(image, SIZE)
    with pytest.raises(PeerError, match="longer than 20 bytes"):
        start_vhostmem_nbd(image, sock, serial="x" * 21)  # vhostmem exits 2 on the spec
    assert not _processes_naming(sock + ".nbd")
