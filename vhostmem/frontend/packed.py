"""Driver side of a packed virtqueue (virtio 1.2 section 2.8) in `GuestRam`, and a blk queue on it.

`PackedRing` lays out the descriptor ring and the two event suppression areas in one
page-aligned block and offers raw access (any descriptor, either area) for hostile tests plus a
fast path: `add_chain` / `add_indirect` per request (each descriptor written, the head's flags
last, so a chain becomes available whole), one `publish` per batch (the kick decision),
`pop_used` to reap used descriptors by buffer id. `PackedBlkQueue` is `BlkQueue` on it: a
request's buffer id is its slot index, and its descriptors are written at submission.
"""

from __future__ import annotations

import struct

from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.queue import BlkQueue, Request
from vhostmem.frontend.ring import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    RING_BLOCK_ALIGN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    EventFd,
    RingAddresses,
    RingError,
    _store_u16,
    memory_barrier,
    vring_need_event,
)

# Packed descriptor flags (2.8.1) and event suppression (2.8.10).
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_AREA_SIZE = 4  # le16 off_wrap, le16 flags
WRAP_SHIFT = 15
POS_MASK = (1 << WRAP_SHIFT) - 1
BASE_USED_SHIFT = 16  # SET/GET_VRING_BASE: used position and wrap in the high half
# Both wrap counters start at 1 (2.8.1): the base of a fresh packed ring.
FRESH_BASE = (1 << WRAP_SHIFT) | (1 << WRAP_SHIFT) << BASE_USED_SHIFT
FLAGS_OFFSET = 14  # of a descriptor: addr u64, len u32, id u16, flags u16
_PDESC = struct.Struct("<QIHH")
_BODY = struct.Struct("<QIH")  # a descriptor without its flags
_U16 = struct.Struct("<H")


def packed_ring_sizes(num: int) -> tuple[int, int, int]:
    return DESC_SIZE * num, EVENT_AREA_SIZE, EVENT_AREA_SIZE


class PackedRing:
    """One packed virtqueue as the driver sees it."""

    packed = True

    def __init__(self, ram: GuestRam, num: int, *, event_idx: bool = False) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} must be a power of two in 1..{MAX_QUEUE_SIZE}")
        self.ram, self.num, self.event_idx = ram, num, event_idx
        ring_size = DESC_SIZE * num
        base = ram.alloc(ring_size + 2 * EVENT_AREA_SIZE, RING_BLOCK_ALIGN)
        self._owned = [base]
        # SET_VRING_ADDR: desc = the ring, avail = driver area, used = device area.
        self.addr = RingAddresses(base, base + ring_size, base + ring_size + EVENT_AREA_SIZE)
        region, self._ring = ram.locate(base, ring_size + 2 * EVENT_AREA_SIZE)
        self._mm = region.mm
        self._driver = self._ring + ring_size
        self._device = self._driver + EVENT_AREA_SIZE
        self.reset()

    def reset(self) -> None:
        self._mm[self._ring:self._device + EVENT_AREA_SIZE] = bytes(
            self._device + EVENT_AREA_SIZE - self._ring)
        self.set_base(FRESH_BASE)

    def set_base(self, base: int) -> None:
        """Driver positions from a vring base (what GET_VRING_BASE returned, or FRESH_BASE)."""
        self.next_avail = base & POS_MASK
        self.avail_wrap = base >> WRAP_SHIFT & 1
        self.last_used = base >> BASE_USED_SHIFT & POS_MASK
        self.used_wrap = base >> (BASE_USED_SHIFT + WRAP_SHIFT) & 1
        self._counts: dict[int, int] = {}  # buffer id -> descriptors it took
        self.free_descs = self.num
        self._added = 0  # descriptors made available since the last publish
        self._published = self._position()

    def base(self) -> int:
        return (self.next_avail | self.avail_wrap << WRAP_SHIFT
                | (self.last_used | self.used_wrap << WRAP_SHIFT) << BASE_USED_SHIFT)

    def _position(self) -> int:
        """The avail position as a 16-bit running value (wrap counter in bit 15)."""
        return self.next_avail | self.avail_wrap << WRAP_SHIFT

    # -- raw access --------------------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        """Write descriptor ``i`` whole (flags last, in one 16-bit store)."""
        off = self._ring + DESC_SIZE * self._index(i)
        _BODY.pack_into(self._mm, off, addr, length, buffer_id)
        _store_u16(self._mm, off + FLAGS_OFFSET, flags)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        """(addr, len, id, flags) of descriptor ``i``."""
        return _PDESC.unpack_from(self._mm, self._ring + DESC_SIZE * self._index(i))

    def _index(self, i: int) -> int:
        if not 0 <= i < self.num:
            raise RingError(f"descriptor index {i} outside queue of {self.num}")
        return i

    def avail_flags(self, wrap: int | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available under ``wrap`` (default: ours)."""
        wrap = self.avail_wrap if wrap is None else wrap
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    @property
    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the driver area."""
        return (_U16.unpack_from(self._mm, self._driver)[0],
                _U16.unpack_from(self._mm, self._driver + 2)[0])

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        _store_u16(self._mm, self._driver, off_wrap)
        _store_u16(self._mm, self._driver + 2, flags)

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) of the device area."""
        return (_U16.unpack_from(self._mm, self._device)[0],
                _U16.unpack_from(self._mm, self._device + 2)[0])

    # -- fast path -----------------------------------------------------------------------
    def add_chain(self, buffer_id: int, pieces: list[tuple[int, int, int]]) -> None:
        """Make (addr, len, flags) pieces available as one buffer: descriptors at the avail
        position, linked by NEXT, the id in each, the head's flags stored last."""
        n = len(pieces)
        if n > self.free_descs:
            raise RingError(f"chain of {n} descriptors does not fit: {self.free_descs} free")
        head, head_flags = self.next_avail, 0
        for k, (addr, length, flags) in enumerate(pieces):
            flags |= (VIRTQ_DESC_F_NEXT if k < n - 1 else 0) | self.avail_flags()
            if k == 0:
                head_flags = flags
                _BODY.pack_into(self._mm, self._ring + DESC_SIZE * head, addr, length,
                                buffer_id)
            else:
                self.write_desc(self.next_avail, addr, length, buffer_id, flags)
            self.next_avail += 1
            if self.next_avail == self.num:
                self.next_avail = 0
                self.avail_wrap ^= 1
        # x86 keeps stores in order: the rest of the chain is visible before the head's flags.
        _store_u16(self._mm, self._ring + DESC_SIZE * head + FLAGS_OFFSET, head_flags)
        self._counts[buffer_id] = n
        self.free_descs -= n
        self._added += n

    def add_indirect(self, buffer_id: int, table_gpa: int, table_len: int) -> None:
        self.add_chain(buffer_id, [(table_gpa, table_len, VIRTQ_DESC_F_INDIRECT)])

    def publish(self) -> bool:
        """Whether the device wants a kick for what was added since the last publish."""
        added, self._added = self._added, 0
        self._published = self._position()
        if not added:
            return False
        memory_barrier()  # descriptors stored before the device's area is read
        off_wrap, flags = self.device_event
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        # The EVENT_IDX rule over positions (u16 arithmetic): an event offset of the other
        # wrap lies one ring behind.
        new = self.next_avail
        event = off_wrap & POS_MASK
        if off_wrap >> WRAP_SHIFT != self.avail_wrap:
            event -= self.num
        return vring_need_event(event, new, new - added)

    def pending_used(self) -> int:
        _, _, _, flags = self.read_desc(self.last_used)
        return int(self._is_used(flags))

    def _is_used(self, flags: int) -> bool:
        want = bool(self.used_wrap)
        return bool(flags & VIRTQ_DESC_F_AVAIL) == want and bool(flags & VIRTQ_DESC_F_USED) == want

    def pop_used(self, limit: int = MAX_QUEUE_SIZE) -> list[tuple[int, int]]:
        """Reap up to ``limit`` used buffers as (id, len); with EVENT_IDX re-arm the driver
        area for the next one."""
        out: list[tuple[int, int]] = []
        while len(out) < limit:
            _, length, buffer_id, flags = self.read_desc(self.last_used)
            if not self._is_used(flags):
                if not self.event_idx:
                    break
                self.set_driver_event(self.last_used | self.used_wrap << WRAP_SHIFT,
                                      RING_EVENT_FLAGS_DESC)
                memory_barrier()
                if not self._is_used(self.read_desc(self.last_used)[3]):
                    break
                continue
            count = self._counts.pop(buffer_id, 0)
            if not count:
                raise RingError(f"device used buffer id {buffer_id}, which is not in flight")
            out.append((buffer_id, length))
            self.free_descs += count
            self.last_used += count
            if self.last_used >= self.num:
                self.last_used -= self.num
                self.used_wrap ^= 1
        return out

    def set_interrupts(self, enabled: bool) -> None:
        self.set_driver_event(0, RING_EVENT_FLAGS_ENABLE if enabled
                              else RING_EVENT_FLAGS_DISABLE)

    def free(self) -> None:
        """Give the ring memory back to the allocator."""
        for gpa in self._owned:
            self.ram.free(gpa)
        self._owned = []

    def missed_kick(self) -> bool:
        return False

    @property
    def published(self) -> int:
        return self._published

    @property
    def used_idx(self) -> int:
        return self.last_used | self.used_wrap << WRAP_SHIFT


class PackedBlkQueue(BlkQueue):
    """`BlkQueue` on a packed ring: buffer id = slot index; descriptors written per submit."""

    ring: PackedRing  # type: ignore[assignment]

    def __init__(self, ram: GuestRam, ring: PackedRing, kick: EventFd, call: EventFd,
                 **kw: int | None) -> None:
        super().__init__(ram, ring, kick, call, **kw)  # type: ignore[arg-type]
        self._pieces: list[list[tuple[int, int, int]]] = [[] for _ in self.slots]
        self._indirect = [False] * len(self.slots)

    def _write_chain(self, req: Request, pieces: list[tuple[int, int, int]],
                     indirect: bool) -> None:
        req.writable = [(gpa, n) for gpa, n, flags in pieces if flags & VIRTQ_DESC_F_WRITE]
        req.head = req.index
        self._pieces[req.index] = pieces
        self._indirect[req.index] = indirect
        if indirect:
            self._write_table(req, pieces)

    def _write_table(self, req: Request, pieces: list[tuple[int, int, int]]) -> None:
        """An indirect table of packed descriptors (2.8.8): consecutive, no NEXT, id unused."""
        region, off = self._table_space(req, len(pieces))
        for k, (addr, length, flags) in enumerate(pieces):
            _PDESC.pack_into(region.mm, off + DESC_SIZE * k, addr, length, 0, flags)

    def _queue(self, req: Request) -> Request:
        self._by_head[req.head] = req
        pieces = self._pieces[req.index]
        if self._indirect[req.index]:
            self.ring.add_indirect(req.head, req.table_gpa, DESC_SIZE * len(pieces))
        else:
            self.ring.add_chain(req.head, pieces)
        return req

    def _stalled(self, timeout: float) -> TimeoutError:
        ring = self.ring
        return TimeoutError(f"no completion within {timeout}s (packed: avail {ring.published:#x},"
                            f" used {ring.used_idx:#x}, device event {ring.device_event})")

    def poll_pending(self) -> bool:
        return self.ring.pending_used() > 0
