"""Inflight I/O tracking (vhost-user INFLIGHT_SHMFD), without sockets: the region and what
both ring layouts share (:class:`QueueLayout`, the device-state trailer, :class:`InflightState`),
and the split layout's tracker. The packed layout is in vhostmem/inflight_packed.py.

The backend keeps, in a memfd it shares with the frontend, which descriptor heads it took from
the avail ring and has not returned in the used ring yet. The frontend keeps that memfd across a
backend crash and hands it to the restarted backend (SET_INFLIGHT_FD), which resubmits those
requests before anything new. Layout (QEMU ``docs/interop/vhost-user.rst``, "Inflight I/O
tracking"; the sizes libvhost-user uses, so a region can move between implementations)::

    region  = queue 0 | queue 1 | ... | queue N-1        each queue_region_size(queue_size) bytes
    queue   = features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
              | desc[desc_num]                           header 16 bytes, then 16 bytes per head
    desc    = inflight u8 | padding u8[5] | next u16 | counter u64

Protocol, per queue (:class:`InflightQueue`):

* fetch (``next_head``): ``counter`` of the head gets the next value of a per-queue counter, then
  ``inflight`` is set to 1.
* complete (``completed``): the caller has already written the used element and stored used idx;
  then ``inflight`` is cleared and the region's ``used_idx`` set to used idx. A crash between the
  two stores leaves ``used_idx`` behind the ring's idx, which recovery repairs.
* start (``recover``): a fresh region (version 0) is initialised. Otherwise heads in the used ring
  slots [region used_idx, ring used idx) lose their flag (they completed: the crash hit between
  the two stores above), every head still flagged is resubmitted in counter order, and the avail
  position restarts at the used idx (QEMU restores last_avail_idx to the used idx when the
  backend died; the flagged heads are exactly the consumed-but-unreturned avail entries, so the
  true position is used idx + their number).

After the queues, regions vhostmem creates carry a **device state** trailer of
``DEVICE_STATE_SIZE`` bytes: ``magic u32 | length u16 | reserved u16 | data[length]``. It holds
what the guest chose that the frontend will not replay to a restarted backend (blk: the
writeback byte it set with SET_CONFIG; QEMU 7.2 caches the config it showed the guest and never
sends it again), so a backend killed with SIGKILL comes back with the guest's write-through
setting. A region without the trailer (made by another backend) simply stores nothing.

Resubmission reuses the virtqueue's own fetch loop: :meth:`InflightQueue.recover` returns the
used idx as the avail position, and ``next_head`` hands out the resubmitted heads in place of
what the avail ring holds at those positions, one per position, until the list is empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vhostmem.sealed_region import map_sealed

log = logging.getLogger(__name__)

QUEUE_HEADER_SIZE = 16
DESC_STATE_SIZE = 16
REGION_ALIGN = 64  # each queue region starts on a 64-byte boundary
REGION_VERSION = 1  # 0 means "not initialised yet"
MAX_QUEUE_SIZE = 32768
MAX_QUEUES = 0xFFFF
IDX_MASK = 0xFFFF
INFLIGHT = 1
# u16 indices of the header fields (features is u16 0..3).
H_VERSION = 4
H_DESC_NUM = 5
H_LAST_BATCH_HEAD = 6
H_USED_IDX = 7
# Byte offset of desc[i] is QUEUE_HEADER_SIZE + DESC_STATE_SIZE * i; inside it:
D_INFLIGHT = 0
D_COUNTER = 8
U64_PER_DESC = DESC_STATE_SIZE // 8
U64_COUNTER0 = (QUEUE_HEADER_SIZE + D_COUNTER) // 8  # u64 index of desc[0].counter
# Used ring element: id u32, len u32 (index 2*slot in a u32 view of the ring entries).
USED_ELEM_U32 = 2
# Device state trailer (see the module docstring).
DEVICE_STATE_SIZE = 64
DEVICE_STATE_MAGIC = 0x53444D56  # "VMDS"
_STATE_HEADER = struct.Struct("<IHH")
DEVICE_STATE_MAX = DEVICE_STATE_SIZE - _STATE_HEADER.size
MEMFD_SEALS = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


class InflightError(ValueError):
    """An inflight region that cannot be used (the message names what is wrong)."""


@dataclass(frozen=True)
class QueueLayout:
    """How one queue's part of the region is laid out, and its tracker: the split layout
    here, the packed one in vhostmem/inflight_packed.py (vhost-user.rst defines both)."""

    name: str
    header_size: int
    desc_state_size: int
    tracker: Callable[[memoryview], Any]  # one queue's view -> its tracker

    def queue_region_size(self, queue_size: int) -> int:
        """Bytes of one queue's region: header + one state per entry, rounded up to 64."""
        raw = self.header_size + self.desc_state_size * queue_size
        return (raw + REGION_ALIGN - 1) // REGION_ALIGN * REGION_ALIGN

    def region_size(self, num_queues: int, queue_size: int) -> int:
        return self.queue_region_size(queue_size) * num_queues


def queue_region_size(queue_size: int) -> int:
    """Bytes of one split queue's region: header + one state per head, rounded up to 64."""
    return SPLIT_LAYOUT.queue_region_size(queue_size)


def region_size(num_queues: int, queue_size: int) -> int:
    return SPLIT_LAYOUT.region_size(num_queues, queue_size)


def _check_shape(num_queues: int, queue_size: int, max_queues: int) -> None:
    if not 1 <= num_queues <= max_queues:
        raise InflightError(f"num_queues {num_queues} not in 1..{max_queues} (device queues)")
    if not 1 <= queue_size <= MAX_QUEUE_SIZE:
        raise InflightError(f"queue_size {queue_size} not in 1..{MAX_QUEUE_SIZE}")


def create_inflight_fd(
    num_queues: int, queue_size: int, max_queues: int = MAX_QUEUES,
    layout: QueueLayout | None = None,
) -> tuple[int, dict[str, int]]:
    """A new zero-filled, size-sealed memfd for GET_INFLIGHT_FD and the reply payload, its
    queue areas sized for ``layout`` (default split).

    The caller owns the fd (it stays valid until closed; the frontend gets its own copy).
    """
    layout = layout or SPLIT_LAYOUT
    _check_shape(num_queues, queue_size, max_queues)
    size = layout.region_size(num_queues, queue_size) + DEVICE_STATE_SIZE
    fd = os.memfd_create("vhostmem-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)  # a fresh memfd reads as zeroes: version 0, nothing in flight
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except OSError:
        os.close(fd)
        raise
    payload = {"mmap_size": size, "mmap_offset": 0, "num_queues": num_queues,
               "queue_size": queue_size}
    return fd, payload


class InflightRegion:
    """A mapped inflight region (all queues); owns the fd and the mapping."""

    def __init__(self, fd: int, mm: mmap.mmap, num_queues: int, queue_size: int,
                 layout: QueueLayout | None = None) -> None:
        self.fd = fd
        self.mm = mm
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.layout = layout or SPLIT_LAYOUT
        self.mmap_size = len(mm)
        self._queues: list[Any] = [None] * num_queues
        self.mmap_offset = 0

    @classmethod
    def attach(
        cls,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        max_queues: int = MAX_QUEUES,
        layout: QueueLayout | None = None,
    ) -> InflightRegion:
        """Map a SET_INFLIGHT_FD region laid out for ``layout`` (default split). Takes
        ownership of ``fd``: it is closed on error."""
        layout = layout or SPLIT_LAYOUT
        try:
            _check_shape(num_queues, queue_size, max_queues)
        except InflightError:
            os.close(fd)
            raise
        needed = layout.region_size(num_queues, queue_size)

        def check_size() -> None:
            if mmap_size < needed:
                raise InflightError(
                    f"mmap_size {mmap_size} is smaller than the {needed} bytes the queues need")

        mm = map_sealed(fd, mmap_size, mmap_offset, "inflight", InflightError, check_size)
        region = cls(fd, mm, num_queues, queue_size, layout)
        region.mmap_offset = mmap_offset  # handed on to data-plane workers
        for i in range(num_queues):
            # Like libvhost-user: the frontend sizes every queue with queue_size (desc_num has
            # the same offset in both layouts).
            with region._header(i) as header:
                header[H_DESC_NUM] = queue_size
        log.info("inflight region attached: %d queues of %d, %d bytes (%s rings)", num_queues,
                 queue_size, needed, layout.name)
        return region

    def device_state(self) -> bytes | None:
        """The device state stored in the trailer, or None (no trailer, or nothing stored).
        The trailer is read once into private memory and decided on from that copy."""
        start = self.layout.region_size(self.num_queues, self.queue_size)
        if self.mmap_size < start + DEVICE_STATE_SIZE:
            return None
        raw = self.mm[start : start + DEVICE_STATE_SIZE]
        magic, length, _ = _STATE_HEADER.unpack_from(raw)
        if magic != DEVICE_STATE_MAGIC or length > DEVICE_STATE_MAX:
            return None
        return raw[_STATE_HEADER.size : _STATE_HEADER.size + length]

    def save_device_state(self, data: bytes) -> bool:
        """Store ``data`` in the trailer (the magic last); False if the region has none."""
        start = self.layout.region_size(self.num_queues, self.queue_size)
        if self.mmap_size < start + DEVICE_STATE_SIZE or len(data) > DEVICE_STATE_MAX:
            return False
        body = start + _STATE_HEADER.size
        self.mm[body : body + len(data)] = data
        self.mm[start : body] = _STATE_HEADER.pack(DEVICE_STATE_MAGIC, len(data), 0)
        return True

    def _header(self, index: int) -> memoryview:
        start = index * self.layout.queue_region_size(self.queue_size)
        with memoryview(self.mm) as whole:
            return whole[start : start + QUEUE_HEADER_SIZE].cast("H")

    def queue(self, index: int) -> Any:
        """The tracker of queue ``index`` (one per queue; the same object on every call): an
        :class:`InflightQueue` for split rings, the packed layout's tracker for packed ones."""
        if not 0 <= index < self.num_queues:
            raise InflightError(f"queue {index} not in the region's 0..{self.num_queues - 1}")
        tracker = self._queues[index]
        if tracker is None:
            stride = self.layout.queue_region_size(self.queue_size)
            with memoryview(self.mm) as whole:
                view = whole[index * stride : (index + 1) * stride]
            tracker = self._queues[index] = self.layout.tracker(view)
        return tracker

    def close(self) -> None:
        """Release the views, unmap, close the fd (the frontend's copy lives on)."""
        for tracker in self._queues:
            if tracker is not None:
                tracker.release()
        self._queues = [None] * self.num_queues
        try:
            self.mm.close()
        except BufferError:  # someone still holds a view: the mapping goes with the last one
            log.warning("inflight region still has views; unmapped when they are released")
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class InflightQueue:
    """One split queue's region, plus this process's counter and resubmit list."""

    packed = False  # the layout it tracks (a ring of the other layout refuses it)

    def __init__(self, view: memoryview) -> None:
        self._bytes = view
        self._u16 = view[:QUEUE_HEADER_SIZE].cast("H")
        self._u64 = view.cast("Q")
        self.desc_num = self._u16[H_DESC_NUM]
        self.counter = 1
        # Heads to resubmit, last first (list.pop() is O(1)).
        self._resubmit: list[int] = []
        # The completing side holds it while it publishes and clears (thread io_mode), so a
        # head the driver re-adds cannot be marked before its old flag is cleared.
        self.lock: Any = threading.Lock()

    # ------------------------------------------------------------- fields

    @property
    def version(self) -> int:
        return self._u16[H_VERSION]

    @property
    def used_idx(self) -> int:
        return self._u16[H_USED_IDX]

    @property
    def last_batch_head(self) -> int:
        return self._u16[H_LAST_BATCH_HEAD]

    def counter_of(self, head: int) -> int:
        return self._u64[U64_COUNTER0 + U64_PER_DESC * head]

    def inflight_heads(self) -> list[tuple[int, int]]:
        """(counter, head) of the heads flagged in flight, oldest fetch first. The flags and
        counters are copied out of the shared region once and sorted from that copy: the
        frontend shares the region, and a value read twice could differ."""
        n = self.desc_num
        flags = bytes(self._bytes[QUEUE_HEADER_SIZE + D_INFLIGHT :: DESC_STATE_SIZE][:n])
        counters = self._u64[U64_COUNTER0 :: U64_PER_DESC][:n].tolist()
        return sorted((counters[i], i) for i, flag in enumerate(flags) if flag)

    # ----------------------------------------------------------- hot path

    def next_head(self, head: int) -> int:
        """The head for the next avail position: a resubmitted one first, else ``head`` from
        the avail ring, now marked in flight."""
        if self._resubmit:
            return self._resubmit.pop()
        if head < self.desc_num:
            lock = self.lock
            lock.acquire()  # a Condition's acquire is its lock's C method: cheaper than `with`
            try:
                self._u64[U64_COUNTER0 + U64_PER_DESC * head] = self.counter
                self.counter += 1
                self._bytes[QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head] = INFLIGHT
            finally:
                lock.release()
        return head

    def completed(self, head: int, used_idx: int) -> None:
        """``head`` was just published in the used ring, whose idx is now ``used_idx``."""
        if head < self.desc_num:
            self._bytes[QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head] = 0
            self._u16[H_LAST_BATCH_HEAD] = head
        self._u16[H_USED_IDX] = used_idx

    def completed_many(self, heads: list[int], used_idx: int) -> None:
        """:meth:`completed` for a batch published with one used idx store: every head's flag
        cleared, then the region's used_idx (a crash before it: recovery unflags the heads
        the ring published past the region's used_idx, :meth:`_settle_last_batch`)."""
        flags = self._bytes
        limit = self.desc_num
        for head in heads:
            if head < limit:
                flags[QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head] = 0
        if heads[-1] < limit:
            self._u16[H_LAST_BATCH_HEAD] = heads[-1]
        self._u16[H_USED_IDX] = used_idx

    # ------------------------------------------------------------- start

    def recover(self, used_ring: Sequence[int], used_idx: int, num: int) -> int | None:
        """Bring the region in line with the ring at ring start.

        ``used_ring`` is a u32 view of the used ring's elements, ``used_idx`` the ring's used
        idx, ``num`` its size. Returns the avail position to continue from, or None for a fresh
        region (the frontend's SET_VRING_BASE stands).
        """
        if num > self.desc_num:
            raise InflightError(
                f"ring size {num} exceeds the inflight region's {self.desc_num} entries"
            )
        version = self._u16[H_VERSION]
        if version == 0:
            self._u16[H_USED_IDX] = used_idx
            self._u16[H_VERSION] = REGION_VERSION
            self._resubmit = []
            return None
        if version != REGION_VERSION:
            raise InflightError(f"inflight region version {version}, expected {REGION_VERSION}")
        self._settle_last_batch(used_ring, used_idx, num)
        flagged = self.inflight_heads()
        for _, head in flagged:
            if head >= num:
                log.warning("inflight head %d is outside the ring of %d: dropped", head, num)
                self._bytes[QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head] = 0
        heads = [h for _, h in flagged if h < num]
        if heads:
            last_counter = max(c for c, h in flagged if h < num)
            self.counter = max(self.counter, last_counter + 1)
            log.info("resubmitting %d in-flight requests: heads %s", len(heads), heads)
        self._resubmit = heads[::-1]
        return used_idx

    def _settle_last_batch(self, used_ring: Sequence[int], used_idx: int, num: int) -> None:
        """Heads published in the used ring after the region's used_idx completed: unflag."""
        region_used = self._u16[H_USED_IDX]  # read once: the frontend shares the region
        behind = (used_idx - region_used) & IDX_MASK
        if not behind:
            return
        if behind > num:
            log.warning("inflight used_idx %d is %d behind the ring's %d: more than the ring "
                        "holds", region_used, behind, used_idx)
            behind = num
        for pos in range(used_idx - behind, used_idx):
            head = used_ring[USED_ELEM_U32 * (pos % num)]
            if head < self.desc_num:
                self._bytes[QUEUE_HEADER_SIZE + DESC_STATE_SIZE * head] = 0
        self._u16[H_USED_IDX] = used_idx

    def base(self, last_avail: int) -> int:
        """The avail position to report (GET_VRING_BASE): resubmits not yet fetched count as
        consumed."""
        return (last_avail + len(self._resubmit)) & IDX_MASK

    def release(self) -> None:
        self._resubmit = []
        for view in (self._u16, self._u64, self._bytes):
            view.release()


SPLIT_LAYOUT = QueueLayout("split", QUEUE_HEADER_SIZE, DESC_STATE_SIZE, InflightQueue)


class Trackable(Protocol):
    """What :class:`InflightState` needs of a virtqueue."""

    def set_inflight(self, tracker: Any) -> None: ...


class InflightState:
    """One connection's inflight bookkeeping: the memfd offered by GET_INFLIGHT_FD (kept open
    until the reply has surely been sent) and the region attached by SET_INFLIGHT_FD."""

    def __init__(self) -> None:
        self.region: InflightRegion | None = None
        self._offered_fd = -1

    def offer(
        self, num_queues: int, queue_size: int, max_queues: int,
        layout: QueueLayout | None = None,
    ) -> tuple[dict[str, int], int]:
        """GET_INFLIGHT_FD: a fresh region; returns the reply payload and the fd to send."""
        fd, payload = create_inflight_fd(num_queues, queue_size, max_queues, layout)
        self._close_offer()
        self._offered_fd = fd
        return payload, fd

    def attach(self, fd: int, payload: Any, queues: Sequence[Trackable],
               layout: QueueLayout | None = None) -> None:
        """SET_INFLIGHT_FD: map ``fd`` (owned from here on, closed on error) and hand each queue
        its tracker; the trackers take effect at each ring's next start."""
        region = InflightRegion.attach(fd, payload.mmap_size, payload.mmap_offset,
                                       payload.num_queues, payload.queue_size, len(queues),
                                       layout)
        self.drop(queues)
        self.region = region
        for i, vq in enumerate(queues):
            vq.set_inflight(region.queue(i) if i < region.num_queues else None)

    def drop(self, queues: Sequence[Trackable]) -> None:
        """Stop tracking and release the mapping and fds (the frontend keeps its copy)."""
        for vq in queues:
            vq.set_inflight(None)
        if self.region is not None:
            self.region.close()
            self.region = None
        self._close_offer()

    def _close_offer(self) -> None:
        if self._offered_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._offered_fd)
            self._offered_fd = -1
