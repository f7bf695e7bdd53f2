"""Driver-side split ring, eventfds and descriptor layouts, on real memfd guest RAM."""

import os
import time

import pytest

from vhostmem.frontend.blk import MERGED, STANDARD, BlkType, Layout, LayoutError, chain_pieces
from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.queue import BlkQueue, LostKickError
from vhostmem.frontend.ring import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    EventFd,
    RingError,
    SplitRing,
    vring_need_event,
)

MIB = 1 << 20
POLL_SECONDS = 0.5


@pytest.fixture
def ram():
    with GuestRam() as r:
        r.add_region(0, MIB)
        yield r


def _device_complete(ram: GuestRam, ring: SplitRing, head: int, length: int) -> None:
    """Act as the device: append one used element and bump used.idx."""
    idx = ring.used_idx
    ram.write(ring.addr.used + 4 + 8 * (idx % ring.num), head.to_bytes(4, "little")
              + length.to_bytes(4, "little"))
    ram.write(ring.addr.used + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))


def test_ring_geometry_and_raw_fields(ram: GuestRam) -> None:
    ring = SplitRing(ram, 8)
    assert ring.addr.desc % 16 == 0 and ring.addr.used % 4 == 0
    ring.write_desc(3, 0x1234, 99, VIRTQ_DESC_F_WRITE, 5)
    assert ring.read_desc(3) == (0x1234, 99, VIRTQ_DESC_F_WRITE, 5)
    ring.avail_idx = 0xFFFF
    assert int.from_bytes(ram.read(ring.addr.avail + 2, 2), "little") == 0xFFFF
    with pytest.raises(RingError, match="outside queue"):
        ring.write_desc(8, 0, 0)
    with pytest.raises(RingError, match="power of two"):
        SplitRing(ram, 6)


def test_publish_batches_and_honours_no_notify(ram: GuestRam) -> None:
    ring = SplitRing(ram, 4)
    head = ring.write_chain([0, 1], [(0x100, 16, 0), (0x200, 1, VIRTQ_DESC_F_WRITE)])
    assert ring.read_desc(0) == (0x100, 16, VIRTQ_DESC_F_NEXT, 1)
    ring.add_avail(head)
    ring.add_avail(head)
    assert ring.avail_idx == 0  # not visible before publish
    assert ring.publish() is True and ring.avail_idx == 2
    assert ring.publish() is False  # nothing new
    ram.write(ring.addr.used, VIRTQ_USED_F_NO_NOTIFY.to_bytes(2, "little"))
    ring.add_avail(head)
    assert ring.publish() is False


def test_event_idx_kick_decision_and_used_event(ram: GuestRam) -> None:
    ring = SplitRing(ram, 4, event_idx=True)
    ring.add_avail(0)
    assert ring.publish() is True  # avail_event 0 is passed by 0 -> 1
    ring.add_avail(0)
    assert ring.publish() is False  # device asked for a kick at 0 only
    _device_complete(ram, ring, 0, 7)
    assert ring.pop_used() == [(0, 7)] and ring.used_event == 1
    assert vring_need_event(0xFFFF, 0, 0xFFFE) and not vring_need_event(5, 3, 2)


def _set_avail_event(ram: GuestRam, ring: SplitRing, value: int) -> None:
    """Act as the device: store used.avail_event (the trailer after the used entries)."""
    ram.write(ring.addr.used + 4 + 8 * ring.num, value.to_bytes(2, "little"))


def test_missed_kick_names_a_device_that_stored_avail_event_too_late(ram: GuestRam) -> None:
    ring = SplitRing(ram, 8, event_idx=True)
    ring.add_avail(0)
    assert ring.publish() is True and ring.kicked_upto == 1 and not ring.missed_kick()
    # The device has taken chain 0, but its avail_event = 1 is not yet visible: this publish
    # reads the old 0 and (rightly, for what it sees) does not kick.
    ring.add_avail(1)
    ring.add_avail(2)
    assert ring.publish() is False and not ring.missed_kick()  # a slow device, so far
    _set_avail_event(ram, ring, 1)  # the late store lands: "kick me past 1", already passed
    assert ring.missed_kick()
    _set_avail_event(ram, ring, 3)  # a device that took everything is owed nothing
    assert not ring.missed_kick()
    ring.add_avail(3)
    assert ring.publish() is True and ring.kicked_upto == 4 and not ring.missed_kick()
    # Without EVENT_IDX a stall cannot be told from a hung request.
    plain = SplitRing(ram, 8)
    ram.write(plain.addr.used, VIRTQ_USED_F_NO_NOTIFY.to_bytes(2, "little"))
    plain.add_avail(0)
    assert plain.publish() is False
    ram.write(plain.addr.used, bytes(2))
    assert not plain.missed_kick()


def test_queue_stall_reports_a_lost_kick_apart_from_a_hung_request() -> None:
    with GuestRam() as ram:
        ram.add_region(0, 4 * MIB)
        ring = SplitRing(ram, 8, event_idx=True)
        q = BlkQueue(ram, ring, EventFd(), EventFd(), depth=4, max_data=512)
        q.submit(BlkType.IN, 0, in_len=512)
        assert q.kicks == 1
        q.submit(BlkType.IN, 1, in_len=512)  # avail_event still reads 0: no kick
        assert q.kicks == 1
        with pytest.raises(TimeoutError) as hung:
            q.wait(timeout=0.02)
        assert not isinstance(hung.value, LostKickError)
        _set_avail_event(ram, ring, 1)
        with pytest.raises(LostKickError, match="avail_event 1 asks for a kick"):
            q.wait(timeout=0.02)


def test_missed_kick_window_wraps_the_16_bit_index(ram: GuestRam) -> None:
    ring = SplitRing(ram, 8, event_idx=True)
    ring.avail_idx = 0xFFFE
    _set_avail_event(ram, ring, 0xFFF0)  # stale: behind everything, no kick due
    for head in range(4):
        ring.add_avail(head)
    assert ring.publish() is False and ring.published == 2
    _set_avail_event(ram, ring, 0xFFFF)
    assert ring.missed_kick()
    _set_avail_event(ram, ring, 2)
    assert not ring.missed_kick()


def test_a_device_polling_avail_idx_never_reads_a_transient_zero(ram: GuestRam) -> None:
    """`struct.pack_into` zeroes its target before storing: a device polling avail.idx then
    reads 0, a jump of thousands of chains (qemu-storage-daemon panicked on it, vhostmem
    marked the queue broken). A second process polls the index while this one publishes."""
    ring = SplitRing(ram, 8)
    ring.avail_idx = 1
    word = (ring.addr.avail + 2) // 2
    results_r, results_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "device": its own CPU, reading the shared page as a backend would
        view = memoryview(ram.regions[0].mm).cast("H")
        zeros = reads = 0
        deadline = time.monotonic() + POLL_SECONDS
        while time.monotonic() < deadline:
            for _ in range(1000):
                zeros += view[word] == 0
            reads += 1000
        os.write(results_w, f"{reads} {zeros}".encode())
        os._exit(0)
    os.close(results_w)
    publishes = 0
    deadline = time.monotonic() + POLL_SECONDS
    while time.monotonic() < deadline:
        for _ in range(1000):
            if ring.next_avail == 0xFFFF:
                ring.avail_idx = 1  # never store the legitimate 0 of a wrap
            ring.add_avail(0)
            ring.publish()
        publishes += 1000
    os.waitpid(pid, 0)
    reads, zeros = map(int, os.read(results_r, 64).split())
    os.close(results_r)
    assert publishes > 10_000 and reads > 10_000
    assert zeros == 0


def test_pop_used_wraps_the_16_bit_index(ram: GuestRam) -> None:
    ring = SplitRing(ram, 4)
    ring.last_used = 0xFFFF
    ram.write(ring.addr.used + 2, (0xFFFF).to_bytes(2, "little"))
    _device_complete(ram, ring, 2, 1)
    assert ring.used_idx == 0 and ring.pop_used() == [(2, 1)] and ring.last_used == 0


def test_eventfd_wait_signal_drain() -> None:
    fd = EventFd()
    try:
        assert fd.wait(0.01) is False
        fd.signal()
        fd.signal()
        assert fd.drain() == 2 and fd.drain() == 0
        fd.signal()
        assert fd.wait(1.0) is True
    finally:
        fd.close()


def test_layouts_cut_bytes_into_descriptors() -> None:
    w = VIRTQ_DESC_F_WRITE
    assert chain_pieces(STANDARD, 0, 16, 0, 16, 512, 528) == [(0, 16, 0), (16, 512, w),
                                                               (528, 1, w)]
    assert chain_pieces(MERGED, 0, 16, 0, 16, 512, 528) == [(0, 16, 0), (16, 513, w)]
    assert chain_pieces(MERGED, 0, 16, 512, 528, 0, 528) == [(0, 528, 0), (528, 1, w)]
    split = chain_pieces(Layout(header_chunks=2, data_chunks=3), 0, 16, 0, 16, 10, 26)
    assert split == [(0, 8, 0), (8, 8, 0), (16, 4, w), (20, 3, w), (23, 3, w), (26, 1, w)]
    assert chain_pieces(Layout(single=True), 0, 16, 0, 16, 4, 20) == [(0, 21, w)]
    with pytest.raises(LayoutError, match="merge_status"):
        chain_pieces(MERGED, 0, 16, 0, 16, 512, 999)
