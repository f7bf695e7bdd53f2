"""MemMap: a 3-level address -> translation map (1 GiB tables, 2 MiB entries, 4 KiB splits).

Layout: ``_l1`` holds 2^18 tables (Python lists of 512 ints), one per 1 GiB of the 48-bit space.
Unallocated slots all point at one shared, never-written ``_default_table`` so that a lookup is
two list subscripts with no ``None`` test. A 2 MiB entry that holds the ``_SPLIT`` marker has its
512 4 KiB translations in ``_split[frame]``; an entry is split only while its 4 KiB translations
differ (a uniform split entry collapses back), so ``_split`` stays as small as the layout allows.

Writers hold ``_lock``; readers take no lock (list subscripts are atomic under the GIL). Writes
are ordered so a lock-free reader never sees a marker without its sub-table, and a reader that
loses a race with an un-split retries.

A write is all or nothing: it first builds every list it needs (new or changed 1 GiB tables,
4 KiB sub-tables, fill lists) without touching the map, so a MemoryError there is ENOMEM with
the map unchanged; then it only stores references (a whole table into ``_l1``, a few entries in
place, markers, sub-tables under existing keys), which allocate nothing. The one store that can
grow a dict, a new key in ``_split``, is made during preparation (no marker points at it yet)
and undone on failure.
"""

from __future__ import annotations

import contextlib
import errno
import operator
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


# A write makes every list it needs (1 GiB tables, 4 KiB sub-tables, fill lists) through these
# two, before its first store; tests replace them to make the Nth allocation fail.
def _filled(value: Any, length: int) -> list[Any]:
    return [value] * length


def _copied(items: list[Any]) -> list[Any]:
    return items.copy()


def _check_size(size: Any) -> int:
    """The ``size`` of ``translate`` when it is not a plain non-negative int (slow path)."""
    try:
        size = operator.index(size)
    except TypeError:
        kind = type(size).__name__
        raise MemMapError(errno.EINVAL, f"translate: size must be an integer, not {kind}") from None
    if size < 0:
        raise MemMapError(errno.EINVAL, f"translate: size {size} is negative")
    return size


# What a write does to a partial 2 MiB frame (see MemMap._prepare_pages).
_NEW_SPLIT, _NEW_SUB, _FOLD = 0, 1, 2
# A write of up to this many entries of an existing 1 GiB table stores them one by one (no
# allocation); more, and it builds a changed copy of the table (cheaper than item stores).
_IN_PLACE_MAX = 64
_Store = tuple[int, int, int]  # (table index, lo, hi): entries lo..hi-1 set in place


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
        translation or without ``are_contiguous``, as in SPDK). A ``size`` that is negative or
        not an integer is EINVAL.
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
        if size.__class__ is not int or size < 0:
            size = _check_size(size)
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

    def translate_many(self, addresses: Iterable[int] | np.ndarray,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Translations of a batch of addresses as a numpy ``uint64`` array of the same shape.

        ``out``: a C-contiguous, writable numpy ``uint64`` array with one element per address
        (any shape) to write the translations into, and return, instead of a new array; it may
        be the addresses array itself. Anything else is EINVAL.
        """
        from vhostmem.memmap._mirror import Mirror

        with self._lock:
            if self._mirror is None:
                self._mirror = Mirror(self._default)
                self._mirror.mark_all(self._l1, self._default_table, self._split)
            self._mirror.sync(self._l1, self._default_table, self._split, _SPLIT)
            return self._mirror.translate(addresses, out)

    # ----------------------------------------------------------------- writes

    def set_translation(self, vaddr: int, size: int, translation: int) -> None:
        """Store ``translation`` (the same value) for every page of ``[vaddr, vaddr+size)``.

        Raises MemMapError EINVAL for a bad range or value, ENOMEM if a table cannot be
        allocated (the translations are then unchanged, and no table is added).
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

    def set_translations(self, vaddrs: Any, lengths: Any, translations: Any) -> None:
        """Many ``set_translation`` calls at once, all or nothing: range ``i`` is
        ``[vaddrs[i], vaddrs[i] + lengths[i])`` and gets ``translations[i]`` (or
        ``translations`` itself when it is one integer). Where ranges overlap the later one
        wins, as with successive calls. Any sequences or numpy arrays of integers.

        EINVAL (nothing changed) if any range or value is bad; ENOMEM (nothing changed) if a
        table cannot be allocated. Batches of whole 2 MiB frames are written table by table
        from numpy arrays, so their cost is per 1 GiB table touched, not per range.
        """
        from vhostmem.memmap import _batch

        starts, sizes = _batch.check_ranges("set_translations", vaddrs, lengths)
        values = _batch.check_values("set_translations", translations, starts.size)
        with self._lock:
            self._check_alive()
            self._set_batch(starts, sizes, values)

    def clear_translations(self, vaddrs: Any, lengths: Any) -> None:
        """Many ``clear_translation`` calls at once, all or nothing (see ``set_translations``)."""
        from vhostmem.memmap import _batch

        starts, sizes = _batch.check_ranges("clear_translations", vaddrs, lengths)
        values = _batch.check_values("clear_translations", self._default, starts.size)
        with self._lock:
            self._check_alive()
            self._set_batch(starts, sizes, values)

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
        """Store ``value`` over ``[start, end)`` all or nothing: every list the write needs is
        made first (ENOMEM, map unchanged, if one cannot be); then come only stores that
        allocate nothing, ordered for lock-free readers."""
        if start == end:
            return
        # A partial head frame, whole 2 MiB frames [f_first, f_stop), a partial tail frame.
        head_end = min(end, (start | MASK_2M) + 1) if start & MASK_2M else start
        tail_start = max(end & ~MASK_2M, head_end)
        f_first, f_stop = head_end >> SHIFT_2M, tail_start >> SHIFT_2M
        split = self._split
        pages: list[tuple[int, int, list[int] | None]] = []  # (kind, frame, sub-table)
        published: list[int] = []
        try:
            indexes, new_tables, stores = self._prepare_tables(
                start >> SHIFT_1G, (end - 1) >> SHIFT_1G, f_first, f_stop, value)
            if start < head_end:
                self._prepare_pages(start, head_end, value, pages)
            if tail_start < end:
                self._prepare_pages(tail_start, end, value, pages)
            if not split or f_first >= f_stop:
                dropped: list[int] | tuple[()] = ()
            elif f_stop - f_first < len(split):
                dropped = [f for f in range(f_first, f_stop) if f in split]
            else:
                dropped = [f for f in split if f_first <= f < f_stop]
            for kind, frame, sub in pages:
                if kind == _NEW_SPLIT:  # no marker points here yet: invisible to readers
                    split[frame] = sub  # a new key may grow the dict
                    published.append(frame)
        except MemoryError as exc:
            for frame in published:
                del split[frame]
            raise MemMapError(errno.ENOMEM, "out of memory allocating a memory-map table") from exc
        l1 = self._l1
        if new_tables:
            for index, table in zip(indexes, new_tables, strict=True):
                l1[index] = table
        for index, lo, hi in stores:
            table = l1[index]
            for slot in range(lo, hi):
                table[slot] = value
        for frame in dropped:  # after the stores that overwrote their markers
            del split[frame]
        for kind, frame, sub in pages:
            if kind == _NEW_SPLIT:
                l1[frame >> _FRAME_TO_TABLE][frame & ENTRY_MASK] = _SPLIT
            elif kind == _NEW_SUB:
                split[frame] = sub  # an existing key: replaced in place
            else:  # _FOLD: the frame is uniform again
                l1[frame >> _FRAME_TO_TABLE][frame & ENTRY_MASK] = value
                del split[frame]
        if self._mirror is not None:
            self._mark_mirror(indexes, stores, dropped, pages)

    def _set_batch(self, starts: np.ndarray, sizes: np.ndarray, values: np.ndarray) -> None:
        keep = sizes > 0
        if not keep.all():
            starts, sizes, values = starts[keep], sizes[keep], values[keep]
        if not starts.size:
            return
        from vhostmem.memmap import _batch

        if _batch.whole_frames(starts, sizes):
            self._set_frames(starts, sizes, values)
        else:
            self._set_each(starts.tolist(), sizes.tolist(), values.tolist())

    def _set_frames(self, starts: np.ndarray, sizes: np.ndarray, values: np.ndarray) -> None:
        """Whole 2 MiB frames: build a changed copy of every 1 GiB table touched (all the
        allocation, so MemoryError leaves the map as it was), then store the copies."""
        from vhostmem.memmap import _batch

        l1, split = self._l1, self._split
        try:
            frames, per_frame = _batch.frame_values(starts, sizes, values)
            indexes, tables = _batch.build_tables(
                l1, self._default_table, self._default, frames, per_frame, _filled, _copied)
            dropped = _batch.split_frames_in(split, frames)
        except MemoryError as exc:
            raise MemMapError(errno.ENOMEM, "out of memory allocating a memory-map table") from exc
        for index, table in zip(indexes, tables, strict=True):
            l1[index] = table
        for frame in dropped:  # after the stores that overwrote their markers
            del split[frame]
        if self._mirror is not None:
            self._mark_mirror(indexes, (), dropped, [])

    def _set_each(self, starts: list[int], sizes: list[int], values: list[int]) -> None:
        """Ranges one by one through ``_set``; if one fails (ENOMEM) the ones before it are
        undone from a snapshot taken first: the table references of every 1 GiB slot touched,
        a copy of each existing table a range only partly covers (``_set`` writes those in
        place), and the split entries."""
        from vhostmem.memmap import _batch

        try:
            saved = _batch.snapshot(self._l1, self._default_table, starts, sizes, _copied)
            old_split = self._split.copy()
        except MemoryError as exc:
            raise MemMapError(errno.ENOMEM, "out of memory allocating a memory-map table") from exc
        try:
            for start, size, value in zip(starts, sizes, values, strict=True):
                self._set(start, start + size, value)
        except MemMapError:
            self._restore(saved, old_split)
            raise

    def _restore(self, saved: dict[int, list[int]], old_split: dict[int, list[int]]) -> None:
        """Put back a snapshot of ``_set_each``. Every marker a lock-free reader can see keeps
        its sub-table: first the union of both split dicts, then the tables, then the old
        dict."""
        # Without memory for the union a reader may retry a lookup until the tables are back.
        with contextlib.suppress(MemoryError):
            self._split = {**self._split, **old_split}
        for index, table in saved.items():
            self._l1[index] = table
        self._split = old_split
        self._mirror = None  # rebuilt from the restored tables by the next translate_many

    def _prepare_tables(self, first: int, last: int, f_first: int, f_stop: int,
                        value: int) -> tuple[Any, list[list[int]], tuple[_Store, ...]]:
        """Plan the 1 GiB tables first..last for whole frames [f_first, f_stop).

        Returns ``(indexes, new_tables, stores)``: ``new_tables[i]`` (fully covered, newly
        allocated, or with many entries changed) is to replace ``l1[indexes[i]]``; ``stores``
        holds ``(index, lo, hi)`` for an existing table whose entries lo..hi-1 are few enough
        to be set in place."""
        full_first = (f_first + ENTRY_MASK) >> _FRAME_TO_TABLE
        full_stop = f_stop >> _FRAME_TO_TABLE
        if full_first < full_stop:
            indexes: Any = range(full_first, full_stop)
            new_tables = [_filled(value, ENTRIES) for _ in indexes]
        else:
            full_first = full_stop = first  # no whole table: only first and last are touched
            indexes = ()
            new_tables = []
        stores: tuple[_Store, ...] = ()
        l1 = self._l1
        # Only the first and the last table can be partly covered.
        for index in (first, last) if first != last else (first,):
            if full_first <= index < full_stop:
                continue
            base = index << _FRAME_TO_TABLE
            lo = f_first - base if f_first > base else 0
            hi = f_stop - base if f_stop - base < ENTRIES else ENTRIES
            old = l1[index]
            if old is self._default_table:
                table = _filled(self._default, ENTRIES)
            elif lo >= hi:
                continue
            elif hi - lo <= _IN_PLACE_MAX:
                stores += ((index, lo, hi),)
                continue
            else:
                table = _copied(old)
            if lo < hi:
                table[lo:hi] = _filled(value, hi - lo)
            if indexes.__class__ is not list:
                indexes = list(indexes)
            indexes.append(index)
            new_tables.append(table)
        return indexes, new_tables, stores

    def _prepare_pages(self, start: int, end: int, value: int,
                       pages: list[tuple[int, int, list[int] | None]]) -> None:
        """Add to ``pages`` what setting 4 KiB pages ``[start, end)`` inside one 2 MiB frame
        takes, if anything: a new split (sub-table, then marker), a new sub-table for a split
        frame, or a fold back into one entry."""
        frame = start >> SHIFT_2M
        lo = (start >> SHIFT_4K) & SUB_MASK
        hi = ((end - 1) >> SHIFT_4K & SUB_MASK) + 1
        current = self._l1[frame >> _FRAME_TO_TABLE][frame & ENTRY_MASK]
        if current is _SPLIT:
            sub = _copied(self._split[frame])
            sub[lo:hi] = _filled(value, hi - lo)
            if sub.count(value) == SUB_ENTRIES:
                pages.append((_FOLD, frame, None))
            else:
                pages.append((_NEW_SUB, frame, sub))
        elif current != value:
            sub = _filled(current, SUB_ENTRIES)
            sub[lo:hi] = _filled(value, hi - lo)
            pages.append((_NEW_SPLIT, frame, sub))

    def _mark_mirror(self, indexes: Iterable[int], stores: tuple[_Store, ...],
                     dropped: Iterable[int], pages: list[tuple[int, int, list[int] | None]]
                     ) -> None:
        mirror = self._mirror
        assert mirror is not None
        try:
            mirror.mark_tables(indexes)
            mirror.mark_tables([index for index, _, _ in stores])
            for frame in dropped:
                mirror.mark_frame(frame)
            for _, frame, _ in pages:
                mirror.mark_frame(frame)
                mirror.mark_tables((frame >> _FRAME_TO_TABLE,))
        except MemoryError:
            self._mirror = None  # the next translate_many rebuilds it from the tables

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
