"""Guest RAM whose regions are fenced: PROT_NONE pages around each mapping, canaries in the file.

Each region's memfd is laid out ``[guard][region][guard]`` and announced with
``mmap_offset = GUARD``, so a backend maps only the region. In this process the region is mapped
in the middle of a ``PROT_NONE`` reservation (a stray access next to it faults), and the guard
bytes of the file hold a canary pattern that :meth:`GuardedRam.canaries_intact` re-reads: a
backend that wrote outside the region through its own mapping of the fd would change them.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from dataclasses import dataclass

from vhostmem.frontend.memory import GuestRam, GuestRegion, create_memfd

GUARD = 64 << 10
CANARY = bytes(range(256)) * (GUARD // 256)
PROT_NONE = 0
MAP_ANONYMOUS = 0x20
MAP_FIXED = 0x10
MAP_NORESERVE = 0x4000
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int


def _check(addr: int | None, what: str) -> int:
    if addr is None or addr == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return addr


@dataclass(eq=False)
class GuardedRegion(GuestRegion):
    """A region mapped inside a PROT_NONE reservation; ``mm`` is a byte memoryview."""

    reservation: int = 0
    total: int = 0

    def close(self) -> None:
        if self.fd < 0:
            return
        self.mm.release()  # type: ignore[attr-defined]
        _munmap(self.reservation, self.total)
        os.close(self.fd)
        self.fd = -1

    def canary_intact(self) -> bool:
        before = os.pread(self.fd, GUARD, 0)
        after = os.pread(self.fd, GUARD, GUARD + self.memory_size)
        return before == CANARY and after == CANARY


class GuardedRam(GuestRam):
    """`GuestRam` whose regions are `GuardedRegion`s."""

    def add_region(self, guest_phys_addr: int, memory_size: int, *,  # type: ignore[override]
                   userspace_addr: int | None = None, mmap_offset: int = 0,
                   name: str = "hostile-guest-ram") -> GuestRegion:
        self._check_new_region(guest_phys_addr, memory_size, mmap_offset)
        total = GUARD + memory_size + GUARD
        fd = create_memfd(name, total, sealed=self.sealed)
        try:
            os.pwrite(fd, CANARY, 0)
            os.pwrite(fd, CANARY, GUARD + memory_size)
            base = _check(_mmap(None, total, PROT_NONE,
                                mmap.MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
                          "reserve")
            host = _check(_mmap(base + GUARD, memory_size, mmap.PROT_READ | mmap.PROT_WRITE,
                                mmap.MAP_SHARED | MAP_FIXED, fd, GUARD), "map region")
        except OSError:
            os.close(fd)
            raise
        view = memoryview((ctypes.c_ubyte * memory_size).from_address(host)).cast("B")
        region = GuardedRegion(guest_phys_addr, memory_size,
                               host if userspace_addr is None else userspace_addr, GUARD, fd,
                               view, host, reservation=base, total=total)  # type: ignore[arg-type]
        bisect.insort(self.regions, region, key=lambda r: r.guest_phys_addr)
        self._alloc.add_region(guest_phys_addr, memory_size)
        return region

    def damaged_guards(self) -> list[int]:
        """Guest addresses of regions whose guard bytes changed (empty: all intact)."""
        return [r.guest_phys_addr for r in self.regions
                if isinstance(r, GuardedRegion) and not r.canary_intact()]
