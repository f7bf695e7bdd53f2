"""The benchmark driver's packed-ring queue (virtio 1.2 section 2.8, driver side).

Same slots and the same closed loop as the split :class:`~bench.ringdriver.FastQueue`
(``fill`` / ``reap`` / ``publish`` / ``arm``), over a packed ring:

* a request is a 3-descriptor chain (header | data | status) written at the avail position,
  buffer id = slot, NEXT on the first two; AVAIL/USED carry the avail wrap counter (2.8.1);
* a slot's three descriptors are pre-built per wrap counter, so a request not crossing the
  ring's end is one 48-byte copy with the head's flags not yet available, then the head's
  flags alone (the store that makes the chain available, last: 2.8.6);
* the device writes one used descriptor per buffer at the used position, which moves on by 3
  (every chain takes 3); a used descriptor has AVAIL = USED = the used wrap counter (2.8.7);
* event suppression (2.8.10): the driver area is DESC at the next used position (EVENT_IDX,
  the packed form of used_event); the kick decision reads the device area once per batch.

Batches of ``VECTOR_MIN`` or more completions are reaped and refilled with numpy fancy
indexing, as the split queue does; smaller ones take a scalar path.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from bench.ringdriver import (
    DESC_SIZE,
    DESCS_PER_REQ,
    HEADER_SIZE,
    OFFSET_TABLE,
    STATUS_UNSET,
    VECTOR_MIN,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DriveError,
    SlotBuffers,
)
from vhostmem.frontend import VhostUserBlk
from vhostmem.frontend.ring import memory_barrier, vring_need_event

VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
# Bits that make a descriptor available under wrap counter 0 / 1 (2.8.1); the other lap's
# bits mark a head written but not yet available.
AVAIL_BITS = (VIRTQ_DESC_F_USED, VIRTQ_DESC_F_AVAIL)
USED_BITS = (0, AVAIL_USED)  # a used descriptor under used wrap counter 0 / 1
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2
EVENT_AREA_SIZE = 4
EVENT_OFF_WRAP, EVENT_FLAGS = 0, 1  # u16 fields of an event suppression area
WRAP_SHIFT = 15
POS_MASK = (1 << WRAP_SHIFT) - 1
DESC_U16S = DESC_SIZE // 2
ID_U16, FLAGS_U16 = 6, 7
CHAIN_BYTES = DESCS_PER_REQ * DESC_SIZE
PDESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("id", "<u2"), ("flags", "<u2")])


class PackedFastQueue(SlotBuffers):
    """One started packed virtqueue driven with pre-built chains (VIRTIO_F_RING_PACKED)."""

    def _map_ring(self, dev: VhostUserBlk, ring: Any, size: int) -> None:
        self.event_idx = ring.event_idx
        region, off = dev.ram.locate(ring.addr.desc, size * DESC_SIZE + 2 * EVENT_AREA_SIZE)
        buf = np.frombuffer(region.mm, dtype=np.uint8)[off:off + size * DESC_SIZE
                                                        + 2 * EVENT_AREA_SIZE]
        ring_bytes = buf[:size * DESC_SIZE]
        self.desc = ring_bytes.view(PDESC_DTYPE)
        self.ring_mv = memoryview(ring_bytes)
        self.ring16 = memoryview(ring_bytes).cast("H")
        self.driver_mv = memoryview(buf[size * DESC_SIZE:size * DESC_SIZE + 4]).cast("H")
        self.device_mv = memoryview(buf[size * DESC_SIZE + 4:]).cast("H")
        self._build_tables(size)
        self.next_avail, self.avail_wrap = 0, 1  # both wrap counters start at 1 (2.8.1)
        self.last_used, self.used_wrap = 0, 1
        self.published = 0  # descriptors made available since the last publish
        if self.event_idx:  # interrupts from the first used descriptor on
            self.driver_mv[EVENT_OFF_WRAP] = 1 << WRAP_SHIFT
            self.driver_mv[EVENT_FLAGS] = RING_EVENT_FLAGS_DESC

    def _write_chains(self, hdr_gpa: int, data_gpa: int, st_gpa: int, write: bool) -> None:
        """Every slot's 3 descriptors without AVAIL/USED (``slot_descs``), and per wrap
        counter as 48 bytes whose head is not available yet (``chain_bytes[wrap][slot]``)."""
        qd, block = self.qd, self.block
        slots = np.arange(qd)
        d = np.zeros((qd, DESCS_PER_REQ), dtype=PDESC_DTYPE)
        d["addr"][:, 0] = hdr_gpa + HEADER_SIZE * slots
        d["len"][:, 0] = HEADER_SIZE
        d["flags"][:, 0] = VRING_DESC_F_NEXT
        d["addr"][:, 1] = data_gpa + block * slots
        d["len"][:, 1] = block
        d["flags"][:, 1] = VRING_DESC_F_NEXT | (0 if write else VRING_DESC_F_WRITE)
        d["addr"][:, 2] = st_gpa + slots
        d["len"][:, 2] = 1
        d["flags"][:, 2] = VRING_DESC_F_WRITE
        d["id"] = slots[:, None]
        self.slot_descs = d
        self.head_flags = [int(d["flags"][0, 0]) | AVAIL_BITS[w] for w in (0, 1)]
        self.chain_bytes: list[list[bytes]] = []
        self.desc_bytes: list[list[list[bytes]]] = []  # [wrap][slot][k]: one descriptor
        for w in (0, 1):
            c = d.copy()
            c["flags"] |= AVAIL_BITS[w]
            c["flags"][:, 0] = int(d["flags"][0, 0]) | AVAIL_BITS[w ^ 1]
            self.chain_bytes.append([c[s].tobytes() for s in range(qd)])
            self.desc_bytes.append([[c[s, k].tobytes() for k in range(DESCS_PER_REQ)]
                                    for s in range(qd)])

    def _build_tables(self, num: int) -> None:
        """Over two laps of running positions x (0 <= x < 2 num): the ring position, and per
        starting wrap counter the AVAIL/USED bits that make x available and that mark x used,
        so a batch's positions and flags are slices, not computed."""
        x = np.arange(2 * num)
        self.pos_of = x & (num - 1)
        lap = x >= num
        self.avail_bits_of = [np.where(lap ^ w, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED)
                              .astype(np.uint16) for w in (0, 1)]
        self.used_bits_of = [np.where(lap ^ w, AVAIL_USED, 0).astype(np.uint16)
                             for w in (0, 1)]

    # ---------------------------------------------------------------- submit

    def fill(self, now: float) -> None:
        """Submit every slot once (start of a run)."""
        self._refill_vec(np.arange(self.qd), now)
        self.in_flight = self.qd
        self.publish()

    def _refill_vec(self, slots: np.ndarray, now: float) -> None:
        k = len(slots)
        self.hdr_sector[slots] = self.sectors[(self.n + self.ar[:k]) & (OFFSET_TABLE - 1)]
        self.n += k
        self.status[slots] = STATUS_UNSET
        self.submit_t[slots] = now
        num, na = self.num, self.next_avail
        end = na + DESCS_PER_REQ * k
        pos = self.pos_of[na:end]
        recs = self.slot_descs[slots].reshape(-1)
        recs["flags"] |= self.avail_bits_of[self.avail_wrap][na:end]
        heads = recs["flags"][0::DESCS_PER_REQ].copy()
        recs["flags"][0::DESCS_PER_REQ] ^= AVAIL_USED  # not available until stored below
        self.desc[pos] = recs
        self.desc["flags"][pos[0::DESCS_PER_REQ]] = heads  # each head last (2.8.6)
        self.published += DESCS_PER_REQ * k
        na += DESCS_PER_REQ * k
        if na >= num:
            na -= num
            self.avail_wrap ^= 1
        self.next_avail = na

    def _submit(self, slot: int) -> None:
        """One request at the avail position (scalar path)."""
        num, pos, wrap = self.num, self.next_avail, self.avail_wrap
        end = pos + DESCS_PER_REQ
        if end <= num:
            self.ring_mv[pos * DESC_SIZE:end * DESC_SIZE] = self.chain_bytes[wrap][slot]
        else:  # the chain crosses the ring's end: the rest is on the next lap
            descs = self.desc_bytes
            for k in range(DESCS_PER_REQ):
                p, w = (pos + k, wrap) if pos + k < num else (pos + k - num, wrap ^ 1)
                self.ring_mv[p * DESC_SIZE:(p + 1) * DESC_SIZE] = descs[w][slot][k]
        self.ring16[pos * DESC_U16S + FLAGS_U16] = self.head_flags[wrap]
        if end >= num:
            end -= num
            self.avail_wrap = wrap ^ 1
        self.next_avail = end
        self.published += DESCS_PER_REQ

    def publish(self) -> None:
        """Kick if the device's event suppression area asks for one for this batch."""
        added, self.published = self.published, 0
        if not added:
            return
        memory_barrier()  # descriptors stored, then the device's area loaded
        flags = self.device_mv[EVENT_FLAGS]
        if flags == RING_EVENT_FLAGS_DISABLE:
            return
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            off_wrap = self.device_mv[EVENT_OFF_WRAP]
            event = off_wrap & POS_MASK
            if off_wrap >> WRAP_SHIFT != self.avail_wrap:
                event -= self.num  # an offset of the other lap lies one ring behind
            if not vring_need_event(event, self.next_avail, self.next_avail - added):
                return
        os.eventfd_write(self.kick_fd.fd, 1)
        self.kicks += 1

    # ------------------------------------------------------------------ reap

    def _used_at(self, step: int) -> bool:
        """The ``step``-th used descriptor from ours is written (the device writes them in
        position order, so all before it are too)."""
        p = self.last_used + DESCS_PER_REQ * step
        wrap = self.used_wrap
        if p >= self.num:
            p -= self.num
            wrap ^= 1
        return self.ring16[p * DESC_U16S + FLAGS_U16] & AVAIL_USED == USED_BITS[wrap]

    def reap(self, now: float, lat: np.ndarray, nlat: int, refill: bool) -> int:
        """Reap every completion, record latencies from ``nlat`` on, refill if asked.
        Returns how many completed."""
        if self.in_flight >= VECTOR_MIN and self._used_at(VECTOR_MIN - 1):
            k = self._reap_vec(now, lat, nlat, refill)
        else:
            k = self._reap_scalar(now, lat, nlat, refill)
        if not refill:
            self.in_flight -= k
        return k

    def _reap_vec(self, now: float, lat: np.ndarray, nlat: int, refill: bool) -> int:
        lu = self.last_used
        run = slice(lu, lu + DESCS_PER_REQ * self.in_flight, DESCS_PER_REQ)
        pos = self.pos_of[run]
        used = self.desc["flags"][pos] & AVAIL_USED == self.used_bits_of[self.used_wrap][run]
        # (the flags were loaded above, the ids below: x86 TSO keeps loads in order)
        m = len(pos)
        k = int(used.argmin()) if not used.all() else m
        slots = self.desc["id"][pos[:k]].astype(np.int64)
        if (slots >= self.qd).any() or self.status[slots].any():
            raise DriveError(f"bad completion: ids {slots.tolist()}, status "
                             f"{self.status[slots % self.qd].tolist()}")
        lat[nlat:nlat + k] = now - self.submit_t[slots]
        self._advance_used(k)
        if refill:
            self._refill_vec(slots, now)
        return k

    def _reap_scalar(self, now: float, lat: np.ndarray, nlat: int, refill: bool) -> int:
        ring16, status, sub = self.ring16, self.status_mv, self.submit_t
        hdr, sectors, qd = self.hdr_sector_mv, self.sectors_list, self.qd
        want = USED_BITS[self.used_wrap]
        k = 0
        while k < self.in_flight:
            at = self.last_used * DESC_U16S
            if ring16[at + FLAGS_U16] & AVAIL_USED != want:
                break
            slot = ring16[at + ID_U16]
            if slot >= qd or status[slot]:
                raise DriveError(f"bad completion: id {slot}")
            lat[nlat + k] = now - sub[slot]
            k += 1
            if self._advance_used(1):
                want = USED_BITS[self.used_wrap]
            if refill:
                hdr[2 * slot + 1] = sectors[self.n & (OFFSET_TABLE - 1)]
                self.n += 1
                status[slot] = STATUS_UNSET
                sub[slot] = now
                self._submit(slot)
        return k

    def _advance_used(self, buffers: int) -> bool:
        """Move the used position past ``buffers`` chains; True if it wrapped."""
        p = self.last_used + DESCS_PER_REQ * buffers
        if p < self.num:
            self.last_used = p
            return False
        self.last_used = p - self.num
        self.used_wrap ^= 1
        return True

    def arm(self) -> bool:
        """Ask for an interrupt at the next used descriptor; True if it is already there."""
        if self.event_idx:
            self.driver_mv[EVENT_OFF_WRAP] = self.last_used | self.used_wrap << WRAP_SHIFT
        memory_barrier()
        return self._used_at(0)
