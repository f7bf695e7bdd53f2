"""Data-plane workers (``--workers N``): real `vhostmem serve` processes and their worker
processes, driven by the fake guest. A worker killed with SIGKILL, memory hot-plug while every
worker serves, reconnects, the control-channel codec, the options. The conformance, hostile and
QEMU suites run in this mode with ``VHOSTMEM_TEST_WORKERS=2`` (docs/architecture.md)."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu.procs import child_pids
from tests.conformance.test_memory import read_into
from tests.peers import VhostmemHandle, _spawn, make_image, start_vhostmem, vhostmem_command
from vhostmem.devspec import UsageError, parse_blk_spec, spec_from_params
from vhostmem.dirty_log import DirtyLog
from vhostmem.frontend.client import VhostUserError
from vhostmem.frontend.device import FRESH_BASE, VhostUserBlk
from vhostmem.frontend.memory import GuestRam
from vhostmem.worker_proto import Msg, WorkerProtocolError, decode, encode

MIB = 1 << 20
SECTOR = 512
IMAGE_SIZE = 16 * MIB
EXTRA_GPA = 256 * MIB  # a hot-plugged region, away from boot RAM
SETTLE_S = 10.0
POLL_S = 0.02


@pytest.fixture
def served() -> Iterator[tuple[VhostmemHandle, bytes]]:
    """`vhostmem serve --workers 2` on a 2-queue image."""
    workdir = Path(tempfile.mkdtemp(prefix="vhm-wk-"))
    image = str(workdir / "disk.raw")
    initial = make_image(image, IMAGE_SIZE)
    handle = start_vhostmem(image, str(workdir / "blk.sock"), num_queues=2, workers=2)
    try:
        yield handle, initial
    finally:
        handle.stop()
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()


def _wait(what, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + SETTLE_S
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(POLL_S)


def _worker_pids(handle: VhostmemHandle) -> dict[int, int]:
    """Slot -> pid of every worker the log says was started (the last one per slot)."""
    found = re.findall(r"data-plane worker (\d+) started \(pid (\d+)\)", handle.log())
    return {int(slot): int(pid) for slot, pid in found}


def _children(pid: int) -> set[int]:
    return set(child_pids(pid))


def test_rings_run_in_worker_processes(served) -> None:
    handle, initial = served
    with VhostUserBlk.open(handle.socket_path) as dev:
        q0, q1 = dev.start_queue(0), dev.start_queue(1)
        assert q0.read(0, 4096) == initial[:4096]
        assert q1.read(8, 4096) == initial[4096:8192]
        pids = _worker_pids(handle)
        assert set(pids) == {0, 1} and set(pids.values()) <= _children(handle.proc.pid)


def test_sigkilled_worker_breaks_its_ring_only(served) -> None:
    handle, initial = served
    data = os.urandom(4096)
    with VhostUserBlk.open(handle.socket_path) as dev:
        q0, q1 = dev.start_queue(0), dev.start_queue(1)
        assert q0.read(0, 4096) == initial[:4096]
        victim = _worker_pids(handle)[0]
        os.kill(victim, signal.SIGKILL)
        # The ring's err eventfd is signalled and the loss is logged with pid and signal.
        assert dev.queues[0].err.wait(SETTLE_S), "err eventfd of the dead worker's ring"
        _wait(lambda: f"pid {victim}) lost" in handle.log(), "worker loss not logged")
        assert "killed by SIGKILL" in handle.log() and "rings [0] broken" in handle.log()
        q1.write(16, data)  # the other worker keeps serving
        assert q1.read(16, 4096) == data
        # GET_VRING_BASE of the dead worker's ring is answered (no hang): the used index.
        assert dev.stop_queue(0) == 1
        assert handle.alive()
    # The next frontend gets the device back, with a new worker for ring 0.
    with VhostUserBlk.open(handle.socket_path) as dev:
        q0 = dev.start_queue(0)
        assert q0.read(16, 4096) == data
        assert _worker_pids(handle)[0] != victim
    assert victim not in _children(handle.proc.pid)  # reaped, not a zombie


def test_memory_hot_plug_while_every_worker_serves(served) -> None:
    handle, initial = served
    with GuestRam() as ram:
        ram.add_region(0, 64 * MIB)
        with VhostUserBlk.open(handle.socket_path, ram=ram, mem="slots") as dev:
            queues = [dev.start_queue(0), dev.start_queue(1)]
            for q in queues:
                assert q.read(0, 4096) == initial[:4096]
            extra = ram.add_region(EXTRA_GPA, 4 * MIB)
            dev.add_region(extra)  # acked only once both workers mapped it
            for n, q in enumerate(queues):
                buf = ram.alloc(8192, region=extra)
                sector = 64 + 16 * n
                assert read_into(q, ram, buf, sector, 8192) == 0
                assert ram.read(buf, 8192) == initial[sector * SECTOR:sector * SECTOR + 8192]
                ram.free(buf)
            dev.remove_region(extra)  # acked only once both workers let it go
            for q in queues:  # the boot RAM still serves on both
                assert q.read(8, 4096) == initial[4096:8192]


def test_reconnect_keeps_the_workers(served) -> None:
    """A frontend leaving with both rings running: they stop in their workers, the next
    frontend is served by the same worker processes, and writes of the first are on disk."""
    handle, _ = served
    data = os.urandom(8192)
    for round_ in range(3):
        with VhostUserBlk.open(handle.socket_path) as dev:
            q0, q1 = dev.start_queue(0), dev.start_queue(1)
            if round_:
                assert q1.read(32, 8192) == data
            q0.write(32, data)
        pids = _worker_pids(handle)
        assert len(pids) == 2
    assert "lost" not in handle.log()
    assert set(pids.values()) <= _children(handle.proc.pid)


# ---------------------------------------------------------------- pieces


def test_control_messages_round_trip_and_refuse_bad_records() -> None:
    msg = decode(encode(Msg.START, seq=3, index=1, addr=[1, 2, 3], call=True))
    assert msg.type is Msg.START and msg["addr"] == [1, 2, 3] and msg["call"] is True
    with pytest.raises(WorkerProtocolError, match="unknown message type"):
        decode(b"\xff\x00{}")
    with pytest.raises(WorkerProtocolError, match="unknown field 'evil'"):
        decode(encode(Msg.ACK, seq=1)[:-1] + b',"evil":1}')
    with pytest.raises(WorkerProtocolError, match="'index' has the wrong kind"):
        decode(b"\x05\x00" + b'{"index":"0"}')
    with pytest.raises(WorkerProtocolError, match="not an object"):
        decode(b"\x05\x00[]")


def test_workers_option() -> None:
    assert parse_blk_spec("socket=a.sock,disk=x.img,workers=2").workers == 2
    assert spec_from_params({"socket": "a.sock", "workers": 3}).workers == 3
    with pytest.raises(UsageError, match="workers= needs io-mode=inline"):
        parse_blk_spec("socket=a.sock,disk=x.img,workers=2,io-mode=thread")
    with pytest.raises(UsageError, match="workers= needs"):
        parse_blk_spec("socket=a.sock,nbd=nbd+unix:///x?socket=/n.sock,workers=1")
    with pytest.raises(UsageError, match="workers='99'"):
        parse_blk_spec("socket=a.sock,workers=99")


def test_shared_dirty_log_marks_exactly_what_a_private_one_does() -> None:
    """The cross-process marking (atomic OR of partial bytes) sets the same bits as the
    single-process read-modify-write."""
    ranges = [(0x1000, 1), (0x3000, 0x5000), (0x10_0000 - 1, 2), (0x7000, 0x20_0000), (0, 4096)]
    results = []
    for shared in (False, True):
        fd = os.memfd_create("log", os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        import fcntl
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        log = DirtyLog.attach(fd, 4096, 0, 1 << 24)
        if shared:
            log.share()
        assert log.mark_ranges(ranges) is None
        results.append(bytes(log.mm))
        log.close()
    assert results[0] == results[1] and any(results[0])


def test_sigterm_to_the_process_group_is_left_to_the_main_process(served) -> None:
    """systemd's SIGTERM reaches every process of the unit: the workers leave only when the
    main process has stopped their rings and closed their control sockets."""
    handle, initial = served
    with VhostUserBlk.open(handle.socket_path) as dev:
        q0 = dev.start_queue(0)
        pids = _worker_pids(handle)
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        assert q0.read(0, 4096) == initial[:4096]  # its worker still serves
    handle.proc.send_signal(signal.SIGTERM)
    assert handle.proc.wait(SETTLE_S) == 0
    assert "lost" not in handle.log()
    for pid in pids.values():
        _wait(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), f"worker {pid} to exit")


def test_workers_die_with_a_killed_main_process(served) -> None:
    """A main process killed with SIGKILL takes its workers with it at once: its restarted
    successor must be the only one popping the rings the frontend hands over again."""
    handle, _ = served
    with VhostUserBlk.open(handle.socket_path) as dev:
        dev.start_queue(0)
        pids = _worker_pids(handle)
        handle.proc.kill()
        handle.proc.wait(SETTLE_S)
        for pid in pids.values():
            _wait(lambda pid=pid: not os.path.exists(f"/proc/{pid}")
                  or _state(pid) == "Z", f"worker {pid} to die with the main process")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_stopped_worker_is_given_up_and_nothing_hangs(tmp_path: Path, monkeypatch) -> None:
    """A worker that stops answering (SIGSTOP here; stuck in the kernel alike) is killed after
    the answer timeout: GET_VRING_BASE of its ring is answered, its ring is broken."""
    monkeypatch.setenv("VHOSTMEM_WORKER_ANSWER_TIMEOUT", "1")
    image = str(tmp_path / "disk.raw")
    initial = make_image(image, IMAGE_SIZE)
    handle = start_vhostmem(image, str(tmp_path / "blk.sock"), num_queues=2, workers=2)
    try:
        with VhostUserBlk.open(handle.socket_path) as dev:
            q0, q1 = dev.start_queue(0), dev.start_queue(1)
            assert q0.read(0, 4096) == initial[:4096]
            victim = _worker_pids(handle)[0]
            os.kill(victim, signal.SIGSTOP)
            started = time.monotonic()
            # The worker never acknowledges the change: the request fails (REPLY_ACK 1) once
            # it is given up, instead of waiting for it forever.
            with pytest.raises(VhostUserError, match="SET_VRING_ENABLE: REPLY_ACK 1"):
                dev.client.set_vring_enable(0, False)
            assert dev.stop_queue(0, disable=False) == 1  # the used index: its worker is gone
            assert time.monotonic() - started < SETTLE_S
            assert "no answer for 1 s" in handle.log() and "killed by SIGKILL" in handle.log()
            assert q1.read(8, 4096) == initial[4096:8192]
    finally:
        handle.stop()


def test_a_worker_slow_to_start_is_waited_for(tmp_path: Path, monkeypatch) -> None:
    """A fresh worker's first answer waits for its interpreter to start (seconds on a loaded
    host): the answer timeout, meant for a running worker, does not give it up meanwhile."""
    monkeypatch.setenv("VHOSTMEM_WORKER_ANSWER_TIMEOUT", "1")
    image = str(tmp_path / "disk.raw")
    initial = make_image(image, IMAGE_SIZE)
    handle = start_vhostmem(image, str(tmp_path / "blk.sock"), num_queues=1, workers=1)
    try:
        with VhostUserBlk.open(handle.socket_path) as dev:
            started: list[object] = []
            thread = threading.Thread(target=lambda: started.append(dev.start_queue(0)))
            thread.start()
            _wait(lambda: 0 in _worker_pids(handle), "no worker was started")
            pid = _worker_pids(handle)[0]
            os.kill(pid, signal.SIGSTOP)  # as if its imports took 2 s
            time.sleep(2)
            os.kill(pid, signal.SIGCONT)
            thread.join(SETTLE_S)
            assert started, "starting the ring failed"
            assert started[0].read(0, 4096) == initial[:4096]  # type: ignore[attr-defined]
            assert "lost" not in handle.log()
    finally:
        handle.stop()


def test_sigkilled_worker_of_a_packed_ring(served) -> None:
    """Packed rings keep their position in the worker only: a dead worker's ring reports the
    position it started from, and GET_VRING_BASE is answered all the same."""
    handle, initial = served
    with VhostUserBlk.open(handle.socket_path, packed=True) as dev:
        q0, q1 = dev.start_queue(0), dev.start_queue(1)
        assert q0.read(0, 4096) == initial[:4096]
        os.kill(_worker_pids(handle)[0], signal.SIGKILL)
        assert dev.queues[0].err.wait(SETTLE_S)
        assert q1.read(8, 4096) == initial[4096:8192]
        assert dev.stop_queue(0) == FRESH_BASE
        assert "the packed ring's base stays" in handle.log()


def test_vhostmem_blk_takes_workers() -> None:
    """The backend-program entry point (vhost-user.rst conventions) passes --workers on."""
    from vhostmem.launch import blk_specs, build_blk_parser

    args = build_blk_parser().parse_args(["--socket-path", "x.sock", "--workers", "2"])
    assert blk_specs(args, [])[0].workers == 2
    with pytest.raises(UsageError, match="workers='x'"):
        blk_specs(build_blk_parser().parse_args(["--socket-path", "x.sock", "--workers", "x"]),
                  [])


def test_worker_records_go_to_the_log_file_and_follow_its_reopening(tmp_path: Path) -> None:
    """A worker's log records reach ``--log-file`` through the main process (tagged with the
    worker's pid), also after SIGHUP reopened the file (logrotate); nothing goes to stderr."""
    image = str(tmp_path / "disk.raw")
    initial = make_image(image, IMAGE_SIZE)
    log_file = tmp_path / "vhostmem.log"
    sock = str(tmp_path / "blk.sock")
    argv = [*vhostmem_command(image, sock, num_queues=2, workers=2), "--log-file", str(log_file)]
    handle = VhostmemHandle(_spawn(argv, sock + ".stderr"), image, sock, 2, False,
                            sock + ".stderr")
    try:
        _wait(lambda: os.path.exists(sock), "vhostmem serve did not start")
        with VhostUserBlk.open(sock) as dev:
            q0, q1 = dev.start_queue(0), dev.start_queue(1)
            assert q0.read(0, 4096) == initial[:4096]
            assert q1.read(8, 4096) == initial[4096:8192]
            pids = _worker_pids_in(log_file.read_text())
            for queue, index, path in ((q0, 0, log_file), (q1, 1, tmp_path / "rotated.log")):
                if index == 1:  # logrotate: move the file away, SIGHUP, a new one is opened
                    log_file.rename(path)
                    handle.proc.send_signal(signal.SIGHUP)
                    _wait(log_file.exists, "SIGHUP did not reopen --log-file")
                    path = log_file
                queue.ring.add_avail(dev.queues[index].ring.num + 7)  # a head out of range
                queue.notify()
                line = f"worker[{pids[index]}] virtqueue {index} broken"
                _wait(lambda p=path, w=line: w in p.read_text(),  # type: ignore[misc]
                      f"{line!r} not in {path.name}")
        assert "worker[" not in Path(sock + ".stderr").read_text()
    finally:
        handle.stop()


def _worker_pids_in(text: str) -> dict[int, int]:
    found = re.findall(r"data-plane worker (\d+) started \(pid (\d+)\)", text)
    return {int(slot): int(pid) for slot, pid in found}
