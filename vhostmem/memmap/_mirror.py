"""A numpy copy of a MemMap's tables for ``translate_many``.

The copy is brought up to date lazily, under the map's lock, from the tables and frames the map
marked dirty since the last batch. Layout:

- ``l1``: for each of the 2^18 1 GiB slots, the flat offset of its row in ``pool`` (0 is the
  all-default row that unallocated slots share).
- ``pool``: rows of 512 2 MiB translations.
- ``split_base``: parallel to ``pool``; -1, or the flat offset of the entry's 4 KiB row in
  ``sub_pool`` when the entry is split.

A batch is processed in blocks that fit in the L2 cache, with preallocated temporaries.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Any

import numpy as np

from vhostmem.memmap._common import (
    ENTRIES,
    SHIFT_1G,
    SHIFT_2M,
    SHIFT_4K,
    SUB_ENTRIES,
    SUB_MASK,
    VA_BITS,
    MemMapError,
)

_BLOCK = 1 << 14  # addresses per block: temporaries stay in L2
_NO_SPLIT = -1
_FRAME_TO_TABLE = SHIFT_1G - SHIFT_2M
_L1_ENTRIES = 1 << (VA_BITS - SHIFT_1G)
_S2M = np.uint64(SHIFT_2M)
_S4K = np.uint64(SHIFT_4K)
_S_TABLE = np.uint64(_FRAME_TO_TABLE)
_ENTRY_MASK = np.uint64(ENTRIES - 1)
_SUB_MASK = np.uint64(SUB_MASK)


class Mirror:
    """Numpy tables mirroring one MemMap; every method runs under that map's lock."""

    def __init__(self, default: int) -> None:
        self.default = default
        self.l1 = np.zeros(_L1_ENTRIES, dtype=np.int64)
        self.pool = np.full(ENTRIES, default, dtype=np.uint64)
        self.split_base = np.full(ENTRIES, _NO_SPLIT, dtype=np.int64)
        self.rows: dict[int, int] = {}
        self.sub_pool = np.zeros(0, dtype=np.uint64)
        self.sub_rows: dict[int, int] = {}
        self.free_sub_rows: list[int] = []
        self.dirty_tables: set[int] = set()
        self.dirty_frames: set[int] = set()

    # ----------------------------------------------------------------- dirty tracking

    def mark_all(self, l1: list[list[int]], shared: list[int], split: dict[int, Any]) -> None:
        self.dirty_tables.update(
            i for i, table in enumerate(l1[:_L1_ENTRIES]) if table is not shared)
        self.dirty_frames.update(split)

    def mark_tables(self, indexes: Iterable[int]) -> None:
        self.dirty_tables.update(indexes)

    def mark_frame(self, frame: int) -> None:
        self.dirty_frames.add(frame)

    # ----------------------------------------------------------------- sync

    def sync(self, l1: list[list[int]], shared: list[int], split: dict[int, list[int]],
             marker: Any) -> None:
        if self.dirty_tables:
            tables = self.dirty_tables
            for index in tables:
                table = l1[index]
                if table is not shared:
                    self._copy_table(index, table, marker)
            # A rewritten row lost its split offsets: re-apply the splits that live in it.
            self.dirty_frames.update(f for f in split if (f >> _FRAME_TO_TABLE) in tables)
            self.dirty_tables = set()
        for frame in self.dirty_frames:
            self._copy_frame(frame, split.get(frame))
        self.dirty_frames = set()

    def _row_base(self, index: int) -> int:
        row = self.rows.get(index)
        if row is None:
            row = len(self.rows) + 1  # row 0 is the shared default row
            if (row + 1) * ENTRIES > self.pool.size:
                grow = max(self.pool.size, ENTRIES)
                self.pool = np.concatenate([self.pool, np.empty(grow, dtype=np.uint64)])
                self.split_base = np.concatenate(
                    [self.split_base, np.empty(grow, dtype=np.int64)])
            self.rows[index] = row
            self.l1[index] = row * ENTRIES
        return row * ENTRIES

    def _copy_table(self, index: int, table: list[int], marker: Any) -> None:
        base = self._row_base(index)
        try:
            self.pool[base:base + ENTRIES] = table
        except TypeError:  # the table holds split markers: their value lives in sub_pool
            self.pool[base:base + ENTRIES] = [0 if v is marker else v for v in table]
        self.split_base[base:base + ENTRIES] = _NO_SPLIT

    def _copy_frame(self, frame: int, sub: list[int] | None) -> None:
        index = frame >> _FRAME_TO_TABLE
        row = self.rows.get(index)
        if sub is None:
            old = self.sub_rows.pop(frame, None)
            if old is not None:
                self.free_sub_rows.append(old)
            if row is not None:
                self.split_base[row * ENTRIES + (frame & (ENTRIES - 1))] = _NO_SPLIT
            return
        base = self._row_base(index)
        sub_row = self.sub_rows.get(frame)
        if sub_row is None:
            sub_row = self._new_sub_row()
            self.sub_rows[frame] = sub_row
        self.sub_pool[sub_row * SUB_ENTRIES:(sub_row + 1) * SUB_ENTRIES] = sub
        self.split_base[base + (frame & (ENTRIES - 1))] = sub_row * SUB_ENTRIES

    def _new_sub_row(self) -> int:
        if self.free_sub_rows:
            return self.free_sub_rows.pop()
        row = len(self.sub_rows)
        if (row + 1) * SUB_ENTRIES > self.sub_pool.size:
            grow = max(self.sub_pool.size, SUB_ENTRIES)
            self.sub_pool = np.concatenate([self.sub_pool, np.empty(grow, dtype=np.uint64)])
        return row

    # ----------------------------------------------------------------- batch translate

    def translate(self, addresses: Any, out: np.ndarray | None = None) -> np.ndarray:
        flat = _as_addresses(addresses)
        given = out
        copy = None
        if given is None:
            out = np.empty(flat.size, dtype=np.uint64)
        else:
            out = _as_output(given, flat.size)
            if np.may_share_memory(out, flat):  # in place: each block is read from a copy
                copy = np.empty(_BLOCK, dtype=np.uint64)
        has_split = bool(self.sub_rows)
        frames = np.empty(_BLOCK, dtype=np.uint64)
        scratch = np.empty(_BLOCK, dtype=np.uint64)
        offsets = np.empty(_BLOCK, dtype=np.int64)
        for start in range(0, flat.size, _BLOCK):
            block = flat[start:start + _BLOCK]
            n = block.size
            if copy is not None:
                block = copy[:n]
                np.copyto(block, flat[start:start + n])
            f, s, o = frames[:n], scratch[:n], offsets[:n]
            np.right_shift(block, _S2M, out=f)
            np.right_shift(f, _S_TABLE, out=s)
            np.take(self.l1, s.view(np.int64), out=o)
            np.bitwise_and(f, _ENTRY_MASK, out=s)
            np.add(o, s.view(np.int64), out=o)
            dest = out[start:start + n]
            np.take(self.pool, o, out=dest)
            if has_split:
                self._fix_split(block, o, dest)
        if given is not None:
            return given
        return out.reshape(np.shape(addresses)) if isinstance(addresses, np.ndarray) else out

    def _fix_split(self, block: np.ndarray, offsets: np.ndarray, dest: np.ndarray) -> None:
        bases = self.split_base.take(offsets)
        hit = bases >= 0
        if hit.any():
            pages = ((block[hit] >> _S4K) & _SUB_MASK).view(np.int64)
            dest[hit] = self.sub_pool.take(bases[hit] + pages)


def _as_addresses(addresses: Any) -> np.ndarray:
    try:
        flat = np.ascontiguousarray(addresses, dtype=np.uint64).reshape(-1)
    except (OverflowError, ValueError, TypeError) as exc:
        raise MemMapError(errno.EINVAL,
                          f"translate_many: addresses must be unsigned integers ({exc})") from exc
    # A negative numpy integer wraps to >= 2^63 in the cast, so this test catches it too.
    if flat.size and int(flat.max()) >> VA_BITS:
        raise MemMapError(errno.EINVAL,
                          "translate_many: an address is outside the 48-bit address space")
    return flat


def _as_output(out: Any, size: int) -> np.ndarray:
    """A flat view of the caller's ``out`` array, which must take ``size`` uint64 values."""
    if not isinstance(out, np.ndarray) or out.dtype != np.uint64:
        raise MemMapError(errno.EINVAL, "translate_many: out must be a numpy uint64 array")
    if out.size != size:
        raise MemMapError(errno.EINVAL,
                          f"translate_many: out has {out.size} elements for {size} addresses")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise MemMapError(errno.EINVAL, "translate_many: out must be C-contiguous and writable")
    return out.reshape(-1)
