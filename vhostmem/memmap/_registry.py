"""MemRegistry: the registration map and the list of maps kept in step with it.

Registrations are kept as a sorted list of chunks, one per ``register`` call. A chunk plays the
part of SPDK's REGISTERED pages with a NOTIFY_START flag on the first page: adjacent
registrations stay separate chunks, notify walks report each chunk once, and ``unregister`` must
begin at a chunk start and end at a chunk end. Looking a range up costs one bisection instead of
a walk over its pages.

Every notify sequence is transactional: if a callback raises, the callbacks that already ran are
replayed backwards with the opposite action, the registration map is restored, and the
callback's own exception propagates unchanged (not wrapped). The callback that raised is not
called again for the range it failed on, so it must leave its own map as it found it.
"""

from __future__ import annotations

import errno
import threading
import weakref
from bisect import bisect_right
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from vhostmem.memmap._common import MapOps, MemMapError, NotifyAction, check_range
from vhostmem.memmap._map import MemMap

if TYPE_CHECKING:  # numpy is imported by the batch calls only
    import numpy as np

# (map, action, vaddr, length); vaddr and length are numpy arrays for a notify_many step.
_Step = tuple[MemMap, NotifyAction, Any, Any]
_BATCH = -1  # in _run_batch's record: the map heard the batch in one notify_many call
_INVERSE = {NotifyAction.REGISTER: NotifyAction.UNREGISTER,
            NotifyAction.UNREGISTER: NotifyAction.REGISTER}


class MemRegistry:
    """Registered memory and the maps notified about it. All methods are thread safe."""

    def __init__(self) -> None:
        # Re-entrant so that a callback calling back in gets EDEADLK instead of hanging.
        self._lock = threading.RLock()
        self._notifying = False
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._reserved: list[tuple[int, int]] = []
        self._maps: list[MemMap] = []  # maps with a notify callback, in allocation order
        self._all_maps: weakref.WeakSet[MemMap] = weakref.WeakSet()

    # ----------------------------------------------------------------- maps

    def alloc_map(self, default_translation: int = 0, ops: MapOps | None = None,
                  ctx: Any = None) -> MemMap:
        """Create a map; its notify callback hears REGISTER for every chunk already registered,
        in address order. If one raises, the chunks already reported are unregistered again and
        the exception propagates."""
        new = MemMap(default_translation, ops, ctx)
        with self._lock:
            self._enter()
            for vaddr, length in self._reserved:
                new.preallocate(vaddr, length)
            if new.ops.notify is not None:
                try:
                    self._run((new, NotifyAction.REGISTER, start, end - start)
                              for start, end in zip(self._starts, self._ends, strict=True))
                except BaseException:
                    new.release()
                    raise
                self._maps.append(new)
            self._all_maps.add(new)
        return new

    def free_map(self, mem_map: MemMap) -> None:
        """Tell the map UNREGISTER for every chunk, then drop it. Freeing always completes; the
        first exception a callback raised is re-raised afterwards (the others as notes)."""
        with self._lock:
            self._enter()
            if mem_map not in self._all_maps:
                raise MemMapError(errno.EINVAL, "free_map: map is not allocated by this registry")
            errors: list[BaseException] = []
            if any(m is mem_map for m in self._maps):
                notify = mem_map.ops.notify
                assert notify is not None
                for start, end in zip(self._starts, self._ends, strict=True):
                    try:
                        self._call(notify, mem_map, NotifyAction.UNREGISTER, start, end - start)
                    except Exception as exc:
                        errors.append(exc)
                self._maps.remove(mem_map)
            self._all_maps.discard(mem_map)
            mem_map.release()
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"free_map: another UNREGISTER failed too: {other!r}")
            raise errors[0]

    @property
    def maps(self) -> list[MemMap]:
        """Maps with a notify callback, in the order they are notified on REGISTER."""
        return list(self._maps)

    # ----------------------------------------------------------------- registration

    def register(self, vaddr: int, length: int) -> None:
        """Register ``[vaddr, vaddr+length)`` as one chunk and notify every map (REGISTER).

        EINVAL: not 4 KiB aligned or outside 48 bits. EBUSY: overlaps a registered chunk.
        """
        vaddr, length = check_range("register", vaddr, length)
        if not length:
            return
        end = vaddr + length
        with self._lock:
            self._enter()
            starts, ends = self._starts, self._ends
            index = bisect_right(starts, vaddr)
            if (index and ends[index - 1] > vaddr) or (index < len(starts)
                                                        and starts[index] < end):
                raise MemMapError(errno.EBUSY, f"register: {vaddr:#x}+{length:#x} overlaps "
                                  "registered memory")
            starts.insert(index, vaddr)
            ends.insert(index, end)
            try:
                self._run((m, NotifyAction.REGISTER, vaddr, length) for m in self._maps)
            except BaseException:
                del starts[index], ends[index]
                raise

    def unregister(self, vaddr: int, length: int) -> None:
        """Unregister whole chunks covering exactly ``[vaddr, vaddr+length)``; each chunk is
        notified (UNREGISTER) to every map in reverse map order.

        EINVAL: bad range, or a page in it is not registered. ERANGE: the range starts or ends
        inside a chunk.
        """
        vaddr, length = check_range("unregister", vaddr, length)
        if not length:
            return
        with self._lock:
            self._enter()
            first, stop = self._whole_chunks(vaddr, vaddr + length)
            starts, ends = self._starts, self._ends
            chunks = list(zip(starts[first:stop], ends[first:stop], strict=True))
            del starts[first:stop], ends[first:stop]
            reverse = self._maps[::-1]
            try:
                self._run((m, NotifyAction.UNREGISTER, start, end - start)
                          for start, end in chunks for m in reverse)
            except BaseException:
                starts[first:first] = [start for start, _ in chunks]
                ends[first:first] = [end for _, end in chunks]
                raise

    def register_many(self, ranges: Any) -> None:
        """Register ``(vaddr, length)`` ranges, each as its own chunk, as one ``register`` call
        per range in the given order would, but all or nothing: every range is checked first
        (EINVAL, or EBUSY if one overlaps registered memory or another range of the batch),
        and if a callback raises, every notification already made is undone and no range
        stays registered. Zero-length ranges are skipped, as ``register`` skips them.

        ``ranges``: a sequence of pairs or an ``(N, 2)`` integer numpy array. Each map hears
        what it would hear from the ``register`` calls, in the same order; maps are notified
        one after the other in allocation order (map 0 hears the whole batch before map 1
        hears any of it). A map whose ``MapOps.notify_many`` is set hears the whole batch in
        one call.
        """
        from vhostmem.memmap import _batch

        vaddrs, lengths = _batch.nonempty_pairs("register_many", ranges)
        if not vaddrs.size:
            return
        with self._lock:
            self._enter()
            old = self._starts, self._ends
            self._starts, self._ends = _batch.add_chunks(*old, vaddrs, lengths)
            try:
                self._run_batch(self._maps, NotifyAction.REGISTER, vaddrs, lengths)
            except BaseException:
                self._starts, self._ends = old
                raise

    def unregister_many(self, ranges: Any) -> None:
        """Unregister ``(vaddr, length)`` ranges, each checked as ``unregister`` checks it
        (EINVAL, ERANGE), all or nothing. EINVAL too if two ranges of the batch cover the same
        chunk. Maps are notified one after the other in reverse allocation order, each about
        every chunk in the order the ``unregister`` calls would report them (one
        ``notify_many`` call for a map that has one); a callback that raises undoes them all.
        """
        import numpy as np

        from vhostmem.memmap import _batch

        vaddrs, lengths = _batch.nonempty_pairs("unregister_many", ranges)
        if not vaddrs.size:
            return
        with self._lock:
            self._enter()
            starts = np.array(self._starts, dtype=np.int64)
            ends = np.array(self._ends, dtype=np.int64)
            covered = _batch.covered_chunks(self._starts, self._ends, starts, ends, vaddrs,
                                            lengths, whole_chunks)
            keep = np.ones(starts.size, dtype=bool)
            keep[covered] = False
            old = self._starts, self._ends
            self._starts, self._ends = starts[keep].tolist(), ends[keep].tolist()
            try:
                self._run_batch(self._maps[::-1], NotifyAction.UNREGISTER, starts[covered],
                                ends[covered] - starts[covered])
            except BaseException:
                self._starts, self._ends = old
                raise

    def _whole_chunks(self, vaddr: int, end: int) -> tuple[int, int]:
        """Indexes ``first, stop`` of the chunks that tile ``[vaddr, end)`` exactly."""
        return whole_chunks(self._starts, self._ends, vaddr, end)

    def reserve(self, vaddr: int, length: int) -> None:
        """Reserve ``[vaddr, vaddr+length)``: the 1 GiB tables covering it are allocated now in
        every map (and in maps allocated later), so a later registration or translation there
        does not allocate them. Registering inside a reservation is allowed (that is its
        purpose); overlapping reservations merge. EBUSY: part of the range is registered."""
        vaddr, length = check_range("reserve", vaddr, length)
        if not length:
            return
        end = vaddr + length
        with self._lock:
            self._enter()
            index = bisect_right(self._starts, vaddr)
            if (index and self._ends[index - 1] > vaddr) or (
                    index < len(self._starts) and self._starts[index] < end):
                raise MemMapError(errno.EBUSY, f"reserve: {vaddr:#x}+{length:#x} overlaps "
                                  "registered memory")
            for mem_map in list(self._all_maps):
                mem_map.preallocate(vaddr, length)
            self._reserved = _merge([*self._reserved, (vaddr, length)])

    # ----------------------------------------------------------------- queries

    def chunks(self) -> list[tuple[int, int]]:
        """Registered chunks as ``(vaddr, length)``, in address order."""
        with self._lock:
            return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def reservations(self) -> list[tuple[int, int]]:
        """Reserved ranges as ``(vaddr, length)``, merged, in address order."""
        with self._lock:
            return list(self._reserved)

    def is_registered(self, vaddr: int) -> bool:
        with self._lock:
            index = bisect_right(self._starts, vaddr) - 1
            return index >= 0 and vaddr < self._ends[index]

    # ----------------------------------------------------------------- notify machinery

    def _enter(self) -> None:
        if self._notifying:
            raise MemMapError(errno.EDEADLK,
                              "a notify callback may not call back into its registry")

    def _call(self, notify: Any, mem_map: MemMap, action: NotifyAction, vaddr: int,
              length: int) -> None:
        self._notifying = True
        try:
            notify(mem_map, mem_map.ctx, action, vaddr, length)
        finally:
            self._notifying = False

    def _run(self, steps: Iterable[_Step]) -> None:
        """Run notify steps in order; if one raises, undo the finished ones backwards."""
        done: list[_Step] = []
        try:
            for step in steps:
                mem_map, action, vaddr, length = step
                self._call(mem_map.ops.notify, mem_map, action, vaddr, length)
                done.append(step)
        except BaseException as exc:
            self._undo(done, exc)
            raise

    def _run_batch(self, maps: list[MemMap], action: NotifyAction, vaddrs: np.ndarray,
                   lengths: np.ndarray) -> None:
        """Tell each map in turn about every range, in order: one ``notify_many`` call, or one
        ``notify`` per range. If a callback raises, everything already heard is undone
        backwards with the opposite action (a batch as one ``notify_many`` call on the ranges
        reversed), as ``_run`` undoes single steps, and the exception propagates."""
        arrays = _read_only(vaddrs), _read_only(lengths)
        lists: tuple[list[int], list[int]] | None = None
        done: list[tuple[MemMap, int]] = []  # (map, how many ranges it heard, or _BATCH)
        try:
            for mem_map in maps:
                notify_many = mem_map.ops.notify_many
                if notify_many is not None:
                    self._call(notify_many, mem_map, action, *arrays)
                    done.append((mem_map, _BATCH))
                    continue
                if lists is None:
                    lists = vaddrs.tolist(), lengths.tolist()
                call, notify, heard = self._call, mem_map.ops.notify, 0
                try:
                    for vaddr, length in zip(*lists, strict=True):
                        call(notify, mem_map, action, vaddr, length)
                        heard += 1
                finally:
                    done.append((mem_map, heard))
        except BaseException as exc:
            steps: list[_Step] = []  # in the order they were heard; _undo walks back
            for mem_map, heard in done:
                if heard == _BATCH:  # undone in one call, its ranges in reverse order
                    steps.append((mem_map, action, arrays[0][::-1], arrays[1][::-1]))
                else:
                    assert lists is not None
                    steps.extend((mem_map, action, lists[0][i], lists[1][i])
                                 for i in range(heard))
            self._undo(steps, exc)
            raise

    def _undo(self, done: list[_Step], exc: BaseException) -> None:
        for mem_map, action, vaddr, length in reversed(done):
            batch = not isinstance(vaddr, int)  # a notify_many step holds arrays
            notify = mem_map.ops.notify_many if batch else mem_map.ops.notify
            try:
                self._call(notify, mem_map, _INVERSE[action], vaddr, length)
            except Exception as undo_exc:
                what = f"{vaddr.size} ranges" if batch else f"{vaddr:#x}+{length:#x}"
                exc.add_note(f"rollback: {_INVERSE[action].name} {what} failed too: "
                             f"{undo_exc!r}")


def whole_chunks(starts: list[int], ends: list[int], vaddr: int, end: int) -> tuple[int, int]:
    """Indexes ``first, stop`` of the chunks in ``starts``/``ends`` that tile ``[vaddr, end)``
    exactly. SPDK's unregister checks: ERANGE if it starts or ends inside a chunk, EINVAL if a
    page in it is not registered."""
    first = bisect_right(starts, vaddr) - 1
    if first >= 0 and starts[first] < vaddr < ends[first]:
        raise MemMapError(errno.ERANGE, f"unregister: {vaddr:#x} is inside a registration "
                          f"that starts at {starts[first]:#x}")
    if first < 0 or starts[first] != vaddr:
        raise MemMapError(errno.EINVAL, f"unregister: {vaddr:#x} is not registered")
    stop, pos = first, vaddr
    while pos < end:
        if stop == len(starts) or starts[stop] != pos:
            raise MemMapError(errno.EINVAL, f"unregister: {pos:#x} is not registered")
        pos = ends[stop]
        stop += 1
    if pos > end:
        raise MemMapError(errno.ERANGE, f"unregister: {end:#x} is inside a registration "
                          f"that ends at {pos:#x}")
    return first, stop


def _read_only(values: np.ndarray) -> np.ndarray:
    """A uint64 copy callbacks can read but not change (the registry's undo reuses it)."""
    import numpy as np

    out = values.astype(np.uint64)
    out.flags.writeable = False
    return out


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or touching ``(vaddr, length)`` ranges."""
    merged: list[list[int]] = []
    for vaddr, length in sorted(ranges):
        if merged and vaddr <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], vaddr + length)
        else:
            merged.append([vaddr, vaddr + length])
    return [(start, end - start) for start, end in merged]
