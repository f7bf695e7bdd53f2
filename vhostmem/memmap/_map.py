"""MemMap: a 3-level address -> translation map (1 GiB tables, 2 MiB entries, 4 KiB splits).

Layout: ``_l1`` holds 2^18 tables (Python lists of 512 ints), one per 1 GiB of the 48-bit space.
Unallocated slots all point at one shared, never-written ``_default_table`` so that a lookup is
two list subscripts with no ``None`` test. A 2 MiB entry that holds the ``_SPLIT`` marker has its
512 4 KiB translations in ``_split[frame]``; an entry is split only while its 4 KiB translations
differ (a uniform split entry collapses back), so ``_split`` stays as small as the layout allows.

Writers hold ``_lock``; readers take no lock (list subscripts are atomic under the GIL). Writes
are ordered so a lock-free reader never sees a marker without its sub-table, and a reader that
loses a race with an un-split retries.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vhostmem.memmap._common import (
    ENTRIES,
    ENTRY_MASK,
    L1_ENTRIES,
    MASK_2M,
    MASK_4K,
    PAGE_2M,
    PAGE_4K,
    SHIFT_1G,
    SHIFT_2M,
    SHIFT_4K,
    SUB_ENTRIES,
    SUB_MASK,
    VA_BITS,
    VA_LIMIT,
    MapOps,
    MemMapError,
    bad_vaddr,
    check_range,
    check_translation,
)

if TYPE_CHECKING:
    import numpy as np

    from vhostmem.memmap._mirror import Mirror

# Marker stored in a 2 MiB entry whose translations are kept per 4 KiB page.
_SPLIT: Any = object()
# Bits between a 2 MiB frame number and its 1 GiB table index.
_FRAME_TO_TABLE = SHIFT_1G - SHIFT_2M
# Beyond the 2^18 real slots, as many again point at a table of markers: an address in
# [2^48, 2^49) or a small negative one (a negative index counts from the end) lands there and
# takes the slow path, which rejects it; anything further out raises IndexError.
_GUARD_TABLE: list[Any] = [_SPLIT] * ENTRIES


def _new_l1(shared: list[int]) -> list[list[int]]:
    return [shared] * L1_ENTRIES + [_GUARD_TABLE] * L1_ENTRIES


class MemMap:
    """Translations for the 48-bit address space; see the package docstring for the API."""

    __slots__ = (
        "__weakref__",
        "_are_contiguous",
        "_default",
        "_default_table",
        "_freed",
        "_l1",
        "_lock",
        "_mirror",
        "_split",
        "ctx",
        "ops",
    )

    def __init__(self, default_translation: int = 0, ops: MapOps | None = None,
                 ctx: Any = None) -> None:
        self._default = check_translation(default_translation)
        self.ops = ops if ops is not None else MapOps()
        self.ctx = ctx
        self._are_contiguous = self.ops.are_contiguous
        self._default_table: list[int] = [self._default] * ENTRIES
        self._l1 = _new_l1(self._default_table)
        self._split: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self._mirror: Mirror | None = None
        self._freed = False

    @property
    def default_translation(self) -> int:
        return self._default

    # ----------------------------------------------------------------- lookups (hot path)

    def lookup(self, vaddr: int) -> int:
        """Translation of ``vaddr`` only: the cheapest lookup (no size, no tuple)."""
        try:
            value = self._l1[vaddr >> SHIFT_1G][(vaddr >> SHIFT_2M) & ENTRY_MASK]
        except IndexError:
            raise bad_vaddr(vaddr) from None
        if value is _SPLIT:
            return self._lookup_split(vaddr)[0]
        return value

    def translate(self, vaddr: int, size: int | None = None) -> tuple[int, int]:
        """Return ``(translation, size)`` for ``vaddr``.

        Without ``size``: the bytes from ``vaddr`` to the end of its page (2 MiB, or 4 KiB in a
        split entry). With ``size``: that page remainder, extended page by page while the map's
        ``are_contiguous(prev, cur)`` holds, capped at ``size`` (no extension for the default
        translation or without ``are_contiguous``, as in SPDK).
        """
        try:
            value = self._l1[vaddr >> SHIFT_1G][(vaddr >> SHIFT_2M) & ENTRY_MASK]
        except IndexError:
            raise bad_vaddr(vaddr) from None
        if value is _SPLIT:
            value, cur = self._lookup_split(vaddr)
        else:
            cur = PAGE_2M - (vaddr & MASK_2M)
        if size is None:
            return value, cur
        if size <= cur or self._are_contiguous is None or value == self._default:
            return value, min(size, cur)
        return value, self._extend(vaddr + cur, value, cur, size)

    def _lookup_split(self, vaddr: int) -> tuple[int, int]:
        """Slow path: a split entry, or an address outside the 48-bit space (whose top-level
        slot holds the ``_SPLIT`` marker so the fast path needs no range test)."""
        if vaddr >> VA_BITS:
            raise bad_vaddr(vaddr)
        try:
            sub = self._split[vaddr >> SHIFT_2M]
        except KeyError:  # a writer collapsed the entry after we read the marker: read again
            value = self._l1[vaddr >> SHIFT_1G][(vaddr >> SHIFT_2M) & ENTRY_MASK]
            if value is _SPLIT:
                return self._lookup_split(vaddr)
            return value, PAGE_2M - (vaddr & MASK_2M)
        return sub[(vaddr >> SHIFT_4K) & SUB_MASK], PAGE_4K - (vaddr & MASK_4K)

    def _extend(self, pos: int, prev: int, cur: int, size: int) -> int:
        """Grow ``cur`` over the pages from ``pos`` while they continue ``prev``."""
        are_contiguous = self._are_contiguous
        assert are_contiguous is not None
        while cur < size and pos < VA_LIMIT:
            value = self._l1[pos >> SHIFT_1G][(pos >> SHIFT_2M) & ENTRY_MASK]
            if value is _SPLIT:
                value, step = self._lookup_split(pos)
            else:
                step = PAGE_2M - (pos & MASK_2M)
            if not are_contiguous(prev, value):
                break
            prev = value
            cur += step
            pos += step
        return min(cur, size)

    def translate_many(self, addresses: Iterable[int] | np.ndarray) -> np.ndarray:
        """Translations of a batch of addresses as a numpy ``uint64`` array of the same shape."""
        from vhostmem.memmap._mirror import Mirror

        with self._lock:
            if self._mirror is None:
                self._mirror = Mirror(self._default)
                self._mirror.mark_all(self._l1, self._default_table, self._split)
            self._mirror.sync(self._l1, self._default_table, self._split, _SPLIT)
            return self._mirror.translate(addresses)

    # ----------------------------------------------------------------- writes

    def set_translation(self, vaddr: int, size: int, translation: int) -> None:
        """Store ``translation`` (the same value) for every page of ``[vaddr, vaddr+size)``.

        Raises MemMapError EINVAL for a bad range or value, ENOMEM if a table cannot be
        allocated (the translations are then unchanged).
        """
        vaddr, size = check_range("set_translation", vaddr, size)
        translation = check_translation(translation)
        with self._lock:
            self._check_alive()
            self._set(vaddr, vaddr + size, translation)

    def clear_translation(self, vaddr: int, size: int) -> None:
        """Reset ``[vaddr, vaddr+size)`` to the default translation."""
        vaddr, size = check_range("clear_translation", vaddr, size)
        with self._lock:
            self._check_alive()
            self._set(vaddr, vaddr + size, self._default)

    def preallocate(self, vaddr: int, size: int) -> None:
        """Allocate the 1 GiB tables covering a range now (used by ``MemRegistry.reserve``)."""
        vaddr, size = check_range("reserve", vaddr, size)
        if size:
            with self._lock:
                self._ensure_tables(vaddr >> SHIFT_1G, (vaddr + size - 1) >> SHIFT_1G)

    def _check_alive(self) -> None:
        if self._freed:
            raise MemMapError(errno.EINVAL, "this map was freed")

    def _set(self, start: int, end: int, value: int) -> None:
        if start == end:
            return
        self._ensure_tables(start >> SHIFT_1G, (end - 1) >> SHIFT_1G)
        # Split the range into a partial head frame, whole 2 MiB frames and a partial tail frame.
        head_end = min(end, (start | MASK_2M) + 1) if start & MASK_2M else start
        tail_start = max(end & ~MASK_2M, head_end)
        if head_end < tail_start:
            self._set_frames(head_end >> SHIFT_2M, tail_start >> SHIFT_2M, value)
        if start < head_end:
            self._set_pages(start, head_end, value)
        if tail_start < end:
            self._set_pages(tail_start, end, value)

    def _ensure_tables(self, first: int, last: int) -> None:
        """Allocate tables first..last; on MemoryError drop the new ones and raise ENOMEM."""
        l1 = self._l1
        shared = self._default_table
        new: list[int] = []
        try:
            for index in range(first, last + 1):
                if l1[index] is shared:
                    l1[index] = [self._default] * ENTRIES
                    new.append(index)
        except MemoryError as exc:
            for index in new:
                l1[index] = shared
            raise MemMapError(errno.ENOMEM, "out of memory allocating a 1 GiB table") from exc
        if new and self._mirror is not None:
            self._mirror.mark_tables(new)

    def _set_frames(self, first: int, stop: int, value: int) -> None:
        """Set whole 2 MiB frames ``first..stop-1`` with one slice store per 1 GiB table."""
        l1 = self._l1
        t_first, t_last = first >> _FRAME_TO_TABLE, (stop - 1) >> _FRAME_TO_TABLE
        fill = [value] * ENTRIES if t_last - t_first > 1 else None
        for index in range(t_first, t_last + 1):
            lo = first - (index << _FRAME_TO_TABLE) if index == t_first else 0
            hi = stop - (index << _FRAME_TO_TABLE) if index == t_last else ENTRIES
            if fill is not None and hi - lo == ENTRIES:
                l1[index][:] = fill
            else:
                l1[index][lo:hi] = [value] * (hi - lo)
        if self._split:
            # The marker was overwritten above before the sub-tables go (lock-free readers).
            for frame in [f for f in self._split if first <= f < stop]:
                del self._split[frame]
                if self._mirror is not None:
                    self._mirror.mark_frame(frame)
        if self._mirror is not None:
            self._mirror.mark_tables(range(t_first, t_last + 1))

    def _set_pages(self, start: int, end: int, value: int) -> None:
        """Set 4 KiB pages ``[start, end)`` inside one 2 MiB frame, splitting it if needed."""
        frame = start >> SHIFT_2M
        table = self._l1[frame >> _FRAME_TO_TABLE]
        slot = frame & ENTRY_MASK
        lo = (start >> SHIFT_4K) & SUB_MASK
        hi = ((end - 1) >> SHIFT_4K & SUB_MASK) + 1
        current = table[slot]
        if current is _SPLIT:
            sub = self._split[frame]
            sub[lo:hi] = [value] * (hi - lo)
            if sub.count(value) == SUB_ENTRIES:  # uniform again: fold back into one entry
                table[slot] = value
                del self._split[frame]
        elif current != value:
            sub = [current] * SUB_ENTRIES
            sub[lo:hi] = [value] * (hi - lo)
            self._split[frame] = sub  # published before the marker (lock-free readers)
            table[slot] = _SPLIT
        else:
            return
        if self._mirror is not None:
            self._mirror.mark_frame(frame)
            self._mirror.mark_tables((frame >> _FRAME_TO_TABLE,))

    # ----------------------------------------------------------------- bookkeeping

    def stats(self) -> dict[str, int]:
        """How many 1 GiB tables and split 2 MiB entries this map holds."""
        shared = self._default_table
        return {
            "tables": sum(1 for table in self._l1[:L1_ENTRIES] if table is not shared),
            "split_entries": len(self._split),
        }

    def release(self) -> None:
        """Drop every table (after ``MemRegistry.free_map``); later writes raise EINVAL."""
        with self._lock:
            self._freed = True
            self._l1 = _new_l1(self._default_table)
            self._split = {}
            self._mirror = None
