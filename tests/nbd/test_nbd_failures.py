"""NBD servers that die, come back, or lie: the guest sees errors (never a hang), vhostmem never
writes outside a request's buffers, reconnects, and its other devices keep serving."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.nbd.hostile import SCENARIOS, HostileServer
from tests.nbd.servers import (
    GUEST_RAM,
    needs_qemu_nbd,
    start_qemu_nbd,
    stop,
    unix_uri,
    vhostmem_on,
)
from vhostmem.frontend import VhostUserBlk
from vhostmem.frontend.queue import BlkQueue, Request

STATUS_OK, STATUS_IOERR = 0, 1
TIMEOUT = 1.5  # nbd-timeout given to vhostmem
PAGE = 4096
CANARY = 0xEE
EXPECTED_LOG = {
    "wrong-magic": "reply magic 0xdeadbeef",
    "unknown-cookie": "unknown cookie",
    "short-then-close": "the server closed the connection",
    "oversized-chunk": "OFFSET_DATA length",
    "chunk-outside": "outside READ cookie",
}


def submit_all(q: BlkQueue, reqs: list[Request]) -> None:
    q.notify()
    for r in reqs:
        q.wait_for(r, timeout=8 * TIMEOUT + 5)


@needs_qemu_nbd
def test_server_killed_then_restarted(tmp_path: Path) -> None:
    timeout = 2 * TIMEOUT  # room for restarting qemu-nbd on a loaded machine
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4 << 20))
    nbd_sock, vsock, log = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "v.log"
    server = start_qemu_nbd(image, nbd_sock, fmt="raw")
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},"
                         f"nbd-timeout={timeout}", log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=128, depth=16)
            q.write(0, b"A" * PAGE)
            stop(server, sig_kill=True)
            # Down for longer than the timeout: every request fails, none hangs.
            started = time.monotonic()
            reqs = [q.prepare(0, i * 8, in_len=PAGE) for i in range(4)]
            reqs += [q.prepare(1, 64 + i * 8, data=b"B" * PAGE) for i in range(4)]
            submit_all(q, reqs)
            assert [r.status for r in reqs] == [STATUS_IOERR] * 8
            assert time.monotonic() - started < timeout + 3
            # Back: vhostmem reconnects by itself and the disk works again.
            server = start_qemu_nbd(image, nbd_sock, fmt="raw")
            deadline = time.monotonic() + 10
            while True:
                status, data = q.run(0, 0, in_len=PAGE, timeout=10)
                if status == STATUS_OK or time.monotonic() > deadline:
                    break
            assert (status, data) == (STATUS_OK, b"A" * PAGE)
            # Down for less than the timeout: requests wait for the reconnect and succeed.
            stop(server, sig_kill=True)
            reqs = [q.prepare(1, 128 + i * 8, data=bytes([i]) * PAGE) for i in range(8)]
            q.notify()
            time.sleep(0.3)
            server = start_qemu_nbd(image, nbd_sock, fmt="raw")
            submit_all(q, reqs)
            assert [r.status for r in reqs] == [STATUS_OK] * 8
            q.flush()
    finally:
        stop(server)
    text = log.read_text()
    assert "connection lost: the server closed the connection" in text
    assert "reconnected" in text
    disk = image.read_bytes()
    assert disk[:PAGE] == b"A" * PAGE
    for i in range(8):
        at = (128 + i * 8) * 512
        assert disk[at : at + PAGE] == bytes([i]) * PAGE
    assert disk[64 * 512 : 64 * 512 + PAGE] == bytes(PAGE)  # the failed writes left nothing


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_hostile_server(tmp_path: Path, scenario: str) -> None:
    nbd_sock, vsock, other = tmp_path / "h.sock", tmp_path / "v.sock", tmp_path / "o.sock"
    log = tmp_path / "v.log"
    server = HostileServer(nbd_sock, scenario)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)},nbd-timeout={TIMEOUT}",
                         f"socket={other},ram=4M", log=log, sockets=(vsock, other)) as proc, \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64, depth=4)
            q.write(8, b"W" * PAGE)  # writes are answered honestly
            req = q.prepare(0, 8, in_len=PAGE)
            # Canaries around the request's buffer: the page before its data (but the
            # header) and the rest of its slot after the status byte.
            before = (req.data_gpa - PAGE, PAGE - 16)
            after = (req.data_gpa + PAGE + 1, req.capacity - PAGE - 1)
            for gpa, n in (before, after):
                dev.ram.write(gpa, bytes([CANARY]) * n)
            started = time.monotonic()
            q.notify()
            q.wait_for(req, timeout=4 * TIMEOUT + 5)
            assert req.status == STATUS_IOERR
            assert time.monotonic() - started < TIMEOUT + 3
            for gpa, n in (before, after):
                assert dev.ram.read(gpa, n) == bytes([CANARY]) * n
            # The other device of the process serves meanwhile.
            with VhostUserBlk.open(str(other), ram_size=GUEST_RAM) as dev2:
                q2 = dev2.start_queue(0, size=64, depth=4)
                q2.write(0, b"O" * PAGE)
                assert q2.read(0, PAGE) == b"O" * PAGE
            assert proc.poll() is None
    finally:
        server.close()
    text = log.read_text()
    assert EXPECTED_LOG[scenario] in text, text
    assert "Traceback" not in text and "Task was destroyed" not in text, text
    assert server.connections >= 2  # it reconnected after dropping the bad connection


def test_no_fd_left_after_a_hostile_episode(tmp_path: Path) -> None:
    """Each dropped connection's socket is closed: the process's fd count stays put."""
    nbd_sock, vsock, log = tmp_path / "h.sock", tmp_path / "v.sock", tmp_path / "v.log"
    server = HostileServer(nbd_sock, "wrong-magic")
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)},nbd-timeout={TIMEOUT}",
                         log=log, sockets=(vsock,)) as proc, \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64, depth=4)
            fds = f"/proc/{proc.pid}/fd"
            # A write (answered honestly) before each count: the connection is up and idle,
            # not between reconnect attempts (no socket) or in one (a socket for a while).
            q.run(0, 0, in_len=PAGE, timeout=10)
            q.write(8, b"W" * PAGE)
            first = len(os.listdir(fds))
            for _ in range(3):
                status, _ = q.run(0, 0, in_len=PAGE, timeout=10)
                assert status == STATUS_IOERR
            q.write(8, b"W" * PAGE)
            assert server.connections >= 4
            assert len(os.listdir(fds)) <= first
    finally:
        server.close()


@needs_qemu_nbd
def test_reconnect_to_a_changed_export_is_refused(tmp_path: Path) -> None:
    """The server comes back with another disk (another size): vhostmem does not use it, the
    guest gets IOERR, and the other image is left untouched."""
    image, other = tmp_path / "d.raw", tmp_path / "other.raw"
    image.write_bytes(bytes(4 << 20))
    other.write_bytes(b"X" * (8 << 20))
    nbd_sock, vsock, log = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "v.log"
    server = start_qemu_nbd(image, nbd_sock, fmt="raw")
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},"
                         f"nbd-timeout={TIMEOUT}", log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64, depth=4)
            q.write(0, b"A" * PAGE)
            stop(server, sig_kill=True)
            server = start_qemu_nbd(other, nbd_sock, fmt="raw")
            status, _ = q.run(1, 8, data=b"B" * PAGE, timeout=4 * TIMEOUT + 5)
            assert status == STATUS_IOERR
    finally:
        stop(server)
    assert "the export changed (size 8388608" in log.read_text()
    assert other.read_bytes() == b"X" * (8 << 20)
