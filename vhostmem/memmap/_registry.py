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
from typing import Any

from vhostmem.memmap._common import MapOps, MemMapError, NotifyAction, check_range
from vhostmem.memmap._map import MemMap

_Step = tuple[MemMap, NotifyAction, int, int]
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

    def _whole_chunks(self, vaddr: int, end: int) -> tuple[int, int]:
        """Indexes ``first, stop`` of the chunks that tile ``[vaddr, end)`` exactly."""
        starts, ends = self._starts, self._ends
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

    def _undo(self, done: list[_Step], exc: BaseException) -> None:
        for mem_map, action, vaddr, length in reversed(done):
            try:
                self._call(mem_map.ops.notify, mem_map, _INVERSE[action], vaddr, length)
            except Exception as undo_exc:
                exc.add_note(f"rollback: {_INVERSE[action].name} {vaddr:#x}+{length:#x} "
                             f"failed too: {undo_exc!r}")


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping or touching ``(vaddr, length)`` ranges."""
    merged: list[list[int]] = []
    for vaddr, length in sorted(ranges):
        if merged and vaddr <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], vaddr + length)
        else:
            merged.append([vaddr, vaddr + length])
    return [(start, end - start) for start, end in merged]
