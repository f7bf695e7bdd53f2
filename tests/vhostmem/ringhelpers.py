"""Driver side of a split virtqueue, for tests: a memfd as guest RAM and a ring writer."""

from __future__ import annotations

import mmap
import os
import struct

from vhostmem.guest_memory import GuestMemory
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
