"""Hostile packed rings against the served devices: the packed twins of test_rings.py cases.

Every case targets queue 0 (a packed ring) of device A (inline) or T (thread pool) and ends
with the ``packed_guest`` fixture's checks: queue 1 and device B still do real I/O verified
against their images, guard bytes intact, no view outside guest memory, nothing left after
disconnect.
"""

from __future__ import annotations

import pytest

from tests.hostile.conftest import Guest
from tests.hostile.env import QUEUE_SIZE
from tests.hostile.test_rings import (
    TARGET_SECTOR,
    TIMEOUT,
    buf,
    expect_broken,
    queue0_still_serves,
)
from vhostmem.frontend import BlkStatus, BlkType, blk_header
from vhostmem.frontend.packed import PackedRing
from vhostmem.frontend.ring import VIRTQ_DESC_F_INDIRECT as INDIRECT
from vhostmem.frontend.ring import VIRTQ_DESC_F_NEXT as NEXT
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE as WRITE

OUTSIDE = 0x40_0000_0000  # far beyond the guest's regions


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


def test_buffer_outside_guest_memory_fails_the_request(packed_guest: Guest) -> None:
    g = packed_guest
    hdr, _, status = read_request(g)
    q = g.dev.queue(0)
    req = q.prepare_chain([(hdr, 16, 0), (OUTSIDE, 512, WRITE), (status, 1, WRITE)],
                          status_gpa=status)
    q.notify()
    q.wait_for(req, TIMEOUT)
    assert req.status == BlkStatus.IOERR and req.used_len == 1
    queue0_still_serves(g)


def test_buffer_id_out_of_range(packed_guest: Guest, caplog: pytest.LogCaptureFixture) -> None:
    hdr, data, status = read_request(packed_guest)
    raw_packed_submit(packed_guest, [(hdr, 16, QUEUE_SIZE, NEXT),
                                     (data, 512, QUEUE_SIZE, WRITE | NEXT),
                                     (status, 1, QUEUE_SIZE, WRITE)])
    expect_broken(packed_guest, caplog, "buffer id .* >= size")


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


def test_indirect_table_outside_guest_memory(packed_guest: Guest,
                                             caplog: pytest.LogCaptureFixture) -> None:
    raw_packed_submit(packed_guest, [(OUTSIDE, 48, 0, INDIRECT)])
    expect_broken(packed_guest, caplog, "indirect table")


def test_descriptor_of_the_other_wrap_is_not_available(packed_guest: Guest) -> None:
    """A driver flipping its wrap counter out of sequence: the head's AVAIL/USED bits say the
    other lap, so the device takes nothing (no break, nothing written) until the driver writes
    them right."""
    g = packed_guest
    st = g.dev.queues[0]
    ring = st.ring
    assert isinstance(ring, PackedRing)
    hdr, data, status = read_request(g)
    head = ring.next_avail
    wrong = ring.avail_flags(ring.avail_wrap ^ 1)
    ring.write_desc(head, hdr, 16, 0, NEXT | wrong)
    ring.write_desc(head + 1, data, 512, 0, WRITE | NEXT | wrong)
    ring.write_desc(head + 2, status, 1, 0, WRITE | wrong)
    st.kick.signal()
    assert not st.call.wait(0.3)
    assert g.ram.read(status, 1) == b"\xee"
    assert not g.srv.call(lambda: g.endpoint.session.queues[0].broken)
    # The head written again under the right wrap counter: served (by its buffer id 0).
    for k, (addr, n, f) in reversed(list(enumerate(
            [(hdr, 16, NEXT), (data, 512, WRITE | NEXT),
             (status, 1, WRITE)]))):
        ring.write_desc(head + k, addr, n, 0, f | ring.avail_flags())
    ring.next_avail += 3
    st.kick.signal()
    assert st.call.wait(TIMEOUT)
    assert g.ram.read(status, 1) == bytes([BlkStatus.OK])
