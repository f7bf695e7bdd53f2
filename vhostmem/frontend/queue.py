"""A virtio-blk request queue on top of a `SplitRing`: reusable request slots, batching, reaping.

Built to double as a load generator: every slot owns its header/data/status buffer (and indirect
table) for its whole life, keeps its descriptor chain between requests and only rewrites it when
the shape changes; `prepare` many, `notify` once (one avail.idx store, at most one kick).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from vhostmem.frontend.blk import (
    BLK_ID_BYTES,
    HEADER,
    HEADER_SIZE,
    SECTOR_SIZE,
    STANDARD,
    STATUS_SIZE,
    STATUS_UNSET,
    BlkStatus,
    BlkType,
    Layout,
    chain_pieces,
    discard_segment,
)
from vhostmem.frontend.memory import PAGE_SIZE, GuestRam, GuestRegion
from vhostmem.frontend.ring import (
    _DESC,
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    EventFd,
    RingError,
    SplitRing,
)

DEFAULT_MAX_DATA = 64 * 1024
DEFAULT_MAX_TABLE = 64  # indirect-table entries per slot
DEFAULT_TIMEOUT = 5.0


class BlkError(Exception):
    """A request completed with a status other than OK (or none at all)."""

    def __init__(self, request: str, status: int) -> None:
        super().__init__(f"{request}: device returned status {status:#x}")
        self.status = status


class QueueFullError(RingError):
    """Every request slot is in flight."""


class LostKickError(TimeoutError):
    """No completion in time, and the device is waiting for a kick it was owed: its
    avail_event asks for one at an index this driver published, without a kick, because the
    value it read then was older (see `SplitRing.missed_kick`). The device's bug, not a hang."""


class Request:
    """A reusable request slot: its buffers, its descriptors, and the last completion."""

    __slots__ = ("_hdr_mm", "_hdr_off", "_mm", "_status_off", "capacity", "data_gpa", "descs",
                 "done", "head", "header_gpa", "in_gpa", "in_len", "index", "key", "out_len",
                 "status_gpa", "table_gpa", "used_len", "writable")

    def __init__(self, ram: GuestRam, index: int, capacity: int) -> None:
        # Header ends where the page-aligned data begins so header+data can share a descriptor.
        base = ram.alloc(PAGE_SIZE + capacity + STATUS_SIZE, PAGE_SIZE)
        self.index, self.capacity = index, capacity
        self.header_gpa, self.data_gpa = base + PAGE_SIZE - HEADER_SIZE, base + PAGE_SIZE
        self.table_gpa = 0
        self.descs: list[int] = []
        # (gpa, len) of every device-writable piece of the current chain: what a device may
        # write, so what a dirty log may mark for this request.
        self.writable: list[tuple[int, int]] = []
        self.key: tuple[object, ...] | None = None
        self.head = -1
        self.in_gpa, self.in_len, self.out_len = self.data_gpa, 0, 0
        self.status_gpa = self.data_gpa
        self.done, self.used_len = False, 0
        region, self._status_off = ram.locate(self.data_gpa)
        self._mm = self._hdr_mm = region.mm
        self._hdr_off = self._status_off - HEADER_SIZE

    def set_status_gpa(self, ram: GuestRam, gpa: int) -> None:
        self.status_gpa = gpa
        region, self._status_off = ram.locate(gpa)
        self._mm = region.mm

    @property
    def status(self) -> int:
        """The status byte the device wrote (STATUS_UNSET if it wrote none)."""
        return self._mm[self._status_off]


class BlkQueue:
    """One virtio-blk virtqueue, driver side."""

    def __init__(self, ram: GuestRam, ring: SplitRing, kick: EventFd, call: EventFd, *,
                 depth: int | None = None, max_data: int = DEFAULT_MAX_DATA,
                 max_table: int = DEFAULT_MAX_TABLE) -> None:
        self.ram, self.ring, self.kick_fd, self.call_fd = ram, ring, kick, call
        self.max_table = max_table
        self.slots = [Request(ram, i, max_data) for i in range(depth or ring.num)]
        self._idle = list(reversed(self.slots))
        self._free_descs = list(range(ring.num - 1, -1, -1))
        self._by_head: list[Request | None] = [None] * ring.num
        self.kicks = 0

    # -- submission ------------------------------------------------------------------------
    def prepare(self, type_: int, sector: int = 0, *, data: bytes | None = None,
                in_len: int = 0, layout: Layout = STANDARD) -> Request:
        """Build a request in a free slot and queue it on the avail ring (not yet published)."""
        req = self._take_slot()
        out_len = 0 if data is None else len(data)
        if out_len + in_len > req.capacity:
            self._idle.append(req)
            raise ValueError(f"request payload {out_len + in_len} exceeds slot capacity "
                             f"{req.capacity}")
        HEADER.pack_into(req._hdr_mm, req._hdr_off, type_, 0, sector)
        if data is not None:
            self.ram.write(req.data_gpa, data)
        key = (out_len, in_len, layout)
        if req.key != key:
            req.in_gpa, req.in_len, req.out_len = req.data_gpa + out_len, in_len, out_len
            req.set_status_gpa(self.ram, req.in_gpa + in_len)
            pieces = chain_pieces(layout, req.header_gpa, req.data_gpa, out_len, req.in_gpa,
                                  in_len, req.status_gpa)
            self._write_chain(req, pieces, layout.indirect)
            req.key = key
        req._mm[req._status_off] = STATUS_UNSET
        return self._queue(req)

    def prepare_chain(self, pieces: Sequence[tuple[int, int, int]], *, indirect: bool = False,
                      status_gpa: int | None = None) -> Request:
        """Queue an arbitrary chain of (addr, len, flags) pieces; the caller owns the bytes.
        `status_gpa` names the byte `Request.status` reads (default: the slot's own)."""
        req = self._take_slot()
        self._write_chain(req, list(pieces), indirect)
        req.key = None
        if status_gpa is not None:
            req.set_status_gpa(self.ram, status_gpa)
        return self._queue(req)

    def notify(self) -> bool:
        """Publish everything prepared with one avail.idx store; kick if the device wants it."""
        if self.ring.publish():
            self.kick_fd.signal()
            self.kicks += 1
            return True
        return False

    def submit(self, type_: int, sector: int = 0, *, data: bytes | None = None,
               in_len: int = 0, layout: Layout = STANDARD) -> Request:
        req = self.prepare(type_, sector, data=data, in_len=in_len, layout=layout)
        self.notify()
        return req

    def _take_slot(self) -> Request:
        if not self._idle:
            raise QueueFullError(f"all {len(self.slots)} request slots are in flight")
        req = self._idle.pop()
        req.done = False
        return req

    def _queue(self, req: Request) -> Request:
        self._by_head[req.head] = req
        self.ring.add_avail(req.head)
        return req

    def _write_chain(self, req: Request, pieces: list[tuple[int, int, int]],
                     indirect: bool) -> None:
        req.writable = [(gpa, n) for gpa, n, flags in pieces if flags & VIRTQ_DESC_F_WRITE]
        if indirect:
            self._grab_descs(req, 1)
            req.head = req.descs[0]
            self._write_table(req, pieces)
            self.ring.write_desc(req.head, req.table_gpa, DESC_SIZE * len(pieces),
                                 VIRTQ_DESC_F_INDIRECT, 0)
        else:
            self._grab_descs(req, len(pieces))
            req.head = self.ring.write_chain(req.descs, pieces)

    def _table_space(self, req: Request, n: int) -> tuple[GuestRegion, int]:
        """Where ``req``'s indirect table of ``n`` descriptors goes: (its region, offset);
        the table is allocated on first use, ``max_table`` entries."""
        if n > self.max_table:
            raise ValueError(f"{n} pieces exceed the indirect table of {self.max_table}")
        if not req.table_gpa:
            req.table_gpa = self.ram.alloc(DESC_SIZE * self.max_table, DESC_SIZE)
        return self.ram.locate(req.table_gpa, DESC_SIZE * n)

    def _write_table(self, req: Request, pieces: list[tuple[int, int, int]]) -> None:
        region, off = self._table_space(req, len(pieces))
        last = len(pieces) - 1
        for k, (addr, length, flags) in enumerate(pieces):
            nxt_flag = 1 if k < last else 0  # VIRTQ_DESC_F_NEXT; table entries link by index
            _DESC.pack_into(region.mm, off + DESC_SIZE * k, addr, length, flags | nxt_flag,
                            k + 1 if k < last else 0)

    def _grab_descs(self, req: Request, n: int) -> None:
        """Make `req` own at least `n` descriptors, reclaiming idle slots' ones if needed."""
        while len(req.descs) < n:
            if not self._free_descs:
                self._reclaim(req)
                if not self._free_descs:
                    raise RingError(f"chain of {n} descriptors does not fit: queue of "
                                    f"{self.ring.num} is full")
            req.descs.append(self._free_descs.pop())

    def _reclaim(self, keep: Request) -> None:
        for other in self._idle:
            if other is not keep and other.descs:
                self._free_descs.extend(other.descs)
                other.descs, other.key = [], None

    # -- completion ------------------------------------------------------------------------
    def poll(self) -> list[Request]:
        """Reap completions without blocking."""
        done = []
        for head, length in self.ring.pop_used():
            req = self._by_head[head] if 0 <= head < self.ring.num else None
            if req is None:
                raise RingError(f"device completed descriptor {head}, which is not in flight")
            self._by_head[head] = None
            req.done, req.used_len = True, length
            self._idle.append(req)
            done.append(req)
        return done

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> list[Request]:
        """Block until at least one completion (via the call eventfd); TimeoutError after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.poll()
            if done:
                return done
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._stalled(timeout)
            self.call_fd.wait(remaining)

    def _stalled(self, timeout: float) -> TimeoutError:
        ring = self.ring
        state = f"avail {ring.published}, used {ring.used_idx}"
        if ring.missed_kick():
            return LostKickError(
                f"no completion within {timeout}s ({state}): the device's avail_event "
                f"{ring.avail_event} asks for a kick at an index published after the last "
                f"kick (at {ring.kicked_upto}), when it still read as older; the device "
                "stored avail_event without reading avail.idx again after a full fence")
        return TimeoutError(f"no completion within {timeout}s ({state})")

    def wait_for(self, req: Request, timeout: float = DEFAULT_TIMEOUT) -> Request:
        deadline = time.monotonic() + timeout
        while not req.done:
            self.wait(max(0.0, deadline - time.monotonic()))
        return req

    async def wait_async(self, timeout: float = DEFAULT_TIMEOUT) -> list[Request]:
        """asyncio variant of `wait`: sleeps on the call eventfd through the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            done = self.poll()
            if done:
                return done
            ready = loop.create_future()
            loop.add_reader(self.call_fd.fd, _wake, ready)
            try:
                await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
            except TimeoutError:
                if not self.poll_pending():
                    raise self._stalled(timeout) from None
            finally:
                loop.remove_reader(self.call_fd.fd)
            self.call_fd.drain()

    def poll_pending(self) -> bool:
        return self.ring.pending_used() > 0

    def close(self) -> None:
        """Give every slot's buffers back to the guest-RAM allocator."""
        for req in self.slots:
            self.ram.free(req.header_gpa + HEADER_SIZE - PAGE_SIZE)
            if req.table_gpa:
                self.ram.free(req.table_gpa)
        self.slots, self._idle = [], []

    @property
    def in_flight(self) -> int:
        return len(self.slots) - len(self._idle)

    # -- one-shot helpers ------------------------------------------------------------------
    def run(self, type_: int, sector: int = 0, *, data: bytes | None = None, in_len: int = 0,
            layout: Layout = STANDARD, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, bytes]:
        """Submit one request, wait for it, return (status, in payload)."""
        req = self.wait_for(self.submit(type_, sector, data=data, in_len=in_len,
                                        layout=layout), timeout)
        return req.status, self.ram.read(req.in_gpa, req.in_len)

    def _checked(self, name: str, type_: int, sector: int = 0, **kw: object) -> bytes:
        status, payload = self.run(type_, sector, **kw)  # type: ignore[arg-type]
        if status != BlkStatus.OK:
            raise BlkError(name, status)
        return payload

    def read(self, sector: int, length: int, layout: Layout = STANDARD) -> bytes:
        return self._checked("read", BlkType.IN, sector, in_len=length, layout=layout)

    def write(self, sector: int, data: bytes, layout: Layout = STANDARD) -> None:
        self._checked("write", BlkType.OUT, sector, data=data, layout=layout)

    def flush(self, layout: Layout = STANDARD) -> None:
        self._checked("flush", BlkType.FLUSH, layout=layout)

    def get_id(self, layout: Layout = STANDARD) -> bytes:
        """The device's serial: up to 20 bytes, cut at the first NUL (the device writes only the
        string and its terminator, so later bytes are stale buffer contents)."""
        raw = self._checked("get-id", BlkType.GET_ID, in_len=BLK_ID_BYTES, layout=layout)
        return raw.split(b"\0", 1)[0]

    def discard(self, sector: int, num_sectors: int, layout: Layout = STANDARD) -> None:
        self._checked("discard", BlkType.DISCARD, data=discard_segment(sector, num_sectors),
                      layout=layout)

    def write_zeroes(self, sector: int, num_sectors: int, *, unmap: bool = False,
                     layout: Layout = STANDARD) -> None:
        self._checked("write-zeroes", BlkType.WRITE_ZEROES,
                      data=discard_segment(sector, num_sectors, int(unmap)), layout=layout)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def sectors(nbytes: int) -> int:
    return nbytes // SECTOR_SIZE
