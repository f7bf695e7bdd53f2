"""A fast closed-loop virtio-blk driver for benchmarks, on top of `vhostmem.frontend`.

Split rings here (:class:`FastQueue`); packed rings in bench/ringdriver_packed.py
(:class:`PackedFastQueue`, the same slots and loop); :func:`make_queue` picks by the
negotiated layout.

The frontend negotiates and programs the rings; this module then drives them itself so that
the load generator costs far less per request than the backend under test:

* every request slot owns a fixed 3-descriptor chain (header | data | status) written once, so
  a request is "new sector into the slot's header, head into the avail ring";
* headers, data buffers and status bytes live in three contiguous arrays, so a whole completion
  batch is reaped and refilled with a handful of numpy operations (fancy indexing over the used
  ring, the headers, the status bytes and the avail ring) instead of a Python loop per request;
  batches smaller than ``VECTOR_MIN`` take a scalar path (numpy's fixed cost would dominate);
* one avail.idx store and at most one kick per batch (EVENT_IDX on both sides).

Latency is measured from the batch that submitted a request to the batch that reaped it.
"""

from __future__ import annotations

import os
import random
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vhostmem.frontend import VhostUserBlk
from vhostmem.frontend.ring import memory_barrier, vring_need_event

DESC_SIZE = 16
DESCS_PER_REQ = 3
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
HEADER_SIZE = 16
SECTOR_SHIFT = 9
PAGE = 4096
T_IN = 0
T_OUT = 1
STATUS_UNSET = 0xFF
U16 = 0xFFFF
RING_HEADER = 4
AVAIL_ENTRY = 2
USED_ENTRY = 8
VECTOR_MIN = 16
OFFSET_TABLE = 1 << 16
POLL_MS = 1000
LAT_RESERVE = 1 << 22  # latency samples kept (enough for seconds at >1M IOPS)
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])

if TYPE_CHECKING:
    from bench.ringdriver_packed import PackedFastQueue


class DriveError(RuntimeError):
    """The device completed a request badly or stopped completing."""


def queue_size_for(qd: int) -> int:
    """Smallest power-of-two ring that holds ``qd`` 3-descriptor chains."""
    size = 1
    while size < qd * DESCS_PER_REQ:
        size *= 2
    return max(size, 16)


def ram_bytes_for(qd: int, queues: int, block: int) -> int:
    per_queue = qd * (block + HEADER_SIZE + 1) + queue_size_for(qd) * 32 + 8 * PAGE
    return (queues * per_queue + (8 << 20) + (1 << 20) - 1) & ~((1 << 20) - 1)


class SlotBuffers:
    """What both ring layouts' queues share: ``qd`` request slots, each a header, a data
    buffer and a status byte in three contiguous blocks of guest RAM, the sector table and the
    submission times. Subclasses map the ring (``_map_ring``), write the chains
    (``_write_chains``) and drive the ring."""

    def __init__(self, dev: VhostUserBlk, index: int, qd: int, block: int, write: bool,
                 sectors: np.ndarray) -> None:
        size = queue_size_for(qd)
        bq = dev.start_queue(index, size=size, depth=1, max_data=PAGE)
        self.kick_fd, self.call_fd = bq.kick_fd, bq.call_fd
        self._map_ring(dev, bq.ring, size)
        self._write_chains(*self._init_slots(dev, qd, block, write, sectors, size), write)

    def _map_ring(self, dev: VhostUserBlk, ring: Any, size: int) -> None:
        raise NotImplementedError

    def _write_chains(self, hdr_gpa: int, data_gpa: int, st_gpa: int, write: bool) -> None:
        raise NotImplementedError

    def _init_slots(self, dev: VhostUserBlk, qd: int, block: int, write: bool,
                    sectors: np.ndarray, size: int) -> tuple[int, int, int]:
        """Allocate the slot buffers; returns their guest addresses (header, data, status)."""
        self.qd, self.block = qd, block
        self.num, self.mask = size, size - 1
        ram = dev.ram
        hdr_gpa = ram.alloc(HEADER_SIZE * qd, PAGE)
        data_gpa = ram.alloc(block * qd, PAGE)
        st_gpa = ram.alloc(qd, PAGE)
        hreg, hoff = ram.locate(hdr_gpa, HEADER_SIZE * qd)
        sreg, soff = ram.locate(st_gpa, qd)
        hdr = np.frombuffer(hreg.mm, dtype=np.uint8)[hoff:hoff + HEADER_SIZE * qd]
        self.hdr_sector = hdr.view("<u8")[1::2]
        self.hdr_sector_mv = memoryview(hdr).cast("Q")
        hdr.view("<u4")[0::4] = T_OUT if write else T_IN
        self.status = np.frombuffer(sreg.mm, dtype=np.uint8)[soff:soff + qd]
        self.status_mv = memoryview(self.status)
        self.sectors = sectors
        self.sectors_list = sectors.tolist()
        self.n = 0
        self.in_flight = 0
        self.submit_t = np.zeros(qd)
        self.ar = np.arange(size, dtype=np.int64)
        self.kicks = 0
        return hdr_gpa, data_gpa, st_gpa

    def release(self) -> None:
        """Drop every view into guest RAM so that the RAM can be unmapped."""
        for name, val in list(vars(self).items()):
            if isinstance(val, memoryview):
                val.release()
            if isinstance(val, memoryview | np.ndarray):
                setattr(self, name, None)


class FastQueue(SlotBuffers):
    """One started split virtqueue driven with fixed chains and vectorized ring updates."""

    def _map_ring(self, dev: VhostUserBlk, ring: Any, size: int) -> None:
        ram = dev.ram
        region, desc_off = ram.locate(ring.addr.desc, size * DESC_SIZE)
        mm = region.mm
        _, avail_off = ram.locate(ring.addr.avail)
        _, used_off = ram.locate(ring.addr.used)
        buf = np.frombuffer(mm, dtype=np.uint8)
        self.desc = buf[desc_off:desc_off + size * DESC_SIZE].view(DESC_DTYPE)
        abytes = buf[avail_off:avail_off + RING_HEADER + AVAIL_ENTRY * size + 2]
        ubytes = buf[used_off:used_off + RING_HEADER + USED_ENTRY * size + 2]
        ring_end = RING_HEADER + USED_ENTRY * size
        self.avail_np = abytes.view("<u2")[2:2 + size]
        self.used_np = ubytes[RING_HEADER:ring_end].view("<u4").reshape(size, 2)
        # Scalar views (memoryview indexing is cheaper than numpy for single elements).
        self.avail_mv = memoryview(abytes).cast("H")
        self.used_mv = memoryview(ubytes[RING_HEADER:ring_end]).cast("I")
        self.used_idx_mv = memoryview(ubytes[:RING_HEADER]).cast("H")
        self.used_event_at = 2 + size
        self.avail_event_mv = memoryview(ubytes[ring_end:]).cast("H")
        self.next_avail = 0
        self.published = 0
        self.last_used = 0

    def _write_chains(self, hdr_gpa: int, data_gpa: int, st_gpa: int, write: bool) -> None:
        qd, block = self.qd, self.block
        slots = np.arange(qd)
        d = self.desc[:qd * DESCS_PER_REQ].reshape(qd, DESCS_PER_REQ)
        d["addr"][:, 0] = hdr_gpa + HEADER_SIZE * slots
        d["len"][:, 0] = HEADER_SIZE
        d["flags"][:, 0] = VRING_DESC_F_NEXT
        d["next"][:, 0] = DESCS_PER_REQ * slots + 1
        d["addr"][:, 1] = data_gpa + block * slots
        d["len"][:, 1] = block
        d["flags"][:, 1] = VRING_DESC_F_NEXT | (0 if write else VRING_DESC_F_WRITE)
        d["next"][:, 1] = DESCS_PER_REQ * slots + 2
        d["addr"][:, 2] = st_gpa + slots
        d["len"][:, 2] = 1
        d["flags"][:, 2] = VRING_DESC_F_WRITE
        d["next"][:, 2] = 0

    # ---------------------------------------------------------------- submit

    def fill(self, now: float) -> None:
        """Submit every slot once (start of a run)."""
        slots = np.arange(self.qd)
        self._refill_vec(slots * DESCS_PER_REQ, slots, now)
        self.in_flight = self.qd
        self.publish()

    def _refill_vec(self, heads: np.ndarray, slots: np.ndarray, now: float) -> None:
        k = len(slots)
        self.hdr_sector[slots] = self.sectors[(self.n + self.ar[:k]) & (OFFSET_TABLE - 1)]
        self.n += k
        self.status[slots] = STATUS_UNSET
        self.submit_t[slots] = now
        self.avail_np[(self.next_avail + self.ar[:k]) & self.mask] = heads
        self.next_avail = (self.next_avail + k) & U16

    def publish(self) -> None:
        old, new = self.published, self.next_avail
        if old == new:
            return
        self.avail_mv[1] = new  # x86 keeps stores in order: entries are visible before idx
        self.published = new
        memory_barrier()  # store idx, then load avail_event: a store-load pair
        if vring_need_event(self.avail_event_mv[0], new, old):
            os.eventfd_write(self.kick_fd.fd, 1)
            self.kicks += 1

    # ------------------------------------------------------------------ reap

    def reap(self, now: float, lat: np.ndarray, nlat: int, refill: bool) -> int:
        """Reap every completion, record latencies from ``nlat`` on, refill if asked.
        Returns how many completed."""
        used_idx = self.used_idx_mv[1]
        k = (used_idx - self.last_used) & U16
        if not k:
            return 0
        if k < VECTOR_MIN:
            self._reap_scalar(k, now, lat, nlat, refill)
        else:
            pos = (self.last_used + self.ar[:k]) & self.mask
            heads = self.used_np[pos, 0]
            slots = heads // DESCS_PER_REQ
            if self.status[slots].any():
                bad = int(self.status[slots].max())
                raise DriveError(f"request completed with status {bad:#x}")
            lat[nlat:nlat + k] = now - self.submit_t[slots]
            if refill:
                self._refill_vec(heads, slots, now)
        self.last_used = used_idx
        if not refill:
            self.in_flight -= k
        return k

    def _reap_scalar(self, k: int, now: float, lat: np.ndarray, nlat: int,
                     refill: bool) -> None:
        used, status, sub = self.used_mv, self.status_mv, self.submit_t
        avail, hdr, sectors = self.avail_mv, self.hdr_sector_mv, self.sectors_list
        mask, last, nxt, n = self.mask, self.last_used, self.next_avail, self.n
        for j in range(k):
            head = used[2 * ((last + j) & mask)]
            slot = head // DESCS_PER_REQ
            if status[slot]:
                raise DriveError(f"request completed with status {status[slot]:#x}")
            lat[nlat + j] = now - sub[slot]
            if refill:
                hdr[2 * slot + 1] = sectors[n & (OFFSET_TABLE - 1)]
                n += 1
                status[slot] = STATUS_UNSET
                sub[slot] = now
                avail[2 + ((nxt + j) & mask)] = head
        if refill:
            self.n = n
            self.next_avail = (nxt + k) & U16

    def arm(self) -> bool:
        """Ask for an interrupt at the next completion; True if one is already there."""
        self.avail_mv[self.used_event_at] = self.last_used
        memory_barrier()
        return self.used_idx_mv[1] != self.last_used


def make_queue(dev: VhostUserBlk, index: int, qd: int, block: int, write: bool,
               sectors: np.ndarray) -> FastQueue | PackedFastQueue:
    """The queue for the ring layout ``dev`` negotiated (VIRTIO_F_RING_PACKED or split)."""
    if dev.packed:
        from bench.ringdriver_packed import PackedFastQueue
        return PackedFastQueue(dev, index, qd, block, write, sectors)
    return FastQueue(dev, index, qd, block, write, sectors)


@dataclass
class DriveResult:
    ops: int
    seconds: float
    loadgen_cpu_s: float
    kicks: int
    sleeps: int  # times the driver waited on a call eventfd (= interrupts taken)
    batches: int  # reaps that found completions
    latencies: np.ndarray


def sector_table(capacity_sectors: int, block: int, seed: int) -> np.ndarray:
    per_block = block >> SECTOR_SHIFT
    rng = random.Random(seed)
    blocks = capacity_sectors // per_block
    return np.array([rng.randrange(blocks) * per_block for _ in range(OFFSET_TABLE)],
                    dtype=np.uint64)


def drive(queues: list[FastQueue | PackedFastQueue], seconds: float) -> DriveResult:
    """Keep every queue full for ``seconds``; then drain."""
    poller = select.poll()
    for q in queues:
        poller.register(q.call_fd.fd, select.POLLIN)
    lat = np.empty(LAT_RESERVE)
    nlat = ops = sleeps = batches = 0
    kicks0 = sum(q.kicks for q in queues)
    cpu0 = time.process_time()
    start = time.perf_counter()
    for q in queues:
        q.fill(start)
    deadline = start + seconds
    now = start
    while now < deadline:
        done = 0
        for q in queues:
            k = q.reap(now, lat, nlat if nlat + q.qd <= LAT_RESERVE else 0, True)
            if k:
                q.publish()
                done += k
                batches += 1
                nlat = min(nlat + k, LAT_RESERVE - q.qd)
        ops += done
        if not done and not any(q.arm() for q in queues):
            sleeps += 1
            if not poller.poll(POLL_MS):
                raise DriveError("no completion within 1 s")
            for q in queues:
                q.call_fd.drain()
        now = time.perf_counter()
    elapsed = now - start
    cpu = time.process_time() - cpu0
    kicks = sum(q.kicks for q in queues) - kicks0
    _drain(queues, poller, lat)
    return DriveResult(ops, elapsed, cpu, kicks, sleeps, batches, lat[:nlat].copy())


def _drain(queues: list[FastQueue | PackedFastQueue], poller: select.poll,
           scratch: np.ndarray) -> None:
    deadline = time.monotonic() + 5
    while any(q.in_flight for q in queues):
        if time.monotonic() > deadline:
            raise DriveError("requests still in flight 5 s after the run")
        for q in queues:
            if q.in_flight:
                q.reap(0.0, scratch, 0, False)
        if any(q.in_flight and not q.arm() for q in queues):
            poller.poll(100)
            for q in queues:
                q.call_fd.drain()
