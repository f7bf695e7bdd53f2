"""Driver side of a split virtqueue, for tests: a memfd as guest RAM and a ring writer."""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator

from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.packed_ring import (
    BASE_USED_SHIFT,
    VIRTIO_F_RING_PACKED,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    WRAP_SHIFT,
)
from vhostmem.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    Virtqueue,
)

GPA_BASE = 0x4000_0000
UADDR_BASE = 0x7F00_0000_0000
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")
ALL_RING_FEATURES = (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)

# A buffer of a chain: (gpa, length, device_writable)
Buf = tuple[int, int, bool]


class GuestRam:
    """A memfd playing guest RAM at ``gpa``; the test (driver) writes it through its own mmap."""

    def __init__(self, size: int = 4 << 20, gpa: int = GPA_BASE, uaddr: int = UADDR_BASE):
        self.size = size
        self.gpa = gpa
        self.uaddr = uaddr
        self.fd = os.memfd_create("test-guest-ram")
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self._next = gpa

    def add_to(self, mem: GuestMemory) -> None:
        mem.add_region(self.gpa, self.size, self.uaddr, 0, os.dup(self.fd))

    def alloc(self, length: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        self._next = gpa + length
        assert self._next <= self.gpa + self.size, "test guest RAM exhausted"
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa
        self.mm[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa
        return self.mm[off : off + length]

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class DriverRing:
    """Descriptor table, avail and used ring of ``num`` entries laid out in ``ram``."""

    def __init__(self, ram: GuestRam, num: int) -> None:
        self.ram = ram
        self.num = num
        self.desc = ram.alloc(16 * num, 16)
        self.avail = ram.alloc(4 + 2 * num + 2, 2)
        self.used = ram.alloc(4 + 8 * num + 2, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(num))

    def attach(self, vq: Virtqueue, features: int = ALL_RING_FEATURES) -> None:
        vq.set_num(self.num)
        vq.set_addr(self.desc, self.used, self.avail)
        vq.set_features(features)
        vq.start()
        vq.enable(True)

    # ------------------------------------------------------------- writing

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.ram.write(self.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int, count: bool = True) -> None:
        """Put ``head`` in the avail ring and bump avail idx."""
        slot = self.avail_idx % self.num
        self.ram.write(self.avail + 4 + 2 * slot, U16.pack(head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if count:
            self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.ram.write(self.avail + 2, U16.pack(idx & 0xFFFF))

    def add(self, bufs: list[Buf], indirect: bool = False) -> int:
        """Write a chain (direct, or one indirect descriptor pointing at a table) and publish
        it; returns the head index."""
        if indirect:
            table = self.ram.alloc(16 * len(bufs), 16)
            for n, (gpa, length, w) in enumerate(bufs):
                more = n + 1 < len(bufs)
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if more else 0)
                self.ram.write(table + 16 * n, DESC.pack(gpa, length, flags, n + 1 if more else 0))
            head = self.free.pop(0)
            self.write_desc(head, table, 16 * len(bufs), VRING_DESC_F_INDIRECT)
        else:
            ids = [self.free.pop(0) for _ in bufs]
            for n, (gpa, length, w) in enumerate(bufs):
                more = n + 1 < len(bufs)
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if more else 0)
                self.write_desc(ids[n], gpa, length, flags, ids[n + 1] if more else 0)
            head = ids[0]
        self.publish(head)
        return head

    def recycle(self, head: int) -> None:
        """Give a completed chain's descriptors back (follows NEXT in the main table)."""
        i = head
        for _ in range(self.num):
            self.free.append(i)
            _, _, flags, nxt = DESC.unpack(self.ram.read(self.desc + 16 * i, 16))
            if not flags & VRING_DESC_F_NEXT:
                return
            i = nxt

    # --------------------------------------------------------- notification

    def set_used_event(self, idx: int) -> None:
        self.ram.write(self.avail + 4 + 2 * self.num, U16.pack(idx & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail, U16.pack(flags))

    def avail_event(self) -> int:
        return U16.unpack(self.ram.read(self.used + 4 + 8 * self.num, 2))[0]

    def used_flags(self) -> int:
        return U16.unpack(self.ram.read(self.used, 2))[0]

    # -------------------------------------------------------------- reading

    def used_idx(self) -> int:
        return U16.unpack(self.ram.read(self.used + 2, 2))[0]

    def set_used_idx(self, idx: int) -> None:
        self.last_used = idx & 0xFFFF
        self.ram.write(self.used + 2, U16.pack(idx & 0xFFFF))

    def take_used(self, recycle: bool = True) -> list[tuple[int, int]]:
        """New used elements (id, len) since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.num
            elem = USED_ELEM.unpack(self.ram.read(self.used + 4 + 8 * slot, 8))
            out.append(elem)
            if recycle:
                self.recycle(elem[0])
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def eventfd_count(fd: int) -> int:
    """Read (and reset) a non-blocking eventfd; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# Packed rings (virtio 1.2 section 2.8): the features, and the vring base of a fresh ring (both
# wrap counters 1, positions 0).
PACKED_FEATURES = ALL_RING_FEATURES | 1 << VIRTIO_F_RING_PACKED
FRESH_BASE = 1 << WRAP_SHIFT | 1 << WRAP_SHIFT << BASE_USED_SHIFT
PDESC = struct.Struct("<QIHH")  # addr, len, id, flags


class PackedDriver:
    """The driver side of a packed ring in test RAM: raw descriptor writes and a chain adder
    that tracks the avail position and wrap counter."""

    def __init__(self, ram: GuestRam, num: int) -> None:
        self.ram, self.num = ram, num
        self.ring = ram.alloc(16 * num, 16)
        self.driver = ram.alloc(4, 4)
        self.device = ram.alloc(4, 4)
        self.pos, self.wrap = 0, 1
        self.used_pos, self.used_wrap = 0, 1

    def attach(self, vq: Virtqueue, features: int = PACKED_FEATURES,
               num: int | None = None) -> None:
        vq.set_features(features)
        vq.set_num(num or self.num)
        vq.set_addr(self.ring, self.device, self.driver)
        vq.set_base(FRESH_BASE)
        vq.start()
        vq.enable(True)

    def avail_flags(self) -> int:
        return VIRTQ_DESC_F_AVAIL if self.wrap else VIRTQ_DESC_F_USED

    def write(self, i: int, addr: int, length: int, buffer_id: int, flags: int) -> None:
        self.ram.write(self.ring + 16 * i, PDESC.pack(addr, length, buffer_id, flags))

    def read(self, i: int) -> tuple[int, int, int, int]:
        return PDESC.unpack(self.ram.read(self.ring + 16 * i, 16))

    def add(self, buffer_id: int, bufs: list[tuple[int, int, bool]], *,
            last_next: bool = False) -> int:
        """Write a chain at the avail position (the head's flags last); returns its head."""
        head, head_desc = self.pos, None
        for n, (gpa, length, w) in enumerate(bufs):
            more = n + 1 < len(bufs) or last_next
            flags = ((VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if more else 0)
                     | self.avail_flags())
            if n == 0:
                head_desc = (gpa, length, buffer_id, flags)
            else:
                self.write(self.pos, gpa, length, buffer_id, flags)
            self.pos += 1
            if self.pos == self.num:
                self.pos, self.wrap = 0, self.wrap ^ 1
        assert head_desc is not None
        self.write(head, *head_desc)
        return head

    def add_indirect(self, buffer_id: int, bufs: list[tuple[int, int, bool]],
                     table_len: int | None = None) -> int:
        table = self.ram.alloc(16 * max(len(bufs), 1), 16)
        for n, (gpa, length, w) in enumerate(bufs):
            self.ram.write(table + 16 * n,
                           PDESC.pack(gpa, length, 0, VRING_DESC_F_WRITE if w else 0))
        length = 16 * len(bufs) if table_len is None else table_len
        return self.add_raw(buffer_id, table, length, VRING_DESC_F_INDIRECT)

    def add_raw(self, buffer_id: int, addr: int, length: int, flags: int) -> int:
        head = self.pos
        self.write(head, addr, length, buffer_id, flags | self.avail_flags())
        self.pos += 1
        if self.pos == self.num:
            self.pos, self.wrap = 0, self.wrap ^ 1
        return head

    def take_used(self) -> list[tuple[int, int, int]]:
        """(id, len, flags) of the used descriptors written since the last call; positions
        advance by what each id took, as a driver does (told by ``counts``)."""
        out = []
        while True:
            _, length, buffer_id, flags = self.read(self.used_pos)
            used = bool(flags & VIRTQ_DESC_F_USED)
            if used != bool(self.used_wrap) or bool(flags & VIRTQ_DESC_F_AVAIL) != used:
                return out
            out.append((buffer_id, length, flags))
            self.used_pos += self.counts.pop(buffer_id)
            if self.used_pos >= self.num:
                self.used_pos, self.used_wrap = self.used_pos - self.num, self.used_wrap ^ 1

    counts: dict[int, int]

    def set_driver_event(self, off_wrap: int, flags: int) -> None:
        self.ram.write(self.driver, U16.pack(off_wrap) + U16.pack(flags))

    def device_event(self) -> tuple[int, int]:
        raw = self.ram.read(self.device, 4)
        return U16.unpack(raw[:2])[0], U16.unpack(raw[2:])[0]


class CountingView:
    """A ring view that notes every load and store of the real view it wraps; ``on_load`` runs
    after a load of index ``watch`` (a driver acting right after the device read a field)."""

    def __init__(self, view: memoryview, watch: int | None = None,
                 on_load: object = None) -> None:
        self.view = view
        self.watch = watch
        self.on_load = on_load
        self.events: list[tuple[str, int, int]] = []

    def __getitem__(self, i: int) -> int:
        value = self.view[i]
        self.events.append(("load", i, value))
        if i == self.watch and callable(self.on_load):
            self.on_load()
        return value

    def __setitem__(self, i: int, value: int) -> None:
        self.view[i] = value
        self.events.append(("store", i, value))

    def release(self) -> None:
        self.view.release()


@contextlib.contextmanager
def ring_env(num: int, failure_status: bytes = b"\x01"
             ) -> Iterator[tuple[GuestRam, GuestMemory, Virtqueue, DriverRing]]:
    """Guest RAM registered in a fresh GuestMemory, a Virtqueue (``failure_status`` for a
    request it cannot translate) and a split DriverRing of ``num`` entries attached to it;
    all closed afterwards."""
    ram = GuestRam()
    mem = GuestMemory(MemRegistry())
    ram.add_to(mem)
    vq = Virtqueue(0, mem, failure_status=failure_status)
    ring = DriverRing(ram, num)
    ring.attach(vq)
    try:
        yield ram, mem, vq, ring
    finally:
        vq.close()
        mem.close()
        ram.close()
