"""The hot path of a split virtqueue (virtio 1.2 section 2.7), device side: avail -> used.

:class:`SplitRing` is the part of :class:`~vhostmem.virtqueue.Virtqueue` that takes available
chains (``pop``), returns them (``push_used``) and signals the driver (``notify``), over ring
views the Virtqueue resolved. The Virtqueue owns the state; this file holds what one turn of
work on a split ring does, so the layout-specific code reads in one sitting.

Guest memory is hostile and concurrent: every ring field (avail idx, an avail entry, used_event,
the avail flags, each descriptor) is read once into a local and decided on from that copy;
nothing is re-read to re-derive it (docs/hostile.md, "Read once").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vhostmem.descriptors import (
    DESC_SIZE,
    ChainError,
    ChainWalker,
    DescChain,
    OutsideMemoryError,
)
from vhostmem.eventfd import signal_eventfd

if TYPE_CHECKING:
    from vhostmem.dirty_log import DirtyLog
    from vhostmem.guest_memory import GuestMemory
    from vhostmem.inflight import InflightQueue

log = logging.getLogger("vhostmem.virtqueue")

# Ring flags.
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
# Feature bits this module honours.
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29

USED_ELEM_SIZE = 8
RING_HEADER_SIZE = 4  # flags u16 + idx u16
EVENT_FIELD_SIZE = 2  # used_event / avail_event u16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
IDX_MASK = 0xFFFF
MAX_QUEUE_SIZE = 32768
U32_MAX = 0xFFFFFFFF
# Work one turn of a queue may do before it yields to the event loop (``pop`` returns None and
# ``yielded`` is set; the caller schedules the next turn): each chain costs one unit plus one per
# 64 KiB of its buffers, so a turn is at most TURN_BUDGET small requests or ~16 MiB of data.
# Another device's message then waits for at most a few milliseconds of this queue's work.
TURN_BUDGET = 256
TURN_BYTES_SHIFT = 16
USED_RING_OFFSET = RING_HEADER_SIZE  # the used elements follow flags and idx
# Index of the fields in the u16 casts of the rings.
FLAGS = 0
IDX = 1
AVAIL_RING = 2


class VirtqueueError(ValueError):
    """A ring configuration that cannot be used (names the queue and the problem)."""




def _fence() -> None:
    """Full memory barrier (see the module docstring)."""
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


_FENCE_LOCK = threading.Lock()


class SplitRing(ChainWalker):
    """The split layout of a Virtqueue: ring views, base, start, and avail -> used. Mixed into
    :class:`~vhostmem.virtqueue.Virtqueue` (it comes first in the MRO, so the hot path calls
    these methods directly: no per-request indirection), which owns the common state below.
    :class:`~vhostmem.packed_ring.PackedRing` is the other layout, with the same methods."""

    # (what, alignment) of the three SET_VRING_ADDR addresses: desc, avail, used (2.7).
    RING_PARTS = (("descriptor table", DESC_ALIGN), ("avail ring", AVAIL_ALIGN),
                  ("used ring", USED_ALIGN))
    packed = False

    index: int
    mem: GuestMemory
    num: int
    started: bool
    enabled: bool
    broken: bool
    event_idx: bool
    inflight: int
    call_fd: int
    yielded: bool
    _turn_left: int
    _mem_gen: int
    _last_avail: int
    _avail_seen: int
    _used_idx: int
    _inflight: InflightQueue | None
    _signalled_used: int
    _signalled_valid: bool
    _unsignalled: bool
    _no_notify: bool
    _bad_buffer_logged: bool
    _idle: threading.Condition
    _avail: memoryview | None
    _used_hdr: memoryview | None
    _used_ring: memoryview | None
    _avail_event: memoryview | None
    log_used_gpa: int | None
    stat_interrupts: int  # QueueStats (queue_stats.py), mixed in after this class
    account_failed: Callable[[], None]

    _desc: memoryview | None
    _written: dict[int, list[tuple[int, int]]]

    def _map(self) -> None:
        raise NotImplementedError

    def mark_broken(self, reason: str) -> None:
        raise NotImplementedError

    def _fail_request(self, head: int, exc: OutsideMemoryError) -> None:
        raise NotImplementedError

    # ------------------------------------------------------- layout state

    def _layout_reset(self) -> None:
        """Positions and views of a fresh split ring (no views: :meth:`_set_views` sets them)."""
        self._last_avail = 0
        self._avail_seen = 0  # avail idx last read; chains up to it need no re-read
        self._used_idx = 0
        self._desc = None
        self._avail = None
        self._used_hdr = None
        self._used_ring = None
        self._avail_event = None

    def ring_sizes(self) -> tuple[int, int, int]:
        """Bytes of the descriptor table, the avail ring and the used ring (with event idx)."""
        n = self.num
        return (
            n * DESC_SIZE,
            RING_HEADER_SIZE + 2 * n + EVENT_FIELD_SIZE,
            RING_HEADER_SIZE + USED_ELEM_SIZE * n + EVENT_FIELD_SIZE,
        )

    def _set_views(self, desc: memoryview, avail: memoryview, used: memoryview) -> None:
        """Take the resolved views (under the completion lock, old views released)."""
        ring_end = RING_HEADER_SIZE + USED_ELEM_SIZE * self.num
        self._desc = desc
        self._avail = avail.cast("H")
        self._used_hdr = used[:RING_HEADER_SIZE].cast("H")
        self._used_ring = used[RING_HEADER_SIZE:ring_end].cast("I")
        self._avail_event = used[ring_end:].cast("H")
        avail.release()
        used.release()

    def _release_views(self) -> None:
        for name in ("_desc", "_avail", "_used_hdr", "_used_ring", "_avail_event"):
            view = getattr(self, name)
            if view is not None:
                view.release()
                setattr(self, name, None)

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: bits 0-15 are the next avail index (vhost-user.rst)."""
        self._last_avail = self._avail_seen = base & IDX_MASK

    def get_base(self) -> int:
        if self._inflight is not None:
            return self._inflight.base(self._last_avail)
        return self._last_avail

    def _start_layout(self) -> None:
        """Pick up the used index the driver sees; recover the inflight region if attached."""
        assert self._used_hdr is not None
        self._used_idx = self._used_hdr[IDX]
        self._avail_seen = self._last_avail
        self._no_notify = False
        if self._inflight is not None:
            self._recover_inflight()

    def _recover_inflight(self) -> None:
        """Repair the inflight region after a crash and queue its heads for resubmission."""
        assert self._inflight is not None and self._used_ring is not None
        base = self._inflight.recover(self._used_ring, self._used_idx, self.num)
        if base is not None:
            self.set_base(base)
        # The previous backend may have published completions without signalling them.
        signal_eventfd(self.call_fd)

    # -------------------------------------------------------------- hot path

    def new_turn(self) -> None:
        """Start a turn of work: :meth:`pop` hands out chains until the budget is used up."""
        self._turn_left = TURN_BUDGET
        self.yielded = False

    def pop(self) -> DescChain | None:
        """The next available chain, or None when there is none (or the queue can't run, or
        the turn's budget is used up: then ``yielded`` is set and kicks are not re-armed).

        The avail index is read once per batch: chains up to the index last seen are taken
        without touching it again, and it is re-read (re-arming kicks if nothing is new) only
        when they are used up. Every ring field is read once into a local and decided on from
        that copy (docs/hostile.md)."""
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
        avail = self._avail
        assert avail is not None
        num = self.num
        while True:
            last = self._last_avail
            if last == self._avail_seen and not self._fetch_avail(last):
                return None
            if self.inflight >= num and self._over_limit(last):
                return None
            head = avail[AVAIL_RING + last % num]
            self._last_avail = (last + 1) & IDX_MASK
            if self._inflight is not None:
                head = self._inflight.next_head(head)
            if head >= num:
                self.mark_broken(f"avail ring entry {last} holds head {head} >= size {num}")
                return None
            try:
                chain = self._walk(head)
            except ChainError as exc:
                self.mark_broken(f"chain at head {head}: {exc}")
                return None
            except OutsideMemoryError as exc:
                self._fail_request(head, exc)
                self._turn_left -= 1
                if self._turn_left <= 0:
                    self.yielded = True
                    return None
                continue
            self._turn_left -= 1 + ((chain.readable_len + chain.writable_len) >> TURN_BYTES_SHIFT)
            return chain

    def pop_batch(self) -> list[DescChain]:
        """:meth:`pop` for a whole batch in one call: every chain available up to the avail
        idx read once for this batch (:meth:`_fetch_avail`, which re-arms kicks when nothing
        is new), as far as the turn's budget goes. Empty when there is none (or the queue
        can't run, or the budget was used up: then ``yielded`` is set). The caller completes
        the batch (:meth:`push_used_batch`) before it asks for the next one.

        Each avail entry and each descriptor is read once into a local, as in :meth:`pop`;
        a chain that breaks the queue ends the batch (the chains before it are returned and
        must be completed), a chain with a buffer outside guest memory is failed on the spot
        (:meth:`_fail_request`) and the batch goes on."""
        batch: list[DescChain] = []
        if not (self.started and self.enabled) or self.broken:
            return batch
        if self._turn_left <= 0:
            self.yielded = True
            return batch
        if self._mem_gen != self.mem.generation:
            try:
                self._map()
            except VirtqueueError as exc:
                self.mark_broken(str(exc))
                return batch
        while True:
            last = self._last_avail
            if last == self._avail_seen and not self._fetch_avail(last):
                return batch  # nothing new: kicks were re-armed
            self._last_avail = self._take_batch(batch, last, self._avail_seen)
            if batch or self.broken:
                return batch
            # Every chain taken failed on the spot: an empty batch would end the caller's turn
            # with kicks not re-armed (the driver would wait for a kick that never comes), so
            # look again, within the budget.
            if self._turn_left <= 0:
                self.yielded = True
                return batch

    def _take_batch(self, batch: list[DescChain], last: int, seen: int) -> int:
        """Walk the chains of avail entries ``last`` up to ``seen`` into ``batch`` within the
        turn's budget; returns the avail position after the last entry taken."""
        avail = self._avail
        assert avail is not None
        num = self.num
        tracker = self._inflight
        left = self._turn_left
        while last != seen and left > 0:
            if self.inflight + len(batch) >= num and self._over_limit(last, len(batch)):
                break
            entry = last
            head = avail[AVAIL_RING + entry % num]
            last = (entry + 1) & IDX_MASK
            if tracker is not None:
                head = tracker.next_head(head)
            if head >= num:
                self.mark_broken(f"avail ring entry {entry} holds head {head} >= size {num}")
                break
            try:
                chain = self._walk(head)
            except ChainError as exc:
                self.mark_broken(f"chain at head {head}: {exc}")
                break
            except OutsideMemoryError as exc:
                self._fail_request(head, exc)
                left -= 1
                continue
            left -= 1 + ((chain.readable_len + chain.writable_len) >> TURN_BYTES_SHIFT)
            batch.append(chain)
        self._turn_left = left
        return last

    def _over_limit(self, last: int, taken: int = 0) -> bool:
        """A chain is available while ``num`` requests are in flight (``taken`` of them popped
        in the current batch): a driver has only ``num`` descriptors, so it made available a
        chain whose descriptors we still hold (libvhost-user refuses the same at ``inuse ==
        num``). Checked under the completion lock, where a completion's used entry and its
        in-flight count change together."""
        with self._idle:
            if self.inflight + taken < self.num:
                return False
        self.mark_broken(
            f"avail entry {last} made available with all {self.num} descriptors in flight"
        )
        return True

    def _fetch_avail(self, last: int) -> bool:
        """Read avail idx (once) into ``_avail_seen``; False when nothing new is available
        (kicks are re-armed first) or the index is bogus (the queue breaks)."""
        avail = self._avail
        assert avail is not None
        avail_idx = avail[IDX]
        if avail_idx == last:
            avail_idx = self._rearm(last)
            if avail_idx == last:
                return False
        if (avail_idx - last) & IDX_MASK > self.num:
            self.mark_broken(f"avail idx {avail_idx} is more than {self.num} ahead of {last}")
            return False
        if not self.event_idx and not self._no_notify:
            self._set_used_flags(VRING_USED_F_NO_NOTIFY)
        self._avail_seen = avail_idx
        return True

    def _rearm(self, last: int) -> int:
        """Ask for kicks again, then read avail idx once more: buffers may have arrived
        meanwhile. Returns that index (the one value the caller decides on)."""
        if self.event_idx:
            assert self._avail_event is not None
            self._avail_event[0] = last
            if self.dirty is not None:
                self._log_used(USED_RING_OFFSET + USED_ELEM_SIZE * self.num, EVENT_FIELD_SIZE)
        elif self._no_notify:
            self._set_used_flags(0)
        _fence()
        assert self._avail is not None
        return self._avail[IDX]

    def _set_used_flags(self, flags: int) -> None:
        assert self._used_hdr is not None
        self._used_hdr[FLAGS] = flags
        self._no_notify = bool(flags & VRING_USED_F_NO_NOTIFY)
        if self.dirty is not None:
            self._log_used(0, RING_HEADER_SIZE)

    def push_used(self, head: int, written_len: int) -> None:
        """Return a chain to the driver with the number of bytes written into it."""
        ring = self._used_ring
        hdr = self._used_hdr
        if ring is None or hdr is None:
            return  # rings were unmapped (reset): nothing may be written
        if written_len > U32_MAX:  # checked before any store: the entry is written whole
            written_len = self._clamp_used(head, written_len)
        pos = self._used_idx % self.num
        slot = pos * 2
        ring[slot] = head
        ring[slot + 1] = written_len
        dirty = self.dirty
        if dirty is not None:  # migrating: the chain's buffers and this entry, before idx
            self._log_completion(dirty, head, pos)
        self._used_idx = idx = (self._used_idx + 1) & IDX_MASK
        hdr[IDX] = idx  # its page is marked once per batch, in notify()
        if self._inflight is not None:
            self._inflight.completed(head, idx)
        self._unsignalled = True

    def push_used_batch(self, chains: list[DescChain], lengths: list[int]) -> None:
        """:meth:`push_used` for a batch, ``lengths[i]`` bytes written into ``chains[i]``: the
        used entries are stored first and the used idx once after them, so the driver sees
        the whole batch at once (virtio 1.2 2.7.8.2: entries visible before idx; stores are
        seen in program order on x86-64, module docstring of virtqueue.py). The inflight
        region hears of the batch after the idx store (a crash in between is settled by
        recovery: every head published past the region's used_idx is unflagged). For the
        thread that popped the batch (inline service); chains held for other threads are
        completed with ``complete`` / ``complete_many``, under the completion lock."""
        ring = self._used_ring
        hdr = self._used_hdr
        if ring is None or hdr is None or not chains:
            return  # rings were unmapped (reset): nothing may be written
        num = self.num
        idx = self._used_idx
        dirty = self.dirty
        for chain, written in zip(chains, lengths, strict=True):
            if written > U32_MAX:
                written = self._clamp_used(chain.head, written)
            pos = idx % num
            ring[2 * pos] = chain.head
            ring[2 * pos + 1] = written
            if dirty is not None:  # migrating: the chain's buffers and this entry, before idx
                self._log_completion(dirty, chain.head, pos)
            idx = (idx + 1) & IDX_MASK
        self._used_idx = idx
        hdr[IDX] = idx  # its page is marked once per batch, in notify()
        if self._inflight is not None:
            self._inflight.completed_many([chain.head for chain in chains], idx)
        self._unsignalled = True

    def _clamp_used(self, head: int, written_len: int) -> int:
        log.error("virtqueue %d: used length %d of request %d exceeds u32; reported as %d",
                  self.index, written_len, head, U32_MAX)
        return U32_MAX

    def _log_completion(self, dirty: DirtyLog, head: int, pos: int) -> None:
        """Mark what completing ``head`` wrote into guest memory: every device-writable buffer
        of its chain (the walk recorded their ranges) and its used entry."""
        ranges = self._written.pop(head, [])
        used_gpa = self.log_used_gpa
        if used_gpa is not None:
            ranges.append((used_gpa + USED_RING_OFFSET + USED_ELEM_SIZE * pos, USED_ELEM_SIZE))
        outside = dirty.mark_ranges(ranges)  # one lock for the whole completion
        if outside is not None:
            self._log_outside(*outside)

    def _log_used(self, offset: int, length: int) -> None:
        """Mark bytes of the used ring, when the frontend asked for it (VHOST_VRING_F_LOG,
        at log_guest_addr)."""
        gpa = self.log_used_gpa
        if gpa is not None and self.dirty is not None and not self.dirty.mark(gpa + offset,
                                                                              length):
            self._log_outside(gpa + offset, length)

    def _log_outside(self, gpa: int, length: int) -> None:
        log.error("virtqueue %d: gpa=%#x len=%#x is outside the dirty log; not marked",
                  self.index, gpa, length)

    def notify(self) -> bool:
        """Signal the call eventfd if the driver wants it for the used entries since the last
        call (EVENT_IDX used_event, or NO_INTERRUPT). Returns whether it signalled."""
        if not self._unsignalled or self._avail is None:
            return False
        if self.dirty is not None:
            # The used idx of the batch pushed since the last notify, marked after its last
            # store: one mark per batch, not per request. Every push is followed by a notify
            # (inline: the end of the turn; thread mode: the batch's last completion, also
            # after a ring stop), so the mark precedes GET_VRING_BASE's answer and with it
            # QEMU's last sync of the log; a sync in between finds it at the next one.
            self._log_used(0, RING_HEADER_SIZE)
        self._unsignalled = False
        new = self._used_idx
        if self.event_idx:
            _fence()  # used idx must be visible before used_event is read
            event = self._avail[AVAIL_RING + self.num]
            old = self._signalled_used
            need = (not self._signalled_valid) or (
                (new - event - 1) & IDX_MASK < (new - old) & IDX_MASK
            )
        else:
            need = not self._avail[FLAGS] & VRING_AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        self._signalled_valid = True
        if need:
            signal_eventfd(self.call_fd)
            self.stat_interrupts += 1
        return need


