"""Two sockets on one disk in one process (the two ends of a live migration on one host):
one frontend at a time runs rings on it, the other is refused with a REPLY_ACK failure naming
the holder, and takes over once the first stopped its rings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vhostmem.test_cli import GUEST_RAM, SECTOR, start_serve, stop_serve, wait_for_socket
from vhostmem.cli import UsageError, make_device, parse_blk_spec
from vhostmem.frontend import VhostUserBlk, VhostUserError


def two_sockets_one_disk(tmp_path: Path, *specs: str) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = start_serve("--blk", f"socket={a},{specs[0]}", "--blk", f"socket={b},{specs[1]}")
    try:
        wait_for_socket(a, proc)
        wait_for_socket(b, proc)
        with VhostUserBlk.open(str(a), ram_size=GUEST_RAM) as src:
            qa = src.start_queue(0, size=16)
            qa.write(3, b"m" * SECTOR)
            with VhostUserBlk.open(str(b), ram_size=GUEST_RAM) as dst:
                with pytest.raises(VhostUserError, match="refused SET_VRING_KICK"):
                    dst.start_queue(0, size=16)
                base = src.stop_queue(0)  # the source stops its rings (switchover)
                qb = dst.resume_queue(0, 0)  # program the ring again, now allowed
                assert qb.read(3, SECTOR) == b"m" * SECTOR
                qb.write(4, b"n" * SECTOR)
            qa = src.resume_queue(0, base)  # the destination went away: back to the source
            assert qa.read(4, SECTOR) == b"n" * SECTOR
    finally:
        log = stop_serve(proc)
    assert f"is in use by the frontend on {a.name}" in log


def test_the_same_disk_file_on_two_sockets(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    two_sockets_one_disk(tmp_path, f"disk={image}", f"disk={image}")


def test_a_shared_ram_disk_on_two_sockets(tmp_path: Path) -> None:
    two_sockets_one_disk(tmp_path, "ram=4M,share=vm1", "share=vm1")


def test_devices_sharing_a_disk_must_agree_on_it(tmp_path: Path) -> None:
    shared: dict = {}
    first = make_device(parse_blk_spec("socket=a,ram=1M,share=s"), shared)
    try:
        with pytest.raises(UsageError, match="readonly must be the same"):
            make_device(parse_blk_spec("socket=b,share=s,readonly=on"), shared)
        with pytest.raises(UsageError, match="ram=2097152 differs"):
            make_device(parse_blk_spec("socket=b,share=s,ram=2M"), shared)
        with pytest.raises(UsageError, match="no device names its disk"):
            make_device(parse_blk_spec("socket=c,share=other"), shared)
    finally:
        first.close()
