"""`vhostmem serve --poll-us`: after a turn that served requests the ring is looked at again
without a kick until the window passes with nothing new; then kicks are needed again.

A real `vhostmem serve` process and the fake guest; the guest publishes requests without
kicking (the avail index store only) to see whether the backend polls.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.nbd.hostile import HONEST, HostileServer
from tests.nbd.servers import unix_uri
from tests.peers import ROOT
from vhostmem.frontend import BlkType, VhostUserBlk
from vhostmem.frontend.queue import BlkQueue

SECTOR = 512
SOCKET_WAIT = 10.0
WINDOW_US = 400_000  # long enough for a loaded CI machine to publish within it


@contextmanager
def served(tmp_path: Path, *extra: str, blk: str = "") -> Iterator[BlkQueue]:
    """A RAM disk, or with ``blk`` the device of ``--blk socket=...,BLK``."""
    sock = tmp_path / "blk.sock"
    disk = ["--blk", f"socket={sock},{blk}"] if blk else ["--socket", str(sock), "--ram-size",
                                                         "1M"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostmem.cli", "serve", *disk, *extra], cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + SOCKET_WAIT
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no socket"
            time.sleep(0.02)
        dev = VhostUserBlk.open(str(sock))
        try:
            yield dev.start_queue(0, size=16, depth=4, max_data=4096)
        finally:
            dev.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert b"Traceback" not in err, err.decode()


def read_without_kick(q: BlkQueue) -> None:
    """Queue a read and publish it with the avail index store only (no kick)."""
    q.prepare(BlkType.IN, 0, in_len=SECTOR)
    q.ring.publish()


def test_a_polled_ring_is_served_without_kicks_until_the_window_passes(tmp_path: Path) -> None:
    with served(tmp_path, "--poll-us", str(WINDOW_US)) as q:
        q.submit(BlkType.IN, 0, in_len=SECTOR)  # kicked: served, the window opens
        q.wait(5)
        for _ in range(3):  # each request served without a kick extends the window
            read_without_kick(q)
            assert len(q.wait(5)) == 1
        time.sleep(3 * WINDOW_US / 1e6)  # the window has passed: kicks are needed again
        read_without_kick(q)
        with pytest.raises(TimeoutError):
            q.wait(1)
        q.kick_fd.signal()
        assert len(q.wait(5)) == 1


def test_a_polled_nbd_ring_is_served_without_kicks(tmp_path: Path) -> None:
    """An NBD disk completes its requests later, outside the turn that took them: the turn
    that took a request opens the window all the same."""
    server = HostileServer(tmp_path / "nbd.sock", HONEST)
    try:
        with served(tmp_path, "--poll-us", str(WINDOW_US),
                    blk=f"nbd={unix_uri(tmp_path / 'nbd.sock')}") as q:
            q.submit(BlkType.IN, 0, in_len=SECTOR)  # kicked: taken, the window opens
            q.wait(5)
            for _ in range(3):  # each request taken without a kick extends the window
                read_without_kick(q)
                assert len(q.wait(5)) == 1
    finally:
        server.close()


def test_without_polling_a_request_waits_for_its_kick(tmp_path: Path) -> None:
    with served(tmp_path) as q:
        q.submit(BlkType.IN, 0, in_len=SECTOR)
        q.wait(5)
        read_without_kick(q)
        with pytest.raises(TimeoutError):
            q.wait(1)
        q.kick_fd.signal()
        assert len(q.wait(5)) == 1


def test_poll_us_is_checked(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vhostmem.cli", "serve", "--socket",
                          str(tmp_path / "s.sock"), "--poll-us", "2000000"], cwd=ROOT,
                         capture_output=True, text=True, timeout=20)
    assert run.returncode == 2
    assert "--poll-us: '2000000' is not a number of microseconds in 0..1000000" in run.stderr
