"""A `vhostmem serve` process killed with SIGKILL in the middle of I/O (packed and split rings), and
its successor resubmitting from the inflight region: no acknowledged write is lost, and every
write the dead process had taken completes.

Real processes and real fds: the fake guest (vhostmem.frontend) plays QEMU 7.2, keeps the
region across the crash and, like QEMU for a packed ring, reconnects with the ring's stale base.
The kill is aimed: the backend is stopped (SIGSTOP) the moment the region shows a request in
flight, the frozen region is checked, then it is killed.
"""

from __future__ import annotations

import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu.procs import child_pids
from tests.peers import ROOT
from vhostmem.frontend import (
    INDIRECT,
    STANDARD,
    BlkType,
    Request,
    VhostUserBlk,
    VhostUserError,
)
from vhostmem.inflight import SPLIT_LAYOUT, QueueLayout
from vhostmem.inflight_packed import O_USED_IDX, O_USED_WRAP, PACKED_LAYOUT

IMAGE_SIZE = 4 << 20
QUEUE_SIZE = 64
DEPTH = 16  # requests in flight: 16 x 3 descriptors fit a ring of 64
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
BLOCKS = IMAGE_SIZE // BLOCK
ROUNDS = 60  # batches before giving up on catching a request in flight
KILLS = 2
# A worker serves inline: try this many batches to catch a request in flight, then kill
# between batches (the region's positions, kept by the worker, must still be right).
WORKER_ROUNDS = 8
SOCKET_WAIT = 10.0
FREEZE_WAIT = 2.0


def serve(image: Path, sock: Path, log: Path, queues: int = 1,
          workers: int = 0) -> subprocess.Popen[bytes]:
    """Thread-mode I/O (requests stay in flight while a thread reads), or inline I/O in
    ``workers`` data-plane worker processes."""
    sock.unlink(missing_ok=True)
    mode = ["--workers", str(workers)] if workers else ["--io-mode", "thread"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(sock), "--disk",
             str(image), *mode, "--num-queues", str(queues)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + SOCKET_WAIT
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc


def flagged(region: mmap.mmap, layout: QueueLayout) -> bool:
    """A head entry of the region is flagged in flight (its first byte, in both layouts)."""
    start, step = layout.header_size, layout.desc_state_size
    return any(region[start : start + step * QUEUE_SIZE : step])


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (data-plane workers)."""
    return [pid, *child_pids(pid)]


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        os.kill(pid, sig)


def away_from_start(region: mmap.mmap) -> bool:
    """A packed region (queue 0) puts the ring elsewhere than a fresh ring's start (used
    position 0 in the first lap, nothing in flight): QEMU 7.2's stale base is then overridden."""
    used = int.from_bytes(region[O_USED_IDX:O_USED_IDX + 2], "little")
    return (used, region[O_USED_WRAP]) != (0, 1) or flagged(region, PACKED_LAYOUT)


def stopped(pid: int) -> bool:
    deadline = time.monotonic() + FREEZE_WAIT
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return True
    return False


class Writer:
    """Batches of 4 KiB writes with distinct contents; what completed OK is acknowledged."""

    def __init__(self, dev: VhostUserBlk) -> None:
        self.q = dev.queue(0)
        self.rng = random.Random(7)
        self.acked: dict[int, bytes] = {}  # block -> contents of its last acknowledged write
        self.pending: dict[int, tuple[int, bytes]] = {}  # request slot -> (block, contents)
        self.seq = 0

    def submit_batch(self) -> None:
        for block in self.rng.sample(range(BLOCKS), DEPTH):
            self.seq += 1
            data = self.seq.to_bytes(8, "little") * (BLOCK // 8)
            layout = INDIRECT if self.seq % 2 else STANDARD
            req = self.q.prepare(BlkType.OUT, block * SECTORS_PER_BLOCK, data=data,
                                 layout=layout)
            self.pending[req.index] = (block, data)
        self.q.notify()

    def reap(self, done: list[Request]) -> None:
        for req in done:
            block, data = self.pending.pop(req.index)
            assert req.status == 0, f"write of block {block} failed: status {req.status}"
            self.acked[block] = data

    def drain(self, timeout: float = 10.0) -> None:
        while self.pending:
            self.reap(self.q.wait(timeout))


def kill_mid_io(proc: subprocess.Popen[bytes], region: mmap.mmap, layout: QueueLayout,
                w: Writer, rounds: int = ROUNDS) -> bool:
    """Submit batches until the backend is frozen with a request flagged in flight, then kill
    it; completions reaped before are acknowledged writes. After ``rounds`` batches without
    one it is killed between batches if ``rounds`` < ROUNDS (inline I/O in a worker rarely
    shows a request in flight), else that fails. Returns whether one was caught."""
    pids = family(proc.pid)
    for _ in range(rounds):
        w.drain()
        w.submit_batch()
        until = time.monotonic() + 0.5
        while w.pending and time.monotonic() < until:
            if flagged(region, layout):
                signal_all(pids, signal.SIGSTOP)
                if all(stopped(p) for p in pids) and flagged(region, layout):
                    w.reap(w.q.poll())  # what the guest saw complete before the crash
                    signal_all(pids, signal.SIGKILL)
                    proc.wait()
                    return True
                signal_all(pids, signal.SIGCONT)
            w.reap(w.q.poll())
    assert rounds < ROUNDS, f"no request caught in flight in {ROUNDS} batches"
    w.drain()
    signal_all(pids, signal.SIGKILL)
    proc.wait()
    return False


@pytest.mark.parametrize(("packed", "workers"), [(True, 0), (False, 0), (True, 1), (False, 1)],
                         ids=["packed", "split", "packed-worker", "split-worker"])
def test_sigkill_mid_io_loses_no_acknowledged_write(tmp_path: Path, packed: bool,
                                                    workers: int) -> None:
    """Packed: the reconnect's base is stale (QEMU's), the region's positions win. Split: the
    base is the used index, as QEMU restores it; the region supplies what was in flight.
    ``workers``: the ring runs in a data-plane worker, which maps and keeps the region itself
    (in the ring's layout: a packed restart takes its position from it)."""
    image, sock, log = tmp_path / "disk.raw", tmp_path / "blk.sock", tmp_path / "serve.log"
    layout = PACKED_LAYOUT if packed else SPLIT_LAYOUT
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    proc = serve(image, sock, log, workers=workers)
    dev = VhostUserBlk.open(str(sock), packed=packed, inflight=True)
    try:
        assert dev.packed == packed
        region_info = dev.use_inflight(QUEUE_SIZE)
        dev.start_queue(0, size=QUEUE_SIZE, depth=DEPTH, max_data=BLOCK)
        region = mmap.mmap(region_info.fd, region_info.payload["mmap_size"], mmap.MAP_SHARED,
                           mmap.PROT_READ)
        w = Writer(dev)
        moved = 0  # restarts where the region's position wins over QEMU's stale base
        for _ in range(KILLS):
            caught = kill_mid_io(proc, region, layout, w, WORKER_ROUNDS if workers else ROUNDS)
            moved += packed and away_from_start(region)
            assert bool(w.pending) == caught, "the kill found nothing in flight"
            proc = serve(image, sock, log, workers=workers)
            dev.reconnect(str(sock))  # kept region, QEMU 7.2's base
            w.drain()  # every write the dead backend held completes now
            if caught:
                assert "resubmitting" in log.read_text().split("inflight region attached")[-1]
            w.submit_batch()  # the ring goes on from where the region says
            w.drain()
        w.submit_batch()
        w.drain()
        region.close()
    finally:
        dev.close()
        proc.terminate()
        proc.wait(10)
    contents = image.read_bytes()
    lost = [b for b, data in w.acked.items() if contents[b * BLOCK:(b + 1) * BLOCK] != data]
    assert not lost, f"acknowledged writes lost: blocks {lost[:8]}"
    assert len(w.acked) > 2 * DEPTH
    text = log.read_text()
    # packed: the region, not the base, was right at every restart
    assert text.count("the frontend's base") == moved
    assert "Traceback" not in text and "broken" not in text


def test_a_hostile_packed_region_stops_its_ring_only(tmp_path: Path) -> None:
    """The frontend rewrites queue 1's part of the region between two backends (an
    old_used_idx beyond the ring): the restarted backend refuses to start that ring, naming
    the field, and keeps serving queue 0 and the connection."""
    image, sock, log = tmp_path / "disk.raw", tmp_path / "blk.sock", tmp_path / "serve.log"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
    proc = serve(image, sock, log, queues=2)
    dev = VhostUserBlk.open(str(sock), packed=True, inflight=True)
    try:
        region = dev.use_inflight(QUEUE_SIZE)
        for index in (0, 1):
            dev.start_queue(index, size=QUEUE_SIZE, depth=DEPTH, max_data=BLOCK)
            dev.queue(index).write(index * 8, bytes([index + 1]) * BLOCK)
        proc.kill()
        proc.wait()
        old_used_idx = PACKED_LAYOUT.queue_region_size(QUEUE_SIZE) + 18  # queue 1's
        os.pwrite(region.fd, (QUEUE_SIZE + 5).to_bytes(2, "little"), old_used_idx)
        proc = serve(image, sock, log, queues=2)
        with pytest.raises(VhostUserError, match="SET_VRING_KICK: REPLY_ACK 1"):
            dev.reconnect(str(sock))  # queue 0 comes back, queue 1 is refused
        assert dev.queue(0).read(0, BLOCK) == bytes([1]) * BLOCK
        assert proc.poll() is None
    finally:
        dev.close()
        proc.terminate()
        proc.wait(10)
    text = log.read_text()
    assert "inflight old_used_idx 69 (wrap counter 1) is not a position of the ring of 64" in text
    assert "Traceback" not in text
