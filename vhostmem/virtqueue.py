"""Split virtqueue (virtio 1.2 section 2.7), device side, over :class:`GuestMemory`.

Ring structures are read and written through memoryviews into the guest's shared memory
(``struct.unpack_from`` on the descriptor table, ``memoryview.cast`` views on the avail and used
rings), so the hot path allocates only the per-chain lists of buffer views.

Addresses: :meth:`Virtqueue.set_addr` takes **guest physical addresses**; the caller translates
the frontend virtual addresses of SET_VRING_ADDR with ``GuestMemory.uva_to_gpa`` first.

Error policy, per case:

* the chain itself is malformed (a loop: more descriptors than the table holds; ``next`` out of
  range; an indirect descriptor inside an indirect table, with NEXT set, of a length that is not a
  non-zero multiple of 16 or larger than ``num * 16``, or whose table is not in guest memory; an
  indirect descriptor when INDIRECT_DESC was not acked; a readable descriptor after a writable
  one), the head index is out of range, or the avail index ran more than ``num`` ahead of us: the
  queue is marked **broken**, the reason is logged once and the err eventfd is signalled. A broken
  queue processes nothing until :meth:`reset`.
* a data buffer of a well-formed chain is not in guest memory: only that **request fails**: no
  data is read or written, the device's ``failure_status`` (blk: the IOERR status byte) is
  written at the end of the chain's last descriptor when that one is device-writable guest
  memory, the chain is completed with the bytes written (0 if none) and the next one is popped.

Requests served on other threads (``hold`` / ``begin`` / ``complete``) publish their used
entries under the queue's completion lock, which every change of the ring views also takes; the
driver is signalled when no held request of the queue still waits for a worker, so a batch
handed to a pool gets one interrupt when its last request completes, not one per request.

Memory ordering: rings are plain shared memory. Stores from this thread become visible in program
order on x86-64 (TSO), which is the host this runs on; the one store->load ordering the protocol
needs (publish used idx / avail_event, then read avail idx / used_event) gets a full fence from a
lock acquire, which is an atomic read-modify-write instruction.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING

from vhostmem import bounds
from vhostmem.descriptors import (
    NO_REGION,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DescChain,
    OutsideMemoryError,
)
from vhostmem.eventfd import KickReader, signal_eventfd
from vhostmem.guest_memory import GuestMemory, GuestMemoryError
from vhostmem.packed_ring import VIRTIO_F_RING_PACKED, PackedRing
from vhostmem.queue_stats import QueueStats
from vhostmem.split_ring import (
    MAX_QUEUE_SIZE,
    TURN_BUDGET,
    U32_MAX,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
    SplitRing,
    VirtqueueError,
)

if TYPE_CHECKING:
    from vhostmem.dirty_log import DirtyLog
    from vhostmem.inflight import InflightQueue
    from vhostmem.inflight_packed import PackedInflightQueue

__all__ = [
    "MAX_QUEUE_SIZE",
    "TURN_BUDGET",
    "U32_MAX",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "DescChain",
    "PackedVirtqueue",
    "Virtqueue",
    "VirtqueueError",
]

log = logging.getLogger(__name__)

# SET_VRING_ADDR flags: log used ring writes at log_guest_addr (vhost-user.rst).
VHOST_VRING_F_LOG = 1




class Virtqueue(SplitRing, QueueStats):
    """Device side of one virtqueue. Rings start stopped and disabled.

    What every layout shares lives here; the layout's own code (ring views, base, start, the
    hot path ``pop`` / ``push_used`` / ``notify``) is a mixin placed first in the MRO: this
    class is a split ring (:class:`SplitRing`), :class:`PackedVirtqueue` a packed one. The
    negotiated features choose (:meth:`set_features` swaps the class of a stopped queue), so a
    device calls the same methods on either and the split hot path pays no indirection."""

    def __init__(
        self,
        index: int,
        mem: GuestMemory,
        max_size: int = MAX_QUEUE_SIZE,
        failure_status: bytes = b"",
        indirect_floor: int = 0,
    ) -> None:
        self.index = index
        # Indirect tables of up to max(num, indirect_floor) descriptors are accepted (the
        # device's longest request: blk seg_max + 2).
        self.indirect_floor = indirect_floor
        self.mem = mem
        self.max_size = max_size
        # Written at the end of a request that failed because a buffer is outside guest memory.
        self.failure_status = failure_status
        self.num = 0
        self._kick = KickReader(-1)
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.started = False
        self.enabled = False
        self.broken = False
        self.broken_reason = ""
        self.event_idx = False
        self.indirect = False
        self._addr: tuple[int, int, int] | None = None  # desc, avail, used GPAs
        # SET_VRING_ADDR as the frontend sent it (its own addresses), kept to resolve the ring
        # again after a memory table change: the one copy of the ring's configuration.
        self.frontend_addr: tuple[int, int, int, int, int] | None = None
        self._turn_left = TURN_BUDGET
        self.yielded = False  # the last pop stopped because the turn's budget was used up
        # Live migration: the dirty log while VHOST_F_LOG_ALL is on, the guest address to log
        # used ring writes at (VHOST_VRING_F_LOG in SET_VRING_ADDR), and the writable ranges of
        # each chain in flight, marked when it completes.
        self.dirty: DirtyLog | None = None
        self.log_used_gpa: int | None = None
        self._written: dict[int, list[tuple[int, int]]] = {}
        self.paused = False  # no new chain is taken (logging being switched on)
        self._region_cache = NO_REGION
        self._inflight: InflightQueue | PackedInflightQueue | None = None  # INFLIGHT_SHMFD
        self._signalled_used = 0
        self._signalled_valid = False
        self._unsignalled = False
        self._no_notify = False
        self._bad_buffer_logged = False
        self._mem_gen = -1
        self._layout_reset()  # the layout's positions and (no) ring views
        # Requests handed to other threads (io_mode="thread"); stop() waits for them. ``queued``
        # of them were not picked up by a worker yet.
        self.inflight = 0
        self.queued = 0
        # One lock for completions and the idle wait. The hot path (hold, complete,
        # complete_many: per request or batch on the event loop) takes ``_lock`` itself, a C
        # context manager, rather than the Condition's Python-level __enter__/__exit__, and
        # wakes idle waiters only when there are some (``_idle_waiters``, counted under it).
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._idle_waiters = 0
        self.stats_init()  # queue_stats.py: counters for the management socket

    # ------------------------------------------------------------ configuration

    def set_num(self, num: int) -> None:
        if not 0 < num <= self.max_size:
            raise VirtqueueError(f"queue {self.index}: size {num} not in 1..{self.max_size}")
        self.num = num
        self.unmap()

    def set_addr(
        self,
        desc_gpa: int,
        used_gpa: int,
        avail_gpa: int,
        frontend_addr: tuple[int, int, int, int, int] | None = None,
    ) -> None:
        """Set the ring GPAs (already translated from the frontend's virtual addresses).

        All or nothing: alignment is checked and, when the size is known, the rings are resolved
        before anything is stored, so a refused address leaves a running ring as it was.
        ``frontend_addr`` is the request as the frontend sent it (kept for re-resolving).
        """
        for (what, align), gpa in zip(self.RING_PARTS, (desc_gpa, avail_gpa, used_gpa),
                                      strict=True):
            if gpa % align:
                raise VirtqueueError(
                    f"queue {self.index}: {what} address {gpa:#x} is not {align}-byte aligned"
                )
        log_used = None
        if frontend_addr is not None and frontend_addr[0] & VHOST_VRING_F_LOG:
            log_used = frontend_addr[4]  # log_guest_addr: a guest physical address
            self._check_log_addr(log_used)
        addr = (desc_gpa, avail_gpa, used_gpa)
        views = self._resolve(addr) if self.num else None
        self._addr = addr
        self.frontend_addr = frontend_addr
        self.log_used_gpa = log_used
        if views is not None:
            self._install(views)  # swaps the views in one step: completions never miss them
        else:
            self.unmap()

    def _check_log_addr(self, gpa: int) -> None:
        """log_guest_addr names where the used ring is in guest-physical memory (QEMU sends
        the used ring's address): a range outside guest memory is a frontend error, refused
        here rather than reported at every completion."""
        length = self.ring_sizes()[2] if self.num else 1
        try:
            for view in self.mem.translate(gpa, length):
                view.release()  # only the check was wanted: pin no mapping
        except GuestMemoryError as exc:
            raise VirtqueueError(
                f"queue {self.index}: log_guest_addr {gpa:#x} (VHOST_VRING_F_LOG) is not in "
                f"guest memory: {exc}") from None

    def set_inflight(self, tracker: InflightQueue | PackedInflightQueue | None) -> None:
        """Track fetched heads in a shared inflight region (vhostmem/inflight.py); the next
        :meth:`start` recovers from it. None stops tracking."""
        self._inflight = tracker
        if tracker is not None:
            tracker.lock = self._idle  # complete() publishes and clears under it

    def set_dirty_log(self, dirty: DirtyLog | None) -> None:
        """Start (a log) or stop (None) marking what this queue writes into guest memory.
        Swapped under the completion lock, which every completion holds in thread mode. A log
        replacing another (QEMU resizes it) keeps the ranges of the chains in flight: they
        are marked in the new one when they complete."""
        with self._idle:
            self.dirty = dirty
            if dirty is None:
                self._written.clear()

    def set_features(self, acked: int) -> None:
        self.event_idx = bool(acked >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(acked >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self._set_layout(bool(acked >> VIRTIO_F_RING_PACKED & 1))

    def _set_layout(self, packed: bool) -> None:
        """Make this queue a packed or a split one (its class: the layout's methods come
        first in the MRO). Only while stopped: the frontend sends SET_FEATURES before it
        configures the rings; a started ring whose layout changes is broken."""
        if self.packed == packed:
            return
        if self.started:
            self.mark_broken("VIRTIO_F_RING_PACKED changed while the ring runs")
            return
        self.unmap()  # the old layout's views
        if self._inflight is not None and self._inflight.packed != packed:
            # QEMU sends SET_FEATURES before the SET_INFLIGHT_FD of the new layout.
            log.info("virtqueue %d: the inflight region is laid out for the other ring layout: "
                     "not tracked until SET_INFLIGHT_FD", self.index)
            self._inflight = None
        self.__class__ = PackedVirtqueue if packed else Virtqueue
        self._layout_reset()

    def set_kick_fd(self, fd: int) -> None:
        """Take ownership of the kick eventfd (-1 for none); it is made non-blocking."""
        _close(self.kick_fd)
        self.kick_fd = fd
        self._kick = KickReader(fd)

    def set_call_fd(self, fd: int) -> None:
        """Take ownership of the call eventfd (-1 for none); it is made non-blocking.

        Swapped under the completion lock, which every signal from a worker thread holds: the
        old fd is closed only once no thread can be signalling it (its number could be reused
        at once), and nothing waits for requests in flight."""
        if fd >= 0:
            os.set_blocking(fd, False)
        with self._idle:
            old, self.call_fd = self.call_fd, fd
            self._signalled_valid = False
            _close(old)

    def set_err_fd(self, fd: int) -> None:
        """Take ownership of the error eventfd (-1 for none); it is made non-blocking."""
        _close(self.err_fd)
        if fd >= 0:
            os.set_blocking(fd, False)
        self.err_fd = fd

    def enable(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def disable(self) -> None:
        self.enabled = False

    def ready_to_start(self) -> bool:
        return self.num > 0 and self._addr is not None

    def start(self) -> None:
        """Resolve the rings and pick up the used index the driver sees."""
        if not self.ready_to_start():
            raise VirtqueueError(f"queue {self.index}: start without size or addresses")
        self._map()
        self._signalled_valid = False
        self._start_layout()
        self.started = True

    def start_elsewhere(self) -> None:
        """Mark the ring started while another process serves it (a data-plane worker,
        vhostmem/session_workers.py): its structures are checked to lie in guest memory, but
        neither mapped nor read here (the worker reads the ring; this copy is the record)."""
        if not self.ready_to_start() or self._addr is None:
            raise VirtqueueError(f"queue {self.index}: start without size or addresses")
        for view in self._resolve(self._addr):
            view.release()
        self.started = True

    def tracked(self) -> bool:
        """Whether an inflight region tracks this queue (INFLIGHT_SHMFD)."""
        return self._inflight is not None

    def stop(self) -> bool:
        """Stop processing (nothing more is popped); whether no request is in flight on other
        threads. Never waits: the caller awaits :meth:`idle` before it reports the ring's
        position (GET_VRING_BASE) or lets go of its memory."""
        self.started = False
        self.yielded = False
        return self.idle()

    def idle(self) -> bool:
        """Whether no popped request is still being served on another thread."""
        with self._lock:
            return self.inflight == 0

    # ------------------------------------------------------- requests in flight

    def hold(self, count: int = 1, *, waiting: bool = True) -> None:
        """``count`` popped chains are handed to another thread: :meth:`begin` when a worker
        takes one up, :meth:`complete` when it is done. ``waiting=False``: they are in service
        already (an asynchronous backend's requests), no :meth:`begin` follows."""
        with self._lock:
            self.inflight += count
            if waiting:
                self.queued += count

    def begin(self) -> None:
        """A worker started serving a held chain."""
        with self._lock:
            self.queued -= 1

    def complete(self, head: int, written_len: int) -> None:
        """Thread-safe ``push_used`` for a chain taken with :meth:`hold`; the driver is
        signalled once no other held chain waits for a worker (whichever completion comes
        last in a batch signals it)."""
        with self._lock:
            try:
                self.push_used(head, written_len)
                if not self.queued:
                    self.notify()
            finally:
                self.inflight -= 1
                if not self.inflight and self._idle_waiters:
                    self._idle.notify_all()

    def complete_many(self, done: list[tuple[int, int]]) -> None:
        """:meth:`complete` for a batch of held chains, (head, written_len) each, with one
        signal for the batch (an asynchronous backend's replies read in one wake-up)."""
        with self._lock:
            try:
                for head, written_len in done:
                    self.push_used(head, written_len)
                if not self.queued:
                    self.notify()
            finally:
                self.inflight -= len(done)
                if not self.inflight and self._idle_waiters:
                    self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False on timeout."""
        with self._idle:
            self._idle_waiters += 1
            try:
                return self._idle.wait_for(lambda: self.inflight == 0, timeout)
            finally:
                self._idle_waiters -= 1

    def ring_overlaps(self, gpa: int, size: int) -> bool:
        """Whether any ring structure lies in [gpa, gpa + size)."""
        if self._addr is None or not self.num:
            return False
        desc, avail, used = self._addr
        sizes = self.ring_sizes()
        starts = (desc, avail, used)
        return any(a < gpa + size and gpa < a + n for a, n in zip(starts, sizes, strict=True))

    def drain_kick(self) -> bool:
        """Consume the kick eventfd's counter; whether a kick was pending (False without an
        fd). Never blocks, even if the frontend cleared O_NONBLOCK on the shared file."""
        return self._kick.drain()

    def reset(self) -> None:
        """Back to a fresh queue: stopped, disabled, unconfigured, not broken; fds closed. The
        caller made sure no request is in flight (:meth:`idle`)."""
        self.stop()
        self.enabled = False
        self.broken = False
        self.broken_reason = ""
        self.num = 0
        self._addr = None
        self.frontend_addr = None
        self.log_used_gpa = None
        self.paused = False
        self.set_dirty_log(None)
        self._inflight = None
        self._signalled_valid = False
        self._bad_buffer_logged = False
        self.event_idx = self.indirect = False
        self.unmap()
        self._set_layout(False)
        self._layout_reset()
        self.set_kick_fd(-1)
        self.set_call_fd(-1)
        self.set_err_fd(-1)

    def close(self) -> None:
        self.reset()

    # ------------------------------------------------------------------ rings

    def _map(self) -> None:
        """(Re)resolve the ring views at the stored addresses; on failure the old views are
        released (the ring cannot run on memory the table no longer has)."""
        assert self._addr is not None
        try:
            views = self._resolve(self._addr)
        except VirtqueueError:
            self.unmap()
            raise
        self._install(views)

    def _resolve(self, addr: tuple[int, int, int]) -> tuple[memoryview, memoryview, memoryview]:
        """Views of the descriptor table, avail ring and used ring at ``addr``; changes nothing."""
        sizes = self.ring_sizes()
        views: list[memoryview] = []
        try:
            for gpa, length in zip(addr, sizes, strict=True):
                views.append(self.mem.view(gpa, length))
        except GuestMemoryError as exc:
            for view in views:
                view.release()  # the traceback must not pin the old mappings
            raise VirtqueueError(f"queue {self.index}: ring not in guest memory: {exc}") from None
        desc, avail, used = views
        return desc, avail, used

    def _install(self, views: tuple[memoryview, memoryview, memoryview]) -> None:
        """Make ``views`` the ring views. Under the completion lock: a worker thread completing
        a request meanwhile writes its used entry through the old views or the new ones, never
        through released ones (both map the same guest memory)."""
        with self._idle:
            self._drop_views()
            self._set_views(*views)  # the layout keeps the views it needs, releases the rest
            self._mem_gen = self.mem.generation
        self.mem.reap()

    def unmap(self) -> None:
        """Release the ring views so that replaced guest memory can be unmapped; a started
        ring resolves them again on its next pop, a stopped one when it starts."""
        with self._idle:
            self._drop_views()
        self.mem.reap()

    def _drop_views(self) -> None:
        self._release_views()  # the layout's
        self._mem_gen = -1
        self._region_cache = NO_REGION

    def _fail_request(self, head: int, exc: OutsideMemoryError) -> None:
        """Complete a chain whose buffer is outside guest memory with the failure status."""
        if not self._bad_buffer_logged:
            self._bad_buffer_logged = True
            # str: a record holding the exception would pin its views via the traceback
            log.error("virtqueue %d: request %d failed: %s", self.index, head, str(exc))
        written = self._write_failure_status(exc.last)
        # Under the completion lock (pool threads may be completing other chains) and
        # signalled now: a caller that hands chains to threads never notifies itself.
        with self._idle:
            self.push_used(head, written)
            self.account_failed()  # under the lock: I/O threads may be counting too
            self.notify()

    def mark_broken(self, reason: str) -> None:
        """Stop processing this queue: log the reason once and signal the err eventfd."""
        if not self.broken:
            self.broken = True
            self.broken_reason = reason
            log.error("virtqueue %d broken: %s", self.index, reason)
            signal_eventfd(self.err_fd)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


class PackedVirtqueue(PackedRing, Virtqueue):
    """A virtqueue with the packed layout (virtio 1.2 section 2.8); see packed_ring.py."""


if bounds.ENV_ON:
    bounds.enable()
