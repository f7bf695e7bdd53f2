"""Hostile packed rings against the served devices: the packed twins of test_rings.py cases.

Every case targets queue 0 (a packed ring) of device A (inline) or T (thread pool) and ends
with the ``packed_guest`` fixture's checks: queue 1 and device B still do real I/O verified
against their images, guard bytes intact, no view outside guest memory, nothing left after
disconnect.

test_rings.py cases that go through the BlkQueue (malformed requests) run unchanged here, where
the queue is a PackedBlkQueue (``test_request_case`` and the parametrized wrappers); the ring
cases are written again with packed descriptors. Split cases without a packed meaning are
listed in docs/packed.md ("Hostile drivers").
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.hostile import test_rings as split
from tests.hostile.conftest import Guest
from tests.hostile.env import QUEUE_SIZE
from tests.hostile.test_rings import (
    DIRECT_OR_INDIRECT,
    OUTSIDE_BUFFERS,
    OUTSIDE_RING,
    OUTSIDE_TABLES,
    RING_PARTS,
    SEGMENT_TYPES,
    TARGET_SECTOR,
    TIMEOUT,
    buf,
    expect_broken,
    outside_ring_address,
    refuse_ring_address,
    table,
)
from vhostmem.frontend import BlkStatus, BlkType, blk_header
from vhostmem.frontend.packed import PackedRing
from vhostmem.frontend.ring import VIRTQ_DESC_F_INDIRECT as INDIRECT
from vhostmem.frontend.ring import VIRTQ_DESC_F_NEXT as NEXT
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE as WRITE

OUTSIDE = 0x40_0000_0000  # far beyond the guest's regions

# test_rings.py cases whose requests go through the BlkQueue: the same on packed rings.
REQUEST_CASES: list[Callable[[Guest], None]] = [
    split.test_data_not_a_multiple_of_512_is_ioerr,
    split.test_header_in_a_writable_descriptor_is_ioerr,
    split.test_read_into_a_readable_buffer_is_ioerr,
    split.test_write_from_a_writable_buffer_is_ioerr,
    split.test_zero_length_descriptors,
    split.test_status_byte_in_a_read_only_descriptor,
    split.test_requests_inside_limits_do_not_touch_other_sectors,
    split.test_an_indirect_table_of_seg_max_plus_two_on_a_smaller_ring,
    split.test_misaligned_descriptor_table_is_refused,  # the ring: 16-byte aligned (2.8.10.1)
]


@pytest.mark.parametrize("case", REQUEST_CASES, ids=lambda f: f.__name__.removeprefix("test_"))
def test_request_case(packed_guest: Guest, case: Callable[[Guest], None]) -> None:
    case(packed_guest)


@pytest.mark.parametrize(("addr", "length"), OUTSIDE_BUFFERS)
@DIRECT_OR_INDIRECT
def test_buffer_outside_guest_memory_fails_the_request(packed_guest: Guest, addr: int,
                                                       length: int, indirect: bool) -> None:
    split.test_buffer_outside_guest_memory_fails_the_request(packed_guest, addr, length,
                                                             indirect)


@DIRECT_OR_INDIRECT
def test_status_outside_guest_memory_completes_empty(packed_guest: Guest,
                                                     indirect: bool) -> None:
    split.test_status_outside_guest_memory_completes_empty(packed_guest, indirect)


@SEGMENT_TYPES
def test_huge_segment_list_fails_without_copying_it(packed_guest: Guest, rtype: int) -> None:
    split.test_huge_segment_list_fails_without_copying_it(packed_guest, rtype)


def raw_packed_submit(g: Guest, descs: list[tuple[int, int, int, int]]) -> None:
    """Write (addr, len, id, flags) descriptors at the avail position as the driver does (the
    head's flags last, AVAIL/USED of the driver's wrap counter added), then kick."""
    st = g.dev.queues[0]
    ring = st.ring
    assert isinstance(ring, PackedRing)
    head = ring.next_avail
    for k, (addr, length, buffer_id, flags) in reversed(list(enumerate(descs))):
        ring.write_desc((head + k) % ring.num, addr, length, buffer_id,
                        flags | ring.avail_flags(ring.avail_wrap ^ ((head + k) >= ring.num)))
    ring.next_avail = (head + len(descs)) % ring.num
    if head + len(descs) >= ring.num:
        ring.avail_wrap ^= 1
    st.kick.signal()


def read_request(g: Guest) -> tuple[int, int, int]:
    return buf(g, blk_header(BlkType.IN, TARGET_SECTOR)), buf(g, 512), buf(g, 1)


@pytest.mark.parametrize("buffer_id", [QUEUE_SIZE, 0xFFFF])  # twin of a head out of range
def test_buffer_id_out_of_range(packed_guest: Guest, caplog: pytest.LogCaptureFixture,
                                buffer_id: int) -> None:
    hdr, data, status = read_request(packed_guest)
    raw_packed_submit(packed_guest, [(hdr, 16, buffer_id, NEXT),
                                     (data, 512, buffer_id, WRITE | NEXT),
                                     (status, 1, buffer_id, WRITE)])
    expect_broken(packed_guest, caplog, f"buffer id {buffer_id} >= size {QUEUE_SIZE}")


def test_chain_without_end_within_the_ring(packed_guest: Guest,
                                           caplog: pytest.LogCaptureFixture) -> None:
    hdr, _, _ = read_request(packed_guest)
    raw_packed_submit(packed_guest, [(hdr, 16, 0, NEXT)] * QUEUE_SIZE)
    expect_broken(packed_guest, caplog, "no descriptor without NEXT")


@pytest.mark.parametrize("length", [0, 24, 16 * 4096], ids=["zero", "not-16", "too-long"])
def test_bad_indirect_table_length(packed_guest: Guest, caplog: pytest.LogCaptureFixture,
                                   length: int) -> None:
    table = buf(packed_guest, 16 * 4096)
    raw_packed_submit(packed_guest, [(table, length, 0, INDIRECT)])
    expect_broken(packed_guest, caplog, "indirect table length")


@OUTSIDE_TABLES
def test_indirect_table_outside_guest_memory(packed_guest: Guest,
                                             caplog: pytest.LogCaptureFixture,
                                             addr: int) -> None:
    raw_packed_submit(packed_guest, [(addr, 32, 0, INDIRECT)])
    expect_broken(packed_guest, caplog, "indirect table: ")


def test_indirect_descriptor_with_next(packed_guest: Guest,
                                       caplog: pytest.LogCaptureFixture) -> None:
    hdr, _, status = read_request(packed_guest)
    tbl = table(packed_guest, [(hdr, 16, 0, 0), (status, 1, 0, WRITE)])
    raw_packed_submit(packed_guest, [(tbl, 32, 0, INDIRECT | NEXT), (status, 1, 0, WRITE)])
    expect_broken(packed_guest, caplog, "indirect descriptor with NEXT set")


def test_status_in_a_read_only_descriptor_after_data(packed_guest: Guest,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    hdr, data, status = read_request(packed_guest)
    raw_packed_submit(packed_guest, [(hdr, 16, 0, NEXT), (data, 512, 0, WRITE | NEXT),
                                     (status, 1, 0, 0)])
    expect_broken(packed_guest, caplog, "readable descriptor follows a writable one")


def test_reserved_flags_in_an_indirect_table_are_ignored(packed_guest: Guest) -> None:
    """Twin of the split cases of NEXT inside a table (a loop, out of range) and of a table in
    a table: a packed table's entries follow each other and WRITE is their only flag; NEXT
    and INDIRECT are reserved and ignored by the device (2.8.8). Served as a plain read."""
    g = packed_guest
    hdr, data, status = read_request(g)
    tbl = table(g, [(hdr, 16, 0, NEXT | INDIRECT), (data, 512, 7, WRITE | NEXT),
                    (status, 1, 0xFFFF, WRITE | INDIRECT)])
    raw_packed_submit(g, [(tbl, 48, 0, INDIRECT)])
    assert g.dev.queues[0].call.wait(TIMEOUT)
    assert g.ram.read(status, 1) == bytes([BlkStatus.OK])
    assert not g.srv.call(lambda: g.endpoint.session.queues[0].broken)


# An aligned 4-byte event area (avail / used here) never straddles a region's end, which is
# page aligned: that case exists for the descriptor ring only.
PACKED_OUTSIDE_RING = [(part, where) for part in RING_PARTS for where in OUTSIDE_RING
                       if part == "desc" or where != "straddles-region-end"]


@pytest.mark.parametrize(("part", "where"), PACKED_OUTSIDE_RING)
def test_ring_addresses_outside_guest_memory_are_refused(packed_guest: Guest, part: str,
                                                         where: str) -> None:
    """desc = the descriptor ring, avail / used = the driver / device event areas."""
    refuse_ring_address(packed_guest, part, outside_ring_address(packed_guest, where))
