"""Dirty logging for live migration (VHOST_F_LOG_ALL, LOG_SHMFD, VHOST_VRING_F_LOG), against
every peer. The fake guest hands the backend a log the way QEMU does (a sealed memfd sized for
guest RAM), switches LOG_ALL on and off, and checks the log against what it gave the device:

- must be marked: the data buffers of reads, every status byte, the GET_ID buffer, the used
  entries of the completions and used idx;
- may be marked: every device-writable buffer (whole) and the whole used ring.

A backend may mark more than it wrote (conservative), never less, and never a page it could
not have written (a write's data buffer, a descriptor table, a page nobody gave it).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

import pytest

from protocol import ProtocolFeature, VirtioFeature
from tests.conformance.profiles import initial, profile
from vhostmem.frontend.blk import BLK_ID_BYTES, BlkStatus, BlkType
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.dirty import (
    LOG_PAGE_SHIFT,
    log_pages,
    log_size_for,
    pages_of,
    used_ring_pages,
    used_write_pages,
)
from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.queue import BlkQueue
from vhostmem.frontend.ring import RING_HEADER, USED_ENTRY

pytestmark = pytest.mark.qsd

MIB = 1 << 20
DEPTH = 8  # request slots per queue: one batch below, all in flight at once
# (sector, bytes) read per batch: inside one page, a whole page, a page and a bit (status on
# the next page), two pages, sixteen pages.
READS = [(0, 512), (8, 4096), (24, 4608), (40, 8192), (64, 65536)]
QUEUE_STRIDE = 4096  # sectors between the areas two queues read
WRITE_SECTOR = 30000  # writes land far from every read
WRITE_BYTES = 8192


def _guest_ram(kind: str) -> GuestRam:
    """`one-region`: 64 MiB at guest address 0 (QEMU's plain layout). `two-regions`: the rings
    in a small region at 1 MiB, the request buffers in one at 4 GiB, both with made-up
    userspace addresses and nonzero mmap offsets, so a backend marking host addresses or
    region offsets instead of guest-physical addresses fails."""
    ram = GuestRam()
    if kind == "one-region":
        ram.add_region(0, 64 * MIB)
    else:
        ram.add_region(MIB, 64 << 10, userspace_addr=0x7770_0000_0000, mmap_offset=8192)
        ram.add_region(4 << 30, 16 * MIB, userspace_addr=0x7780_0000_0000, mmap_offset=4096)
    return ram


@dataclass
class Pages:
    """What one batch gave the device, as log page numbers."""

    buffers: set[int] = field(default_factory=set)  # must be marked: written buffers
    used: set[int] = field(default_factory=set)  # must be marked: used entries and used idx
    may: set[int] = field(default_factory=set)  # writable buffers and used rings

    @property
    def must(self) -> set[int]:
        return self.buffers | self.used


def _batch(peer, queues: list[BlkQueue]) -> Pages:
    """On every queue: the reads of READS, a GET_ID, a FLUSH and a write, all in flight at once
    (each in its own slot, so their buffers are distinct pages). Checks every answer."""
    out = Pages()
    for qi, q in enumerate(queues):
        first = q.ring.last_used
        base = QUEUE_STRIDE * qi
        reads = [q.prepare(BlkType.IN, base + sector, in_len=n) for sector, n in READS]
        get_id = q.prepare(BlkType.GET_ID, in_len=BLK_ID_BYTES)
        flush = q.prepare(BlkType.FLUSH)
        write = q.prepare(BlkType.OUT, WRITE_SECTOR + 16 * qi, data=os.urandom(WRITE_BYTES))
        q.notify()
        reqs = [*reads, get_id, flush, write]
        for req in reqs:
            q.wait_for(req)
            assert req.status == BlkStatus.OK, req.index
        for req, (sector, n) in zip(reads, READS, strict=True):
            assert q.ram.read(req.in_gpa, n) == initial(peer, base + sector, n)
        assert q.ram.read(get_id.in_gpa, BLK_ID_BYTES).split(b"\0", 1)[0] == \
            profile(peer).serial
        for req in reqs:
            out.may |= set().union(*(pages_of(gpa, n) for gpa, n in req.writable))
            out.buffers |= pages_of(req.status_gpa, 1)
        for req, (_, n) in zip(reads, READS, strict=True):
            out.buffers |= pages_of(req.in_gpa, n)
        out.buffers |= pages_of(get_id.in_gpa, 1)  # a serial may be shorter than the buffer
        out.used |= used_write_pages(q.ring, first, q.ring.last_used)
        out.may |= used_ring_pages(q.ring)
        # The write's data is device-readable only, and no other request's writable buffer
        # shares its pages: a mark there fails `_check`.
        assert not pages_of(write.data_gpa, WRITE_BYTES) & out.may
    return out


def _settle(dev: VhostUserBlk) -> None:
    """One control round trip: the backend has finished what the completions started (both
    peers serve messages and rings on one thread) before the log is read."""
    dev.client.get_features()


def _gpas(pages: set[int]) -> str:
    return ", ".join(f"{p << LOG_PAGE_SHIFT:#x}" for p in sorted(pages)[:12]) + \
        (f" (+{len(pages) - 12} more)" if len(pages) > 12 else "")


def _check(dirty: set[int], expected: Pages, when: str, must: set[int] | None = None) -> None:
    missing = (expected.must if must is None else must) - dirty
    assert not missing, f"{when}: pages written but not marked: {_gpas(missing)}"
    stray = dirty - expected.may
    assert not stray, f"{when}: pages marked that the device could not write: {_gpas(stray)}"


@pytest.mark.parametrize("ram_kind", ["one-region", "two-regions"])
def test_log_all_marks_every_written_page(blk_peer, num_queues: int, ram_kind: str) -> None:
    peer = blk_peer(num_queues=num_queues)
    prof = profile(peer)
    with _guest_ram(ram_kind) as ram, VhostUserBlk.open(peer.socket_path, ram=ram) as dev:
        assert dev.client.has_protocol(ProtocolFeature.LOG_SHMFD)
        assert dev.offer.features >> VirtioFeature.LOG_ALL & 1
        queues = [dev.start_queue(i, depth=DEPTH) for i in range(num_queues)]
        reply = dev.set_log_base()
        assert dev.log is not None
        assert dev.log.size == log_size_for(r.as_tuple()[:2] for r in ram.regions)
        assert reply == (dev.log.size if prof.log_base_reply_is_mmap_size else 0)
        dev.set_logging(True)
        assert dev.logging
        for n in range(2):  # marking goes on after a fetch cleared the log
            expected = _batch(peer, queues)
            _settle(dev)
            _check(dev.fetch_dirty(), expected, f"LOG_ALL on, batch {n}")

        dev.set_logging(False)
        assert not dev.logging
        _batch(peer, queues)
        _settle(dev)
        dirty = dev.fetch_dirty()
        assert not dirty, f"LOG_ALL off, yet marked: {_gpas(dirty)}"

        dev.set_logging(True)  # the same log, on again
        expected = _batch(peer, queues)
        _settle(dev)
        _check(dev.fetch_dirty(), expected, "LOG_ALL on again")


def test_new_log_base_takes_over(blk_peer) -> None:
    """QEMU sends a new log while logging (it resizes the log when memory grows): marks go to
    the new one, none to the old one."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path) as dev:
        queues = [dev.start_queue(0, depth=DEPTH)]
        dev.set_logging(True)  # sends the first log
        expected = _batch(peer, queues)
        _settle(dev)
        _check(dev.fetch_dirty(), expected, "first log")
        assert dev.log is not None
        old = mmap.mmap(dev.log.fd, dev.log.size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            dev.set_log_base()  # closes our handle of the first log; `old` still maps it
            expected = _batch(peer, queues)
            _settle(dev)
            _check(dev.fetch_dirty(), expected, "second log")
            stale = log_pages(bytes(old))
            assert not stale, f"marks went to the replaced log: {_gpas(stale)}"
        finally:
            old.close()


def test_used_ring_without_vring_log_flag(blk_peer) -> None:
    """LOG_ALL on but SET_VRING_ADDR without VHOST_VRING_F_LOG: both peers mark the buffers;
    the used ring is marked by qsd (libvhost-user ignores the flag), not by vhostmem."""
    peer = blk_peer()
    with _guest_ram("two-regions") as ram, VhostUserBlk.open(peer.socket_path, ram=ram) as dev:
        q = dev.start_queue(0, depth=DEPTH)
        dev.set_logging(True)
        ring, host = q.ring, ram.host_address
        dev.client.set_vring_addr(0, host(ring.addr.desc), host(ring.addr.used),
                                  host(ring.addr.avail), flags=0, log=ring.addr.used)
        expected = _batch(peer, [q])
        _settle(dev)
        dirty = dev.fetch_dirty()
        _check(dirty, expected, "no VHOST_VRING_F_LOG", must=expected.buffers)
        ring_pages = used_ring_pages(ring)
        assert not ring_pages & expected.buffers  # the rings live in their own region
        if profile(peer).logs_used_ring_without_log_flag:
            assert expected.used <= dirty
        else:
            assert not dirty & ring_pages, f"used ring marked: {_gpas(dirty & ring_pages)}"


def test_avail_event_write_is_logged(blk_peer) -> None:
    """avail_event (EVENT_IDX) is the used ring's last field, written by the device: on a
    512-entry ring it sits on a page no used entry of the first 382 touches, so its mark shows
    on its own. vhostmem marks it; libvhost-user (qsd) writes it without marking it."""
    peer = blk_peer()
    with VhostUserBlk.open(peer.socket_path, event_idx=True) as dev:
        q = dev.start_queue(0, size=512, depth=DEPTH)
        ring = q.ring
        event_gpa = ring.addr.used + RING_HEADER + USED_ENTRY * ring.num
        (event_page,) = pages_of(event_gpa, 2)
        dev.set_logging(True)
        before = ring.avail_event
        expected = _batch(peer, [q])
        _settle(dev)
        assert ring.avail_event == ring.published != before  # the device wrote it
        assert event_page not in expected.used  # only avail_event is on that page
        dirty = dev.fetch_dirty()
        _check(dirty, expected, "512-entry ring")
        if profile(peer).logs_avail_event:
            assert event_page in dirty, f"avail_event at {event_gpa:#x} written, not marked"
        else:
            assert event_page not in dirty
