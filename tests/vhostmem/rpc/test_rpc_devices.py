"""The management socket of a running `vhostmem serve`: devices added and deleted while another
device keeps serving a fake guest, statistics against what the guest did, fds released."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hostile.slowfs import SlowDisk, pattern
from tests.vhostmem.rpc.rpcenv import Rpc, RpcFailed, Serve, wait_until
from tests.vhostmem.test_cli import GUEST_RAM, REPO, SECTOR
from vhostmem.frontend import BlkStatus, BlkType, VhostUserBlk, VhostUserError
from vhostmem.rpc.protocol import DEVICE_BUSY, DEVICE_EXISTS, INVALID_PARAMS, NO_SUCH_DEVICE
from vhostmem.rpc.server import MAX_CLIENTS

BLOCK = 4096


class Traffic(threading.Thread):
    """A fake guest writing and reading back sectors on one device until stopped; records the
    longest gap between two completed round trips."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.ready = threading.Event()
        self.halt = threading.Event()
        self.rounds = 0
        self.max_gap = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with VhostUserBlk.open(str(self.path), ram_size=GUEST_RAM) as dev:
                q = dev.start_queue(0, size=16)
                last = time.monotonic()
                self.ready.set()
                while not self.halt.is_set():
                    pattern = bytes([self.rounds % 251 + 1]) * SECTOR
                    q.write(self.rounds % 64, pattern)
                    assert q.read(self.rounds % 64, SECTOR) == pattern
                    now = time.monotonic()
                    self.max_gap = max(self.max_gap, now - last)
                    last = now
                    self.rounds += 1
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def stop(self) -> None:
        self.halt.set()
        self.join(20)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def roundtrip(path: Path, sector: int, pattern: bytes) -> None:
    with VhostUserBlk.open(str(path), ram_size=GUEST_RAM) as dev:
        q = dev.start_queue(0, size=16)
        q.write(sector, pattern * SECTOR)
        assert q.read(sector, SECTOR) == pattern * SECTOR


def test_serve_with_an_rpc_socket_starts_without_devices(tmp_path: Path) -> None:
    with Serve(tmp_path, cwd=tmp_path) as serve:
        assert serve.call("device_list") == []
        assert os.stat(serve.rpc_path).st_mode & 0o777 == 0o600
        assert not (tmp_path / "vhostmem.sock").exists()  # no default RAM disk
        assert serve.call("version")["version"]
    assert not serve.rpc_path.exists()


def test_device_add_while_another_device_keeps_serving(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    image = tmp_path / "b.img"
    image.write_bytes(bytes(1 << 20))
    with Serve(tmp_path, "--blk", f"socket={a},ram=4M") as serve:
        traffic = Traffic(a)
        traffic.start()
        try:
            assert traffic.ready.wait(20)
            before = traffic.rounds
            with serve.rpc() as rpc:
                name = rpc.call("device_add", socket=str(b), disk=str(image), num_queues=2,
                                serial="disk-b")["name"]
                assert name == "b.sock"
                roundtrip(b, 5, b"B")
                listed = {d["name"]: d for d in rpc.call("device_list")}
                with pytest.raises(RpcFailed) as exc:
                    rpc.call("device_add", socket=str(tmp_path / "c.sock"), ram="1M",
                             name="b.sock")
                assert exc.value.code == DEVICE_EXISTS
                rpc.call("device_del", name="b.sock")  # nobody connected: safe succeeds
            wait_until(lambda: traffic.rounds > before + 20, "traffic on a")
        finally:
            traffic.stop()
        assert traffic.max_gap < 2.0, f"device a stalled for {traffic.max_gap:.2f} s"
    assert image.read_bytes()[5 * SECTOR : 6 * SECTOR] == b"B" * SECTOR
    assert set(listed) == {"a.sock", "b.sock"}
    assert listed["a.sock"]["frontend"]["pid"] == os.getpid()
    assert listed["a.sock"]["memory_regions"] == [{"guest_phys_addr": 0, "size": GUEST_RAM}]
    assert listed["a.sock"]["features"] >> 32 & 1  # VERSION_1 negotiated
    assert listed["b.sock"]["frontend"] is None  # its guest had gone
    assert (listed["b.sock"]["disk"], listed["b.sock"]["num_queues"]) == (str(image), 2)
    assert not b.exists()


def test_device_del_safe_refuses_while_connected_and_hard_disconnects(tmp_path: Path) -> None:
    path, image = tmp_path / "d.sock", tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    with Serve(tmp_path) as serve, serve.rpc() as rpc:
        rpc.call("version")
        baseline = serve.fd_summary()
        rpc.call("device_add", socket=str(path), disk=str(image), name="d", io_mode="thread")
        assert any(target == str(image) for target in serve.fds().values())
        with VhostUserBlk.open(str(path), ram_size=GUEST_RAM) as dev:
            q = dev.start_queue(0, size=16)
            q.write(7, b"h" * SECTOR)
            with pytest.raises(RpcFailed) as exc:
                rpc.call("device_del", name="d")
            assert exc.value.code == DEVICE_BUSY
            assert f"pid {os.getpid()}" in exc.value.message
            q.write(8, b"i" * SECTOR)  # the refusal changed nothing
            reqs = [q.submit(BlkType.OUT, 9 + i, data=bytes([65 + i]) * SECTOR)
                    for i in range(4)]
            assert rpc.call("device_del", name="d", mode="hard") == {"name": "d"}
            assert not path.exists()
            with pytest.raises((VhostUserError, OSError, TimeoutError)):
                dev.client.get_features()  # the frontend was disconnected
            done = {reqs.index(req): req.status for req in q.poll()}
        assert rpc.call("device_list") == []
        wait_until(lambda: serve.fd_summary() == baseline, "the device's fds to be closed")
    data = image.read_bytes()
    assert data[7 * SECTOR : 9 * SECTOR] == b"h" * SECTOR + b"i" * SECTOR
    for i, status in done.items():  # what completed before the disconnect is on the disk
        assert status == BlkStatus.OK
        assert data[(9 + i) * SECTOR : (10 + i) * SECTOR] == bytes([65 + i]) * SECTOR


@pytest.mark.parametrize("io_mode", ["inline", "thread", "workers"])
def test_device_stats_count_what_the_guest_did(tmp_path: Path, io_mode: str) -> None:
    """``workers``: the rings run in two data-plane workers, which report their counts at
    most STATS_PERIOD_S later: the snapshot is taken once they arrived."""
    path = tmp_path / "s.sock"
    with Serve(tmp_path) as serve, serve.rpc() as rpc:
        mode = {"workers": 2} if io_mode == "workers" else {"io_mode": io_mode}
        rpc.call("device_add", socket=str(path), ram="4M", num_queues=2, **mode)
        with VhostUserBlk.open(str(path), ram_size=GUEST_RAM) as dev:
            q0 = dev.start_queue(0, size=16)
            q1 = dev.start_queue(1, size=16)
            for i in range(5):
                q0.write(i * 8, bytes([i + 1]) * BLOCK)
            for i in range(3):
                assert q0.read(i * 8, 2 * BLOCK)[:BLOCK] == bytes([i + 1]) * BLOCK
            status, _ = q0.run(BlkType.IN, 1 << 40, in_len=SECTOR)  # past the end
            assert status == BlkStatus.IOERR
            q1.write(100, b"x" * SECTOR)
            q1.flush()
            wait_until(lambda: [q["requests"] for q in rpc.call(
                "device_stats", name="s.sock")["queues"]] == [9, 2], "the workers' counts")
            stats = rpc.call("device_stats", name="s.sock")
            again = rpc.call("device_stats", name="s.sock", reset=True)
            after_reset = rpc.call("device_stats", name="s.sock")
    s0, s1 = stats["queues"]
    assert (s0["index"], s1["index"]) == (0, 1)
    assert (s0["requests"], s0["write_bytes"], s0["read_bytes"], s0["errors"]) == \
        (9, 5 * BLOCK, 3 * 2 * BLOCK, 1)
    assert (s1["requests"], s1["write_bytes"], s1["read_bytes"], s1["errors"]) == \
        (2, SECTOR, 0, 0)
    for q, n in ((s0, 9), (s1, 2)):
        assert sum(b["count"] for b in q["latency_us"]) == n
        assert 1 <= q["kicks"] <= n and 1 <= q["interrupts"] <= n
        assert q["in_flight"] == 0
    assert again["queues"] == stats["queues"]  # reset returns the counts it cleared
    for q in after_reset["queues"]:
        assert (q["requests"], q["read_bytes"], q["write_bytes"], q["kicks"]) == (0, 0, 0, 0)
        assert q["latency_us"] == []


def test_add_errors_name_the_parameter_and_leave_nothing_open(tmp_path: Path) -> None:
    victim = tmp_path / "not-a-socket"
    victim.write_text("keep")
    with Serve(tmp_path) as serve, serve.rpc() as rpc:
        rpc.call("version")
        baseline = serve.fd_summary()
        cases = [
            ({"socket": str(tmp_path / "x.sock"), "num_queues": "two"}, "num_queues"),
            ({"socket": str(tmp_path / "x.sock"), "num_queues": 17},
             "num_queues: num-queues='17': expected 1..16"),
            ({"socket": str(tmp_path / "x.sock"), "ram": "12Q"}, "ram: bad size '12Q'"),
            ({"socket": str(tmp_path / "x.sock"), "io_mode": "async"}, "io_mode: "),
            ({"socket": str(tmp_path / "x.sock"), "readonly": 3}, "readonly"),
            ({"socket": str(tmp_path / "x.sock"), "colour": "red"}, "'colour'"),
            ({"ram": "1M"}, "exactly one of socket, client and fd"),
            ({"socket": str(tmp_path / "x.sock"), "client": "y"}, "exactly one of"),
            ({"socket": str(tmp_path / "x.sock"), "serial": "s" * 21}, "longer than 20"),
            ({"socket": 5}, "socket: expected a string"),
            ({"fd": 0}, "fd 0"),
            ({"fd": 999}, "fd 999"),
            ({"fd": "3"}, "fd: expected an integer"),
        ]
        for params, message in cases:
            with pytest.raises(RpcFailed) as exc:
                rpc.call("device_add", **params)
            assert exc.value.code == INVALID_PARAMS, (params, exc.value)
            assert message in exc.value.message, (params, exc.value.message)
        for params, message in [
            ({"socket": str(victim), "ram": "1M"}, "is not a socket"),
            ({"socket": str(tmp_path / "x.sock"), "disk": str(tmp_path / "missing.img")},
             "missing.img"),
        ]:
            with pytest.raises(RpcFailed) as exc:
                rpc.call("device_add", **params)
            assert message in exc.value.message
        with pytest.raises(RpcFailed) as exc:
            rpc.call("device_del", name="nope")
        assert exc.value.code == NO_SUCH_DEVICE and "'nope'" in exc.value.message
        with pytest.raises(RpcFailed) as exc:
            rpc.call("device_del", name="nope", mode="gentle")
        assert exc.value.code == INVALID_PARAMS and "mode" in exc.value.message
        assert rpc.call("device_list") == []
        assert serve.fd_summary() == baseline
    assert victim.read_text() == "keep"
    assert not (tmp_path / "x.sock").exists()


def test_device_on_an_inherited_listening_fd(tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    fd = listener.fileno()
    serve = Serve.__new__(Serve)
    # Serve with pass_fds: the way a parent hands a backend its socket.
    serve.rpc_path = tmp_path / "rpc.sock"
    serve.proc = subprocess.Popen(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--rpc-socket", str(serve.rpc_path)],
        cwd=REPO, pass_fds=[fd], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    listener.close()  # the child holds it now
    try:
        wait_until(serve.rpc_path.exists, "the management socket")
        with serve.rpc() as rpc:
            with pytest.raises(RpcFailed, match="already in use"):
                rpc.call("device_add", fd=_rpc_fd(serve), ram="1M")
            assert rpc.call("device_add", fd=fd, ram="4M")["name"] == f"fd{fd}"
            roundtrip(path, 3, b"F")
            listed = rpc.call("device_list")
            assert (listed[0]["fd"], listed[0]["socket"]) == (fd, None)
            rpc.call("device_del", name=f"fd{fd}")
            assert fd not in serve.fds()
            assert path.exists()  # the file was not ours to remove
    finally:
        serve.stop()


def _rpc_fd(serve: Serve) -> int:
    """The fd of the management socket in the server (the listening one bound to rpc.sock)."""
    inodes = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(serve.rpc_path):
            inodes[fields[6]] = True
    for fd, target in serve.fds().items():
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return fd
    raise AssertionError("management socket fd not found")


def test_rpc_client_command(tmp_path: Path) -> None:
    with Serve(tmp_path) as serve:
        def vhostmem_rpc(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "vhostmem.cli", "rpc", "--socket", str(serve.rpc_path),
                 *argv], cwd=REPO, capture_output=True, text=True, timeout=30)
        ok = vhostmem_rpc("device_add", f"socket={tmp_path / 'c.sock'}", "ram=2M",
                          "num_queues=2", "readonly=true", "name=c")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"name": "c"}
        listed = json.loads(vhostmem_rpc("device_list").stdout)
        assert (listed[0]["num_queues"], listed[0]["readonly"]) == (2, True)
        bad = vhostmem_rpc("device_del", "name=nope")
        assert bad.returncode == 1
        assert "no device named 'nope'" in bad.stderr
        level = vhostmem_rpc("log_set_level", "level=debug")
        assert json.loads(level.stdout) == {"level": "DEBUG"}
        vhostmem_rpc("version")
        log = serve.stop()
    assert "log level set to DEBUG" in log
    assert "management socket: " not in log  # no request failed with a traceback


def test_many_clients_are_limited(tmp_path: Path) -> None:
    with Serve(tmp_path) as serve:
        clients = [serve.rpc() for _ in range(MAX_CLIENTS)]
        try:
            for c in clients:
                c.call("version")
            extra = Rpc(serve.rpc_path)
            reply = extra.reply()
            assert reply is not None and "too many" in reply["error"]["message"]
            assert extra.reply() is None  # and closed
            extra.close()
        finally:
            for c in clients:
                c.close()
        wait_until(lambda: _try_version(serve), "a slot for a new client")


def test_silent_clients_are_closed_after_the_idle_timeout(tmp_path: Path) -> None:
    """MAX_CLIENTS clients that connect and send nothing, and one that sends requests and never
    reads a reply, are closed after --rpc-idle-timeout: the operator is not locked out."""
    with Serve(tmp_path, "--rpc-idle-timeout", "1") as serve:
        silent = [serve.rpc() for _ in range(MAX_CLIENTS)]
        try:
            for c in silent:
                assert c.reply() is None  # closed by the server, no request ever sent
            assert serve.call("version")["version"]
            with serve.rpc() as deaf:
                deaf.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                request = b'{"jsonrpc":"2.0","method":"device_list","id":1}\n'
                deaf.sock.settimeout(10)
                # Its replies fill the socket, the server stops reading it, then closes it:
                # our sends fail with a reset, not with our own timeout.
                with pytest.raises((BrokenPipeError, ConnectionResetError)):
                    for _ in range(1000000):
                        deaf.sock.sendall(request)
        finally:
            for c in silent:
                c.close()
        log = serve.stop()
    assert log.count("closing a client idle for 1 s") >= MAX_CLIENTS


def test_idle_timeout_option_is_checked(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "vhostmem.cli", "serve", "--rpc-socket",
                          str(tmp_path / "r.sock"), "--rpc-idle-timeout", "-1"],
                         capture_output=True, text=True, timeout=20)
    assert run.returncode == 2
    assert "--rpc-idle-timeout: '-1' is not a number of seconds" in run.stderr


def _try_version(serve: Serve) -> bool:
    try:
        serve.call("version")
    except (RpcFailed, AssertionError):
        return False
    return True


def test_hard_delete_waits_for_requests_in_flight(tmp_path: Path) -> None:
    """Reads held 2 s by a slow disk (a FUSE image) are in flight on I/O threads when the
    device is deleted with mode=hard: the reply comes only after they completed, and the guest
    finds them completed with the disk's data in its memory."""
    delay = 2.0
    disk = SlowDisk(tmp_path / "mnt", delay, 64 << 10)
    path = tmp_path / "slow.sock"
    try:
        with Serve(tmp_path) as serve, serve.rpc() as rpc:
            rpc.call("device_add", socket=str(path), disk=disk.path, io_mode="thread",
                     name="slow")
            with VhostUserBlk.open(str(path), ram_size=GUEST_RAM) as dev:
                q = dev.start_queue(0, size=16)
                reqs = [q.submit(BlkType.IN, sector, in_len=BLOCK) for sector in (0, 8)]
                assert disk.wait_started(2, 10), disk.stderr()
                stats = rpc.call("device_stats", name="slow")
                assert stats["queues"][0]["in_flight"] == 2
                began = time.monotonic()
                assert rpc.call("device_del", name="slow", mode="hard") == {"name": "slow"}
                took = time.monotonic() - began
                assert disk.wait_done(2, 5), disk.stderr()
                assert not path.exists()
                done = {id(r): r for r in q.poll()}
                assert set(done) == {id(r) for r in reqs}  # both completed, none lost
                for req, sector in zip(reqs, (0, 8), strict=True):
                    assert req.status == BlkStatus.OK
                    assert dev.ram.read(req.in_gpa, BLOCK) == pattern(sector * SECTOR, BLOCK)
            assert rpc.call("device_list") == []
        assert took > delay / 4, f"device_del returned after {took:.2f} s"
    finally:
        disk.close()
