"""Guest memory of one device connection: mmapped region fds, registered SPDK-style.

Every region fd is mmapped (MAP_SHARED | MAP_NORESERVE) and its host range is registered in a
process-wide :class:`MemRegistry`. Each :class:`GuestMemory` owns one map on that registry whose
notify callback turns *its own* registrations into translations ``gpa -> region id``; so the map
used to translate descriptor addresses is filled by registration itself and cannot drift from it.
Registrations of other connections reach the callback too and are ignored.

Guest physical addresses are used directly as the map's keys (they are below 2^48); region gpa
and size must therefore be 4 KiB aligned, as QEMU's always are.

Unmapping is deferred while views are alive: :meth:`translate` hands out zero-copy views into the
mmaps, and an mmap cannot be closed while any view into it exists (``mmap.close`` raises
BufferError). A removed region's mmap is kept on a pending list and closed by :meth:`reap`, which
every table change calls; its range is unregistered at once, so nothing translates into it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import mmap
import os
from collections.abc import Iterable

from vhostmem.memmap import MapOps, MemMap, MemMapError, MemRegistry, NotifyAction

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
# Map keys are GPAs; the map covers a 48-bit address space.
GPA_LIMIT = 1 << 48
ADDR_LIMIT = 1 << 64
# Linux value; the mmap module only exports it from Python 3.12 on.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
# statfs f_type of hugetlbfs (linux/magic.h). Its pages come from a fixed pool: mapped with
# MAP_NORESERVE, a page the pool cannot supply faults with SIGBUS when first touched, which
# would kill the process. Without it the kernel reserves the pages at mmap time, or mmap fails.
HUGETLBFS_MAGIC = 0x958458F6
STATFS_BYTES = 256  # struct statfs is 120 bytes on x86-64; f_type is its first long
_libc = ctypes.CDLL(None, use_errno=True)
# Translation value for "not guest memory"; region ids start at 1.
NO_REGION = 0

# A region fd the frontend can still shrink is a crash risk: touching a page past the new end of
# the file raises SIGBUS, which no Python code can recover from. QEMU's memory-backend-memfd
# seals its memfds against shrinking by default (seal=on); other fds (memory-backend-file,
# unsealed memfds) are accepted with one warning per memory table unless sealed memory is required
# (GuestMemory(require_sealed=True), `vhostmem serve --require-sealed-memory`).
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


def shrink_sealed(fd: int) -> bool:
    """True when ``fd`` is a memfd sealed with F_SEAL_SHRINK (its size can never go down)."""
    try:
        return bool(fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK)
    except OSError:  # EINVAL: not a memfd (a regular or hugetlbfs file, a pipe...)
        return False

RegionSpec = tuple[int, int, int, int, int]  # gpa, size, userspace_addr, mmap_offset, fd

_default_registry: MemRegistry | None = None


def default_registry() -> MemRegistry:
    """The process-wide registry every GuestMemory uses unless given another."""
    global _default_registry
    if _default_registry is None:
        _default_registry = MemRegistry()
    return _default_registry


class GuestMemoryError(Exception):
    """An address or region the guest memory cannot serve; the message names it."""


class Region:
    """One mapped region. ``view`` covers the whole mmap; guest byte ``gpa`` is at
    ``view[gpa - view_gpa]``."""

    __slots__ = (
        "gpa_end",
        "guest_phys_addr",
        "host_addr",
        "host_len",
        "id",
        "memory_size",
        "mm",
        "mmap_offset",
        "userspace_addr",
        "view",
        "view_gpa",
    )

    def __init__(self, rid: int, gpa: int, size: int, uaddr: int, offset: int) -> None:
        self.id = rid
        self.guest_phys_addr = gpa
        self.memory_size = size
        self.userspace_addr = uaddr
        self.mmap_offset = offset
        self.gpa_end = gpa + size
        self.mm: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.view_gpa = gpa
        self.host_addr = 0  # host VA of the mmap start (page aligned)
        self.host_len = 0  # registered length (page multiple)

    def __repr__(self) -> str:
        return f"Region(gpa={self.guest_phys_addr:#x}, size={self.memory_size:#x})"


class GuestMemory:
    """The guest's memory as seen by one device connection."""

    def __init__(self, registry: MemRegistry | None = None, require_sealed: bool = False) -> None:
        self.registry = registry if registry is not None else default_registry()
        # Refuse region fds a frontend could still shrink under us (see F_SEAL_SHRINK above).
        self.require_sealed = require_sealed
        self._regions: dict[int, Region] = {}
        self._next_id = NO_REGION + 1
        self._last: Region | None = None
        self._pending_unmap: list[mmap.mmap] = []
        self._warned_unsealed = False
        # Bumped on every table change so cached ring views know to re-resolve.
        self.generation = 0
        self._map: MemMap | None = self.registry.alloc_map(
            default_translation=NO_REGION,
            ops=MapOps(notify=self._notify, are_contiguous=_same_region),
            ctx=None,
        )

    # ---------------------------------------------------------------- table

    @property
    def regions(self) -> list[Region]:
        return sorted(self._regions.values(), key=lambda r: r.guest_phys_addr)

    @property
    def pending_unmaps(self) -> int:
        """How many removed mmaps still wait for their last view to be released."""
        return len(self._pending_unmap)

    def add_region(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int) -> None:
        """Map ``fd`` at ``mmap_offset`` as guest memory [gpa, gpa + size). Owns ``fd``:
        it is closed once mapped, or on any error."""
        region = self._map_new(gpa, size, uaddr, mmap_offset, fd, self._regions.values())
        self._register(region)
        self._changed()

    def _map_new(self, gpa: int, size: int, uaddr: int, mmap_offset: int, fd: int,
                 others: Iterable[Region]) -> Region:
        """Check and mmap one new region (not registered yet); always closes ``fd``."""
        try:
            self._check_new(gpa, size, uaddr, mmap_offset, others)
            self._check_sealed(gpa, fd)
            region = Region(self._next_id, gpa, size, uaddr, mmap_offset)
            _mmap_region(region, fd)
        finally:
            _close(fd)
        self._next_id += 1
        return region

    def _register(self, region: Region) -> None:
        """Add a mapped region to the table and the registry (which fills our gpa map)."""
        self._regions[region.id] = region
        try:
            self.registry.register(region.host_addr, region.host_len)
        except (MemMapError, ValueError) as exc:
            del self._regions[region.id]
            self._retire(region)
            raise GuestMemoryError(
                f"region gpa={region.guest_phys_addr:#x}: registration failed: {exc}"
            ) from exc

    def remove_region(self, gpa: int, size: int, uaddr: int | None = None) -> None:
        for region in self._regions.values():
            if region.guest_phys_addr == gpa and region.memory_size == size and (
                uaddr is None or region.userspace_addr == uaddr
            ):
                self._drop(region)
                self._changed()
                return
        raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x} to remove")

    def set_table(self, specs: Iterable[RegionSpec]) -> None:
        """Replace every region. Owns all fds. Every new region is checked and mapped before
        the old table goes, so a bad table leaves the old one in place; only a failure to
        register (out of memory for map tables) can leave the table empty."""
        specs = list(specs)
        new: list[Region] = []
        for n, (gpa, size, uaddr, offset, fd) in enumerate(specs):
            try:
                new.append(self._map_new(gpa, size, uaddr, offset, fd, new))
            except GuestMemoryError:
                for rest in specs[n + 1 :]:
                    _close(rest[4])
                for region in new:
                    self._retire(region)
                self.reap()
                raise
        self.clear()
        for n, region in enumerate(new):
            try:
                self._register(region)
            except GuestMemoryError:
                for rest in new[n + 1 :]:
                    self._retire(rest)
                self.clear()
                raise
        self._changed()

    def clear(self) -> None:
        """Unregister and unmap every region (disconnect)."""
        for region in list(self._regions.values()):
            self._drop(region)
        self._warned_unsealed = False  # a new table (or the next frontend) is warned again
        self._changed()

    def close(self) -> None:
        """clear() and give the map back to the registry. Mmaps still viewed are closed by
        CPython when their last view goes (the view keeps the mmap object alive)."""
        self.clear()
        if self._map is not None:
            self.registry.free_map(self._map)
            self._map = None
        self._pending_unmap.clear()

    def reap(self) -> int:
        """Close removed mmaps whose views are all gone; returns how many still wait."""
        waiting = []
        for mm in self._pending_unmap:
            try:
                mm.close()
            except BufferError:
                waiting.append(mm)
        self._pending_unmap = waiting
        return len(waiting)

    def _check_sealed(self, gpa: int, fd: int) -> None:
        if shrink_sealed(fd):
            return
        if self.require_sealed:
            raise GuestMemoryError(
                f"region gpa={gpa:#x}: fd is not sealed against shrinking (F_SEAL_SHRINK) "
                "and sealed guest memory is required"
            )
        if not self._warned_unsealed:
            self._warned_unsealed = True
            log.warning(
                "region gpa=%#x: fd is not sealed against shrinking; a frontend that truncates "
                "it would crash this process (SIGBUS). Use sealed memfds (QEMU's "
                "memory-backend-memfd default) or --require-sealed-memory",
                gpa,
            )

    def _check_new(self, gpa: int, size: int, uaddr: int, offset: int,
                   others: Iterable[Region]) -> None:
        where = f"region gpa={gpa:#x} size={size:#x}"
        if size <= 0:
            raise GuestMemoryError(f"{where}: size must be positive")
        if gpa & PAGE_MASK or size & PAGE_MASK:
            raise GuestMemoryError(f"{where}: gpa and size must be {PAGE_SIZE}-byte aligned")
        if gpa < 0 or gpa + size > GPA_LIMIT:
            raise GuestMemoryError(f"{where}: beyond the 48-bit guest address space")
        if offset < 0 or uaddr < 0 or uaddr + size > ADDR_LIMIT:
            raise GuestMemoryError(f"{where}: bad mmap_offset or userspace_addr")
        for r in others:
            if gpa < r.gpa_end and r.guest_phys_addr < gpa + size:
                raise GuestMemoryError(f"{where}: overlaps {r!r}")

    def _drop(self, region: Region) -> None:
        del self._regions[region.id]
        try:
            self.registry.unregister(region.host_addr, region.host_len)
        except MemMapError as exc:  # should not happen: log and still unmap
            log.error("unregister of %r failed: %s", region, exc)
        self._retire(region)

    def _retire(self, region: Region) -> None:
        if region.view is not None:
            region.view.release()
            region.view = None
        if region.mm is not None:
            self._pending_unmap.append(region.mm)
            region.mm = None

    def _changed(self) -> None:
        self._last = None
        self.generation += 1
        self.reap()

    # --------------------------------------------------------------- notify

    def _notify(
        self, mem_map: MemMap, ctx: object, action: NotifyAction, vaddr: int, length: int
    ) -> None:
        """Registry callback: mirror registrations of our regions into gpa translations."""
        end = vaddr + length
        for region in self._regions.values():
            lo = max(vaddr, region.host_addr)
            hi = min(end, region.host_addr + region.host_len)
            if lo >= hi:
                continue  # not ours (another connection's region, or another of ours)
            # host byte h holds guest byte h - host_addr + view_gpa; keep to the region.
            gpa_lo = max(region.guest_phys_addr, lo - region.host_addr + region.view_gpa)
            gpa_hi = min(region.gpa_end, hi - region.host_addr + region.view_gpa)
            gpa_lo &= ~PAGE_MASK
            gpa_hi = (gpa_hi + PAGE_MASK) & ~PAGE_MASK
            if action == NotifyAction.REGISTER:
                mem_map.set_translation(gpa_lo, gpa_hi - gpa_lo, region.id)
            else:
                mem_map.clear_translation(gpa_lo, gpa_hi - gpa_lo)

    # ------------------------------------------------------------ translate

    def translate(self, gpa: int, length: int) -> list[memoryview]:
        """Zero-copy views of guest memory [gpa, gpa + length), split at region borders."""
        r = self._last
        if r is not None and r.guest_phys_addr <= gpa and gpa + length <= r.gpa_end and length > 0:
            off = gpa - r.view_gpa
            return [r.view[off : off + length]]  # type: ignore[index]
        if length == 0:
            return []
        return self._translate_slow(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """One contiguous view (ring structures); raises if it would cross a region."""
        r = self._last
        if r is None or not (r.guest_phys_addr <= gpa and gpa + length <= r.gpa_end):
            views = self._translate_slow(gpa, length) if length > 0 else []
            if len(views) != 1:
                raise GuestMemoryError(
                    f"gpa={gpa:#x} len={length:#x} is not inside one guest memory region"
                )
            return views[0]
        off = gpa - r.view_gpa
        return r.view[off : off + length]  # type: ignore[index]

    def _translate_slow(self, gpa: int, length: int) -> list[memoryview]:
        what = f"buffer gpa={gpa:#x} len={length:#x}"
        if gpa < 0 or length < 0 or gpa + length > ADDR_LIMIT:
            raise GuestMemoryError(f"{what} wraps past 2^64")
        if gpa + length > GPA_LIMIT:
            raise GuestMemoryError(f"{what} is not in guest memory (beyond 2^48)")
        if self._map is None:
            raise GuestMemoryError(f"{what}: guest memory is closed")
        end = gpa + length
        views: list[memoryview] = []
        cur = gpa
        while cur < end:
            rid, run = self._map.translate(cur, size=end - cur)
            region = self._regions.get(rid)
            if region is None or region.view is None:
                raise GuestMemoryError(f"{what}: gpa {cur:#x} is not in guest memory")
            n = min(run, end - cur, region.gpa_end - cur)
            off = cur - region.view_gpa
            views.append(region.view[off : off + n])
            self._last = region
            cur += n
        return views

    def uva_to_gpa(self, uva: int) -> int:
        """Guest physical address of a frontend virtual address (ring addresses)."""
        for r in self._regions.values():
            if r.userspace_addr <= uva < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + (uva - r.userspace_addr)
        raise GuestMemoryError(f"frontend address {uva:#x} is in no guest memory region")


def _same_region(prev: int, cur: int) -> bool:
    return prev == cur


def on_hugetlbfs(fd: int) -> bool:
    """Whether ``fd`` is a hugetlbfs file (a MFD_HUGETLB memfd, or a file on /dev/hugepages)."""
    buf = ctypes.create_string_buffer(STATFS_BYTES)
    if _libc.fstatfs(fd, buf) != 0:
        return False  # not a file on a filesystem: mmap will say what is wrong
    return ctypes.c_long.from_buffer(buf).value == HUGETLBFS_MAGIC


def _mmap_region(region: Region, fd: int) -> None:
    """mmap the region's fd from the page-aligned offset at or below mmap_offset."""
    aligned = region.mmap_offset & ~(mmap.ALLOCATIONGRANULARITY - 1)
    delta = region.mmap_offset - aligned
    length = delta + region.memory_size
    noreserve = 0 if on_hugetlbfs(fd) else MAP_NORESERVE
    try:
        mm = mmap.mmap(
            fd,
            length,
            flags=mmap.MAP_SHARED | noreserve,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
    except (OSError, ValueError, OverflowError) as exc:
        raise GuestMemoryError(
            f"region gpa={region.guest_phys_addr:#x}: mmap of fd {fd} "
            f"({length:#x} bytes at offset {aligned:#x}) failed: {exc}"
        ) from exc
    region.mm = mm
    # The exported c_char is dropped at once, releasing its buffer export.
    region.host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    region.host_len = (length + PAGE_MASK) & ~PAGE_MASK
    region.view = memoryview(mm)
    region.view_gpa = region.guest_phys_addr - delta


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
