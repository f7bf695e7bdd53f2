"""The packed virtqueue layout (virtio 1.2 section 2.8), device side.

:class:`PackedRing` is the other layout of :class:`~vhostmem.virtqueue.Virtqueue` (next to
:class:`~vhostmem.split_ring.SplitRing`): the same ``pop`` / ``push_used`` / ``notify`` over one
descriptor ring (SET_VRING_ADDR ``desc``) and the driver (``avail``) and device (``used``)
event suppression areas. A descriptor is available when AVAIL equals the avail wrap counter and
USED does not (2.8.1); a chain runs by NEXT, its buffer id in its last descriptor (2.8.6); an
INDIRECT descriptor ends it (2.8.8). Completions come in any order: one used descriptor each
(id, len, AVAIL = USED = used wrap counter, WRITE when bytes were written) at the used position,
which moves on by the descriptors that buffer took (2.8.7).

**Read once, in order** (docs/packed.md): the head's flags word is loaded once and availability
decided from it; only then is each descriptor of the chain copied (one 16-byte unpack) and
everything else decided from the copies. The flags load precedes the copies in program order and
x86-64 (TSO) never reorders loads with loads, so the copies are at least as new as the flags the
driver stored last: an acquire without a fence. Completions store id and len, then the flags.

Hostile rings (docs/hostile.md): an id out of range or in flight, a chain without end within the
ring, more descriptors in flight than the ring holds, a bad indirect table: the queue breaks; a
buffer outside guest memory fails that request only. Nothing raises out of ``pop``.
"""

from __future__ import annotations

import struct
import threading
from typing import TYPE_CHECKING

from vhostmem.descriptors import (
    DESC_SIZE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    ChainError,
    ChainWalker,
    DescChain,
    OutsideMemoryError,
)
from vhostmem.eventfd import signal_eventfd
from vhostmem.guest_memory import GuestMemoryError
from vhostmem.packed_events import (
    EVENT_AREA_SIZE,
    POS_MASK,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    WRAP_SHIFT,
    PackedEvents,
)
from vhostmem.split_ring import (
    TURN_BUDGET,
    TURN_BYTES_SHIFT,
    U32_MAX,
    VirtqueueError,
    _fence,
    log,
)

if TYPE_CHECKING:
    from vhostmem.inflight_packed import PackedInflightQueue, Resubmit

# Feature bit (virtio 1.2 section 6): the packed layout.
VIRTIO_F_RING_PACKED = 34
# Descriptor flags of the packed layout (2.8.1): bit 7 AVAIL, bit 15 USED.
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
# SET/GET_VRING_BASE of a packed ring (vhost-user.rst): bits 0-14 the avail position, bit 15
# the avail wrap counter, bits 16-30 the used position, bit 31 the used wrap counter.
BASE_USED_SHIFT = 16
# Alignment of the three areas (2.8.10.1 / 4.1.4.3.2): ring 16, event structures 4.
RING_ALIGN = 16
EVENT_ALIGN = 4
# A descriptor in u16 / u32 units: id at byte 12, flags at byte 14, len at byte 8.
DESC_U16S = DESC_SIZE // 2
ID_U16 = 6
FLAGS_U16 = 7
LEN_U32 = 2
DESC_U32S = DESC_SIZE // 4
_PDESC = struct.Struct("<QIHH")  # addr, len, id, flags
AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


class PackedOutsideMemoryError(OutsideMemoryError):
    """A buffer of a packed chain is outside guest memory; the chain was read to its end, so
    its buffer id and descriptor count are known (the request can be completed)."""

    def __init__(self, reason: str, last: tuple[int, int, int], buffer_id: int,
                 count: int) -> None:
        super().__init__(reason, last)
        self.buffer_id = buffer_id
        self.count = count


class PackedRing(PackedEvents, ChainWalker):
    """The packed layout of a Virtqueue (first in PackedVirtqueue's MRO). The common state
    (num, mem, flags, locks, fds) is the Virtqueue's; what is below is this layout's."""

    RING_PARTS = (("descriptor ring", RING_ALIGN), ("driver event suppression area",
                                                     EVENT_ALIGN),
                  ("device event suppression area", EVENT_ALIGN))
    packed = True

    index: int
    started: bool
    enabled: bool
    broken: bool
    event_idx: bool
    call_fd: int
    yielded: bool
    log_used_gpa: int | None
    stat_interrupts: int
    _turn_left: int
    _mem_gen: int
    _addr: tuple[int, int, int] | None
    _idle: threading.Condition
    _unsignalled: bool
    _signalled_valid: bool
    _inflight: PackedInflightQueue | None

    # ------------------------------------------------------- layout state

    def _layout_reset(self) -> None:
        # Wrap counters start at 1 (2.8.1); positions at 0.
        self._avail_pos = 0
        self._avail_wrap = 1
        self._used_pos = 0
        self._used_wrap = 1
        self._signalled_pos = 0  # used position and wrap at the last interrupt
        self._signalled_wrap = 1
        self._signalled_returned = 0  # self._returned at the last interrupt
        self._kicks_off = False  # our area says DISABLE
        # Descriptors each buffer id in flight took (0: not in flight); counters of descriptors
        # taken (pop) and returned (push_used): their difference is what is in flight.
        self._id_descs: list[int] = []
        self._taken = 0
        self._returned = 0
        # The last walk's descriptors (addr, len, id, flags), kept while an inflight region
        # tracks the ring; and the buffers to serve again after a crash, last first.
        self._walk_raw: list[tuple[int, int, int, int]] | None = None
        self._resubmits: list[Resubmit] = []
        self._desc = None  # ChainWalker's table: unused by the packed walk
        self._ring: memoryview | None = None
        self._ring16: memoryview | None = None
        self._ring32: memoryview | None = None
        self._driver_area: memoryview | None = None
        self._device_area: memoryview | None = None

    def ring_sizes(self) -> tuple[int, int, int]:
        """Bytes of the descriptor ring and of the driver and device event areas."""
        return self.num * DESC_SIZE, EVENT_AREA_SIZE, EVENT_AREA_SIZE

    def _set_views(self, ring: memoryview, driver: memoryview, device: memoryview) -> None:
        self._ring = ring
        self._ring16 = ring.cast("H")
        self._ring32 = ring.cast("I")
        self._driver_area = driver.cast("H")
        self._device_area = device.cast("H")
        driver.release()
        device.release()
        if len(self._id_descs) != self.num:
            self._id_descs = [0] * self.num

    def _release_views(self) -> None:
        for name in ("_ring16", "_ring32", "_ring", "_driver_area", "_device_area"):
            view = getattr(self, name)
            if view is not None:
                view.release()
                setattr(self, name, None)

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE of a packed ring: avail position and wrap in the low half, used
        position and wrap in the high half (vhost-user.rst)."""
        self._avail_pos = base & POS_MASK
        self._avail_wrap = base >> WRAP_SHIFT & 1
        used = base >> BASE_USED_SHIFT
        self._used_pos = used & POS_MASK
        self._used_wrap = used >> WRAP_SHIFT & 1

    def get_base(self) -> int:
        avail = self._avail_pos | self._avail_wrap << WRAP_SHIFT
        used = self._used_pos | self._used_wrap << WRAP_SHIFT
        return avail | used << BASE_USED_SHIFT

    def _start_layout(self) -> None:
        num = self.num
        if self._avail_pos >= num or self._used_pos >= num:
            raise VirtqueueError(
                f"queue {self.index}: vring base {self.get_base():#x} has a position beyond "
                f"the ring of {num}")
        self._id_descs = [0] * num  # nothing in flight at start, unless the region says so
        self._taken = self._returned = 0
        self._kicks_off = False
        self._resubmits = []
        if self._inflight is not None:
            self._recover_inflight(self._inflight)
        self._signalled_pos, self._signalled_wrap = self._used_pos, self._used_wrap
        self._signalled_returned = 0

    def _recover_inflight(self, tracker: PackedInflightQueue) -> None:
        """Continue where the inflight region says the ring is, with its buffers in flight
        served first (vhostmem/inflight_packed.py). QEMU 7.2 sends the base it had before the
        backend died (for a packed ring it restores nothing), so the region wins."""
        ring16 = self._ring16
        assert ring16 is not None
        plan = tracker.recover(self.num, self._used_pos, self._used_wrap,
                               lambda i: ring16[i * DESC_U16S + FLAGS_U16])
        if plan is not None:
            frontend = self.get_base()
            self._avail_pos, self._avail_wrap = plan.avail_pos, plan.avail_wrap
            self._used_pos, self._used_wrap = plan.used_pos, plan.used_wrap
            if self.get_base() != frontend:
                log.info("virtqueue %d: the frontend's base %#x is not where the ring is; the "
                         "inflight region's %#x is used", self.index, frontend, self.get_base())
            for r in plan.resubmits:
                self._id_descs[r.buffer_id] = r.count
                self._taken += r.count
            self._resubmits = plan.resubmits[::-1]
            self._kicks_off = True  # the dead backend may have left DISABLE in our area
        # The previous backend may have published completions without signalling them.
        signal_eventfd(self.call_fd)

    # -------------------------------------------------------------- hot path

    def new_turn(self) -> None:
        self._turn_left = TURN_BUDGET
        self.yielded = False

    def pop(self) -> DescChain | None:
        """The next available chain (its ``head`` is its buffer id), or None: nothing
        available, the queue cannot run, or the turn's budget is used up (``yielded``)."""
        if not (self.started and self.enabled) or self.broken:
            return None
        if self._turn_left <= 0:
            self.yielded = True
            return None
        if self._mem_gen != self.mem.generation:
            try:
                self._map()
            except VirtqueueError as exc:
                self.mark_broken(str(exc))
                return None
        if self._resubmits:
            chain = self._pop_resubmitted()
            if chain is not None or self.broken or self.yielded:
                return chain
        ring16 = self._ring16
        assert ring16 is not None
        while True:
            pos = self._avail_pos
            wrap = self._avail_wrap
            # Available: AVAIL equal to the wrap counter and USED not (2.8.1).
            want = VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED
            if ring16[pos * DESC_U16S + FLAGS_U16] & AVAIL_USED != want:  # read once
                if self._rearm(pos, wrap) & AVAIL_USED != want:
                    return None
            elif not self.event_idx and not self._kicks_off:
                self._set_device_event(RING_EVENT_FLAGS_DISABLE, 0)
            try:
                chain, count, gpas = self._walk_packed(pos)
            except ChainError as exc:
                self.mark_broken(f"chain at descriptor {pos}: {exc}")
                return None
            except PackedOutsideMemoryError as exc:
                if not self._take(exc.buffer_id, exc.count, pos):
                    return None
                self._fail_request(exc.buffer_id, exc)
                self._turn_left -= 1
                if self._turn_left <= 0:
                    self.yielded = True
                    return None
                continue
            head = chain.head
            if not self._take(head, count, pos):
                return None
            if self._inflight is not None:  # recorded before the request is served
                assert self._walk_raw is not None
                self._inflight.fetched(head, self._walk_raw)
            if gpas is not None:  # migrating: only once the id is known valid and taken
                self._written[head] = gpas
            self._turn_left -= 1 + ((chain.readable_len + chain.writable_len) >> TURN_BYTES_SHIFT)
            return chain

    def _pop_resubmitted(self) -> DescChain | None:
        """The next buffer in flight at a crash, walked from the region's copy of its
        descriptors (the ring slots may hold used descriptors by now). None when the copies
        are used up, the queue broke, or the turn's budget is spent."""
        while self._resubmits:
            r = self._resubmits.pop()
            try:
                chain, _, gpas = self._walk_packed(0, r.descs)
            except ChainError as exc:
                self.mark_broken(f"buffer {r.buffer_id} resubmitted from the inflight region: "
                                 f"{exc}")
                return None
            except PackedOutsideMemoryError as exc:
                self._fail_request(r.buffer_id, exc)
                self._turn_left -= 1
                if self._turn_left <= 0:
                    self.yielded = True
                    return None
                continue
            if gpas is not None:
                self._written[chain.head] = gpas
            self._turn_left -= 1 + ((chain.readable_len + chain.writable_len) >> TURN_BYTES_SHIFT)
            return chain
        return None

    def _take(self, buffer_id: int, count: int, pos: int) -> bool:
        """Record a popped buffer and move the avail position past its descriptors; False
        (the queue broke) for an id out of range or in flight, or more descriptors in flight
        than the ring holds."""
        num = self.num
        id_descs = self._id_descs
        if (buffer_id >= num or id_descs[buffer_id]
                or self._taken - self._returned + count > num) and not self._admit(
                    buffer_id, count, pos):
            return False
        id_descs[buffer_id] = count
        self._taken += count
        pos += count
        if pos >= num:
            pos -= num
            self._avail_wrap ^= 1
        self._avail_pos = pos
        return True

    def _admit(self, buffer_id: int, count: int, pos: int) -> bool:
        """The checks of :meth:`_take` that failed without the lock, made for good: breaks
        the queue and returns False, unless completions on I/O threads made room meanwhile."""
        num = self.num
        if buffer_id >= num:
            self.mark_broken(f"descriptor {pos}: buffer id {buffer_id} >= size {num}")
            return False
        if self._id_descs[buffer_id]:
            self.mark_broken(f"descriptor {pos}: buffer id {buffer_id} is already in flight")
            return False
        with self._idle:  # completions on I/O threads count under the lock
            over = self._taken - self._returned + count > num
        if over:
            self.mark_broken(f"descriptor {pos}: {count} more descriptors made available "
                             f"with {self._taken - self._returned} of {num} in flight")
        return not over

    def _walk_packed(self, pos: int, copy: bytes | None = None,
                     ) -> tuple[DescChain, int, list[tuple[int, int]] | None]:
        """The chain starting at ring position ``pos`` (or in ``copy``, descriptors in the
        ring's format from the inflight region), how many ring descriptors it takes, and
        (while migrating) the guest ranges of its writable buffers. While an inflight region
        tracks the ring, the ring descriptors' copies are kept in ``_walk_raw`` for it. Each
        descriptor (and indirect table entry) is copied once (one unpack) and decided on from
        the copy; the buffer id is the last ring descriptor's (2.8.6). Buffers in the cached
        region are sliced here, as in ChainWalker._walk; others go through
        :meth:`_translate_into`."""
        ring = self._ring if copy is None else copy
        raw: list[tuple[int, int, int, int]] | None = (
            [] if self._inflight is not None and copy is None else None)
        num = self.num
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rlen = wlen = 0
        bad: str | None = None
        gpas: list[tuple[int, int]] | None = None if self.dirty is None else []
        lo, hi, rview, rbase = self._region_cache
        count = 0  # ring descriptors taken
        table: memoryview | None = None  # an indirect table, once the chain reached one
        entry = entries = 0
        try:
            while True:
                if table is None:
                    count += 1
                    if count > num:
                        raise ChainError(f"no descriptor without NEXT within the ring of {num}")
                    addr, length, buffer_id, flags = _PDESC.unpack_from(ring, pos * DESC_SIZE)  # type: ignore[arg-type]
                    if raw is not None:  # tracked: the region keeps this copy
                        raw.append((addr, length, buffer_id, flags))
                    pos = pos + 1 if pos + 1 < num else 0
                    if flags & VRING_DESC_F_INDIRECT:  # ends the chain (2.8.8)
                        table = self._indirect_table(addr, length, flags, False)
                        entries = length // DESC_SIZE
                        continue
                elif entry < entries:
                    addr, length, _, flags = _PDESC.unpack_from(table, entry * DESC_SIZE)
                    flags &= VRING_DESC_F_WRITE  # a table entry's only flag (2.8.8)
                    entry += 1
                else:
                    break
                if flags & VRING_DESC_F_WRITE:
                    wlen += length
                    target = writable
                    if gpas is not None:
                        gpas.append((addr, length))
                else:
                    if wlen:
                        raise ChainError("a device-readable descriptor follows a writable one")
                    rlen += length
                    target = readable
                if length and bad is None:
                    if lo <= addr and addr + length <= hi:
                        off = addr - rbase
                        target.append(rview[off: off + length])  # type: ignore[index]
                    else:
                        bad = self._translate_into(target, addr, length)
                        lo, hi, rview, rbase = self._region_cache
                if table is None and not flags & VRING_DESC_F_NEXT:
                    break
        finally:
            if table is not None:
                table.release()
        if bad is not None:
            raise PackedOutsideMemoryError(bad, (addr, length, flags), buffer_id, count)
        # The writable ranges go to _written in pop once _take accepted the buffer id: an id
        # out of range or in flight must not replace those of the request holding it.
        self._walk_raw = raw
        return DescChain(buffer_id, readable, rlen, writable, wlen), count, gpas

    def _translate_into(self, target: list[memoryview], addr: int, length: int) -> str | None:
        """Append the views of a buffer outside the cached region (and cache its region);
        returns why it is not in guest memory instead, if it is not."""
        try:
            target += self.mem.translate(addr, length)
        except GuestMemoryError as exc:
            return str(exc)  # the walk goes on: a chain without end still breaks the queue
        self._cache_region(addr)
        return None

    def pop_batch(self) -> list[DescChain]:
        """The split ring's batch call over this layout's :meth:`pop`: every chain it hands
        out this turn. Completions stay per request (:meth:`push_used_batch`): a batched
        commit is unsafe with inflight tracking (docs/inflight.md, "Batched commits")."""
        batch: list[DescChain] = []
        pop = self.pop
        while (chain := pop()) is not None:
            batch.append(chain)
        return batch

    def push_used_batch(self, chains: list[DescChain], lengths: list[int]) -> None:
        """:meth:`push_used` for each chain of a batch, in order."""
        push = self.push_used
        for chain, written in zip(chains, lengths, strict=True):
            push(chain.head, written)

    def _rearm(self, pos: int, wrap: int) -> int:
        """Ask for a kick at ``pos`` again, then read its flags once more: the driver may have
        made it available meanwhile. Returns that flags word (the one value decided on)."""
        if self.event_idx:
            self._set_device_event(RING_EVENT_FLAGS_DESC, pos | wrap << WRAP_SHIFT)
        elif self._kicks_off:
            self._set_device_event(RING_EVENT_FLAGS_ENABLE, 0)
        _fence()  # the area store before the flags load (store -> load)
        assert self._ring16 is not None
        return self._ring16[pos * DESC_U16S + FLAGS_U16]

    def push_used(self, head: int, written_len: int) -> None:
        """Return buffer ``head`` (its id) with the bytes written into it: one used
        descriptor at the used position, which moves on by the descriptors it took."""
        ring16 = self._ring16
        ring32 = self._ring32
        if ring16 is None or ring32 is None:
            return  # rings were unmapped (reset): nothing may be written
        count = self._id_descs[head] if 0 <= head < len(self._id_descs) else 0
        if not count:
            log.error("virtqueue %d: completion of buffer id %d, which is not in flight",
                      self.index, head)
            return
        if written_len > U32_MAX:
            log.error("virtqueue %d: used length %d of request %d exceeds u32; reported as %d",
                      self.index, written_len, head, U32_MAX)
            written_len = U32_MAX
        pos = self._used_pos
        ring32[pos * DESC_U32S + LEN_U32] = written_len
        ring16[pos * DESC_U16S + ID_U16] = head
        flags = AVAIL_USED if self._used_wrap else 0
        if written_len:
            flags |= VRING_DESC_F_WRITE
        # The id may be reused once the driver sees the flags: free it first.
        self._id_descs[head] = 0
        self._returned += count
        dirty = self.dirty
        if dirty is not None:  # migrating: the buffers and this descriptor, before its flags
            ranges = self._written.pop(head, [])
            if self.log_used_gpa is not None and self._addr is not None:
                ranges.append((self._addr[0] + pos * DESC_SIZE, DESC_SIZE))
            self._mark(dirty, ranges)
        new_pos, new_wrap = pos + count, self._used_wrap
        if new_pos >= self.num:
            new_pos -= self.num
            new_wrap ^= 1
        tracker = self._inflight
        if tracker is not None:  # the region's used position moves first (spec order)
            entry = tracker.completing(head, new_pos, new_wrap)
        # Stores become visible in program order (x86 TSO): id and len before the flags.
        ring16[pos * DESC_U16S + FLAGS_U16] = flags
        if tracker is not None:
            tracker.completed(entry)
        self._used_pos, self._used_wrap = new_pos, new_wrap
        self._unsignalled = True
