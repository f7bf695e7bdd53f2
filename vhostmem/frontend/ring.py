"""Driver side of a virtio split virtqueue, living in `GuestRam`, plus eventfd notifiers.

`SplitRing` gives raw access to every field (any descriptor, any avail index, the used ring) so
tests can play a hostile guest, and a fast path for well-behaved use: `add_avail` per request,
one `publish` per batch (one idx store, one notification decision), `pop_used` to reap.
Reads and descriptor writes are precompiled `struct` operations on the region's mmap; the
indices and flags a running device reads are each stored in one 16-bit store (`_store_u16`). No
construct, and no allocation beyond the small tuples and 2-byte values stored.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import threading
from dataclasses import dataclass

from vhostmem.frontend.memory import GuestRam, GuestRegion

# Descriptor flags (virtio 1.2, 2.7.5).
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags: the driver asks for no interrupts / the device asks for no kicks.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
RING_HEADER = 4  # flags u16 + idx u16 of both avail and used rings
AVAIL_ENTRY = 2
USED_ENTRY = 8
EVENT_FIELD = 2  # used_event / avail_event trailer
U16_MASK = 0xFFFF
MAX_QUEUE_SIZE = 32768
RING_BLOCK_ALIGN = 4096

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
EVENTFD_WORD = 8  # an eventfd read/write moves one u64


_FENCE = threading.Lock()


def _store_u16(mm: mmap.mmap, off: int, value: int) -> None:
    """Store a ring index or flags word the device may be reading at this moment, in one
    16-bit store. Not `struct.pack_into`: it zeroes its target before writing the value, so a
    device polling avail.idx could read 0 (a jump of up to 65535 entries) mid-store. mmap slice
    assignment is a single 2-byte memcpy."""
    mm[off:off + 2] = value.to_bytes(2, "little")


def memory_barrier() -> None:
    """A full CPU memory barrier: taking a lock is an atomic read-modify-write (LOCK-prefixed on
    x86), which no load may pass. Python offers no fence instruction of its own."""
    _FENCE.acquire()
    _FENCE.release()


class RingError(Exception):
    """Bad ring geometry or a ring access outside the queue."""


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from `old` to `new` passes `event` (virtio EVENT_IDX rule)."""
    return ((new - event - 1) & U16_MASK) < ((new - old) & U16_MASK)


class EventFd:
    """A non-blocking eventfd: `signal`, `drain`, `wait(timeout)`."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def signal(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def drain(self) -> int:
        """Read and reset the counter; 0 when nothing was signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds for a signal; drains it. False on timeout."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return False
        return self.drain() > 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class RingAddresses:
    """Guest-physical addresses of the three ring parts."""

    desc: int
    avail: int
    used: int


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, avail ring, used ring); the event trailers are always
    reserved so the same memory works with EVENT_IDX on or off."""
    return (DESC_SIZE * num, RING_HEADER + AVAIL_ENTRY * num + EVENT_FIELD,
            RING_HEADER + USED_ENTRY * num + EVENT_FIELD)


class SplitRing:
    """One split virtqueue as the driver sees it."""

    def __init__(self, ram: GuestRam, num: int, *, event_idx: bool = False,
                 addresses: RingAddresses | None = None) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"queue size {num} must be a power of two in 1..{MAX_QUEUE_SIZE}")
        self.ram, self.num, self.event_idx = ram, num, event_idx
        self._owned: list[int] = []
        self.addr = addresses or self._allocate()
        self._region, self._desc = self._place(self.addr.desc, ring_sizes(num)[0])
        self._avail = self._place_same(self.addr.avail, ring_sizes(num)[1])
        self._used = self._place_same(self.addr.used, ring_sizes(num)[2])
        self._mm = self._region.mm
        self.reset()

    def _allocate(self) -> RingAddresses:
        """One page-aligned block: descriptor table, avail ring, used ring (so all three
        are in the same region, as backends expect)."""
        desc_size, avail_size, used_size = ring_sizes(self.num)
        used_off = (desc_size + avail_size + USED_ALIGN - 1) & ~(USED_ALIGN - 1)
        base = self.ram.alloc(used_off + used_size, RING_BLOCK_ALIGN)
        self._owned = [base]
        return RingAddresses(base, base + desc_size, base + used_off)

    def _place(self, gpa: int, size: int) -> tuple[GuestRegion, int]:
        return self.ram.locate(gpa, size)

    def _place_same(self, gpa: int, size: int) -> int:
        region, off = self.ram.locate(gpa, size)
        if region is not self._region:
            raise RingError("the three ring parts must live in the same guest region")
        return off

    # -- driver state ------------------------------------------------------------------------
    def reset(self) -> None:
        """Zero the ring memory and the driver's shadow indices."""
        sizes = ring_sizes(self.num)
        for off, size in zip((self._desc, self._avail, self._used), sizes, strict=True):
            self._mm[off:off + size] = bytes(size)
        self.next_avail = 0  # shadow of avail.idx (free running, masked on store)
        self.last_used = 0  # next used entry to reap
        self.published = 0  # avail.idx value last stored
        self.kicked_upto = 0  # avail.idx of the last publish that asked for a kick

    packed = False

    def set_base(self, base: int) -> None:
        """Driver indices from a vring base (SET_VRING_BASE / GET_VRING_BASE)."""
        self.next_avail = self.published = self.kicked_upto = self.last_used = base

    # -- raw descriptor access -------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        _DESC.pack_into(self._mm, self._desc + DESC_SIZE * self._index(i), addr, length, flags,
                        next_)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack_from(self._mm, self._desc + DESC_SIZE * self._index(i))

    def _index(self, i: int) -> int:
        if not 0 <= i < self.num:
            raise RingError(f"descriptor index {i} outside queue of {self.num}")
        return i

    # -- raw avail ring ----------------------------------------------------------------------
    @property
    def avail_flags(self) -> int:
        return _U16.unpack_from(self._mm, self._avail)[0]

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        _store_u16(self._mm, self._avail, value)

    @property
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._mm, self._avail + 2)[0]

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        """Store any avail.idx (hostile tests); the shadow follows it."""
        _store_u16(self._mm, self._avail + 2, value & U16_MASK)
        self.next_avail = self.published = self.kicked_upto = value & U16_MASK

    def set_avail_entry(self, slot: int, head: int) -> None:
        _store_u16(self._mm, self._avail + RING_HEADER + AVAIL_ENTRY * (slot % self.num),
                   head & U16_MASK)

    @property
    def used_event(self) -> int:
        return _U16.unpack_from(self._mm, self._avail + RING_HEADER + AVAIL_ENTRY * self.num)[0]

    @used_event.setter
    def used_event(self, value: int) -> None:
        _store_u16(self._mm, self._avail + RING_HEADER + AVAIL_ENTRY * self.num,
                   value & U16_MASK)

    # -- raw used ring -----------------------------------------------------------------------
    @property
    def used_flags(self) -> int:
        return _U16.unpack_from(self._mm, self._used)[0]

    @property
    def used_idx(self) -> int:
        return _U16.unpack_from(self._mm, self._used + 2)[0]

    def read_used(self, slot: int) -> tuple[int, int]:
        """(id, len) of used ring entry `slot` (taken modulo the queue size)."""
        return _USED_ELEM.unpack_from(
            self._mm, self._used + RING_HEADER + USED_ENTRY * (slot % self.num))

    @property
    def avail_event(self) -> int:
        return _U16.unpack_from(self._mm, self._used + RING_HEADER + USED_ENTRY * self.num)[0]

    # -- fast path -----------------------------------------------------------------------
    def write_chain(self, indices: list[int] | tuple[int, ...],
                    pieces: list[tuple[int, int, int]]) -> int:
        """Write (addr, len, flags) pieces into descriptors `indices`, linked by NEXT; returns
        the head index."""
        if len(indices) < len(pieces):
            raise RingError(f"{len(pieces)} pieces need as many descriptors, "
                            f"got {len(indices)}")
        last = len(pieces) - 1
        for k, (addr, length, flags) in enumerate(pieces):
            nxt = indices[k + 1] if k < last else 0
            self.write_desc(indices[k], addr, length,
                            flags | (VIRTQ_DESC_F_NEXT if k < last else 0), nxt)
        return indices[0]

    def add_avail(self, head: int) -> None:
        """Queue `head` in the next avail slot without publishing it yet."""
        _store_u16(self._mm, self._avail + RING_HEADER + AVAIL_ENTRY
                   * (self.next_avail & (self.num - 1)), head)
        self.next_avail = (self.next_avail + 1) & U16_MASK

    def publish(self) -> bool:
        """Store avail.idx once for everything added; True when the device wants a kick."""
        old, new = self.published, self.next_avail
        # x86 keeps stores in order, so the ring entries are visible before the index.
        _store_u16(self._mm, self._avail + 2, new)
        self.published = new
        if old == new:
            return False
        # Store idx, then load avail_event/flags: a store-load pair the CPU may reorder, which
        # would lose a kick when the device goes idle at the same moment.
        memory_barrier()
        if self.event_idx:
            kick = vring_need_event(self.avail_event, new, old)
        else:
            kick = not self.used_flags & VIRTQ_USED_F_NO_NOTIFY
        if kick:
            self.kicked_upto = new
        return kick

    def missed_kick(self) -> bool:
        """True when the device's avail_event (EVENT_IDX) now asks for a kick at an index that
        chains published since the last kick have already passed: the device stored it after
        `publish` read it, and did not read avail.idx again afterwards. `publish` fences its
        idx store before that read, so only a device lacking the same fence (or the re-read)
        gets here. Called on a stall, it tells a device's lost wakeup from a slow or hung
        request. Without EVENT_IDX a cleared NO_NOTIFY cannot tell the two apart: False."""
        if not self.event_idx or self.kicked_upto == self.published:
            return False
        # The kick rule itself, applied to everything published since the last kick.
        return vring_need_event(self.avail_event, self.published, self.kicked_upto)

    def pending_used(self) -> int:
        return (self.used_idx - self.last_used) & U16_MASK

    def pop_used(self, limit: int = MAX_QUEUE_SIZE) -> list[tuple[int, int]]:
        """Reap up to `limit` completions; with EVENT_IDX re-arm used_event for the next one."""
        out: list[tuple[int, int]] = []
        while len(out) < limit:
            used_idx = self.used_idx
            if self.last_used == used_idx:
                if not self.event_idx:
                    break
                # Re-arm, then look again: without the barrier the device could miss the new
                # used_event while we miss its new used.idx, and nobody would wake us.
                self.used_event = self.last_used
                memory_barrier()
                if self.used_idx == used_idx:
                    break
                continue
            while self.last_used != used_idx and len(out) < limit:
                out.append(self.read_used(self.last_used))
                self.last_used = (self.last_used + 1) & U16_MASK
        return out

    def set_interrupts(self, enabled: bool) -> None:
        """Driver-side interrupt suppression: NO_INTERRUPT flag, or used_event with EVENT_IDX."""
        if self.event_idx:
            self.used_event = self.last_used if enabled else (self.last_used - 1) & U16_MASK
        else:
            self.avail_flags = 0 if enabled else VIRTQ_AVAIL_F_NO_INTERRUPT

    def free(self) -> None:
        """Give the ring memory back to the allocator (only memory this ring allocated)."""
        for gpa in self._owned:
            self.ram.free(gpa)
        self._owned = []
