"""Inflight I/O tracking of packed rings (vhost-user.rst, QueueRegionPacked): layout, tracking,
recovery after a crash, hostile region contents.

Real memfds throughout, as in test_inflight.py: the region is a sealed memfd the test keeps
open like QEMU; a "crash" drops the virtqueue without completing anything or touching the
region; the "restarted backend" attaches the same fd and starts from the base QEMU 7.2 sends
for a packed ring after a crash: the one of the ring's start (it restores nothing).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.vhostmem.ringhelpers import FRESH_BASE, PACKED_FEATURES, GuestRam, PackedDriver
from vhostmem import bounds
from vhostmem.descriptors import DescChain
from vhostmem.guest_memory import GuestMemory
from vhostmem.inflight import (
    DEVICE_STATE_SIZE,
    SPLIT_LAYOUT,
    InflightError,
    InflightRegion,
    create_inflight_fd,
)
from vhostmem.inflight_packed import PACKED_LAYOUT, PackedInflightQueue
from vhostmem.memmap import MemRegistry
from vhostmem.packed_ring import BASE_USED_SHIFT, WRAP_SHIFT
from vhostmem.virtqueue import PackedVirtqueue, Virtqueue

NUM = 16
# The spec's C structs, little-endian, written out field by field.
HEADER = struct.Struct("<QHHHHHHBB7x")  # features .. old_used_wrap_counter, padding[7]
ENTRY = struct.Struct("<BxHHHQHHIQ")  # inflight, next, last, num, counter, id, flags, len, addr


def header(fd: int) -> dict[str, int]:
    names = ("features", "version", "desc_num", "free_head", "old_free_head", "used_idx",
             "old_used_idx", "used_wrap", "old_used_wrap")
    return dict(zip(names, HEADER.unpack(os.pread(fd, HEADER.size, 0)), strict=True))


def entry(fd: int, i: int) -> dict[str, int]:
    names = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")
    raw = os.pread(fd, ENTRY.size, 32 + 32 * i)
    return dict(zip(names, ENTRY.unpack(raw), strict=True))


def poke(fd: int, offset: int, fmt: str, value: int) -> None:
    os.pwrite(fd, struct.pack("<" + fmt, value), offset)


# ------------------------------------------------------------------ layout


def test_packed_layout_sizes_match_the_spec_structs() -> None:
    assert HEADER.size == 29 and ENTRY.size == 32  # sizeof: 32 (desc[] is 8-aligned), 32
    for qs in (1, 2, 3, 64, 127, 128, 256, 1024, 32768):
        # DPDK's get_pervq_shm_size_packed: ALIGN_UP(32 * qs + 8 + 2 * 6 + 9, 64)
        assert PACKED_LAYOUT.queue_region_size(qs) == -(-(32 * qs + 29) // 64) * 64
    fd, p = create_inflight_fd(2, 128, max_queues=2, layout=PACKED_LAYOUT)
    try:
        assert p["mmap_size"] == 2 * (32 + 32 * 128) + 64 + DEVICE_STATE_SIZE
        assert os.fstat(fd).st_size == p["mmap_size"]
    finally:
        os.close(fd)


def test_device_state_trailer_follows_the_packed_queues() -> None:
    fd, p = create_inflight_fd(2, NUM, layout=PACKED_LAYOUT)
    keep = os.dup(fd)
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 2, NUM, layout=PACKED_LAYOUT)
    assert region.device_state() is None
    assert region.save_device_state(b"\x03")
    region.close()
    trailer = 2 * PACKED_LAYOUT.queue_region_size(NUM)
    assert os.pread(keep, 9, trailer) == b"VMDS\x01\x00\x00\x00\x03"
    again = InflightRegion.attach(os.dup(keep), p["mmap_size"], 0, 2, NUM,
                                  layout=PACKED_LAYOUT)
    assert again.device_state() == b"\x03"
    # The same bytes read as a split region put the trailer elsewhere: nothing found there.
    again.close()
    split = InflightRegion.attach(keep, p["mmap_size"], 0, 1, NUM, layout=SPLIT_LAYOUT)
    assert split.device_state() is None
    split.close()


# ------------------------------------------------------------ virtqueue level


@dataclass
class Guest:
    """Guest RAM with one packed ring, and the region QEMU keeps across crashes."""

    ram: GuestRam = field(default_factory=GuestRam)
    drv: PackedDriver = field(init=False)
    region_fd: int = -1
    region_size: int = 0

    def __post_init__(self) -> None:
        self.drv = PackedDriver(self.ram, NUM)
        self.drv.counts = {}
        self.region_fd, p = create_inflight_fd(1, NUM, layout=PACKED_LAYOUT)
        self.region_size = p["mmap_size"]

    def buffer(self, tag: int, length: int = 8) -> int:
        gpa = self.ram.alloc(length, 16)
        self.ram.write(gpa, bytes([tag]) * length)
        return gpa

    def add(self, buffer_id: int, ndesc: int = 1) -> None:
        bufs = [(self.buffer(buffer_id * 16 + k), 8, False) for k in range(ndesc)]
        self.drv.add(buffer_id, bufs)
        self.drv.counts[buffer_id] = ndesc

    def used(self) -> list[int]:
        return [buffer_id for buffer_id, _, _ in self.drv.take_used()]

    def close(self) -> None:
        os.close(self.region_fd)
        self.ram.close()


@dataclass
class Backend:
    mem: GuestMemory
    vq: Virtqueue
    region: InflightRegion
    call: int

    @property
    def tracker(self) -> PackedInflightQueue:
        return self.region.queue(0)  # type: ignore[no-any-return]

    def pop_all(self) -> list[DescChain]:
        out = []
        while (chain := self.vq.pop()) is not None:
            out.append(chain)
        return out

    def complete(self, *chains: DescChain) -> None:
        for chain in chains:
            self.vq.push_used(chain.head, 0)
        self.vq.notify()

    def crash(self) -> None:
        """The process dies: mappings and fds vanish, nothing touches the region."""
        self.vq._inflight = None
        self.vq.close()
        self.region.close()
        self.mem.close()
        os.close(self.call)


def start_backend(g: Guest, base: int = FRESH_BASE) -> Backend:
    mem = GuestMemory(MemRegistry())
    g.ram.add_to(mem)
    vq = Virtqueue(0, mem)
    region = InflightRegion.attach(os.dup(g.region_fd), g.region_size, 0, 1, NUM,
                                   layout=PACKED_LAYOUT)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    vq.set_call_fd(os.dup(call))
    vq.set_features(PACKED_FEATURES)
    vq.set_inflight(region.queue(0))
    vq.set_num(NUM)
    vq.set_addr(g.drv.ring, g.drv.device, g.drv.driver)
    vq.set_base(base)
    vq.start()
    vq.enable(True)
    assert isinstance(vq, PackedVirtqueue)
    return Backend(mem, vq, region, call)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def data_of(chain: DescChain) -> bytes:
    return b"".join(bytes(v) for v in chain.readable)


def test_fresh_region_is_initialised_from_the_frontend_base(guest: Guest) -> None:
    base = 5 | 0 << WRAP_SHIFT | (3 | 1 << WRAP_SHIFT) << BASE_USED_SHIFT
    guest.drv.pos, guest.drv.wrap = 5, 0
    b = start_backend(guest, base)
    h = header(guest.region_fd)
    assert (h["version"], h["desc_num"], h["free_head"], h["old_free_head"]) == (1, NUM, 0, 0)
    assert (h["used_idx"], h["used_wrap"], h["old_used_idx"], h["old_used_wrap"]) == (3, 1, 3, 1)
    assert [entry(guest.region_fd, i)["next"] for i in range(NUM)] == list(range(1, NUM + 1))
    assert b.vq.get_base() == base  # a fresh region: the frontend's base stands
    b.crash()


def test_fetch_copies_chains_and_completion_returns_entries(guest: Guest) -> None:
    b = start_backend(guest)
    guest.add(7, ndesc=2)
    guest.add(3)
    chains = b.pop_all()
    assert [c.head for c in chains] == [7, 3]
    fd = guest.region_fd
    e0, e1, e2 = (entry(fd, i) for i in range(3))
    # buffer 7 took entries 0-1 (head entry 0), buffer 3 entry 2
    assert (e0["inflight"], e0["num"], e0["last"], e1["inflight"]) == (1, 2, 1, 0)
    assert (e2["inflight"], e2["num"], e2["last"]) == (1, 1, 2)
    assert e0["counter"] < e2["counter"]
    assert [(e["id"], e["len"]) for e in (e0, e1, e2)] == [(7, 8), (7, 8), (3, 8)]
    assert e0["addr"] == guest.drv.read(0)[0] and e2["addr"] == guest.drv.read(2)[0]
    assert (header(fd)["free_head"], header(fd)["old_free_head"]) == (3, 3)
    b.complete(chains[1])  # out of order: buffer 3 first, its used descriptor at position 0
    h = header(fd)
    assert entry(fd, 2)["inflight"] == 0 and entry(fd, 0)["inflight"] == 1
    assert (h["free_head"], h["used_idx"], h["used_wrap"]) == (2, 1, 1)
    assert (h["old_free_head"], h["old_used_idx"], h["old_used_wrap"]) == (2, 1, 1)
    assert entry(fd, 2)["next"] == 3  # back on the free list, before the rest
    assert guest.used() == [3]
    b.crash()


def test_crash_resubmits_from_the_copies_in_fetch_order(guest: Guest) -> None:
    b = start_backend(guest)
    for buffer_id, ndesc in ((4, 1), (9, 2), (1, 1), (6, 1)):
        guest.add(buffer_id, ndesc)
    chains = b.pop_all()
    want = {c.head: data_of(c) for c in chains}
    b.complete(chains[2])  # buffer 1: its used descriptor overwrites buffer 4's at position 0
    assert guest.drv.read(0)[2] == 1
    b.crash()
    guest.add(2)  # arrives while the backend is down
    b2 = start_backend(guest)  # QEMU 7.2 sends the stale base of the ring's start
    assert b2.vq.get_base() == (5 | 1 << WRAP_SHIFT) | (1 | 1 << WRAP_SHIFT) << BASE_USED_SHIFT
    assert eventfd_read(b2.call) == 1  # what the dead backend published is signalled
    again = b2.pop_all()
    assert [c.head for c in again] == [4, 9, 6, 2]
    assert all(data_of(c) == want[c.head] for c in again[:3])  # from the copies
    assert data_of(again[3]) == bytes([2 * 16]) * 8
    b2.complete(again[1], again[0], again[3], again[2])
    assert guest.used() == [1, 9, 4, 2, 6]
    h = header(guest.region_fd)
    assert (h["used_idx"], h["free_head"] < NUM) == (6, True)
    assert not any(entry(guest.region_fd, i)["inflight"] for i in range(NUM))
    b2.crash()
    b3 = start_backend(guest)  # nothing in flight: continues where the ring is
    assert b3.vq.get_base() == (6 | 1 << WRAP_SHIFT) * 0x10001
    assert b3.pop_all() == []
    b3.crash()


def test_wrap_counters_survive_a_crash_across_laps(guest: Guest) -> None:
    b = start_backend(guest)
    for lap in range(3):
        for k in range(NUM // 2):
            guest.add(k)
        b.complete(*b.pop_all())
        assert len(guest.used()) == NUM // 2, lap
    guest.add(5, ndesc=3)
    guest.add(6)
    held = b.pop_all()
    b.complete(held[1])
    b.crash()
    b2 = start_backend(guest)
    # 3 laps of 8 + 1: used at 9, wrap 0; avail 3 further
    assert b2.vq.get_base() == (12 | 0 << WRAP_SHIFT) | (9 | 0 << WRAP_SHIFT) << BASE_USED_SHIFT
    (again,) = b2.pop_all()
    assert again.head == 5 and len(again.readable) == 3
    b2.complete(again)
    assert guest.used() == [6, 5]
    b2.crash()


def test_crash_before_the_used_flags_store_rolls_back(guest: Guest) -> None:
    b = start_backend(guest)
    guest.add(2)
    guest.add(3)
    b.pop_all()
    # The process dies inside push_used of buffer 3: the region moved, the ring did not.
    b.tracker.completing(3, 2, 1)
    h = header(guest.region_fd)
    assert (h["used_idx"], h["old_used_idx"]) == (2, 0)
    b.crash()
    b2 = start_backend(guest)
    assert [c.head for c in b2.pop_all()] == [2, 3]  # both again: the guest saw neither
    assert b2.vq.get_base() >> BASE_USED_SHIFT == 0 | 1 << WRAP_SHIFT
    b2.crash()


def test_crash_after_the_used_flags_store_commits(guest: Guest) -> None:
    b = start_backend(guest)
    guest.add(2)
    guest.add(3)
    _, c3 = b.pop_all()
    b.tracker.completed = lambda head: None  # type: ignore[method-assign]  # dies right after
    b.vq.push_used(c3.head, 0)
    assert entry(guest.region_fd, 1)["inflight"] == 1  # not cleared yet
    b.crash()
    b2 = start_backend(guest)
    assert [c.head for c in b2.pop_all()] == [2]  # 3 completed: the guest may have seen it
    assert guest.used() == [3]
    h = header(guest.region_fd)
    assert (h["used_idx"], h["old_used_idx"], h["free_head"], h["old_free_head"]) == (
        1, 1, h["free_head"], h["free_head"])
    b2.crash()


def test_crash_inside_a_fetch_takes_the_chain_again_from_the_ring(guest: Guest) -> None:
    b = start_backend(guest)
    guest.add(8, ndesc=2)
    b.pop_all()
    poke(guest.region_fd, 14, "H", 0)  # old_free_head not committed yet
    b.crash()
    b2 = start_backend(guest)
    assert entry(guest.region_fd, 0)["inflight"] == 0  # the entry was on the free list
    (again,) = b2.pop_all()  # read from the ring at the avail position, not resubmitted
    assert again.head == 8 and data_of(again) == data_of_ram(guest, 0, 2)
    assert entry(guest.region_fd, 0)["inflight"] == 1
    b2.crash()


def data_of_ram(g: Guest, pos: int, count: int) -> bytes:
    out = b""
    for i in range(pos, pos + count):
        addr, length, _, _ = g.drv.read(i)
        out += g.ram.read(addr, length)
    return out


def eventfd_read(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_thread_mode_completion_and_fetch_keep_the_free_list(guest: Guest) -> None:
    b = start_backend(guest)
    for k in range(NUM):
        guest.add(k)
    chains = b.pop_all()
    b.vq.hold(len(chains), waiting=False)
    for chain in reversed(chains):
        b.vq.complete(chain.head, 0)
    assert sorted(guest.used()) == list(range(NUM))
    for k in range(NUM):  # every entry is free again: a full ring fits once more
        guest.add(k)
    assert len(b.pop_all()) == NUM
    assert all(entry(guest.region_fd, i)["inflight"] for i in range(NUM))
    b.crash()
    b2 = start_backend(guest)
    assert [c.head for c in b2.pop_all()] == list(range(NUM))
    b2.crash()


def test_free_list_stays_whole_across_recoveries(guest: Guest) -> None:
    """Chains whose entries are scattered over the region (out-of-order completions reorder
    the free list) go back to the free list whole after a recovery: a full ring of new
    chains is tracked afterwards, and recovered again after a second crash."""
    b = start_backend(guest)
    for buffer_id, ndesc in ((0, 3), (1, 1), (2, 3), (3, 2)):
        guest.add(buffer_id, ndesc)
    first = b.pop_all()
    b.complete(first[1], first[0])  # free list: 0 1 2 (buffer 0), 3 (buffer 1), 9 10 ...
    for buffer_id, ndesc in ((4, 3), (5, 3), (6, 1)):
        guest.add(buffer_id, ndesc)
    b.pop_all()  # buffer 5 takes entries 3, 9, 10: a chain across a gap
    assert guest.used() == [1, 0]
    b.crash()
    b2 = start_backend(guest)
    again = b2.pop_all()
    assert [c.head for c in again] == [2, 3, 4, 5, 6]
    b2.complete(*again)
    assert sorted(guest.used()) == [2, 3, 4, 5, 6]
    ids = list(range(NUM // 2))
    for buffer_id in ids:  # 8 chains of 2: every entry of the region
        guest.add(buffer_id, 2)
    held = b2.pop_all()
    assert [c.head for c in held] == ids
    assert sum(entry(guest.region_fd, i)["inflight"] for i in range(NUM)) == len(ids)
    b2.crash()
    b3 = start_backend(guest)
    assert [(c.head, len(c.readable)) for c in b3.pop_all()] == [(i, 2) for i in ids]
    b3.crash()


@pytest.fixture
def bounds_on() -> Iterator[None]:
    was_on = bounds.enabled
    bounds.enable()
    yield
    if not was_on:
        bounds.disable()
    assert not bounds.violations


def test_resubmission_under_bounds_checks(guest: Guest, bounds_on: None) -> None:
    """VHOSTMEM_DEBUG_BOUNDS wraps the packed walk; a walk of the region's copies goes
    through the same check."""
    b = start_backend(guest)
    guest.add(3, ndesc=2)
    guest.add(4)
    held = b.pop_all()
    b.complete(held[1])
    b.crash()
    b2 = start_backend(guest)
    (again,) = b2.pop_all()
    assert again.head == 3 and len(again.readable) == 2
    b2.crash()


# ------------------------------------------------------------ hostile regions


def _with_two_in_flight(g: Guest) -> None:
    b = start_backend(g)
    g.add(4, ndesc=2)
    g.add(5)
    b.pop_all()
    b.crash()


Poke = tuple[int, str, int]  # offset in the region, struct format, value


@pytest.mark.parametrize(("pokes", "match"), [
    ([(8, "H", 7)], "version 7, expected 1"),
    ([(18, "H", NUM)], "old_used_idx 16 .* not a position of the ring of 16"),
    ([(21, "B", 2)], "old_used_idx 0 \\(wrap counter 2\\)"),
    ([(14, "H", NUM + 1)], "old_free_head 17 is beyond the 16 entries"),
    ([(32 + 6, "H", 0)], "inflight entry 0: num 0 not in 1..16"),
    ([(32 + 6, "H", 17)], "inflight entry 0: num 17 not in 1..16"),
    ([(32 + 2, "H", 40000)], "entry 0: descriptor 1 of its chain is entry 40000"),
    ([(32 + 2, "H", 2), (32 + 4, "H", 2)],
     "entry 2: descriptor 0 of its chain is entry 2, outside the region or taken twice"),
    ([(32 + 4, "H", 5)], "entry 0: last 5, but its chain of 2 ends at entry 1"),
    ([(32 + 32 + 16, "H", 16)], "entry 0: buffer id 16 is out of the ring"),
    ([(32 + 32 + 16, "H", 5)], "buffer id 5 is out of the ring of 16 or in flight twice"),
    # a completion cut short before its flags store: rolled back, its bogus position unused
    ([(16, "H", NUM + 3)], None),
])
def test_hostile_region_contents_are_refused_and_nothing_written(
        guest: Guest, pokes: list[Poke], match: str | None) -> None:
    _with_two_in_flight(guest)
    for offset, fmt, value in pokes:
        poke(guest.region_fd, offset, fmt, value)
    before = os.pread(guest.region_fd, guest.region_size, 0)
    mem = GuestMemory(MemRegistry())
    guest.ram.add_to(mem)
    vq = Virtqueue(0, mem)
    region = InflightRegion.attach(os.dup(guest.region_fd), guest.region_size, 0, 1, NUM,
                                   layout=PACKED_LAYOUT)
    vq.set_features(PACKED_FEATURES)
    vq.set_inflight(region.queue(0))
    vq.set_num(NUM)
    vq.set_addr(guest.drv.ring, guest.drv.device, guest.drv.driver)
    vq.set_base(FRESH_BASE)
    if match is None:  # rolled back: the ring's descriptor there is still available
        vq.start()
        assert vq.started and vq.get_base() >> BASE_USED_SHIFT == 1 << WRAP_SHIFT
    else:
        with pytest.raises(InflightError, match=match):
            vq.start()
        assert not vq.started
        assert os.pread(guest.region_fd, guest.region_size, 0) == before
    vq.close()
    region.close()
    mem.close()


def test_more_descriptors_in_flight_than_the_ring_is_refused(guest: Guest) -> None:
    _with_two_in_flight(guest)
    poke(guest.region_fd, 32 + 6, "H", 2)  # fine so far: 2 + 1 descriptors
    poke(guest.region_fd, 10, "H", 2)  # desc_num in the header is not believed
    mem = GuestMemory(MemRegistry())
    guest.ram.add_to(mem)
    vq = Virtqueue(0, mem)
    region = InflightRegion.attach(os.dup(guest.region_fd), guest.region_size, 0, 1, NUM,
                                   layout=PACKED_LAYOUT)
    vq.set_features(PACKED_FEATURES)
    vq.set_inflight(region.queue(0))
    vq.set_num(2)  # a ring of 2 cannot have 3 descriptors in flight
    vq.set_addr(guest.drv.ring, guest.drv.device, guest.drv.driver)
    vq.set_base(FRESH_BASE)
    with pytest.raises(InflightError, match="3 descriptors in flight, more than the ring of 2"):
        vq.start()
    vq.close()
    region.close()
    mem.close()


def test_a_split_region_on_a_packed_ring_is_dropped(guest: Guest) -> None:
    mem = GuestMemory(MemRegistry())
    guest.ram.add_to(mem)
    vq = Virtqueue(0, mem)
    fd, p = create_inflight_fd(1, NUM)
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 1, NUM)
    vq.set_inflight(region.queue(0))
    vq.set_features(PACKED_FEATURES)  # the layout changes: a split tracker cannot follow
    assert vq._inflight is None
    vq.close()
    region.close()
    mem.close()
