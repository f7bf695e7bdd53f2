"""Virtqueue isolation: rings read once under a concurrent mutator, per-turn budgets, the
in-flight bound, all-or-nothing ring addresses, u32 used lengths."""

from __future__ import annotations

import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator

import pytest

from tests.vhostmem.ringhelpers import GPA_BASE, DriverRing, GuestRam, ring_env
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import (
    TURN_BUDGET,
    U32_MAX,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Virtqueue,
    VirtqueueError,
)

NUM = 16
OUTSIDE = 0x10_0000_0000  # a GPA in no region
IOERR = b"\x01"
DESC = struct.Struct("<QIHH")
PROGRESS = struct.Struct("<qq")  # attempts done, escaped exceptions
MUTATOR_STATES = (
    (VRING_DESC_F_WRITE, 0),  # what the driver wrote: the chain ends here
    (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),  # NEXT pointing at itself: a loop
    (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0xFFFF),  # NEXT out of range
)
ATTEMPTS = 20000
STALL_SECONDS = 5.0


@pytest.fixture
def env() -> Iterator[tuple[GuestRam, GuestMemory, Virtqueue, DriverRing]]:
    with ring_env(NUM, IOERR) as env:
        yield env


def _failing_chain(ram: GuestRam, ring: DriverRing) -> int:
    """header -> data outside guest memory -> status, as descriptors 0, 1, 2."""
    hdr = ram.alloc(16)
    status = ram.alloc(1)
    ring.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
    ring.write_desc(1, OUTSIDE, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2)
    ring.write_desc(2, status, 1, VRING_DESC_F_WRITE, 0)
    return status


def test_failure_status_is_decided_from_the_walk_under_a_concurrent_mutator(env) -> None:  # type: ignore[no-untyped-def]
    """A guest process rewrites the status descriptor (loop to itself, next out of range)
    while the device fails the request again and again. The failure status must be written
    from the descriptor as the walk read it: no second walk that could loop forever or index
    outside the table. The device runs in a child process, so a hang is seen from outside."""
    ram, _, vq, ring = env
    _failing_chain(ram, ring)
    progress = mmap.mmap(-1, PROGRESS.size)
    desc2 = ring.desc + 32 - GPA_BASE
    child = os.fork()
    if child == 0:  # the device
        code = 0
        try:
            code = _device_loop(vq, ring, progress)
        finally:
            os._exit(code)
    mutator = os.fork()
    if mutator == 0:  # the guest vCPU rewriting descriptor 2 through its own mapping
        try:
            mm = mmap.mmap(ram.fd, ram.size)
            i = 0
            while True:
                flags, nxt = MUTATOR_STATES[i % len(MUTATOR_STATES)]
                mm[desc2 + 12 : desc2 + 16] = struct.pack("<HH", flags, nxt)
                i += 1
        finally:
            os._exit(0)
    try:
        last, since = -1, time.monotonic()
        while True:
            done, escaped = PROGRESS.unpack(progress)
            assert escaped == 0, "an exception escaped pop() (a second walk of the chain)"
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                assert os.waitstatus_to_exitcode(status) == 0
                break
            if done != last:
                last, since = done, time.monotonic()
            assert time.monotonic() - since < STALL_SECONDS, (
                f"the device made no progress for {STALL_SECONDS} s after {done} attempts: "
                "it loops on the rewritten chain")
            time.sleep(0.01)
        done, escaped = PROGRESS.unpack(progress)
        assert (done, escaped) == (ATTEMPTS, 0)
    finally:
        for pid in (mutator, child):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def _device_loop(vq: Virtqueue, ring: DriverRing, progress: mmap.mmap) -> int:
    escaped = 0
    for n in range(1, ATTEMPTS + 1):
        ring.publish(0)
        vq.new_turn()
        try:
            chain = vq.pop()
        except Exception:  # the finding this test looks for
            escaped += 1
            chain = None
        PROGRESS.pack_into(progress, 0, n - 1, escaped)
        if chain is not None:  # the mutator can't make this chain valid: data is outside
            return 3
        if vq.broken:  # the walk itself saw a loop or next out of range: restart the ring
            vq.reset()
            ring.avail_idx = 0
            ring.set_avail_idx(0)
            ring.set_used_idx(0)
            ring.attach(vq)
        else:
            used = ring.take_used(recycle=False)
            if used not in ([(0, 1)], [(0, 0)]):  # status written, or not writable then
                return 4
        PROGRESS.pack_into(progress, 0, n, escaped)
    return 0


def test_a_turn_yields_after_its_budget_and_the_next_turn_goes_on(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, _ = env
    big = DriverRing(ram, 1024)
    vq.reset()
    big.attach(vq)
    hdr = ram.alloc(16)
    for _ in range(TURN_BUDGET + 10):
        big.add([(hdr, 16, False)])
    vq.new_turn()
    taken = 0
    while vq.pop() is not None:
        taken += 1
    assert taken == TURN_BUDGET and vq.yielded
    vq.new_turn()
    while vq.pop() is not None:
        taken += 1
    assert taken == TURN_BUDGET + 10 and not vq.yielded


def test_large_requests_use_up_a_turn_sooner(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, ring = env
    buf = ram.alloc(1 << 20)
    for _ in range(NUM):
        ring.add([(buf, 1 << 20, True)])
    vq.new_turn()
    taken = 0
    while vq.pop() is not None:
        taken += 1
    # each 1 MiB request costs 1 + 16 units
    assert taken == -(-TURN_BUDGET // 17) and vq.yielded


def test_a_chain_made_available_with_every_descriptor_in_flight_breaks_the_queue(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, ring = env
    hdr = ram.alloc(16)
    for _ in range(NUM):
        ring.add([(hdr, 16, False)])
    vq.new_turn()
    for _ in range(NUM):
        assert vq.pop() is not None
        vq.hold()  # handed to an I/O thread
    # A hostile driver reuses descriptor 0, still in flight, for a 17th request.
    ring.write_desc(0, hdr, 16, 0)
    ring.publish(0)
    assert vq.pop() is None
    assert vq.broken and "in flight" in vq.broken_reason
    assert vq.inflight == NUM


def test_completing_one_request_makes_room_for_the_next(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, ring = env
    hdr = ram.alloc(16)
    for _ in range(NUM):
        ring.add([(hdr, 16, False)])
    vq.new_turn()
    chains = []
    for _ in range(NUM):
        chain = vq.pop()
        assert chain is not None
        vq.hold()
        vq.begin()
        chains.append(chain)
    vq.complete(chains[0].head, 0)
    ring.take_used()
    ring.add([(hdr, 16, False)])
    assert vq.pop() is not None and not vq.broken


def test_a_refused_ring_address_leaves_the_running_ring_as_it_was(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, ring = env
    hdr = ram.alloc(16)
    with pytest.raises(VirtqueueError, match="not in guest memory"):
        vq.set_addr(ring.desc, OUTSIDE, ring.avail)
    with pytest.raises(VirtqueueError, match="aligned"):
        vq.set_addr(ring.desc + 1, ring.used, ring.avail)
    head = ring.add([(hdr, 16, False)])
    vq.new_turn()
    chain = vq.pop()
    assert chain is not None and chain.head == head and not vq.broken
    vq.push_used(chain.head, 0)
    assert ring.take_used() == [(head, 0)]


def test_a_used_length_beyond_u32_is_written_whole_and_clamped(env) -> None:  # type: ignore[no-untyped-def]
    ram, _, vq, ring = env
    hdr = ram.alloc(16)
    head = ring.add([(hdr, 16, False)])
    vq.new_turn()
    chain = vq.pop()
    assert chain is not None
    vq.push_used(chain.head, 5 << 30)
    assert ring.take_used() == [(head, U32_MAX)]


@pytest.mark.parametrize("entries, served", [(128, True), (129, False)])
def test_indirect_tables_as_long_as_the_device_asks_for_on_a_smaller_ring(
        entries: int, served: bool) -> None:
    """Linux builds indirect tables of seg_max + 2 descriptors (128 for blk) whatever the ring
    size: on a 16-entry ring such a table is served, a longer one still breaks the queue."""
    ram = GuestRam()
    mem = GuestMemory(MemRegistry())
    ram.add_to(mem)
    vq = Virtqueue(0, mem, indirect_floor=128)
    ring = DriverRing(ram, NUM)
    ring.attach(vq)
    try:
        hdr, buf, status = ram.alloc(16), ram.alloc(512 * entries), ram.alloc(1)
        bufs = [(hdr, 16, False)]
        bufs += [(buf + 512 * k, 512, True) for k in range(entries - 2)]
        bufs.append((status, 1, True))
        head = ring.add(bufs, indirect=True)
        vq.new_turn()
        chain = vq.pop()
        if served:
            assert chain is not None and chain.head == head and not vq.broken
            assert chain.writable_len == 512 * (entries - 2) + 1
        else:
            assert chain is None and vq.broken and "indirect table length" in vq.broken_reason
    finally:
        vq.close()
        mem.close()
        ram.close()


def test_blk_queues_accept_tables_of_seg_max_plus_two() -> None:
    from tests.vhostmem.test_inflight import Watcher
    from vhostmem.devices import BlkDevice, ram_disk
    from vhostmem.session import Session

    dev = BlkDevice(ram_disk(1 << 20))
    s = Session(dev, MemRegistry(), Watcher())
    try:
        assert dev.max_chain == dev.seg_max + 2 == 128
        assert all(vq.indirect_floor == 128 for vq in s.queues)
    finally:
        s.close()
