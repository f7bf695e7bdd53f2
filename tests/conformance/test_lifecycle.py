"""Ring lifetime and connections: stop/resume with GET_VRING_BASE, two queues at once,
reconnects, async completion, a full ring under load, no leaked fds or guest memory."""

from __future__ import annotations

import os
import threading

import pytest

from tests.conformance.profiles import MIB, SECTOR, initial
from vhostmem.frontend.blk import INDIRECT, STANDARD, BlkStatus, BlkType, Layout
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.loadgen import random_reads
from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.queue import BlkQueue

pytestmark = pytest.mark.qsd

USED_IDX_OFFSET = 2  # used ring: flags u16, idx u16, ring[num], avail_event u16
USED_RING_OFFSET = 4
USED_ENTRY = 8
QUEUE_OFFSET = 4096  # sectors between the regions the two queues work on


def test_stop_with_get_vring_base_and_resume(blk_peer, num_queues: int) -> None:
    peer = blk_peer(num_queues=num_queues)
    with VhostUserBlk.open(peer.socket_path) as dev:
        queues = [dev.start_queue(i) for i in range(num_queues)]
        for i, q in enumerate(queues):
            for k in range(5 + i):
                q.read(k, SECTOR)
        for i in range(num_queues):
            assert dev.stop_queue(i) == 5 + i == queues[i].ring.published
        for i, q in enumerate(queues):
            dev.resume_queue(i, 5 + i)
            assert q.read(3, SECTOR) == initial(peer, 3, SECTOR)
        # GET_VRING_BASE without SET_VRING_ENABLE 0 first (the legacy way) also stops it.
        assert dev.stop_queue(0, disable=False) == 6
        dev.resume_queue(0, 6)
        assert queues[0].read(7, SECTOR) == initial(peer, 7, SECTOR)
        assert dev.stop_queue(0) == 7


def test_resume_from_a_wrapped_base(blk_peer) -> None:
    """Resume at a base near 2^16 (as after migration: the used ring's idx already says so);
    the device must keep counting modulo 2^16."""
    peer = blk_peer()
    base = 0xFFFE
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0, size=8)
        assert dev.stop_queue(0) == 0
        # What a migrated ring holds: avail.idx, used.idx and (EVENT_IDX) avail_event all at
        # the base (a stale avail.idx of 0 would announce two bogus chains).
        q.ring.avail_idx = base
        dev.ram.write(q.ring.addr.used + USED_IDX_OFFSET, base.to_bytes(2, "little"))
        dev.ram.write(q.ring.addr.used + USED_RING_OFFSET + USED_ENTRY * 8,
                      base.to_bytes(2, "little"))
        dev.resume_queue(0, base)
        for k in range(4):
            assert q.read(k, SECTOR) == initial(peer, k, SECTOR)
        assert q.ring.used_idx == (base + 4) & 0xFFFF
        assert dev.stop_queue(0) == (base + 4) & 0xFFFF == 2


def _drive(q: BlkQueue, ram: GuestRam, first_sector: int, rounds: int,
           errors: list[BaseException], peer) -> None:
    try:
        for r in range(rounds):
            reqs = [q.prepare(BlkType.IN, first_sector + 16 * (8 * r + k), in_len=4096)
                    for k in range(8)]
            q.notify()
            for k, req in enumerate(reqs):
                q.wait_for(req)
                sector = first_sector + 16 * (8 * r + k)
                assert req.status == BlkStatus.OK
                assert ram.read(req.in_gpa, 4096) == initial(peer, sector, 4096)
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


def test_two_queues_used_concurrently(blk_peer) -> None:
    """Each queue driven by its own thread, both in flight at once."""
    peer = blk_peer(num_queues=2)
    with VhostUserBlk.open(peer.socket_path) as dev:
        queues = [dev.start_queue(0), dev.start_queue(1)]
        errors: list[BaseException] = []
        threads = [threading.Thread(target=_drive, args=(q, dev.ram, i * QUEUE_OFFSET, 6,
                                                         errors, peer))
                   for i, q in enumerate(queues)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [q.ring.last_used for q in queues] == [48, 48]


@pytest.mark.parametrize("mem", ["table", "slots"])
def test_reconnect_after_disconnect_twice(blk_peer, mem: str) -> None:
    peer = blk_peer()
    data = os.urandom(4096)
    with VhostUserBlk.open(peer.socket_path, mem=mem) as dev:
        dev.start_queue(0).write(8, data)  # disconnect with the ring running
    for round_ in range(2):
        with VhostUserBlk.open(peer.socket_path, mem=mem) as dev:
            q = dev.start_queue(0)
            assert q.read(8, 4096) == data
            q.write(16 + 8 * round_, data)
    with VhostUserBlk.open(peer.socket_path) as dev:
        assert dev.start_queue(0).read(16, 8192) == data + data
    assert peer.alive()


async def test_async_wait(blk_peer) -> None:
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0)
        req = q.submit(BlkType.IN, 2, in_len=1024)
        done = []
        while not req.done:
            done += await q.wait_async(5.0)
        assert req in done and dev.ram.read(req.in_gpa, 1024) == initial(peer, 2, 1024)


@pytest.mark.parametrize(("size", "qd", "layout"), [(256, 32, STANDARD), (128, 128, INDIRECT)],
                         ids=["standard-qd32", "indirect-qd128"])
def test_full_ring_under_load(blk_peer, size: int, qd: int, layout: Layout) -> None:
    """A full ring with EVENT_IDX is where a lost wakeup would stall."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        q = dev.start_queue(0, size=size, depth=qd, max_data=4096)
        result = random_reads(q, dev.config()["capacity"], qd=qd, seconds=0.5, layout=layout)
        assert result.ops > qd and result.kicks < result.ops
        assert q.in_flight == 0 and q.read(0, SECTOR) == initial(peer, 0, SECTOR)


def test_open_close_leaks_no_fd_and_returns_shared_ram(blk_peer) -> None:
    peer = blk_peer()
    with GuestRam() as ram:
        ram.add_region(0, 32 * MIB)
        before_fds = len(os.listdir("/proc/self/fd"))
        free_before = ram.free_bytes()
        for mem in ("table", "slots"):
            with VhostUserBlk.open(peer.socket_path, ram=ram, mem=mem) as dev:
                dev.start_queue(0, depth=8).read(0, SECTOR)
        assert len(os.listdir("/proc/self/fd")) == before_fds
        assert ram.free_bytes() == free_before
