"""Hostile rings: a guest that writes malformed descriptors, indexes and ring addresses.

Every case targets queue 0 of device A and ends with the `guest` fixture's checks: queue 1 of A
and device B still do real I/O verified against their images, the images are unchanged outside
the sectors written on purpose, the guard bytes around every guest region are intact, the
bounds-checked guest memory saw no view outside a region, and after disconnect every
registration and mapping is gone.

Outcomes: a malformed *request* fails alone (status IOERR; when a buffer is not guest memory
nothing but that status byte is written, and when the status byte itself is not guest memory
the chain comes back with used length 0); a malformed *chain or ring* breaks
queue 0 only: the err eventfd fires and the reason is logged once.
"""

from __future__ import annotations

import re
import struct
import time
import tracemalloc

import pytest

from tests.hostile.conftest import Guest
from tests.hostile.env import HOLE, QUEUE_SIZE, REGION0, REGION1, SECTOR
from vhostmem.frontend import BlkError, BlkStatus, BlkType, VhostUserError, blk_header
from vhostmem.frontend.blk import STATUS_UNSET
from vhostmem.frontend.ring import VIRTQ_DESC_F_INDIRECT as INDIRECT
from vhostmem.frontend.ring import VIRTQ_DESC_F_NEXT as NEXT
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE as WRITE

DESC = struct.Struct("<QIHH")
U32_MAX = (1 << 32) - 1
ADDR_LIMIT = 1 << 64
TIMEOUT = 5.0
INTERRUPT_DEADLINE = 2.0
SETTLE = 0.05
# Raw cases use the top descriptors, which the BlkQueue of the fixture does not hand out first.
D = QUEUE_SIZE - 8
TARGET_SECTOR = 64  # sector the hostile requests aim at (never really written)
PROBE_BYTES = 1 << 16  # how much of a failed buffer is checked for stray writes
COPY_LIMIT = 8 << 20  # allocations allowed while a hostile segment list is refused


def buf(g: Guest, data: bytes | int) -> int:
    """A guest buffer holding ``data`` (or that many 0xEE bytes)."""
    if isinstance(data, int):
        data = b"\xee" * data
    gpa = g.ram.alloc(max(len(data), 1), 16)
    g.ram.write(gpa, data)
    return gpa


def table(g: Guest, entries: list[tuple[int, int, int, int]]) -> int:
    gpa = g.ram.alloc(DESC.size * len(entries), 16)
    g.ram.write(gpa, b"".join(DESC.pack(*e) for e in entries))
    return gpa


# ------------------------------------------------------------------ failed requests


def run_chain(g: Guest, pieces: list[tuple[int, int, int]], status_gpa: int,
              indirect: bool = False) -> tuple[int, int]:
    """Submit one chain on queue 0 through the BlkQueue; (status byte, used length)."""
    q = g.dev.queue(0)
    g.ram.write(status_gpa, bytes([STATUS_UNSET]))
    req = q.prepare_chain(pieces, indirect=indirect, status_gpa=status_gpa)
    started = time.monotonic()
    q.notify()
    q.wait_for(req, TIMEOUT)
    # wait_for polls the used ring after its wait times out; a prompt answer means the call
    # eventfd was signalled for this completion
    assert time.monotonic() - started < INTERRUPT_DEADLINE, "completed without an interrupt"
    return req.status, req.used_len


def queue0_still_serves(g: Guest) -> None:
    q = g.dev.queue(0)
    assert len(q.read(0, 4096)) == 4096
    assert q.get_id() == b"vhostmem"


def read_chain(g: Guest, data: tuple[int, int, int], header_flags: int = 0,
               rtype: int = BlkType.IN) -> tuple[list[tuple[int, int, int]], int]:
    status = buf(g, 1)
    hdr = buf(g, blk_header(rtype, TARGET_SECTOR))
    return [(hdr, 16, header_flags), data, (status, 1, WRITE)], status


def test_data_not_a_multiple_of_512_is_ioerr(guest: Guest) -> None:
    data = buf(guest, 700)
    pieces, status = read_chain(guest, (data, 700, WRITE))
    assert run_chain(guest, pieces, status) == (BlkStatus.IOERR, 1)
    wr = buf(guest, 700)
    hdr = buf(guest, blk_header(BlkType.OUT, TARGET_SECTOR))
    st = buf(guest, 1)
    assert run_chain(guest, [(hdr, 16, 0), (wr, 700, 0), (st, 1, WRITE)], st)[0] == \
        BlkStatus.IOERR
    queue0_still_serves(guest)


def test_header_in_a_writable_descriptor_is_ioerr(guest: Guest) -> None:
    pieces, status = read_chain(guest, (buf(guest, 512), 512, WRITE), header_flags=WRITE)
    assert run_chain(guest, pieces, status)[0] == BlkStatus.IOERR
    queue0_still_serves(guest)


def test_read_into_a_readable_buffer_is_ioerr(guest: Guest) -> None:
    before = guest.ram.read(data := buf(guest, 512), 512)
    pieces, status = read_chain(guest, (data, 512, 0))
    assert run_chain(guest, pieces, status) == (BlkStatus.IOERR, 1)
    assert guest.ram.read(data, 512) == before, "device wrote into a device-readable buffer"
    queue0_still_serves(guest)


def test_write_from_a_writable_buffer_is_ioerr(guest: Guest) -> None:
    pieces, status = read_chain(guest, (buf(guest, 512), 512, WRITE), rtype=BlkType.OUT)
    assert run_chain(guest, pieces, status) == (BlkStatus.IOERR, 1)
    queue0_still_serves(guest)  # and the fixture checks that the image is unchanged


def test_zero_length_descriptors(guest: Guest) -> None:
    # zero-length data: a valid empty read
    pieces, status = read_chain(guest, (buf(guest, 1), 0, WRITE))
    assert run_chain(guest, pieces, status) == (BlkStatus.OK, 1)
    # zero-length header: no header at all
    hdr, st = buf(guest, blk_header(BlkType.IN)), buf(guest, 1)
    assert run_chain(guest, [(hdr, 0, 0), (buf(guest, 512), 512, WRITE), (st, 1, WRITE)],
                     st)[0] == BlkStatus.IOERR
    # zero-length status: no writable byte anywhere, completed empty and untouched
    hdr, st = buf(guest, blk_header(BlkType.FLUSH)), buf(guest, 1)
    assert run_chain(guest, [(hdr, 16, 0), (st, 0, WRITE)], st) == (STATUS_UNSET, 0)
    queue0_still_serves(guest)


def test_status_byte_in_a_read_only_descriptor(guest: Guest) -> None:
    hdr, st = buf(guest, blk_header(BlkType.FLUSH)), buf(guest, 1)
    assert run_chain(guest, [(hdr, 16, 0), (st, 1, 0)], st) == (STATUS_UNSET, 0)
    queue0_still_serves(guest)


# Buffers (addr, length) that are not wholly guest memory (also used by test_packed_process.py).
OUTSIDE_BUFFERS = [
    pytest.param(HOLE + 0x1000, 512, id="unmapped"),
    pytest.param(REGION0[1] - 256, 512, id="straddles-end-of-region0"),
    pytest.param(REGION1[0] + REGION1[1] - 256, 512, id="straddles-end-of-memory"),
    pytest.param(REGION1[0] - 256, 512, id="straddles-start-of-region1"),
    pytest.param(ADDR_LIMIT - 256, 512, id="wraps-past-2^64"),
    pytest.param(ADDR_LIMIT - 512, 512, id="ends-at-2^64"),
    pytest.param(1 << 48, 512, id="beyond-2^48"),
    pytest.param(0x1000, U32_MAX, id="4GiB-length"),
]
DIRECT_OR_INDIRECT = pytest.mark.parametrize("indirect", [False, True],
                                             ids=["direct", "indirect"])


@pytest.mark.parametrize(("addr", "length"), OUTSIDE_BUFFERS)
@DIRECT_OR_INDIRECT
def test_buffer_outside_guest_memory_fails_the_request(guest: Guest, addr: int, length: int,
                                                       indirect: bool) -> None:
    pieces, status = read_chain(guest, (addr, length, WRITE))
    mapped = mapped_parts(guest, addr, min(length, PROBE_BYTES))
    before = [guest.ram.read(a, n) for a, n in mapped]
    # the request fails with IOERR in its status byte, and that is the one byte written
    assert run_chain(guest, pieces, status, indirect) == (BlkStatus.IOERR, 1)
    assert [guest.ram.read(a, n) for a, n in mapped] == before, "wrote into a failed buffer"
    queue0_still_serves(guest)


def mapped_parts(g: Guest, addr: int, length: int) -> list[tuple[int, int]]:
    """The pieces of [addr, addr + length) that are guest RAM (a straddling buffer's)."""
    parts = []
    for r in g.ram.regions:
        lo, hi = max(addr, r.guest_phys_addr), min(addr + length, r.end)
        if lo < hi:
            parts.append((lo, hi - lo))
    return parts


@DIRECT_OR_INDIRECT
def test_status_outside_guest_memory_completes_empty(guest: Guest, indirect: bool) -> None:
    """Data in memory, status byte in the hole: nothing can be said and nothing is written."""
    data = buf(guest, 512)
    before = guest.ram.read(data, 512)
    hdr = buf(guest, blk_header(BlkType.IN, TARGET_SECTOR))
    q = guest.dev.queue(0)
    req = q.prepare_chain([(hdr, 16, 0), (data, 512, WRITE), (HOLE + 0x1000, 1, WRITE)],
                          indirect=indirect)
    q.notify()
    q.wait_for(req, TIMEOUT)
    assert req.used_len == 0
    assert guest.ram.read(data, 512) == before
    queue0_still_serves(guest)


# ------------------------------------------------------------------ broken queue


def raw_submit(g: Guest, head: int, descs: dict[int, tuple[int, int, int, int]]) -> None:
    """Write descriptors as given, put ``head`` in the next avail slot, publish, kick."""
    st = g.dev.queues[0]
    ring = st.ring
    for i, d in descs.items():
        ring.write_desc(i, *d)
    slot = ring.next_avail
    ring.set_avail_entry(slot, head)
    ring.avail_idx = slot + 1
    st.kick.signal()


def expect_broken(g: Guest, caplog: pytest.LogCaptureFixture, reason: str) -> None:
    st = g.dev.queues[0]
    assert st.err.wait(TIMEOUT), "err eventfd was not signalled"
    session = g.endpoint.session
    got = g.srv.call(lambda: session.queues[0].broken_reason)
    assert re.search(reason, got), got
    used = st.ring.used_idx
    st.kick.signal()  # more kicks: still nothing processed, nothing logged again
    time.sleep(SETTLE)
    assert st.ring.used_idx == used
    logged = [r for r in caplog.records if r.getMessage().startswith("virtqueue 0 broken")]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert re.search(reason, logged[0].getMessage())
    assert not g.srv.call(lambda: session.queues[1].broken)


@pytest.fixture
def hdr_status(guest: Guest) -> tuple[int, int, int]:
    """(header gpa, data gpa, status gpa) of a read request."""
    return buf(guest, blk_header(BlkType.IN, TARGET_SECTOR)), buf(guest, 512), buf(guest, 1)


def test_direct_descriptor_loop(guest: Guest, caplog: pytest.LogCaptureFixture,
                                hdr_status: tuple[int, int, int]) -> None:
    hdr, data, _ = hdr_status
    raw_submit(guest, D, {D: (hdr, 16, NEXT, D + 1), D + 1: (data, 512, NEXT, D)})
    expect_broken(guest, caplog, "chain loops")


def test_chain_longer_than_the_queue(guest: Guest, caplog: pytest.LogCaptureFixture,
                                     hdr_status: tuple[int, int, int]) -> None:
    hdr, data, _ = hdr_status
    descs = {i: (data, 512, NEXT, (i + 1) % QUEUE_SIZE) for i in range(QUEUE_SIZE)}
    descs[0] = (hdr, 16, NEXT, 1)
    raw_submit(guest, 0, descs)
    expect_broken(guest, caplog, f"more than {QUEUE_SIZE} descriptors")


def test_next_out_of_range(guest: Guest, caplog: pytest.LogCaptureFixture,
                           hdr_status: tuple[int, int, int]) -> None:
    hdr, _, _ = hdr_status
    raw_submit(guest, D, {D: (hdr, 16, NEXT, QUEUE_SIZE)})
    expect_broken(guest, caplog, f"next {QUEUE_SIZE} out of range")


def test_loop_through_next_into_an_indirect_table(guest: Guest, caplog: pytest.LogCaptureFixture,
                                                  hdr_status: tuple[int, int, int]) -> None:
    hdr, data, status = hdr_status
    tbl = table(guest, [(data, 512, WRITE | NEXT, 1), (status, 1, WRITE | NEXT, 0)])
    raw_submit(guest, D, {D: (hdr, 16, NEXT, D + 1), D + 1: (tbl, 32, INDIRECT, 0)})
    expect_broken(guest, caplog, "more than 2 descriptors: the chain loops")


def test_next_out_of_range_in_an_indirect_table(guest: Guest,
                                                caplog: pytest.LogCaptureFixture,
                                                hdr_status: tuple[int, int, int]) -> None:
    hdr, data, _ = hdr_status
    tbl = table(guest, [(hdr, 16, NEXT, 1), (data, 512, WRITE | NEXT, 2)])
    raw_submit(guest, D, {D: (tbl, 32, INDIRECT, 0)})
    expect_broken(guest, caplog, r"next 2 out of range \(table of 2\)")


def test_indirect_table_inside_an_indirect_table(guest: Guest,
                                                 caplog: pytest.LogCaptureFixture,
                                                 hdr_status: tuple[int, int, int]) -> None:
    hdr, _, status = hdr_status
    inner = table(guest, [(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
    outer = table(guest, [(inner, 32, INDIRECT, 0)])
    raw_submit(guest, D, {D: (outer, 16, INDIRECT, 0)})
    expect_broken(guest, caplog, "indirect descriptor inside an indirect table")


# Tables are accepted up to max(queue size, seg_max + 2) descriptors: Linux sizes them from
# seg_max (128 for blk) whatever the queue size.
LONGEST_TABLE = max(QUEUE_SIZE, 128)


@pytest.mark.parametrize(
    "length", [24, 0, (LONGEST_TABLE + 1) * 16], ids=["not-multiple-of-16", "zero", "over-queue"]
)
def test_bad_indirect_table_length(guest: Guest, caplog: pytest.LogCaptureFixture,
                                   hdr_status: tuple[int, int, int], length: int) -> None:
    hdr, _, status = hdr_status
    tbl = table(guest, [(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)] * (LONGEST_TABLE + 1))
    raw_submit(guest, D, {D: (tbl, length, INDIRECT, 0)})
    expect_broken(guest, caplog, f"indirect table length {length} is not a multiple")


# Indirect tables of 32 bytes at these addresses are not wholly guest memory.
OUTSIDE_TABLES = pytest.mark.parametrize(
    "addr", [HOLE, REGION0[1] - 16, ADDR_LIMIT - 16], ids=["unmapped", "straddles", "wraps"]
)


@OUTSIDE_TABLES
def test_indirect_table_outside_guest_memory(guest: Guest, caplog: pytest.LogCaptureFixture,
                                             addr: int) -> None:
    raw_submit(guest, D, {D: (addr, 32, INDIRECT, 0)})
    expect_broken(guest, caplog, "indirect table: ")


def test_indirect_descriptor_with_next(guest: Guest, caplog: pytest.LogCaptureFixture,
                                       hdr_status: tuple[int, int, int]) -> None:
    hdr, _, status = hdr_status
    tbl = table(guest, [(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
    raw_submit(guest, D, {D: (tbl, 32, INDIRECT | NEXT, D + 1), D + 1: (status, 1, WRITE, 0)})
    expect_broken(guest, caplog, "indirect descriptor with NEXT set")


def test_status_in_a_read_only_descriptor_after_data(guest: Guest,
                                                     caplog: pytest.LogCaptureFixture,
                                                     hdr_status: tuple[int, int, int]) -> None:
    hdr, data, status = hdr_status
    raw_submit(guest, D, {D: (hdr, 16, NEXT, D + 1), D + 1: (data, 512, WRITE | NEXT, D + 2),
                          D + 2: (status, 1, 0, 0)})
    expect_broken(guest, caplog, "readable descriptor follows a writable one")


def test_avail_index_jumps_past_the_queue_size(guest: Guest,
                                               caplog: pytest.LogCaptureFixture) -> None:
    st = guest.dev.queues[0]
    st.ring.avail_idx = st.ring.next_avail + QUEUE_SIZE + 1
    st.kick.signal()
    expect_broken(guest, caplog, f"more than {QUEUE_SIZE} ahead")


@pytest.mark.parametrize("head", [QUEUE_SIZE, 0xFFFF])
def test_head_index_out_of_range(guest: Guest, caplog: pytest.LogCaptureFixture,
                                 head: int) -> None:
    raw_submit(guest, head, {})
    expect_broken(guest, caplog, f"holds head {head} >= size {QUEUE_SIZE}")


# --------------------------------------------------------------- ring addresses


RING_PARTS = ("desc", "used", "avail")  # SET_VRING_ADDR's three addresses
OUTSIDE_RING = ("unmapped", "straddles-region-end", "wraps")


@pytest.mark.parametrize("where", OUTSIDE_RING)
@pytest.mark.parametrize("part", RING_PARTS)
def test_ring_addresses_outside_guest_memory_are_refused(guest: Guest, where: str,
                                                         part: str) -> None:
    refuse_ring_address(guest, part, outside_ring_address(guest, where))


def outside_ring_address(guest: Guest, where: str) -> int:
    """A host address of guest RAM's neighbourhood, for a ring part, that is not wholly in it."""
    r0, r1 = guest.ram.regions
    return {
        "unmapped": r0.userspace_addr + r0.memory_size + (1 << 30),
        "straddles-region-end": r1.userspace_addr + r1.memory_size - 16,
        "wraps": ADDR_LIMIT - 16,
    }[where]


def refuse_ring_address(guest: Guest, part: str, bad: int) -> None:
    """Stop queue 0, then SET_VRING_ADDR with ``part`` at host address ``bad``: refused."""
    dev = guest.dev
    dev.stop_queue(0)
    addr = dev.queues[0].ring.addr
    parts = {name: dev.ram.host_address(getattr(addr, name)) for name in ("desc", "used", "avail")}
    parts[part] = bad
    dev.client.set_vring_num(0, QUEUE_SIZE)
    with pytest.raises(VhostUserError, match="REPLY_ACK"):
        dev.client.set_vring_addr(0, parts["desc"], parts["used"], parts["avail"])


def test_misaligned_descriptor_table_is_refused(guest: Guest) -> None:
    dev = guest.dev
    dev.stop_queue(0)
    addr = dev.queues[0].ring.addr
    used, avail = dev.ram.host_address(addr.used), dev.ram.host_address(addr.avail)
    with pytest.raises(VhostUserError, match="REPLY_ACK"):
        dev.client.set_vring_addr(0, dev.ram.host_address(addr.desc) + 8, used, avail)


def test_requests_inside_limits_do_not_touch_other_sectors(guest: Guest) -> None:
    """Control case: a legal write at the last sector lands exactly there."""
    q = guest.dev.queue(0)
    last = (4 << 20) // SECTOR - 1
    data = bytes(range(256)) * 2
    q.write(last, data)
    guest.image.record_write(last, data)
    with pytest.raises(BlkError, match="status 0x1"):
        q.write(last, data * 2)  # one sector past the end


SEGMENT_TYPES = pytest.mark.parametrize("rtype", [BlkType.DISCARD, BlkType.WRITE_ZEROES])


@SEGMENT_TYPES
def test_huge_segment_list_fails_without_copying_it(guest: Guest, rtype: int) -> None:
    """DISCARD / WRITE_ZEROES whose "segment list" is every byte of guest RAM, many times over
    (all inside memory): IOERR from the length alone, nothing copied out of guest memory."""
    n = QUEUE_SIZE - 2
    hdr, st = buf(guest, blk_header(rtype, TARGET_SECTOR)), buf(guest, 1)
    pieces = [(hdr, 16, 0), *[(REGION0[0], REGION0[1], 0)] * n, (st, 1, WRITE)]
    tracemalloc.start()
    try:
        assert run_chain(guest, pieces, st, indirect=True) == (BlkStatus.IOERR, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < COPY_LIMIT, f"{peak} bytes allocated for a {n * REGION0[1]}-byte segment list"
    queue0_still_serves(guest)


def test_an_indirect_table_of_seg_max_plus_two_on_a_smaller_ring(guest: Guest) -> None:
    """A Linux guest on a ring smaller than 128 (QEMU queue-size=64 here) still builds
    indirect tables of seg_max + 2 = 128 descriptors: served, not a broken queue."""
    assert QUEUE_SIZE < 128
    guest.dev.queue(0).max_table = 128  # the driver sizes its tables like Linux does
    segs = 126
    data = buf(guest, 512 * segs)
    status = buf(guest, 1)
    hdr = buf(guest, blk_header(BlkType.IN, TARGET_SECTOR))
    pieces = [(hdr, 16, 0)] + [(data + 512 * k, 512, WRITE) for k in range(segs)]
    pieces.append((status, 1, WRITE))
    assert run_chain(guest, pieces, status, indirect=True) == (BlkStatus.OK, 512 * segs + 1)
    queue0_still_serves(guest)
