"""The dirty log of live migration (vhost-user.rst "Migration", LOG_SHMFD), without sockets.

While VHOST_F_LOG_ALL is negotiated, every guest page the backend writes is marked in a bitmap
the frontend shares with us (SET_LOG_BASE: an fd, ``mmap_size`` and ``mmap_offset``): bit
``page % 8`` of byte ``page // 8``, one bit per 4 KiB guest-physical page (``VHOST_LOG_PAGE``).
QEMU fetches and clears it concurrently with atomic exchanges of 64-bit words, so the log must
never lose a bit QEMU has not collected yet.

How that is guaranteed: bits are only ever added. A byte that gets some of its bits is updated
by read-modify-write (``byte | mask``) and a byte that gets all eight by a plain store of 0xFF,
both under one lock per log, so two backend threads never race on a byte. Against QEMU the
read-modify-write is safe: if QEMU's exchange lands between our read and our write, our write
sets again bits QEMU already collected (the page is sent once more), and never clears one,
because what we write is what we read plus our bits. A store of 0xFF sets everything. So every
bit set since QEMU's last exchange is still set at its next one
(tests/vhostmem/test_dirty_log.py runs a C collector doing exactly QEMU's exchanges against it).

Bounds: the log covers guest addresses below ``mmap_size * 8 * 4096``; a range beyond it is
not marked (it cannot be: there is no byte for it) and is reported by :meth:`DirtyLog.mark`
returning False. SET_LOG_BASE refuses a log too small for the memory table, so that happens only
for a guest address outside guest memory, which no write of ours reaches.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Callable, Iterable

from vhostmem.sealed_region import map_sealed

LOG_PAGE_SHIFT = 12  # VHOST_LOG_PAGE: 4 KiB per bit
BITS_PER_BYTE_SHIFT = 3
BYTE_PAGES = 1 << BITS_PER_BYTE_SHIFT
BYTE_BIT_MASK = BYTE_PAGES - 1  # a page's bit within its byte
FULL_BYTE = 0xFF
# __atomic_fetch_or_1(ptr, value, memorder) from libatomic (GCC's runtime), for logs several
# processes mark (DirtyLog.share); None when the library is not installed.
ATOMIC_SEQ_CST = 5


def _load_atomic_or() -> Callable[[int, int, int], int] | None:
    name = ctypes.util.find_library("atomic")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).__atomic_fetch_or_1
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    fn.restype = ctypes.c_uint8
    return fn  # type: ignore[no-any-return]


_ATOMIC_OR = _load_atomic_or()
# Largest log accepted: 2^48 bytes of guest memory at one bit per 4 KiB.
MAX_LOG_SIZE = 1 << (48 - LOG_PAGE_SHIFT - BITS_PER_BYTE_SHIFT)


class DirtyLogError(ValueError):
    """A SET_LOG_BASE that cannot be used (names what is wrong)."""


def log_bytes_for(gpa_end: int) -> int:
    """Bytes of log that cover guest addresses below ``gpa_end``."""
    pages = (gpa_end + (1 << LOG_PAGE_SHIFT) - 1) >> LOG_PAGE_SHIFT
    return (pages + BYTE_PAGES - 1) >> BITS_PER_BYTE_SHIFT


class DirtyLog:
    """A mapped log: owns the fd and the mapping."""

    def __init__(self, fd: int, mm: mmap.mmap, mmap_offset: int = 0) -> None:
        self.fd = fd
        self.mm = mm
        self.size = len(mm)
        self.mmap_offset = mmap_offset  # where the log starts in fd (handed to workers)
        self.lock = threading.Lock()
        self.marks = 0  # mark() calls that set something (for tests and stats)
        # Several processes mark this log (data-plane workers): see share().
        self.shared = False
        self._base = 0  # the mapping's address, for atomic ORs (shared)

    @classmethod
    def attach(cls, fd: int, mmap_size: int, mmap_offset: int, gpa_end: int) -> DirtyLog:
        """Map a SET_LOG_BASE log covering guest memory up to ``gpa_end``. Takes ownership of
        ``fd``: it is closed on error."""

        def check_size() -> None:
            if not 0 < mmap_size <= MAX_LOG_SIZE:
                raise DirtyLogError(f"mmap_size {mmap_size} not in 1..{MAX_LOG_SIZE}")
            needed = log_bytes_for(gpa_end)
            if mmap_size < needed:
                raise DirtyLogError(
                    f"mmap_size {mmap_size} is smaller than the {needed} bytes guest memory up "
                    f"to {gpa_end:#x} needs")

        return cls(fd, map_sealed(fd, mmap_size, mmap_offset, "dirty log", DirtyLogError,
                                  check_size), mmap_offset)

    def covers(self, gpa_end: int) -> bool:
        return log_bytes_for(gpa_end) <= self.size

    def mark(self, gpa: int, length: int) -> bool:
        """Mark the pages of guest [gpa, gpa + length) dirty; False if the range is not
        (wholly) inside the log, in which case nothing is marked."""
        return self.mark_ranges(((gpa, length),)) is None

    def mark_ranges(self, ranges: Iterable[tuple[int, int]]) -> tuple[int, int] | None:
        """Mark every (gpa, length) range under one lock (what one completion wrote). Returns
        the last range not wholly inside the log (that one is not marked), else None."""
        mm, size = self.mm, self.size
        outside = None
        with self.lock:
            for gpa, length in ranges:
                if length <= 0:
                    continue
                first = gpa >> LOG_PAGE_SHIFT
                last = (gpa + length - 1) >> LOG_PAGE_SHIFT
                lo, hi = first >> BITS_PER_BYTE_SHIFT, last >> BITS_PER_BYTE_SHIFT
                if gpa < 0 or hi >= size:
                    outside = (gpa, length)
                elif self.shared:
                    self._mark_shared(first, last, lo, hi)
                elif lo == hi:  # the common case: a buffer within 8 pages' byte
                    mm[lo] |= ((2 << (last & BYTE_BIT_MASK)) - 1) & ~(
                        (1 << (first & BYTE_BIT_MASK)) - 1)
                else:
                    mm[lo] |= _span_mask(first, (lo << BITS_PER_BYTE_SHIFT) + BYTE_PAGES - 1)
                    if hi - lo > 1:
                        mm[lo + 1 : hi] = bytes([FULL_BYTE]) * (hi - lo - 1)
                    mm[hi] |= _span_mask(hi << BITS_PER_BYTE_SHIFT, last)
            self.marks += 1
        return outside

    def share(self) -> None:
        """Other processes mark this log too (data-plane workers, docs/migration.md). The
        read-modify-write of a partial byte is only safe under one process's lock: across
        processes it is one atomic OR instruction (libatomic's ``__atomic_fetch_or_1``, a
        ``lock or`` on x86-64), and without libatomic every touched byte is stored whole
        (0xFF: up to 7 neighbouring pages over-marked, i.e. sent once more; never a bit lost).
        Whole bytes are plain stores in both cases: setting all eight bits loses nothing."""
        self.shared = True
        if _ATOMIC_OR is not None:
            self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))

    def _mark_shared(self, first: int, last: int, lo: int, hi: int) -> None:
        mm = self.mm
        if _ATOMIC_OR is None:
            mm[lo : hi + 1] = bytes([FULL_BYTE]) * (hi - lo + 1)
            return
        if lo == hi:
            self._or_byte(lo, _span_mask(first, last))
            return
        self._or_byte(lo, _span_mask(first, (lo << BITS_PER_BYTE_SHIFT) + BYTE_PAGES - 1))
        if hi - lo > 1:
            mm[lo + 1 : hi] = bytes([FULL_BYTE]) * (hi - lo - 1)
        self._or_byte(hi, _span_mask(hi << BITS_PER_BYTE_SHIFT, last))

    def _or_byte(self, index: int, mask: int) -> None:
        """Set ``mask`` in byte ``index`` atomically, unless it is set already: the guest
        write being logged is globally visible before this check (mark_ranges took the lock
        after it: a locked instruction, a full fence on x86-64, so the check cannot pass the
        write), so a bit still set is collected by QEMU after that write, and a bit QEMU
        clears after the check reports the write too. A hot buffer's page (a driver's request
        slots) costs one read instead of a call."""
        if self.mm[index] & mask != mask:
            _ATOMIC_OR(self._base + index, mask, ATOMIC_SEQ_CST)

    def mark_all(self) -> None:
        """Every page the log covers: bits only set, as in mark()."""
        with self.lock:
            self.mm[:] = bytes([FULL_BYTE]) * self.size
            self.marks += 1

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.mm.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _span_mask(first: int, last: int) -> int:
    """Bits of pages first..last, which lie in one byte."""
    lo, hi = first & BYTE_BIT_MASK, last & BYTE_BIT_MASK
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)
