"""vhost-user-blk over NBD with real servers: the fake guest (vhostmem.frontend) drives
`vhostmem serve --blk socket=S,nbd=URI` on qemu-nbd (a qcow2 image) and nbdkit (memory and
file plugins)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nbd.constants import (
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
)
from tests.nbd.hostile import HONEST, SILENT_FLUSH, HostileServer
from tests.nbd.servers import (
    CLOSE_TIMEOUT_ENV,
    CONNECT_TIMEOUT_ENV,
    GUEST_RAM,
    SHORT_TIMEOUT,
    needs_nbdkit,
    needs_qemu_nbd,
    start_nbdkit,
    start_qemu_nbd,
    stop,
    unix_uri,
    vhostmem_on,
    wait_for_path,
)
from tests.vhostmem.rpc.rpcenv import RpcFailed, Serve, wait_until
from vhostmem.devices.nbd_backend import ZERO_CHUNK, zero_fill
from vhostmem.frontend import VhostUserBlk, VhostUserClient
from vhostmem.frontend.queue import BlkError

SECTOR = 512
IMAGE_SIZE = 8 << 20
VIRTIO_BLK_F_RO = 5
CFG_WRITEBACK = 32
STATUS_OK, STATUS_IOERR, STATUS_UNSUPP = 0, 1, 2
VIRTIO_BLK_F_WRITE_ZEROES = 14


def guest_writes(seed: int) -> list[tuple[int, bytes]]:
    """(sector, data) writes: different sizes, overlapping some of each other."""
    rng = random.Random(seed)
    out = []
    for _ in range(24):
        nsec = rng.choice([1, 8, 64, 128])
        sector = rng.randrange(0, IMAGE_SIZE // SECTOR - nsec)
        out.append((sector, rng.randbytes(nsec * SECTOR)))
    return out


@needs_qemu_nbd
def test_qcow2_through_qemu_nbd_equals_a_raw_image_written_the_same_way(tmp_path: Path) -> None:
    qcow2, raw = tmp_path / "disk.qcow2", tmp_path / "ref.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(IMAGE_SIZE)],
                   check=True)
    raw.write_bytes(bytes(IMAGE_SIZE))
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    server = start_qemu_nbd(qcow2, nbd_sock)
    writes = guest_writes(1)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')}",
                         log=tmp_path / "v.log", sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=256)
            assert dev.config()["capacity"] == IMAGE_SIZE // SECTOR
            for sector, data in writes:
                q.write(sector, data)
            q.write_zeroes(writes[0][0], 8)  # NO_HOLE: reads as zeroes, stays allocated
            q.flush()
            for sector, data in writes[-4:]:
                assert q.read(sector, len(data)) == data
    finally:
        stop(server)
    with open(raw, "r+b") as f:
        for sector, data in writes:
            f.seek(sector * SECTOR)
            f.write(data)
        f.seek(writes[0][0] * SECTOR)
        f.write(bytes(8 * SECTOR))
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2),
                          str(raw)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@needs_nbdkit
def test_many_requests_in_flight_on_nbdkit_memory(tmp_path: Path) -> None:
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    server = start_nbdkit(nbd_sock, "memory", "16M")
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=256, depth=32, max_data=1 << 20)
            blocks = {i: os.urandom(4096) for i in range(32)}
            reqs = [q.prepare(1, i * 8, data=blocks[i]) for i in range(32)]
            q.notify()
            for r in reqs:
                assert q.wait_for(r).status == STATUS_OK
            reqs = [q.prepare(0, i * 8, in_len=4096) for i in range(32)]
            q.notify()
            for i, r in enumerate(reqs):
                q.wait_for(r)
                assert r.status == STATUS_OK
                assert dev.ram.read(r.in_gpa, 4096) == blocks[i]
            big = os.urandom(1 << 20)
            q.write(4096, big)
            assert q.read(4096, 1 << 20) == big
            q.discard(4096, 2048)
            assert q.read(4096, 4096) == bytes(4096)  # the memory plugin trims to zeroes
    finally:
        stop(server)


@needs_nbdkit
def test_nbdkit_file_plugin_gets_the_guest_writes(tmp_path: Path) -> None:
    image = tmp_path / "file.img"
    image.write_bytes(bytes(IMAGE_SIZE))
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    server = start_nbdkit(nbd_sock, "file", str(image))
    writes = guest_writes(2)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=256)
            for sector, data in writes:
                q.write(sector, data)
    finally:
        stop(server)
    expected = bytearray(IMAGE_SIZE)
    for sector, data in writes:
        expected[sector * SECTOR : sector * SECTOR + len(data)] = data
    assert image.read_bytes() == expected


@needs_qemu_nbd
def test_read_only_export_is_a_read_only_disk(tmp_path: Path) -> None:
    image = tmp_path / "ro.raw"
    image.write_bytes(b"R" * IMAGE_SIZE)
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    server = start_qemu_nbd(image, nbd_sock, fmt="raw", readonly=True)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')}",
                         log=tmp_path / "v.log", sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            assert dev.offer.features >> VIRTIO_BLK_F_RO & 1
            q = dev.start_queue(0, size=64)
            assert q.read(0, 4096) == b"R" * 4096
            with pytest.raises(BlkError):
                q.write(0, b"W" * 4096)
    finally:
        stop(server)
    assert image.read_bytes()[:4096] == b"R" * 4096


@needs_nbdkit
def test_write_through_guest_gets_fua_writes(tmp_path: Path) -> None:
    """writeback off: each WRITE carries FUA (nbdkit's log filter shows the flags)."""
    nbd_sock, vsock, log = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "nbd.log"
    server = start_nbdkit(nbd_sock, "memory", "16M", f"logfile={log}", filters=("log",))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64)
            q.write(0, b"a" * 4096)  # writeback (the default): no FUA
            dev.client.set_config(CFG_WRITEBACK, b"\0")
            q.write(8, b"b" * 4096)
            q.write_zeroes(16, 8)
    finally:
        stop(server)
    lines = log.read_text().splitlines()
    writes = [line for line in lines if " Write " in line and "id=" in line]
    zeroes = [line for line in lines if " Zero " in line and "id=" in line]
    first = [w for w in writes if "offset=0x0 " in w]
    second = [w for w in writes if "offset=0x1000 " in w]
    assert first and "fua=0" in first[0], writes
    assert second and "fua=1" in second[0], writes
    assert zeroes and "fua=1" in zeroes[0], zeroes


@needs_nbdkit
def test_unreachable_or_refusing_server_stops_startup(tmp_path: Path) -> None:
    vsock = tmp_path / "v.sock"
    missing = tmp_path / "missing.sock"
    run = subprocess.run(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--blk",
         f"socket={vsock},nbd={unix_uri(missing)}"],
        capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "cannot connect to the NBD server" in run.stderr and str(missing) in run.stderr
    nbd_sock = tmp_path / "nbd.sock"
    server = start_nbdkit(nbd_sock, "memory", "1M", export="good")
    try:
        # nbdkit serves any name unless told otherwise; qemu-nbd refuses unknown ones.
        run = subprocess.run(
            [sys.executable, "-m", "vhostmem.cli", "serve", "--blk",
             f"socket={vsock},nbd=nbds+unix:///x?socket={nbd_sock}"],
            capture_output=True, text=True, timeout=30)
        assert run.returncode == 2 and "TLS" in run.stderr
    finally:
        stop(server)
    assert not vsock.exists()


@needs_qemu_nbd
def test_unknown_export_is_refused_by_name(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    server = start_qemu_nbd(image, nbd_sock, fmt="raw", export="disk")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "vhostmem.cli", "serve", "--blk",
             f"socket={vsock},nbd={unix_uri(nbd_sock, 'other')}"],
            capture_output=True, text=True, timeout=30)
    finally:
        stop(server)
    assert run.returncode == 1
    assert "NBD_REP_ERR_UNKNOWN" in run.stderr, run.stderr


@needs_nbdkit
def test_device_add_nbd_and_list_it(tmp_path: Path) -> None:
    nbd_sock, rpc_sock, vsock = tmp_path / "nbd.sock", tmp_path / "r.sock", tmp_path / "v.sock"
    server = start_nbdkit(nbd_sock, "memory", "4M")
    cli = [sys.executable, "-m", "vhostmem.cli"]
    serve = subprocess.Popen([*cli, "serve", "--rpc-socket", str(rpc_sock)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_path(rpc_sock, serve, "vhostmem serve")

        def rpc(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*cli, "rpc", "--socket", str(rpc_sock), *args],
                                  capture_output=True, text=True, timeout=30)

        uri = unix_uri(nbd_sock)
        assert rpc("device_add", f"socket={vsock}", f"nbd={uri}", "nbd_timeout=5").returncode == 0
        listed = json.loads(rpc("device_list").stdout)
        assert (listed[0]["nbd"], listed[0]["ram"], listed[0]["size"]) == (uri, None, 4 << 20)
        with VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64)
            q.write(0, b"r" * 4096)
            assert q.read(0, 4096) == b"r" * 4096
        bad = rpc("device_add", f"socket={tmp_path / 'w.sock'}",
                  f"nbd={unix_uri(tmp_path / 'missing.sock')}")
        assert bad.returncode != 0 and "cannot connect to the NBD server" in bad.stderr
        assert not (tmp_path / "w.sock").exists()
    finally:
        stop(serve)
        stop(server)


@needs_nbdkit
def test_server_without_write_zeroes_is_not_offered_write_zeroes(tmp_path: Path) -> None:
    """nbdkit's nozero filter hides WRITE_ZEROES: the guest is not offered
    VIRTIO_BLK_F_WRITE_ZEROES (a zeroing would be many writes of zeroes), and a write-zeroes
    sent anyway is UNSUPP and sends nothing (the log filter, outermost, shows what vhostmem
    sent)."""
    nbd_sock, vsock, log = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "nbd.log"
    server = start_nbdkit(nbd_sock, "memory", "16M", f"logfile={log}",
                          filters=("log", "nozero"))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            assert not dev.offer.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
            q = dev.start_queue(0, size=64)
            q.write(0, b"z" * 8192)
            with pytest.raises(BlkError) as err:
                q.write_zeroes(0, 16)
            assert err.value.status == STATUS_UNSUPP
            assert q.read(0, 8192) == b"z" * 8192
    finally:
        stop(server)
    lines = [line for line in log.read_text().splitlines() if " id=" in line]
    assert not [line for line in lines if " Zero " in line]
    assert len([line for line in lines if " Write " in line]) <= 2, lines


def test_write_zeroes_fallback_keeps_few_writes_in_flight() -> None:
    """Writes of zeroes (a reconnect lost the server's WRITE_ZEROES): one 2 GiB write-zeroes
    has a few writes out at a time (not 2048 at once), in order, and completes once all did."""
    pending: list[tuple[int, int, Callable[[bool], None]]] = []

    def write(views: list[memoryview], offset: int, length: int,
              done: Callable[[bool], None]) -> None:
        pending.append((offset, length, done))
    results: list[bool] = []
    zero_fill(write, 0, 2 << 30, results.append)
    written = []
    while pending:
        assert len(pending) <= 16  # nbd_backend.ZERO_IN_FLIGHT: 4
        offset, length, done = pending.pop(0)
        written.append((offset, length))
        done(True)
    assert results == [True]
    assert written == [(pos, ZERO_CHUNK) for pos in range(0, 2 << 30, ZERO_CHUNK)]
    # A failed piece: no more are sent, and the request fails once those out completed.
    zero_fill(write, 0, 64 << 20, results.append)
    pending.pop(0)[2](False)
    while pending:
        pending.pop(0)[2](True)
    assert results == [True, False]


def test_server_without_fua_or_trim(tmp_path: Path) -> None:
    """A server offering only FLUSH (the scripted one, honest): a write-through write is
    followed by a FLUSH before it completes, a discard sends nothing, no FUA is ever sent."""
    nbd_sock, vsock = tmp_path / "h.sock", tmp_path / "v.sock"
    server = HostileServer(nbd_sock, HONEST)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64)
            q.write(0, b"a" * 4096)
            dev.client.set_config(CFG_WRITEBACK, b"\0")
            q.write(8, b"b" * 4096)
            q.discard(16, 8)
            assert q.read(0, 8192) == b"a" * 4096 + b"b" * 4096
    finally:
        server.close()
    commands = [(cmd, flags, offset) for cmd, flags, offset, _ in server.requests]
    assert commands[:3] == [(NBD_CMD_WRITE, 0, 0), (NBD_CMD_WRITE, 0, 4096),
                            (NBD_CMD_FLUSH, 0, 0)]
    assert NBD_CMD_TRIM not in [c for c, _, _ in commands]
    assert server.disk[:8192] == b"a" * 4096 + b"b" * 4096


@needs_nbdkit
def test_error_replies_fail_the_request_not_the_connection(tmp_path: Path) -> None:
    """nbdkit's error filter answers READs with EIO while a trigger file exists: the guest
    gets IOERR for those, the connection stays up, and reads work again after."""
    nbd_sock, vsock, vlog = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "v.log"
    trigger = tmp_path / "fail-reads"
    server = start_nbdkit(nbd_sock, "memory", "16M", "error-pread=EIO",
                          "error-pread-rate=100%", f"error-pread-file={trigger}",
                          filters=("error",))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)}", log=vlog,
                         sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=64)
            q.write(0, b"e" * 4096)
            trigger.touch()
            status, _ = q.run(0, 0, in_len=4096)
            assert status == STATUS_IOERR
            trigger.unlink()
            assert q.read(0, 4096) == b"e" * 4096
    finally:
        stop(server)
    text = vlog.read_text()
    assert "READ of 4096 bytes at 0 failed: NBD error 5" in text, text
    assert "connection lost" not in text


def test_device_add_waits_for_a_silent_server_without_holding_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An NBD server that accepts and never speaks: device_add's handshake is awaited on the
    event loop, so the device already served keeps answering meanwhile (the old code ran it
    blocking: the whole handshake timeout without an answer), and then fails naming the
    server."""
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, str(SHORT_TIMEOUT))
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)  # connects complete in the backlog; nothing is ever sent
    asock, wsock = tmp_path / "a.sock", tmp_path / "w.sock"
    try:
        with Serve(tmp_path, "--blk", f"socket={asock},ram=4M") as serve, \
                ThreadPoolExecutor(1) as pool:
            adding = pool.submit(serve.call, "device_add", socket=str(wsock),
                                 nbd=unix_uri(tmp_path / "silent.sock"))
            slowest = answering_while(asock, lambda: not adding.done())
            with pytest.raises(RpcFailed, match=f"no handshake within {SHORT_TIMEOUT:g} s"):
                adding.result()
        assert slowest < 1.0, f"the served device stalled {slowest:.1f} s during device_add"
        assert not wsock.exists()
    finally:
        silent.close()


def answering_while(sock: Path, busy: Callable[[], bool]) -> float:
    """Ask the device on ``sock`` for its features again and again while ``busy()``; the
    slowest answer, in seconds."""
    slowest = 0.0
    while busy():
        started = time.monotonic()
        with VhostUserClient.connect(str(sock)) as c:
            c.get_features()
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.05)
    return slowest


def test_device_del_does_not_wait_on_a_server_that_never_answers_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """device_del of an NBD device whose server never answers the final FLUSH: the FLUSH and
    DISC run as a task on the event loop, so the other device keeps answering (the old code
    waited blocking, up to CLOSE_TIMEOUT, on the loop) and device_del returns at once."""
    monkeypatch.setenv(CLOSE_TIMEOUT_ENV, str(SHORT_TIMEOUT))
    nbd_sock, asock, nsock = tmp_path / "h.sock", tmp_path / "a.sock", tmp_path / "n.sock"
    server = HostileServer(nbd_sock, SILENT_FLUSH)
    try:
        with Serve(tmp_path, "--blk", f"socket={asock},ram=4M") as serve, \
                ThreadPoolExecutor(1) as pool:
            name = serve.call("device_add", socket=str(nsock), nbd=unix_uri(nbd_sock))["name"]
            started_del = time.monotonic()
            deleting = pool.submit(serve.call, "device_del", name=name)
            slowest = answering_while(asock, lambda: not deleting.done() or
                                      time.monotonic() - started_del < 2.0)
            deleting.result()
            assert slowest < 1.0, f"the served device stalled {slowest:.1f} s during device_del"
            assert NBD_CMD_FLUSH in [cmd for cmd, _, _, _ in server.requests]
            # The task gave up on the FLUSH after CLOSE_TIMEOUT and closed the connection.
            wait_until(lambda: server.hangups > 0, "the connection closed")
            assert server.hangups == 1
    finally:
        server.close()


def test_sigterm_flushes_and_disconnects_cleanly(tmp_path: Path) -> None:
    """Process shutdown (SIGTERM, the loop stopped): the final FLUSH and DISC still go out,
    answered, before the process exits 0."""
    nbd_sock, nsock = tmp_path / "h.sock", tmp_path / "n.sock"
    server = HostileServer(nbd_sock, HONEST)
    try:
        with vhostmem_on(f"socket={nsock},nbd={unix_uri(nbd_sock)}", log=tmp_path / "v.log",
                         sockets=(nsock,)) as proc:
            pass
        assert proc.returncode == 0, (tmp_path / "v.log").read_text()[-2000:]
        assert [cmd for cmd, _, _, _ in server.requests] == [NBD_CMD_FLUSH, NBD_CMD_DISC]
    finally:
        server.close()


def test_device_del_flushes_and_disconnects_cleanly(tmp_path: Path) -> None:
    """device_del of an NBD device on an answering server: FLUSH, then DISC (sent by the
    task on the event loop once the FLUSH was answered)."""
    nbd_sock, nsock = tmp_path / "h.sock", tmp_path / "n.sock"
    server = HostileServer(nbd_sock, HONEST)
    try:
        with Serve(tmp_path) as serve:
            name = serve.call("device_add", socket=str(nsock), nbd=unix_uri(nbd_sock))["name"]
            serve.call("device_del", name=name)
            wait_until(lambda: len(server.requests) >= 2, "FLUSH and DISC")
        assert [cmd for cmd, _, _, _ in server.requests] == [NBD_CMD_FLUSH, NBD_CMD_DISC]
    finally:
        server.close()
