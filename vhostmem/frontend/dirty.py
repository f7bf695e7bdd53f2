"""The frontend's side of the dirty log of live migration (vhost-user.rst "Migration").

QEMU gives the backend a bitmap in shared memory (SET_LOG_BASE with LOG_SHMFD): one bit per
4 KiB guest-physical page, bit ``page % 8`` of byte ``page // 8``. While VHOST_F_LOG_ALL is
negotiated the backend sets the bit of every page it writes; QEMU collects the log word by word
and clears what it collected. `DirtyBitmap` is that bitmap, allocated and sized the way QEMU
does (hw/virtio/vhost.c: `vhost_get_log_size`, `vhost_log_alloc`):

- the size is counted in u64 chunks of 64 pages: ``last_gpa // (4096 * 64) + 1`` over the
  memory regions, ``mmap_size = chunks * 8``, ``mmap_offset = 0``;
- the memory is a memfd sealed against growing, shrinking and further sealing
  (`qemu_memfd_alloc(..., F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)`).

`fetch_and_clear` reads each word and zeroes the nonzero ones. QEMU uses an atomic exchange per
word; Python has none, so a bit a backend sets between our read and our store of zero would be
lost: call it while the backend writes nothing (no request in flight), as the tests do.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterable

from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.ring import RING_HEADER, U16_MASK, USED_ENTRY, SplitRing, ring_sizes

LOG_PAGE_SHIFT = 12  # VHOST_LOG_PAGE = 4 KiB of guest-physical memory per bit
LOG_PAGE = 1 << LOG_PAGE_SHIFT
LOG_WORD = 8  # QEMU's vhost_log_chunk_t is a u64
LOG_BITS = LOG_WORD * 8
LOG_CHUNK = LOG_PAGE * LOG_BITS  # guest bytes covered by one u64 of log (VHOST_LOG_CHUNK)
# What QEMU seals the log memfd with (vhost_log_alloc -> qemu_memfd_alloc).
LOG_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def log_size_for(regions: Iterable[tuple[int, int]]) -> int:
    """Bytes of log QEMU allocates for (guest_phys_addr, memory_size) regions: u64 chunks up to
    the chunk holding the last guest address, times 8 (at least one chunk)."""
    chunks = 0
    for gpa, size in regions:
        if size > 0:
            chunks = max(chunks, (gpa + size - 1) // LOG_CHUNK + 1)
    return max(chunks, 1) * LOG_WORD


def pages_of(gpa: int, length: int) -> set[int]:
    """Log page numbers (guest-physical address >> 12) that bytes [gpa, gpa+length) touch."""
    if length <= 0:
        return set()
    return set(range(gpa >> LOG_PAGE_SHIFT, ((gpa + length - 1) >> LOG_PAGE_SHIFT) + 1))


def used_ring_pages(ring: SplitRing) -> set[int]:
    """Every page of the ring's used ring (flags, idx, entries, avail_event): all a device
    may write there."""
    return pages_of(ring.addr.used, ring_sizes(ring.num)[2])


def used_write_pages(ring: SplitRing, start: int, end: int) -> set[int]:
    """Pages a device writes when it completes used entries ``start`` up to ``end`` (free
    running 16-bit indices, as `SplitRing.last_used`): those entries and used idx."""
    used = ring.addr.used
    out = pages_of(used + 2, 2) if start != end else set()
    for k in range((end - start) & U16_MASK):
        out |= pages_of(used + RING_HEADER + USED_ENTRY * ((start + k) % ring.num), USED_ENTRY)
    return out


class DirtyBitmap:
    """A dirty log in a sealed memfd, mapped shared; `fd` goes to SET_LOG_BASE."""

    def __init__(self, size: int, *, name: str = "vhost-log") -> None:
        if size <= 0:
            raise ValueError(f"log size {size} must be positive")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, LOG_SEALS)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise

    @classmethod
    def for_ram(cls, ram: GuestRam) -> DirtyBitmap:
        """A log sized for every region of `ram`, as QEMU sizes it for its memory table."""
        return cls(log_size_for((r.guest_phys_addr, r.memory_size) for r in ram.regions))

    @property
    def payload(self) -> dict[str, int]:
        """The SET_LOG_BASE payload (`VhostUserLog`) for this log."""
        return {"mmap_size": self.size, "mmap_offset": 0}

    @property
    def covers_below(self) -> int:
        """Guest-physical addresses below this have a bit in the log."""
        return self.size * 8 * LOG_PAGE

    def peek(self) -> set[int]:
        """Dirty page numbers, without clearing them."""
        return log_pages(bytes(self.mm))

    def fetch_and_clear(self) -> set[int]:
        """Dirty page numbers since the last fetch; their bits are cleared (word by word, not
        atomically: see the module docstring)."""
        mm, dirty = self.mm, set()
        snapshot = bytes(mm)
        for off in range(0, self.size, LOG_WORD):
            word = snapshot[off:off + LOG_WORD]  # the last one is short for odd sizes
            if any(word):
                mm[off:off + len(word)] = bytes(len(word))
                dirty |= log_pages(word, off)
        return dirty

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            with contextlib.suppress(BufferError):
                self.mm.close()
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirtyBitmap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def log_pages(data: bytes, byte_offset: int = 0) -> set[int]:
    """Page numbers of the set bits of `data`, the log bytes starting at `byte_offset`."""
    out = set()
    value = int.from_bytes(data, "little")
    base = byte_offset * 8
    while value:
        low = value & -value
        out.add(base + low.bit_length() - 1)
        value ^= low
    return out
