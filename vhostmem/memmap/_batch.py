"""Vectorized helpers for the batch calls (``register_many``, ``set_translations``, ...).

Validation turns a batch of ranges into two numpy ``int64`` arrays with the checks
``check_range`` makes for one range (4 KiB aligned, inside the 48-bit space) done once for the
whole batch, so a bad batch is refused before anything changes. ``plan_frames`` turns a batch of
whole 2 MiB frames into the new 1 GiB tables that hold it, for ``MemMap.set_translations``.
"""

from __future__ import annotations

import errno
import itertools
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from vhostmem.memmap._common import (
    ENTRIES,
    ENTRY_MASK,
    MASK_2M,
    MASK_4K,
    SHIFT_1G,
    SHIFT_2M,
    TRANSLATION_LIMIT,
    VA_LIMIT,
    MemMapError,
    check_translation,
)

# Bits between a 2 MiB frame number and its 1 GiB table index.
FRAME_TO_TABLE = SHIFT_1G - SHIFT_2M
# A frame-by-frame plan holds two 8-byte values per 2 MiB frame; past this many frames (2 TiB)
# a batch is written range by range instead, as set_translation writes whole 1 GiB tables
# without looking at their frames.
PLAN_FRAMES_MAX = 1 << 20
_INTEGER_KINDS = "iu"


def _integers(what: str, name: str, values: Any) -> np.ndarray:
    """A flat int64 array of ``values`` (a sequence or array of integers); EINVAL otherwise."""
    try:
        arr = np.asarray(values)
    except (OverflowError, ValueError, TypeError) as exc:
        raise MemMapError(errno.EINVAL, f"{what}: {name} must be integers ({exc})") from exc
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == object:  # Python ints beyond 64 bits: outside the address space anyway
        raise MemMapError(errno.EINVAL, f"{what}: a value in {name} is outside the 48-bit "
                          "address space")
    if arr.dtype.kind not in _INTEGER_KINDS:
        raise MemMapError(errno.EINVAL, f"{what}: {name} must be integers, not {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) >= VA_LIMIT:
        raise MemMapError(errno.EINVAL, f"{what}: a value in {name} is outside the 48-bit "
                          "address space")
    return arr.astype(np.int64, copy=False).reshape(-1)


def check_ranges(what: str, vaddrs: Any, lengths: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch as ``check_range`` validates one range; return int64 arrays (a copy
    the caller may keep). EINVAL names the first bad range."""
    starts = _integers(what, "addresses", vaddrs)
    sizes = _integers(what, "lengths", lengths)
    if starts.shape != sizes.shape:
        raise MemMapError(errno.EINVAL, f"{what}: {starts.size} addresses for {sizes.size} "
                          "lengths")
    # Both are below 2^63 here, and each is tested against 2^48 before their sum is used.
    bad = (starts < 0) | (sizes < 0) | (starts > VA_LIMIT) | (sizes > VA_LIMIT)
    bad |= (starts + np.where(bad, 0, sizes)) > VA_LIMIT
    bad |= ((starts | sizes) & MASK_4K) != 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        vaddr, length = int(starts[i]), int(sizes[i])
        raise MemMapError(errno.EINVAL, f"{what}: range {i} (vaddr={vaddr:#x} "
                          f"length={length:#x}) is outside the 48-bit address space or not "
                          "made of 4 KiB pages")
    return starts.copy(), sizes.copy()


def nonempty_pairs(what: str, ranges: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`check_pairs`, without the zero-length ranges (no-ops, as single calls)."""
    vaddrs, lengths = check_pairs(what, ranges)
    if not lengths.all():
        keep = lengths > 0
        vaddrs, lengths = vaddrs[keep], lengths[keep]
    return vaddrs, lengths


def check_pairs(what: str, ranges: Any) -> tuple[np.ndarray, np.ndarray]:
    """``ranges``: ``(vaddr, length)`` pairs: an ``(N, 2)`` integer numpy array, or any
    iterable of pairs of integers (``operator.index`` decides, as ``check_range`` does, so a
    float is EINVAL rather than truncated)."""
    if isinstance(ranges, np.ndarray):
        if ranges.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if ranges.ndim != 2 or ranges.shape[1] != 2:
            raise MemMapError(errno.EINVAL, f"{what}: ranges must be (vaddr, length) pairs, "
                              f"not an array of shape {ranges.shape}")
        return check_ranges(what, ranges[:, 0], ranges[:, 1])
    try:
        pairs = ranges if isinstance(ranges, list | tuple) else list(ranges)
        if set(map(len, pairs)) - {2}:
            raise TypeError("a range is not a (vaddr, length) pair")
        # One C-level pass over the pairs: much cheaper than numpy guessing a dtype.
        flat = np.fromiter(map(operator.index, itertools.chain.from_iterable(pairs)),
                           dtype=np.int64, count=2 * len(pairs))
    except OverflowError as exc:
        raise MemMapError(errno.EINVAL, f"{what}: a range is outside the 48-bit address "
                          "space") from exc
    except (TypeError, ValueError) as exc:
        raise MemMapError(errno.EINVAL, f"{what}: ranges must be (vaddr, length) pairs of "
                          f"integers ({exc})") from exc
    return check_ranges(what, flat[0::2], flat[1::2])


def check_values(what: str, translations: Any, count: int) -> np.ndarray:
    """One uint64 translation per range: an integer for all of them, or one each."""
    try:
        if isinstance(translations, np.ndarray):
            arr = translations
        elif hasattr(translations, "__index__"):
            arr = np.array(check_translation(translations), dtype=np.uint64)
        else:  # numpy would guess float64 for a list mixing small ints and ints >= 2^63
            ints = [check_translation(value) for value in translations]
            arr = np.array(ints, dtype=np.uint64)
        if arr.dtype == object or arr.dtype.kind not in _INTEGER_KINDS:
            raise TypeError(f"not integers ({arr.dtype})")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= TRANSLATION_LIMIT):
            raise OverflowError("a translation is not an unsigned 64-bit value")
        values = np.broadcast_to(arr.astype(np.uint64), (count,))
    except (OverflowError, ValueError, TypeError, MemMapError) as exc:
        raise MemMapError(errno.EINVAL, f"{what}: translations must be unsigned 64-bit "
                          f"integers, one or one per range ({exc})") from exc
    return values


def whole_frames(starts: np.ndarray, sizes: np.ndarray) -> bool:
    """Whether every range is whole 2 MiB frames and the batch is small enough to plan frame
    by frame (``plan_frames``)."""
    return bool(not ((starts | sizes) & MASK_2M).any()
                and int(sizes.sum()) >> SHIFT_2M <= PLAN_FRAMES_MAX)


def frame_values(starts: np.ndarray, sizes: np.ndarray,
                 values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every 2 MiB frame the ranges cover, sorted, with its value; where ranges overlap the
    later one wins, as successive ``set_translation`` calls would leave it."""
    counts = sizes >> SHIFT_2M
    total = int(counts.sum())
    # Frame k of the flattened batch belongs to range r: first[r] + (k - offset[r]).
    offsets = np.cumsum(counts) - counts
    frames = np.arange(total, dtype=np.int64) + np.repeat((starts >> SHIFT_2M) - offsets, counts)
    per_frame = np.repeat(values, counts)
    if total > 1 and not (frames[1:] > frames[:-1]).all():
        order = np.argsort(frames, kind="stable")
        frames, per_frame = frames[order], per_frame[order]
        last = np.ones(total, dtype=bool)
        last[:-1] = frames[1:] != frames[:-1]
        frames, per_frame = frames[last], per_frame[last]
    return frames, per_frame


def build_tables(l1: list[list[Any]], shared: list[int], default: int, frames: np.ndarray,
                 per_frame: np.ndarray, filled: Callable[[Any, int], list[Any]],
                 copied: Callable[[list[Any]], list[Any]]) -> tuple[list[int], list[list[Any]]]:
    """New 1 GiB tables holding ``per_frame`` at sorted ``frames``: a copy of each existing
    table touched (a filled one for an unallocated slot) with the frames written. Nothing is
    stored into ``l1``; ``filled`` and ``copied`` make the lists (the map's allocators)."""
    indexes: list[int] = []
    tables: list[list[Any]] = []
    for index, a, b, lo, hi in _table_runs(frames):
        old = l1[index]
        table = filled(default, ENTRIES) if old is shared else copied(old)
        if hi - lo == b - a:  # one run of slots: a single slice store
            table[lo:hi] = per_frame[a:b].tolist()
        else:
            for slot, value in zip((frames[a:b] & ENTRY_MASK).tolist(),
                                   per_frame[a:b].tolist(), strict=True):
                table[slot] = value
        indexes.append(index)
        tables.append(table)
    return indexes, tables


def snapshot(l1: list[list[Any]], shared: list[int], starts: list[int], sizes: list[int],
             copied: Callable[[list[Any]], list[Any]]) -> dict[int, list[Any]]:
    """What ``MemMap._set_each`` restores after a failure: the table of every 1 GiB slot the
    ranges touch, as a copy for an existing table a range only partly covers (``_set``
    writes those in place), else the table itself (``_set`` only replaces it)."""
    saved = {i: l1[i] for start, size in zip(starts, sizes, strict=True)
             for i in range(start >> SHIFT_1G, ((start + size - 1) >> SHIFT_1G) + 1)}
    for start, size in zip(starts, sizes, strict=True):
        for i in (start >> SHIFT_1G, (start + size - 1) >> SHIFT_1G):
            if saved[i] is not shared and saved[i] is l1[i]:
                saved[i] = copied(l1[i])
    return saved


def split_frames_in(split: dict[int, Any], frames: np.ndarray) -> list[int]:
    """The split 2 MiB entries among ``frames``: a whole-frame write drops them, as
    ``MemMap._set`` does."""
    if not split:
        return []
    known = np.fromiter(split, dtype=np.int64, count=len(split))
    return known[np.isin(known, frames)].tolist()


def _table_runs(frames: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """Split sorted frames by 1 GiB table: ``(table, a, b, lo, hi)`` where frames[a:b] are in
    ``table`` at slots lo..hi-1 (contiguous when ``hi - lo == b - a``)."""
    tables = frames >> FRAME_TO_TABLE
    cuts = np.flatnonzero(tables[1:] != tables[:-1]) + 1
    bounds = [0, *cuts.tolist(), int(frames.size)]
    firsts = (frames[bounds[:-1]] & ENTRY_MASK).tolist()
    lasts = (frames[[b - 1 for b in bounds[1:]]] & ENTRY_MASK).tolist()
    return [(int(tables[a]), a, b, lo, hi + 1)
            for a, b, lo, hi in zip(bounds[:-1], bounds[1:], firsts, lasts, strict=True)]


def add_chunks(starts: list[int], ends: list[int], vaddrs: np.ndarray,
               lengths: np.ndarray) -> tuple[list[int], list[int]]:
    """The registry's chunk lists with the batch's ranges added, each as its own chunk (new
    lists; the given ones are not changed). EBUSY, as ``register`` gives it, if a range
    overlaps registered memory or another range of the batch."""
    order = np.argsort(vaddrs, kind="stable")
    new_starts = vaddrs[order]
    new_ends = new_starts + lengths[order]
    inside = np.flatnonzero(new_ends[:-1] > new_starts[1:])
    if inside.size:
        i = int(inside[0])
        raise MemMapError(errno.EBUSY, f"register_many: {int(new_starts[i + 1]):#x} overlaps "
                          f"{int(new_starts[i]):#x}+{int(new_ends[i] - new_starts[i]):#x} of "
                          "the same batch")
    if not starts:
        return new_starts.tolist(), new_ends.tolist()
    old_starts = np.array(starts, dtype=np.int64)
    old_ends = np.array(ends, dtype=np.int64)
    count = old_starts.size
    # The chunk before each new range must end at or before it, the chunk after it must start
    # at or after its end (the two tests ``register`` makes with one bisection).
    after = np.searchsorted(old_starts, new_starts, side="right")
    busy = (after > 0) & (old_ends[np.maximum(after - 1, 0)] > new_starts)
    busy |= (after < count) & (old_starts[np.minimum(after, count - 1)] < new_ends)
    if busy.any():
        i = int(np.flatnonzero(busy)[0])
        raise MemMapError(errno.EBUSY, f"register_many: {int(new_starts[i]):#x}+"
                          f"{int(new_ends[i] - new_starts[i]):#x} overlaps registered memory")
    merged = np.concatenate([old_starts, new_starts])
    order = np.argsort(merged, kind="stable")
    return merged[order].tolist(), np.concatenate([old_ends, new_ends])[order].tolist()


def covered_chunks(start_list: list[int], end_list: list[int], starts: np.ndarray,
                   ends: np.ndarray, vaddrs: np.ndarray, lengths: np.ndarray,
                   whole_chunks: Callable[[list[int], list[int], int, int], tuple[int, int]]
                   ) -> np.ndarray:
    """Indexes of the chunks the batch's ranges unregister, range by range in batch order and
    in address order within a range, with the errors the ``unregister`` calls one by one
    would raise first. The common batch, each range exactly one chunk and no chunk twice, is
    found by one vectorized search; any other is checked range by range with
    ``whole_chunks`` (``unregister``'s own test) on a copy of the chunk lists from which
    each range's chunks are removed, so a range meeting an earlier one of the batch gets the
    EINVAL or ERANGE it would get after that earlier ``unregister``."""
    count = starts.size
    if count:
        at = np.minimum(np.searchsorted(starts, vaddrs), count - 1)
        exact = (starts[at] == vaddrs) & (ends[at] == vaddrs + lengths)
        if exact.all() and int(np.bincount(at, minlength=count).max()) == 1:
            return at
    left_starts, left_ends = list(start_list), list(end_list)
    ids = list(range(count))  # original index of each chunk left in the copies
    covered: list[int] = []
    for vaddr, length in zip(vaddrs.tolist(), lengths.tolist(), strict=True):
        first, stop = whole_chunks(left_starts, left_ends, vaddr, vaddr + length)
        covered.extend(ids[first:stop])
        del left_starts[first:stop], left_ends[first:stop], ids[first:stop]
    return np.array(covered, dtype=np.int64)
