"""Guest RAM for the fake guest: memfd-backed regions at chosen guest-physical addresses.

Each region is a memfd mapped MAP_SHARED into this process, so a backend that mmaps the same fd
sees every byte the frontend writes.  The `userspace_addr` a region announces is, by default, the
real host virtual address of our mapping (what QEMU sends); a synthetic value may be chosen
instead, since backends only use it to translate ring addresses.

Internally everything works with (region, offset) pairs and `struct` or slice stores on the mmap,
so no long-lived memoryview slices pin the mappings and `close()` can always unmap.
"""

from __future__ import annotations

import bisect
import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_ALIGN = 16  # descriptor tables need 16-byte alignment; a safe default for everything


# QEMU's memory-backend-memfd seals guest RAM (seal=on by default): its size can never change,
# so a backend may map it without fearing a truncation under its feet (SIGBUS).
GUEST_RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def create_memfd(name: str, size: int, *, sealed: bool = True) -> int:
    """A memfd of ``size`` bytes, sealed against resizing unless ``sealed`` is False."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        if sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, GUEST_RAM_SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd


class GuestRamError(Exception):
    """A guest-RAM request named an address, size or region that does not fit."""


def _host_address(mm: mmap.mmap) -> int:
    """Host virtual address of an mmap (the temporary ctypes view is dropped at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@dataclass(eq=False)
class GuestRegion:
    """One memfd mapping: `memory_size` bytes at `guest_phys_addr`, fd offset `mmap_offset`."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int
    mm: mmap.mmap
    host_addr: int

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.memory_size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def as_tuple(self) -> tuple[int, int, int, int]:
        """(guest_phys_addr, memory_size, userspace_addr, mmap_offset) as a memory-table entry."""
        return (self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)

    def as_dict(self) -> dict[str, int]:
        return {
            "guest_phys_addr": self.guest_phys_addr,
            "memory_size": self.memory_size,
            "userspace_addr": self.userspace_addr,
            "mmap_offset": self.mmap_offset,
        }

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.mm.close()
        finally:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Extent:
    start: int
    size: int


@dataclass
class Allocator:
    """First-fit allocator over guest-physical extents; free extents never span two regions."""

    free: list[_Extent] = field(default_factory=list)
    used: dict[int, int] = field(default_factory=dict)  # gpa -> size
    boundaries: set[int] = field(default_factory=set)  # region starts: extents split there

    def add_region(self, start: int, size: int) -> None:
        self.boundaries.add(start)
        self._add(start, size)

    def drop_region(self, start: int, size: int) -> None:
        """Forget a region's range entirely (its allocations die with it)."""
        end = start + size
        self.boundaries.discard(start)
        self.free = [e for e in self.free if not (start <= e.start < end)]
        self.used = {g: s for g, s in self.used.items() if not (start <= g < end)}

    def alloc(self, size: int, align: int = DEFAULT_ALIGN,
              within: tuple[int, int] | None = None) -> int:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise GuestRamError(f"alloc: bad size {size} or alignment {align} (power of two)")
        for i, ext in enumerate(self.free):
            if within is not None and not (within[0] <= ext.start < within[1]):
                continue
            gpa = (ext.start + align - 1) & ~(align - 1)
            if gpa + size <= ext.start + ext.size:
                self._carve(i, gpa, size)
                self.used[gpa] = size
                return gpa
        raise GuestRamError(f"alloc: no free guest memory for {size} bytes aligned to {align}")

    def reserve(self, gpa: int, size: int) -> None:
        """Take exactly [gpa, gpa+size); it may cover adjacent extents of touching regions."""
        end, pos = gpa + size, gpa
        spans = []
        while pos < end:
            i = next((i for i, e in enumerate(self.free) if e.start <= pos < e.start + e.size),
                     None)
            if i is None:
                raise GuestRamError(f"reserve: {pos:#x} is not free guest memory")
            ext = self.free[i]
            spans.append((pos, min(end, ext.start + ext.size) - pos))
            pos += spans[-1][1]
        for start, n in spans:
            i = next(i for i, e in enumerate(self.free) if e.start <= start < e.start + e.size)
            self._carve(i, start, n)
        self.used[gpa] = size

    def release(self, gpa: int) -> None:
        size = self.used.pop(gpa, None)
        if size is None:
            raise GuestRamError(f"free: {gpa:#x} was not allocated")
        cuts = sorted(b for b in self.boundaries if gpa < b < gpa + size)
        for start, end in zip([gpa, *cuts], [*cuts, gpa + size], strict=True):
            self._add(start, end - start)

    def _carve(self, i: int, gpa: int, size: int) -> None:
        ext = self.free.pop(i)
        if gpa > ext.start:
            self._insert(ext.start, gpa - ext.start)
        tail = ext.start + ext.size - (gpa + size)
        if tail:
            self._insert(gpa + size, tail)

    def _insert(self, start: int, size: int) -> None:
        bisect.insort(self.free, _Extent(start, size), key=lambda e: e.start)

    def _add(self, start: int, size: int) -> None:
        """Insert a free extent and merge it with neighbours of the same region."""
        i = bisect.bisect_left(self.free, start, key=lambda e: e.start)
        if i < len(self.free) and self.free[i].start == start + size \
                and self.free[i].start not in self.boundaries:
            size += self.free.pop(i).size
        if i > 0 and self.free[i - 1].start + self.free[i - 1].size == start \
                and start not in self.boundaries:
            self.free[i - 1].size += size
            return
        self.free.insert(i, _Extent(start, size))


class GuestRam:
    """The fake guest's physical memory: memfd regions plus an allocator over them."""

    def __init__(self, *, sealed: bool = True) -> None:
        self.regions: list[GuestRegion] = []
        self._alloc = Allocator()
        # False: memfds a frontend could still truncate (tests of backends that refuse them).
        self.sealed = sealed

    # -- regions ---------------------------------------------------------------------------
    def add_region(self, guest_phys_addr: int, memory_size: int, *,
                   userspace_addr: int | None = None, mmap_offset: int = 0,
                   name: str = "vhostmem-guest-ram") -> GuestRegion:
        """Create a memfd of `mmap_offset + memory_size` bytes and map the region part of it."""
        self._check_new_region(guest_phys_addr, memory_size, mmap_offset)
        fd = create_memfd(name, mmap_offset + memory_size, sealed=self.sealed)
        try:
            mm = mmap.mmap(fd, memory_size, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset)
        except OSError:
            os.close(fd)
            raise
        host = _host_address(mm)
        region = GuestRegion(guest_phys_addr, memory_size,
                             host if userspace_addr is None else userspace_addr,
                             mmap_offset, fd, mm, host)
        bisect.insort(self.regions, region, key=lambda r: r.guest_phys_addr)
        self._alloc.add_region(guest_phys_addr, memory_size)
        return region

    def _check_new_region(self, gpa: int, size: int, offset: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise GuestRamError(f"region size {size:#x} must be a positive multiple of "
                                f"{PAGE_SIZE:#x}")
        if gpa < 0 or gpa % PAGE_SIZE or offset < 0 or offset % PAGE_SIZE:
            raise GuestRamError(f"region gpa {gpa:#x} and mmap_offset {offset:#x} must be "
                                f"page aligned")
        for r in self.regions:
            if gpa < r.end and r.guest_phys_addr < gpa + size:
                raise GuestRamError(f"region [{gpa:#x}, {gpa + size:#x}) overlaps region at "
                                    f"{r.guest_phys_addr:#x}")

    def remove_region(self, guest_phys_addr: int) -> None:
        region = self.region_at(guest_phys_addr)
        self.regions.remove(region)
        self._alloc.drop_region(region.guest_phys_addr, region.memory_size)
        region.close()

    def region_at(self, guest_phys_addr: int) -> GuestRegion:
        for r in self.regions:
            if r.guest_phys_addr == guest_phys_addr:
                return r
        raise GuestRamError(f"no region starts at {guest_phys_addr:#x}")

    def locate(self, gpa: int, length: int = 1) -> tuple[GuestRegion, int]:
        """(region, offset) holding [gpa, gpa+length) entirely."""
        for r in self.regions:
            if r.contains(gpa, length):
                return r, gpa - r.guest_phys_addr
        raise GuestRamError(f"[{gpa:#x}, {gpa + length:#x}) is not inside one guest region")

    def _pieces(self, gpa: int, length: int) -> Iterator[tuple[GuestRegion, int, int]]:
        """Split a range that may cross touching regions into (region, offset, length)."""
        pos, end = gpa, gpa + length
        while pos < end:
            r, off = self.locate(pos)
            n = min(end, r.end) - pos
            yield r, off, n
            pos += n

    # -- byte access -----------------------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(r.mm[off:off + n] for r, off, n in self._pieces(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        done = 0
        for r, off, n in list(self._pieces(gpa, len(data))):
            r.mm[off:off + n] = data[done:done + n]
            done += n

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def host_address(self, gpa: int) -> int:
        """The userspace_addr a backend would see for `gpa` (ring addresses use this)."""
        r, off = self.locate(gpa)
        return r.userspace_addr + off

    # -- allocation ------------------------------------------------------------------------
    def alloc(self, size: int, align: int = DEFAULT_ALIGN, *, region: GuestRegion | None = None
              ) -> int:
        within = None if region is None else (region.guest_phys_addr, region.end)
        return self._alloc.alloc(size, align, within)

    def reserve(self, gpa: int, size: int) -> int:
        """Allocate exactly [gpa, gpa+size) (may cross touching regions); returns gpa."""
        self._pieces_check(gpa, size)
        self._alloc.reserve(gpa, size)
        return gpa

    def _pieces_check(self, gpa: int, size: int) -> None:
        for _ in self._pieces(gpa, size):
            pass

    def free(self, gpa: int) -> None:
        self._alloc.release(gpa)

    def free_bytes(self) -> int:
        """Unallocated guest memory, summed over all regions."""
        return sum(e.size for e in self._alloc.free)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        regions, self.regions = self.regions, []
        self._alloc = Allocator()
        for r in regions:
            r.close()

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
