"""The batch interface of a virtqueue (``pop_batch`` / ``push_used_batch``): batch boundaries
against the turn budget, the avail idx read once per batch, the used idx stored once per batch
after the batch's entries, a guest rewriting the ring while batches are taken, and the inflight
region after a batch."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.vhostmem.ringhelpers import (
    DESC,
    GPA_BASE,
    PACKED_FEATURES,
    U16,
    CountingView,
    DriverRing,
    GuestRam,
    PackedDriver,
    ring_env,
)
from vhostmem.guest_memory import GuestMemory
from vhostmem.inflight import InflightRegion, create_inflight_fd
from vhostmem.memmap import MemRegistry
from vhostmem.split_ring import IDX
from vhostmem.virtqueue import TURN_BUDGET, Virtqueue

NUM = 16
IOERR = b"\x01"
# The mutated run goes on until this many chains were taken and the queue broke at least once
# (bounded in time: a machine too busy to get there fails the progress assertion, not a hang).
MUTATED_CHAINS = 2000
MUTATION_SECONDS_MAX = 60.0


@pytest.fixture
def env() -> Iterator[tuple[GuestRam, Virtqueue, DriverRing]]:
    with ring_env(NUM, IOERR) as (ram, _, vq, ring):
        yield ram, vq, ring


def _status_chains(ram: GuestRam, ring: DriverRing, count: int) -> list[int]:
    """``count`` one-descriptor chains (a writable byte each), published; their heads."""
    return [ring.add([(ram.alloc(1), 1, True)]) for _ in range(count)]


def test_a_batch_is_every_chain_up_to_avail_idx(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    heads = _status_chains(ram, ring, 5)
    vq.new_turn()
    batch = vq.pop_batch()
    assert [c.head for c in batch] == heads
    assert [c.writable_len for c in batch] == [1] * 5
    vq.push_used_batch(batch, [1] * 5)
    assert vq.pop_batch() == [] and not vq.yielded
    assert ring.take_used() == [(h, 1) for h in heads]


def test_batches_stop_at_the_turn_budget_and_the_next_turn_goes_on(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, _ = env
    big = DriverRing(ram, 1024)
    vq.reset()
    big.attach(vq)
    _status_chains(ram, big, TURN_BUDGET + 10)
    vq.new_turn()
    first = vq.pop_batch()
    assert len(first) == TURN_BUDGET
    vq.push_used_batch(first, [1] * len(first))
    assert vq.pop_batch() == [] and vq.yielded
    vq.new_turn()
    second = vq.pop_batch()
    assert len(second) == 10 and not vq.yielded
    vq.push_used_batch(second, [1] * 10)
    assert big.used_idx() == TURN_BUDGET + 10


def test_large_requests_end_a_batch_sooner(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    buf = ram.alloc(1 << 20)
    for _ in range(NUM):
        ring.add([(buf, 1 << 20, True)])
    vq.new_turn()
    # each 1 MiB request costs 1 + 16 units of the turn
    assert len(vq.pop_batch()) == -(-TURN_BUDGET // 17)
    assert vq.pop_batch() == [] and vq.yielded


def test_avail_idx_is_read_once_per_batch(env) -> None:  # type: ignore[no-untyped-def]
    """The driver publishes more chains right after the device read avail idx: the batch is
    what that one read said, and the next batch takes the rest."""
    ram, vq, ring = env
    first = _status_chains(ram, ring, 3)
    later = [(ram.alloc(1), 1, True) for _ in range(4)]

    def driver_publishes_more() -> None:
        spy.on_load = None
        for buf in later:
            ring.add([buf])

    spy = CountingView(vq._avail, watch=IDX, on_load=driver_publishes_more)  # type: ignore[arg-type]
    vq._avail = spy  # type: ignore[assignment]
    vq.new_turn()
    batch = vq.pop_batch()
    idx_loads = [e for e in spy.events if e[:2] == ("load", IDX)]
    assert len(idx_loads) == 1 and idx_loads[0][2] == 3
    assert [c.head for c in batch] == first
    vq.push_used_batch(batch, [1] * 3)
    spy.events.clear()
    assert len(vq.pop_batch()) == 4
    assert len([e for e in spy.events if e[:2] == ("load", IDX)]) == 1
    vq._avail = spy.view


def test_used_idx_is_stored_once_per_batch_after_its_entries(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    heads = _status_chains(ram, ring, 6)
    vq.new_turn()
    batch = vq.pop_batch()
    entries = CountingView(vq._used_ring)  # type: ignore[arg-type]
    hdr = CountingView(vq._used_hdr)  # type: ignore[arg-type]
    order: list[tuple[str, int, int]] = []
    entries.events = hdr.events = order  # one timeline of the stores
    vq._used_ring, vq._used_hdr = entries, hdr  # type: ignore[assignment]
    vq.push_used_batch(batch, [1] * 6)
    vq._used_ring, vq._used_hdr = entries.view, hdr.view
    stores = [e for e in order if e[0] == "store"]
    assert len(stores) == 2 * 6 + 1
    assert stores[-1] == ("store", IDX, 6)  # the idx, once, after every entry
    assert [v for _, _, v in stores[0:-1:2]] == heads
    assert ring.take_used() == [(h, 1) for h in heads]


def test_a_bad_head_ends_the_batch_and_the_chains_before_it_complete(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    good = _status_chains(ram, ring, 2)
    ring.publish(NUM + 3)  # a head beyond the ring
    vq.new_turn()
    batch = vq.pop_batch()
    assert [c.head for c in batch] == good and vq.broken
    assert "holds head 19 >= size 16" in vq.broken_reason
    vq.push_used_batch(batch, [1, 1])
    assert ring.used_idx() == 2
    assert vq.pop_batch() == []


def test_a_buffer_outside_memory_fails_alone_inside_a_batch(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    before = _status_chains(ram, ring, 1)
    status = ram.alloc(1)
    bad = ring.add([(0x10_0000_0000, 512, True), (status, 1, True)])
    after = _status_chains(ram, ring, 1)
    vq.new_turn()
    batch = vq.pop_batch()
    assert [c.head for c in batch] == before + after and not vq.broken
    vq.push_used_batch(batch, [1, 1])
    assert sorted(ring.take_used()) == sorted([(before[0], 1), (bad, 1), (after[0], 1)])
    assert ram.read(status, 1) == IOERR


def test_a_batch_of_failed_chains_only_rearms_kicks_before_it_ends(env) -> None:  # type: ignore[no-untyped-def]
    """Every chain of the batch fails on the spot: pop_batch does not return until avail idx
    was read again with kicks re-armed (EVENT_IDX: avail_event at the next position), or the
    driver, which sent its kick for the failed chains, would wait for ever for the next."""
    ram, vq, ring = env
    status = ram.alloc(1)
    for _ in range(2):
        ring.add([(0x10_0000_0000, 512, True), (status, 1, True)])
    vq.new_turn()
    assert vq.pop_batch() == [] and not vq.yielded and not vq.broken
    assert ring.avail_event() == 2
    assert len(ring.take_used()) == 2
    later = _status_chains(ram, ring, 1)
    assert [c.head for c in vq.pop_batch()] == later


def test_failed_chains_using_up_the_budget_yield_the_turn(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, _ = env
    big = DriverRing(ram, 1024)
    vq.reset()
    big.attach(vq)
    status = ram.alloc(1)
    for _ in range(TURN_BUDGET + 3):
        big.add([(0x10_0000_0000, 512, True), (status, 1, True)])
    vq.new_turn()
    assert vq.pop_batch() == [] and vq.yielded
    assert big.used_idx() == TURN_BUDGET
    vq.new_turn()
    assert vq.pop_batch() == [] and not vq.yielded
    assert big.used_idx() == TURN_BUDGET + 3


def test_a_guest_rewriting_the_ring_during_batches_never_escapes(env) -> None:  # type: ignore[no-untyped-def]
    """A guest thread rewrites avail entries, avail idx and descriptors while batches are
    taken (the GIL is handed over every microsecond, so its writes land between the device's
    bytecodes): every batch is either taken whole or ends at a broken queue, no exception
    escapes, and every chain is consistent with itself (its views add up to the lengths the
    walk read)."""
    ram, vq, ring = env
    bufs = [ram.alloc(64) for _ in range(NUM)]
    # Chains of four 64-byte writable buffers: descriptors 0-3, 4-7, ...
    good = [(bufs[i], 64, 2 | (1 if i % 4 != 3 else 0), i + 1 if i % 4 != 3 else 0)
            for i in range(NUM)]
    for i, desc in enumerate(good):
        ring.write_desc(i, *desc)
    avail_off = ring.avail - GPA_BASE
    desc_off = ring.desc - GPA_BASE
    used_off = ring.used - GPA_BASE
    stop = threading.Event()
    rng = random.Random(7)

    def guest() -> None:
        mm = ram.mm
        while not stop.is_set():
            which = rng.randrange(3)
            if which == 0:  # an avail entry: a head, rarely one beyond the ring
                slot = rng.randrange(NUM)
                head = rng.randrange(NUM) if rng.random() < 0.99 else rng.randrange(0x10000)
                mm[avail_off + 4 + 2 * slot : avail_off + 6 + 2 * slot] = U16.pack(head)
            elif which == 1:  # avail idx a few entries past what was used, rarely anywhere
                used = U16.unpack(mm[used_off + 2 : used_off + 4])[0]
                ahead = rng.randrange(1, NUM + 1) if rng.random() < 0.99 else rng.randrange(
                    0x10000)
                mm[avail_off + 2 : avail_off + 4] = U16.pack((used + ahead) & 0xFFFF)
            else:  # a descriptor: as built, or one of the hostile states for a moment
                i = rng.randrange(NUM)
                addr, length, flags, nxt = good[i]
                if rng.random() < 0.3:
                    addr, length, flags, nxt = rng.choice((
                        (addr, length, flags | 1, i),  # NEXT to itself: a loop
                        (addr, length, flags | 1, 0xFFFF),  # NEXT out of range
                        (0x10_0000_0000, length, flags, nxt),  # outside guest memory
                        (addr, rng.choice((0, 1, 63)), flags, nxt),  # another length
                        (addr, length, flags & ~2, nxt),  # readable after writable
                    ))
                mm[desc_off + 16 * i : desc_off + 16 * i + 16] = DESC.pack(
                    addr, length, flags, nxt)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    thread = threading.Thread(target=guest, daemon=True)
    thread.start()
    batches = restarts = taken = 0
    try:
        deadline = time.monotonic() + MUTATION_SECONDS_MAX
        while (taken < MUTATED_CHAINS or not restarts) and time.monotonic() < deadline:
            time.sleep(0)  # the guest runs between batches too, not only inside them
            vq.new_turn()
            batch = vq.pop_batch()
            batches += 1
            for chain in batch:
                assert 0 <= chain.head < NUM
                assert sum(len(v) for v in chain.readable) == chain.readable_len
                assert sum(len(v) for v in chain.writable) == chain.writable_len
            used_before = vq._used_idx
            vq.push_used_batch(batch, [len(c.writable) for c in batch])
            assert (vq._used_idx - used_before) & 0xFFFF == len(batch)
            taken += len(batch)
            if vq.broken:  # a reset and the same ring again: the guest goes on rewriting it
                restarts += 1
                vq.reset()
                base = U16.unpack(ram.mm[avail_off + 2 : avail_off + 4])[0]
                vq.set_base(base)
                ring.set_used_idx(base)  # what a driver's reset does: both rings start here
                ring.attach(vq)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert taken >= MUTATED_CHAINS and restarts  # both outcomes were exercised


def test_a_batch_clears_its_heads_in_the_inflight_region(env) -> None:  # type: ignore[no-untyped-def]
    ram, vq, ring = env
    fd, payload = create_inflight_fd(1, NUM)
    region = InflightRegion.attach(fd, payload["mmap_size"], 0, 1, NUM)
    try:
        vq.stop()
        vq.set_inflight(region.queue(0))
        vq.start()
        heads = _status_chains(ram, ring, 4)
        vq.new_turn()
        batch = vq.pop_batch()
        tracker = region.queue(0)
        assert sorted(h for _, h in tracker.inflight_heads()) == sorted(heads)
        vq.push_used_batch(batch[:3], [1] * 3)
        assert [h for _, h in tracker.inflight_heads()] == [heads[3]]
        assert tracker.used_idx == 3 == ring.used_idx()
        assert tracker.last_batch_head == heads[2]
    finally:
        vq.set_inflight(None)
        region.close()


def test_a_packed_ring_serves_batches_through_the_same_calls() -> None:
    ram = GuestRam()
    mem = GuestMemory(MemRegistry())
    ram.add_to(mem)
    vq = Virtqueue(0, mem)
    ring = PackedDriver(ram, NUM)
    ring.counts = {i: 1 for i in range(5)}
    ring.attach(vq, PACKED_FEATURES)
    try:
        for buffer_id in range(5):
            ring.add(buffer_id, [(ram.alloc(1), 1, True)])
        vq.new_turn()
        batch = vq.pop_batch()
        assert [c.head for c in batch] == list(range(5))
        vq.push_used_batch(batch, [1] * 5)
        assert [(i, n) for i, n, _ in ring.take_used()] == [(i, 1) for i in range(5)]
        assert vq.pop_batch() == []
    finally:
        vq.close()
        mem.close()
        ram.close()

