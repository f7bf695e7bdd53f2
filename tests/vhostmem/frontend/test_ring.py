"""Driver-side split ring, eventfds and descriptor layouts, on real memfd guest RAM."""

import pytest

from vhostmem.frontend.blk import MERGED, STANDARD, Layout, LayoutError, chain_pieces
from vhostmem.frontend.memory import GuestRam
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
