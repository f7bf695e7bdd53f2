"""Several NBD connections for a multi-queue device (NBD_FLAG_CAN_MULTI_CONN): one per queue
on qemu-nbd -e 2 and nbdkit, one for all queues where the server does not offer multi-conn, and
a connection that goes silent failing only its own requests."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from nbd.constants import NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_WRITE
from tests.nbd.hostile import HONEST, HostileServer
from tests.nbd.servers import (
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
)
from tests.vhostmem.rpc.rpcenv import Serve, wait_until
from vhostmem.frontend import VhostUserBlk
from vhostmem.frontend.queue import BlkQueue

PAGE = 4096
STATUS_OK, STATUS_IOERR = 0, 1
TIMEOUT = 1.5  # nbd-timeout given to vhostmem
OPEN_WAIT = 10.0


def wait_for_log(log: Path, text: str) -> None:
    """The extra connections open on the event loop after the first request: wait for it."""
    deadline = time.monotonic() + OPEN_WAIT
    while text not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def both_queues_serve(q0: BlkQueue, q1: BlkQueue) -> None:
    """Each queue reads what the other wrote (NBD_FLAG_CAN_MULTI_CONN: a write answered on one
    connection is seen by a read on another), then a FLUSH on each."""
    q0.write(0, b"0" * PAGE)
    q1.write(8, b"1" * PAGE)
    assert q1.read(0, PAGE) == b"0" * PAGE
    assert q0.read(8, PAGE) == b"1" * PAGE
    q0.flush()
    q1.flush()


@needs_qemu_nbd
def test_qemu_nbd_shared_gets_one_connection_per_queue(tmp_path: Path) -> None:
    """qemu-nbd -e 2 offers multi-conn: the 2-queue device opens a second connection, each
    queue's writes reach the image (flushed; checked in the file after SIGTERM)."""
    image, nbd_sock = tmp_path / "d.raw", tmp_path / "nbd.sock"
    vsock, log = tmp_path / "v.sock", tmp_path / "v.log"
    image.write_bytes(bytes(4 << 20))
    server = start_qemu_nbd(image, nbd_sock, fmt="raw", shared=2)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},num-queues=2",
                         log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q0, q1 = dev.start_queue(0, size=64), dev.start_queue(1, size=64)
            q0.read(0, PAGE)  # the backend is on the loop now: the second connection opens
            wait_for_log(log, "(connection 2): connected")
            both_queues_serve(q0, q1)
    finally:
        stop(server)
    text = log.read_text()
    assert "2 connection(s)" in text, text
    disk = image.read_bytes()
    assert disk[:PAGE] == b"0" * PAGE and disk[8 * 512 : 8 * 512 + PAGE] == b"1" * PAGE


@needs_qemu_nbd
def test_qemu_nbd_without_multi_conn_gets_one_shared_connection(tmp_path: Path) -> None:
    """qemu-nbd -e 1 (the default) does not offer multi-conn: one connection for both queues
    (a second would wait for the first to leave), and both queues work on it."""
    image, nbd_sock = tmp_path / "d.raw", tmp_path / "nbd.sock"
    vsock, log = tmp_path / "v.sock", tmp_path / "v.log"
    image.write_bytes(bytes(4 << 20))
    server = start_qemu_nbd(image, nbd_sock, fmt="raw")
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},num-queues=2",
                         log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            both_queues_serve(dev.start_queue(0, size=64), dev.start_queue(1, size=64))
    finally:
        stop(server)
    text = log.read_text()
    assert "1 connection(s) (not 2: the server does not offer multi-conn)" in text, text
    assert "(connection 2)" not in text


@needs_qemu_nbd
def test_a_connection_the_server_does_not_take_is_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-nbd -e 2 offers multi-conn but takes 2 clients at once: a 3-queue device's third
    connection gets no handshake, is given up after the handshake timeout, and queue 2 is
    served on the first connection meanwhile and afterwards."""
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, str(SHORT_TIMEOUT))
    image, nbd_sock = tmp_path / "d.raw", tmp_path / "nbd.sock"
    vsock, log = tmp_path / "v.sock", tmp_path / "v.log"
    image.write_bytes(bytes(4 << 20))
    server = start_qemu_nbd(image, nbd_sock, fmt="raw", shared=2)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},num-queues=3",
                         log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            queues = [dev.start_queue(i, size=64) for i in range(3)]
            queues[2].write(0, b"2" * PAGE)  # connection 3 is still being opened
            wait_for_log(log, f"(connection 3): cannot open it: no handshake within "
                         f"{SHORT_TIMEOUT:g} s; its queues use the other connections")
            queues[2].write(8, b"3" * PAGE)
            assert queues[0].read(0, 2 * PAGE) == b"2" * PAGE + b"3" * PAGE
    finally:
        stop(server)


@needs_qemu_nbd
def test_reconnect_to_a_server_without_multi_conn_is_refused(tmp_path: Path) -> None:
    """qemu-nbd -e 2 comes back as -e 1 (no multi-conn): a device on 2 connections does not
    use it (its FLUSH would no longer cover the other connection's writes); the requests fail
    after nbd-timeout, naming why."""
    image, nbd_sock = tmp_path / "d.raw", tmp_path / "nbd.sock"
    vsock, log = tmp_path / "v.sock", tmp_path / "v.log"
    image.write_bytes(bytes(4 << 20))
    server = start_qemu_nbd(image, nbd_sock, fmt="raw", shared=2)
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock, 'disk')},num-queues=2,"
                         f"nbd-timeout={TIMEOUT}", log=log, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q0, q1 = dev.start_queue(0, size=64), dev.start_queue(1, size=64)
            q0.write(0, b"A" * PAGE)
            wait_for_log(log, "(connection 2): connected")
            stop(server, sig_kill=True)
            server = start_qemu_nbd(image, nbd_sock, fmt="raw")
            for q in (q0, q1):
                status, _ = q.run(1, 8, data=b"B" * PAGE, timeout=4 * TIMEOUT + 5)
                assert status == STATUS_IOERR
    finally:
        stop(server)
    assert "the export changed (no NBD_FLAG_CAN_MULTI_CONN); not using it" in log.read_text()
    assert image.read_bytes()[8 * 512 : 8 * 512 + PAGE] == bytes(PAGE)


def nbdkit_connections(log: Path, command: str) -> set[str]:
    """The nbdkit log filter's connection numbers of ``command`` requests."""
    return {m.group(1) for line in log.read_text().splitlines()
            if f" {command} " in line and (m := re.search(r"connection=(\d+)", line))}


@needs_nbdkit
def test_nbdkit_queues_use_their_own_connections(tmp_path: Path) -> None:
    """nbdkit memory offers multi-conn: with nbd-conns=2 on 4 queues, queues 0 and 2 share
    one connection, 1 and 3 the other (the log filter numbers each request's connection)."""
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    vlog, nlog = tmp_path / "v.log", tmp_path / "nbd.log"
    server = start_nbdkit(nbd_sock, "memory", "16M", f"logfile={nlog}", filters=("log",))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)},num-queues=4,nbd-conns=2",
                         log=vlog, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            queues = [dev.start_queue(i, size=64) for i in range(4)]
            queues[0].read(0, PAGE)
            wait_for_log(vlog, "(connection 2): connected")
            queues[0].write(0, b"a" * PAGE)
            queues[2].write(8, b"c" * PAGE)
            first = nbdkit_connections(nlog, "Write")
            queues[1].write(16, b"b" * PAGE)
            queues[3].write(24, b"d" * PAGE)
            second = nbdkit_connections(nlog, "Write") - first
            assert queues[3].read(0, PAGE) == b"a" * PAGE
            assert queues[0].read(24, PAGE) == b"d" * PAGE
    finally:
        stop(server)
    assert len(first) == 1 and len(second) == 1, nlog.read_text()
    assert "2 connection(s)" in vlog.read_text()


@needs_nbdkit
def test_device_add_opens_a_connection_per_queue(tmp_path: Path) -> None:
    """device_add with num_queues=2 on nbdkit: the first connection is opened before the reply,
    the second once the device serves, and queue 1's writes go on it."""
    nbd_sock, vsock, nlog = tmp_path / "nbd.sock", tmp_path / "v.sock", tmp_path / "nbd.log"
    server = start_nbdkit(nbd_sock, "memory", "16M", f"logfile={nlog}", filters=("log",))
    try:
        with Serve(tmp_path) as serve:
            serve.call("device_add", socket=str(vsock), nbd=unix_uri(nbd_sock), num_queues=2)
            with VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
                q0, q1 = dev.start_queue(0, size=64), dev.start_queue(1, size=64)
                q0.write(0, b"a" * PAGE)
                wait_until(lambda: len(nbdkit_connections(nlog, "Connect")) == 2,
                           "the second connection")
                wait_until(lambda: (q1.write(8, b"b" * PAGE) or
                                    len(nbdkit_connections(nlog, "Write")) == 2),
                           "a write of queue 1 on the second connection")
                assert q1.read(0, PAGE) == b"a" * PAGE
                listed = serve.call("device_list")[0]["nbd_connections"]
                assert listed == [{"connected": True, "given_up": False, "reconnects": 0,
                                   "requests": 0}] * 2
    finally:
        stop(server)


def test_device_del_flushes_once_and_disconnects_each_connection(tmp_path: Path) -> None:
    """device_del of a 2-connection device: one FLUSH (multi-conn: it covers the writes of
    both connections), answered, and a DISC on each connection."""
    nbd_sock, vsock = tmp_path / "h.sock", tmp_path / "v.sock"
    server = HostileServer(nbd_sock, HONEST, multi_conn=True)
    try:
        with Serve(tmp_path) as serve:
            name = serve.call("device_add", socket=str(vsock), nbd=unix_uri(nbd_sock),
                              num_queues=2)["name"]
            with VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
                q0, q1 = dev.start_queue(0, size=64), dev.start_queue(1, size=64)
                q0.write(0, b"a" * PAGE)
                wait_until(lambda: (q1.write(8, b"b" * PAGE) or
                                    (2, NBD_CMD_WRITE) in server.commands),
                           "a write of queue 1 on the second connection")
            before = len(server.commands)
            serve.call("device_del", name=name)
            wait_until(lambda: server.hangups == 2 or
                       [c for _, c in server.commands].count(NBD_CMD_DISC) == 2,
                       "a DISC on each connection")
            closing = server.commands[before:]
    finally:
        server.close()
    assert [c for _, c in closing].count(NBD_CMD_FLUSH) == 1, closing
    assert sorted(n for n, c in closing if c == NBD_CMD_DISC) == [1, 2], closing
    flush_at = next(i for i, (_, c) in enumerate(closing) if c == NBD_CMD_FLUSH)
    flushed_on = closing[flush_at][0]
    assert closing.index((flushed_on, NBD_CMD_DISC)) > flush_at  # after its FLUSH's reply


@needs_nbdkit
def test_nbdkit_without_multi_conn_gets_one_connection(tmp_path: Path) -> None:
    """The same server with multi-conn taken away (the multi-conn filter): every request of
    the 2 queues on one connection."""
    nbd_sock, vsock = tmp_path / "nbd.sock", tmp_path / "v.sock"
    vlog, nlog = tmp_path / "v.log", tmp_path / "nbd.log"
    server = start_nbdkit(nbd_sock, "memory", "16M", "multi-conn-mode=disable",
                          f"logfile={nlog}", filters=("log", "multi-conn"))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)},num-queues=2",
                         log=vlog, sockets=(vsock,)), \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            both_queues_serve(dev.start_queue(0, size=64), dev.start_queue(1, size=64))
            time.sleep(0.2)  # an extra connection would have opened by now
    finally:
        stop(server)
    assert len(nbdkit_connections(nlog, "Write")) == 1, nlog.read_text()
    assert len(nbdkit_connections(nlog, "Connect")) == 1, nlog.read_text()


def test_a_silent_connection_fails_only_its_requests(tmp_path: Path) -> None:
    """A server offering multi-conn whose second connection takes requests and never answers:
    queue 1's read fails with IOERR after nbd-timeout while queue 0 keeps being answered on
    the first connection; queue 1 is served on the first connection while its own reconnects,
    then on the new one."""
    nbd_sock, vsock, log = tmp_path / "h.sock", tmp_path / "v.sock", tmp_path / "v.log"
    server = HostileServer(nbd_sock, HONEST, multi_conn=True, silent=frozenset({2}))
    try:
        with vhostmem_on(f"socket={vsock},nbd={unix_uri(nbd_sock)},num-queues=2,"
                         f"nbd-timeout={TIMEOUT}", log=log, sockets=(vsock,)) as proc, \
                VhostUserBlk.open(str(vsock), ram_size=GUEST_RAM) as dev:
            q0, q1 = dev.start_queue(0, size=64, depth=4), dev.start_queue(1, size=64, depth=4)
            q0.write(0, b"A" * PAGE)
            wait_for_log(log, "(connection 2): connected")
            stuck = q1.prepare(0, 0, in_len=PAGE)
            started = time.monotonic()
            q1.notify()
            answered = 0
            while not stuck.done:
                q1.poll()
                assert q0.read(0, PAGE) == b"A" * PAGE  # queue 0 is served meanwhile
                answered += 1
                assert time.monotonic() - started < TIMEOUT + 5
            assert stuck.status == STATUS_IOERR
            assert time.monotonic() - started >= TIMEOUT * 0.9
            assert answered >= 2
            # Queue 1 is served on the first connection until connection 3 (honest)
            # replaces the silent one, then on that.
            assert q1.read(0, PAGE) == b"A" * PAGE
            wait_for_log(log, "(connection 2): reconnected")
            assert q1.read(0, PAGE) == b"A" * PAGE
            assert proc.poll() is None
    finally:
        server.close()
    text = log.read_text()
    assert "(connection 2): connection lost: no reply to READ" in text, text
    assert server.unanswered >= 1 and server.connections >= 3
    assert "Traceback" not in text, text
