"""Descriptor chains of a split virtqueue (virtio 1.2 section 2.7.5): walking them into views.

:class:`ChainWalker` is the part of :class:`~vhostmem.virtqueue.Virtqueue` that turns a head
index into a :class:`DescChain` of zero-copy views of guest memory, following ``next`` links and
indirect tables, and that writes a device's failure status into a chain whose buffers could not
be translated. It raises :class:`ChainError` for a malformed chain (the queue breaks) and
:class:`OutsideMemoryError` for a buffer outside guest memory (only that request fails); the
queue decides what follows.

The walk is the hot path: one ``struct`` unpack per descriptor, and buffers that fall in the
region of the previous one are sliced straight from that region's view instead of going through
:meth:`GuestMemory.translate` (the cache is dropped whenever the memory table changes).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vhostmem.guest_memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from vhostmem.dirty_log import DirtyLog

# Descriptor flags (virtio 1.2 2.7.5).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
# Empty region cache of ChainWalker._walk: (gpa, gpa_end, view, view_gpa) that matches nothing.
NO_REGION: tuple[int, int, memoryview | None, int] = (0, 0, None, 0)


class DescChain:
    """One available descriptor chain, with its buffers already translated to views.

    ``readable`` are the device-readable buffers (the driver wrote them), ``writable`` the
    device-writable ones, in chain order; ``*_len`` are their total byte counts.
    """

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        readable_len: int,
        writable: list[memoryview],
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.readable_len = readable_len
        self.writable = writable
        self.writable_len = writable_len


class ChainError(Exception):
    """The chain is malformed (a loop, an index out of range, a bad indirect table)."""


class OutsideMemoryError(Exception):
    """A buffer of an otherwise well-formed chain is not guest memory.

    ``last`` is the chain's last descriptor (addr, len, flags) as the walk read it: the failure
    status goes there, decided from this private copy. Walking the shared table a second time
    would let a guest that rewrites it meanwhile (a loop, ``next`` out of range) hang or crash
    the device (docs/hostile.md, "read once").
    """

    def __init__(self, reason: str, last: tuple[int, int, int]) -> None:
        super().__init__(reason)
        self.last = last


class ChainWalker:
    """Chain walking over a descriptor table; mixed into Virtqueue, which owns the state."""

    mem: GuestMemory
    num: int
    indirect: bool
    indirect_floor: int
    failure_status: bytes
    dirty: DirtyLog | None
    _written: dict[int, list[tuple[int, int]]]
    _desc: memoryview | None
    _region_cache: tuple[int, int, memoryview | None, int]

    def _walk(self, head: int) -> DescChain:
        table = self._desc
        limit = self.num
        in_indirect = False
        # The last region a buffer was found in: most buffers hit it, and slicing its view here
        # saves a call into GuestMemory per descriptor.
        lo, hi, rview, rbase = self._region_cache
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        bad: str | None = None
        # While migrating, the guest ranges of device-writable buffers, to mark them dirty
        # when the chain completes (taken from this walk's copy of each descriptor).
        gpas: list[tuple[int, int]] | None = None if self.dirty is None else []
        i = head
        seen = 0
        while True:
            seen += 1
            if seen > limit:
                raise ChainError(f"more than {limit} descriptors: the chain loops")
            addr, length, flags, nxt = _DESC.unpack_from(table, i * DESC_SIZE)  # type: ignore[arg-type]
            if flags & VRING_DESC_F_INDIRECT:
                table = self._indirect_table(addr, length, flags, in_indirect)
                limit = length // DESC_SIZE
                in_indirect = True
                i = seen = 0
                continue
            if flags & VRING_DESC_F_WRITE:
                wlen += length
                target = writable
                if gpas is not None:
                    gpas.append((addr, length))
            else:
                if wlen:
                    raise ChainError("a device-readable descriptor follows a writable one")
                rlen += length
                target = readable
            if length and bad is None:
                if lo <= addr and addr + length <= hi:
                    off = addr - rbase
                    target.append(rview[off : off + length])  # type: ignore[index]
                else:
                    try:
                        target += self.mem.translate(addr, length)
                    except GuestMemoryError as exc:
                        bad = str(exc)  # keep walking: a loop must still break the queue
                    else:
                        lo, hi, rview, rbase = self._cache_region(addr)
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
            if i >= limit:
                raise ChainError(f"next {i} out of range (table of {limit})")
        if bad is not None:
            raise OutsideMemoryError(bad, (addr, length, flags))
        if gpas is not None:
            self._written[head] = gpas
        return DescChain(head, readable, rlen, writable, wlen)

    def _cache_region(self, gpa: int) -> tuple[int, int, memoryview | None, int]:
        """Remember the region holding ``gpa`` for :meth:`_walk`."""
        cache = NO_REGION
        for r in self.mem.regions:
            if r.view is not None and r.guest_phys_addr <= gpa < r.gpa_end:
                cache = (r.guest_phys_addr, r.gpa_end, r.view, r.view_gpa)
                break
        self._region_cache = cache
        return cache

    def _indirect_table(self, addr: int, length: int, flags: int, nested: bool) -> memoryview:
        if not self.indirect:
            raise ChainError("indirect descriptor but INDIRECT_DESC was not negotiated")
        if nested:
            raise ChainError("indirect descriptor inside an indirect table")
        if flags & VRING_DESC_F_NEXT:
            raise ChainError("indirect descriptor with NEXT set")
        # A table may be longer than the ring: Linux sizes its tables from the device's
        # seg_max (seg_max + 2 descriptors) whatever the queue size the frontend chose.
        cap = max(self.num, self.indirect_floor) * DESC_SIZE
        if length == 0 or length % DESC_SIZE or length > cap:
            raise ChainError(
                f"indirect table length {length} is not a multiple of {DESC_SIZE} in 1..{cap}"
            )
        try:
            return self.mem.view(addr, length)
        except GuestMemoryError as exc:
            raise ChainError(f"indirect table: {exc}") from exc

    def _write_failure_status(self, last: tuple[int, int, int]) -> int:
        """Write ``failure_status`` over the end of the chain's last descriptor if it is
        device-writable guest memory; returns the bytes written. ``last`` is that descriptor
        as the walk read it (:attr:`OutsideMemoryError.last`): the table is not read again."""
        status = self.failure_status
        addr, length, flags = last
        if not status or not flags & VRING_DESC_F_WRITE or length < len(status):
            return 0
        try:
            views = self.mem.translate(addr + length - len(status), len(status))
        except GuestMemoryError:
            return 0  # the status itself is outside guest memory: nothing can be said
        done = 0
        for view in views:
            view[:] = status[done : done + len(view)]
            done += len(view)
            view.release()
        if self.dirty is not None:
            self.dirty.mark(addr + length - len(status), len(status))
        return done
