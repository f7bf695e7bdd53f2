"""Packed virtqueues (virtio 1.2 section 2.8) under a hostile driver, in process, bounds checks on
(this package's fixture): every case ends in a served request, a failed request or a broken
queue, never an exception out of ``pop`` or a view outside guest memory."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.vhostmem.ringhelpers import GuestRam, PackedDriver
from vhostmem import bounds
from vhostmem.dirty_log import DirtyLog
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.packed_ring import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
)
from vhostmem.virtqueue import (
    TURN_BUDGET,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    PackedVirtqueue,
    Virtqueue,
    VirtqueueError,
)

NUM = 16
PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
UNMAPPED = 0x10_0000_0000


@dataclass
class Env:
    mem: GuestMemory
    ram: GuestRam
    vq: Virtqueue
    drv: PackedDriver
    call: int
    err: int

    def signalled(self, fd: int) -> bool:
        try:
            return os.eventfd_read(fd) > 0
        except BlockingIOError:
            return False


@pytest.fixture
def env() -> Iterator[Env]:
    mem = GuestMemory(MemRegistry())
    ram = GuestRam()
    ram.add_to(mem)
    vq = Virtqueue(0, mem, failure_status=b"\x01")
    drv = PackedDriver(ram, NUM)
    drv.counts = {}
    call = os.eventfd(0, os.EFD_NONBLOCK)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    vq.set_call_fd(os.dup(call))
    vq.set_err_fd(os.dup(err))
    drv.attach(vq)
    assert isinstance(vq, PackedVirtqueue) and vq.packed
    yield Env(mem, ram, vq, drv, call, err)
    vq.close()
    mem.close()
    os.close(call)
    os.close(err)
    assert not bounds.violations


def request(env: Env, buffer_id: int, n_data: int = 1, indirect: bool = False) -> list:
    """A read-like chain: header (readable), ``n_data`` writable buffers, status byte."""
    hdr = env.ram.alloc(16)
    bufs = [(hdr, 16, False)] + [(env.ram.alloc(512), 512, True) for _ in range(n_data)]
    bufs.append((env.ram.alloc(1), 1, True))
    if indirect:
        env.drv.add_indirect(buffer_id, bufs)
        env.drv.counts[buffer_id] = 1
    else:
        env.drv.add(buffer_id, bufs)
        env.drv.counts[buffer_id] = len(bufs)
    return bufs


def test_chains_wrap_the_ring_and_complete_out_of_order(env: Env) -> None:
    vq = env.vq
    for rnd in range(6):  # 3 chains of 4 descriptors a round on a ring of 16: it wraps
        ids = [(rnd * 3 + k) % NUM for k in range(3)]
        for i in ids:
            request(env, i, n_data=2)
        chains = []
        while (chain := vq.pop()) is not None:
            chains.append(chain)
        assert [c.head for c in chains] == ids
        assert all(c.readable_len == 16 and c.writable_len == 1025 for c in chains)
        for c in reversed(chains):  # completed last first
            vq.push_used(c.head, 100 + c.head)
        used = env.drv.take_used()
        assert [(i, n) for i, n, _ in used] == [(i, 100 + i) for i in reversed(ids)]
        assert all(f & VRING_DESC_F_WRITE for _, _, f in used)
    assert not vq.broken
    # 72 descriptors: 4 laps plus 8; both wrap counters flipped 4 times (back to 1).
    assert vq.get_base() == 8 | 1 << 15 | (8 | 1 << 15) << 16


def test_indirect_table_of_packed_descriptors(env: Env) -> None:
    bufs = request(env, 7, n_data=3, indirect=True)
    chain = env.vq.pop()
    assert chain is not None and chain.head == 7
    assert chain.readable_len == 16 and chain.writable_len == 3 * 512 + 1
    env.vq.push_used(7, 1)
    assert env.drv.take_used() == [(7, 1, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
                                    | VRING_DESC_F_WRITE)]
    assert len(bufs) == 5


def test_direct_descriptors_then_an_indirect_one(env: Env) -> None:
    """A chain of direct descriptors ending in an indirect one: the table's buffers add to
    what came before it (bytes, and a buffer outside memory failing the request)."""
    drv, ram = env.drv, env.ram
    hdr, data, status = ram.alloc(16), ram.alloc(512), ram.alloc(1)
    drv.add(2, [(hdr, 16, False)], last_next=True)
    drv.add_indirect(2, [(ram.alloc(8), 8, False), (data, 512, True), (status, 1, True)])
    chain = env.vq.pop()
    assert chain is not None and chain.head == 2
    assert (chain.readable_len, chain.writable_len) == (24, 513)
    env.vq.push_used(2, 513)
    drv.counts[2] = 2
    assert env.drv.take_used()[0][:2] == (2, 513)
    bad_status = ram.alloc(1)
    drv.add(3, [(UNMAPPED, 16, False)], last_next=True)  # the direct part is outside memory
    drv.add_indirect(3, [(data, 512, True), (bad_status, 1, True)])
    drv.counts[3] = 2
    assert env.vq.pop() is None and not env.vq.broken
    assert ram.read(bad_status, 1) == b"\x01"
    assert env.drv.take_used()[0][:2] == (3, 1)


@pytest.mark.parametrize("case", [
    "id-out-of-range", "id-in-flight", "endless-chain", "indirect-bad-length",
    "indirect-zero-length", "indirect-too-long", "indirect-with-next", "indirect-outside",
    "readable-after-writable", "wrap-out-of-sequence",
])
def test_malformed_ring_breaks_the_queue(env: Env, case: str) -> None:
    drv, ram = env.drv, env.ram
    buf = ram.alloc(64)
    if case == "id-out-of-range":
        drv.add(NUM, [(buf, 16, False), (buf, 1, True)])
    elif case == "id-in-flight":
        drv.add(3, [(buf, 16, False), (buf, 1, True)])
        assert env.vq.pop() is not None
        drv.add(3, [(buf, 16, False), (buf, 1, True)])
    elif case == "endless-chain":
        for _ in range(NUM):
            drv.add(1, [(buf, 8, False)], last_next=True)
    elif case == "indirect-bad-length":
        drv.add_indirect(1, [(buf, 16, False), (buf, 1, True)], table_len=20)
    elif case == "indirect-zero-length":
        drv.add_indirect(1, [], table_len=0)
    elif case == "indirect-too-long":
        drv.add_indirect(1, [(buf, 1, True)], table_len=16 * 4096)
    elif case == "indirect-with-next":
        drv.add_raw(1, buf, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT)
        drv.add(1, [(buf, 1, True)])
    elif case == "indirect-outside":
        drv.add_raw(1, UNMAPPED, 32, VRING_DESC_F_INDIRECT)
    elif case == "readable-after-writable":
        drv.add(1, [(buf, 1, True), (buf, 16, False)])
    elif case == "wrap-out-of-sequence":
        # Every descriptor made available under the current wrap, then the driver flips its
        # wrap counter early and offers the same positions again: more than NUM in flight.
        for i in range(NUM // 2):
            drv.add(i, [(buf, 16, False), (buf, 1, True)])
        while env.vq.pop() is not None:
            pass
        assert not env.vq.broken
        drv.add(9, [(buf, 16, False), (buf, 1, True)])  # positions 0-1 again (wrap 0)
    got = env.vq.pop()
    while got is not None:  # a case may pop good chains first
        got = env.vq.pop()
    assert env.vq.broken, case
    assert env.signalled(env.err)
    assert env.vq.pop() is None  # nothing more is processed


def test_buffer_outside_memory_fails_only_that_request(env: Env) -> None:
    drv, ram = env.drv, env.ram
    status = ram.alloc(1)
    drv.add(4, [(ram.alloc(16), 16, False), (UNMAPPED, 4096, True), (status, 1, True)])
    drv.counts[4] = 3
    request(env, 5)
    chain = env.vq.pop()  # the bad one is completed inside pop; the good one comes out
    assert chain is not None and chain.head == 5 and not env.vq.broken
    assert ram.read(status, 1) == b"\x01"  # the failure status, at the chain's end
    assert env.drv.take_used()[0][:2] == (4, 1)


def test_event_suppression_areas(env: Env) -> None:
    vq, drv = env.vq, env.drv
    vq.event_idx = False  # ENABLE / DISABLE first
    drv.set_driver_event(0, RING_EVENT_FLAGS_DISABLE)
    request(env, 0)
    vq.push_used(vq.pop().head, 1)  # type: ignore[union-attr]
    assert vq.pop() is None  # empty: kicks enabled again
    assert drv.device_event()[1] == RING_EVENT_FLAGS_ENABLE
    assert not vq.notify() and not env.signalled(env.call)
    drv.set_driver_event(0, RING_EVENT_FLAGS_ENABLE)
    request(env, 1)
    vq.push_used(vq.pop().head, 1)  # type: ignore[union-attr]
    assert vq.notify() and env.signalled(env.call)
    drv.take_used()
    # EVENT_IDX: DESC with off_wrap; an interrupt only when the used position passes it.
    vq.event_idx = True
    assert vq.pop() is None
    assert drv.device_event() == (drv.pos | drv.wrap << 15, RING_EVENT_FLAGS_DESC)
    target = (drv.used_pos + 3) | drv.used_wrap << 15  # the second chain's used descriptor
    drv.set_driver_event(target, RING_EVENT_FLAGS_DESC)
    for i in (2, 3):
        request(env, i)
        vq.push_used(vq.pop().head, 1)  # type: ignore[union-attr]
        assert vq.notify() is (i == 3)
    drv.take_used()


def test_event_area_outside_memory_is_refused(env: Env) -> None:
    vq = env.vq
    vq.stop()
    with pytest.raises(VirtqueueError, match="not in guest memory"):
        vq.set_addr(env.drv.ring, UNMAPPED, env.drv.driver)
    with pytest.raises(VirtqueueError, match="aligned"):
        vq.set_addr(env.drv.ring, env.drv.device + 2, env.drv.driver)
    vq.start()  # the old, valid addresses are still in place
    request(env, 0)
    assert vq.pop() is not None


def test_turn_budget_and_in_flight_bound(env: Env) -> None:
    vq, drv = env.vq, env.drv
    vq.stop()
    vq.reset()
    big = PackedDriver(env.ram, 512)
    big.counts = {}
    big.attach(vq, num=512)
    buf = env.ram.alloc(16)
    for i in range(300):
        big.add(i, [(buf, 1, True)])
    vq.new_turn()
    served = 0
    while (chain := vq.pop()) is not None:
        vq.push_used(chain.head, 1)
        served += 1
    assert served == TURN_BUDGET and vq.yielded and not vq.broken
    del drv


def test_dirty_log_marks_buffers_and_used_descriptor(env: Env) -> None:
    vq, drv, ram = env.vq, env.drv, env.ram
    size = 64 << 10  # one bit per page up to 2 GiB
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, size)
    dirty = DirtyLog(log_fd, mmap.mmap(log_fd, size))
    try:
        vq.stop()
        vq.set_addr(drv.ring, drv.device, drv.driver, (1, 0, 0, 0, drv.device))  # F_LOG
        vq.start()
        vq.set_dirty_log(dirty)
        data = ram.alloc(4096, 4096) + 8192
        drv.add(2, [(ram.alloc(16), 16, False), (data, 512, True)])
        chain = vq.pop()
        assert chain is not None
        vq.push_used(2, 512)
        raw = bytes(dirty.mm)
        marked = {8 * i + b for i, byte in enumerate(raw) if byte for b in range(8)
                  if byte >> b & 1}
        assert data >> 12 in marked and drv.ring >> 12 in marked
        assert (ram.gpa + ram.size) >> 12 not in marked
    finally:
        vq.set_dirty_log(None)
        dirty.close()


def test_descriptors_rewritten_while_the_device_walks_them(env: Env) -> None:
    """A mutator thread rewrites every descriptor (flags, ids, lengths, addresses: in and out
    of memory, NEXT and INDIRECT on and off) while the device pops and completes: no exception,
    no view outside guest memory (bounds checks on), the queue ends served or broken."""
    vq, drv, ram = env.vq, env.drv, env.ram
    table = ram.alloc(16 * 4, 16)
    targets = [ram.alloc(4096), UNMAPPED, table, ram.gpa + ram.size - 8]
    stop = threading.Event()
    writes = [0]

    def mutate() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            i = k % NUM
            flags = (k * 7919) & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT
                                  | VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
            drv.write(i, targets[k % 4], (k * 37) % 8192, (k * 13) % (NUM + 4), flags)
            ram.write(table + 16 * (k % 4), PDESC.pack(targets[(k + 1) % 4], k % 600, 0,
                                                       k & VRING_DESC_F_WRITE))
            writes[0] = k

    for i in range(NUM // 4):  # valid chains first: the device is busy when the mutator starts
        request(env, i)
    thread = threading.Thread(target=mutate)
    thread.start()
    pops = 0
    deadline = time.monotonic() + 20
    try:
        # Until the mutator rewrote the ring a few thousand times and the device decided
        # something from what it read (served, failed or broke), within the deadline.
        while time.monotonic() < deadline and not vq.broken:
            vq.new_turn()
            while (chain := vq.pop()) is not None:
                pops += 1
                vq.push_used(chain.head, chain.writable_len)
            vq.notify()
            if writes[0] > 5000 and pops + vq.stat_errors > NUM // 4:
                break
            time.sleep(0)
    finally:
        stop.set()
        thread.join()
    assert not bounds.violations
    assert writes[0] > 1000
    assert vq.broken or pops + vq.stat_errors > NUM // 4  # decided beyond the valid chains


def test_completions_from_threads_out_of_order(env: Env) -> None:
    """Thread mode (hold / begin / complete): buffers completed by workers in reverse order
    get their used descriptors in completion order, and one interrupt for the batch."""
    vq = env.vq
    for i in range(4):
        request(env, i)
    chains = []
    while (chain := vq.pop()) is not None:
        vq.hold()
        chains.append(chain)
    assert [c.head for c in chains] == [0, 1, 2, 3]
    for c in reversed(chains):
        worker = threading.Thread(target=lambda c=c: (vq.begin(), vq.complete(c.head, 7)))
        worker.start()
        worker.join()
    assert vq.idle()
    assert [(i, n) for i, n, _ in env.drv.take_used()] == [(3, 7), (2, 7), (1, 7), (0, 7)]
    assert os.eventfd_read(env.call) >= 1
    assert vq.get_base() == 12 | 1 << 15 | (12 | 1 << 15) << 16


def test_vring_base_beyond_the_ring_is_refused(env: Env) -> None:
    """SET_VRING_BASE positions are 15 bits; one at or past the ring size cannot start."""
    vq = env.vq
    vq.stop()
    vq.set_base(NUM | 1 << 15 | (0 | 1 << 15) << 16)
    with pytest.raises(VirtqueueError, match="beyond the ring"):
        vq.start()
    assert not vq.started
    vq.set_base(3 | 0 << 15 | (3 | 0 << 15) << 16)  # a valid base: position 3, wrap 0
    vq.start()
    assert vq.get_base() == 3 | 3 << 16


def test_desc_event_after_laps_of_used_descriptors_signals(env: Env) -> None:
    """EVENT_IDX with a DESC event: two or more laps of used descriptors between two signals
    bring the used wrap counter back to the one of the last signal; the event the driver asked
    for was passed all the same, so the interrupt is due (a skipped one hangs the guest)."""
    vq, drv, ram = env.vq, env.drv, env.ram
    vq.event_idx = True
    buf = ram.alloc(16)
    drv.set_driver_event(0, RING_EVENT_FLAGS_ENABLE)

    def complete_one(buffer_id: int) -> None:
        drv.add(buffer_id, [(buf, 1, True)])
        drv.counts[buffer_id] = 1
        chain = vq.pop()
        assert chain is not None and chain.head == buffer_id
        vq.push_used(chain.head, 1)
        drv.take_used()

    for i in range(5):
        complete_one(i)
    assert vq.notify() and env.signalled(env.call)  # last signal: used position 5, wrap 1
    assert (drv.used_pos, drv.used_wrap) == (5, 1)
    drv.set_driver_event(4 | 0 << 15, RING_EVENT_FLAGS_DESC)  # position 4 of the next lap
    for k in range(35):  # 5 + 35 = 2 laps + 8: used position 8, wrap 1 again
        complete_one(k % NUM)
    assert (drv.used_pos, drv.used_wrap) == (8, 1)
    assert vq.get_base() >> 16 == 8 | 1 << 15
    assert vq.notify() and env.signalled(env.call)
    # Within one lap the spec's check still decides: the event (position 12, wrap 1) is not
    # reached by 3 more, then passed by 2 more.
    drv.set_driver_event(12 | 1 << 15, RING_EVENT_FLAGS_DESC)
    for k in range(3):
        complete_one(k)
        assert not vq.notify()
    for k in range(3, 5):
        complete_one(k)
        assert vq.notify() is (k == 4)
    assert not vq.broken


def test_duplicate_id_under_dirty_log_keeps_in_flight_ranges(env: Env) -> None:
    """A hostile driver offers an id already in flight while dirty logging is on: the queue
    breaks, and the in-flight request's writable buffers are still logged when it completes
    (the duplicate must not replace its recorded ranges)."""
    vq, drv, ram = env.vq, env.drv, env.ram
    size = 64 << 10  # one bit per page up to 2 GiB
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, size)
    dirty = DirtyLog(log_fd, mmap.mmap(log_fd, size))
    try:
        vq.set_dirty_log(dirty)
        pages = ram.alloc(4 * 4096, 4096)
        first, second = pages, pages + 2 * 4096  # pages of their own
        drv.add(3, [(ram.alloc(16), 16, False), (first, 512, True)])
        chain = vq.pop()
        assert chain is not None and chain.head == 3
        drv.add(3, [(ram.alloc(16), 16, False), (second, 512, True)])  # id 3 again
        assert vq.pop() is None and vq.broken
        vq.push_used(3, 512)  # the first request completes
        raw = bytes(dirty.mm)
        marked = {8 * i + b for i, byte in enumerate(raw) if byte for b in range(8)
                  if byte >> b & 1}
        assert first >> 12 in marked
        assert second >> 12 not in marked
    finally:
        vq.set_dirty_log(None)
        dirty.close()
