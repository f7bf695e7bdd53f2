"""Inflight I/O tracking for packed virtqueues (vhost-user INFLIGHT_SHMFD), without sockets.

The packed layout of the shared region (QEMU ``docs/interop/vhost-user.rst``, "Inflight I/O
tracking", ``QueueRegionPacked`` / ``DescStatePacked``; the C structs, little-endian)::

    queue  = features u64 | version u16 | desc_num u16 | free_head u16 | old_free_head u16
             | used_idx u16 | old_used_idx u16 | used_wrap_counter u8
             | old_used_wrap_counter u8 | padding u8[7] | desc[desc_num]     header 32 bytes
    desc   = inflight u8 | padding u8 | next u16 | last u16 | num u16 | counter u64
             | id u16 | flags u16 | len u32 | addr u64                       32 bytes each

A packed ring has no used index in guest memory and its used descriptors overwrite the slots of
descriptors still in flight, so the region keeps both: the device's used position and wrap
counter, and a copy of every descriptor of every buffer in flight. ``desc[]`` entries form a
free list (``next``); a fetched chain takes one entry per descriptor, its first entry (the
"head entry") holding ``inflight``, ``counter``, ``num`` (descriptors) and ``last``.

Protocol (the spec's steps; :class:`PackedInflightQueue`):

* fetch (``fetched``): copy the chain's descriptors into the free entries, fill the head entry,
  then ``free_head`` and ``old_free_head`` in one store (the commit of the fetch).
* complete (``completing`` before the ring's used flags store, ``completed`` after it): the
  chain's entries go back to the free list, ``used_idx`` / ``used_wrap_counter`` move on; after
  the flags store, ``inflight = 0`` and the ``old_*`` fields take the new values (the commit).
  Fields that share a word are stored together (x86 sees an aligned store whole).
* start (``recover``): if ``used_idx`` differs from ``old_used_idx``, the descriptor at
  ``old_used_idx`` tells whether the used flags were stored (AVAIL/USED no longer those of an
  available descriptor under ``old_used_wrap_counter``): then the completion is committed, else
  rolled back; flagged entries on the free list are cleared (a fetch cut short); the others are
  resubmitted in ``counter`` order from their copies.

vhostmem's own state is private: the free list, the buffer id -> head entry map and the
counters live in this process and are written through to the region, never read back from it
while the ring runs (the frontend shares the region). At start the region is copied once into
private memory and everything is decided from that copy and validated; an inconsistent region
(positions beyond the ring, broken links, a chain longer than the ring, a bad or repeated
buffer id, more descriptors in flight than the ring holds) is refused with an
:class:`~vhostmem.inflight.InflightError` naming what is wrong, and nothing is written.

**The avail position.** QEMU 7.2 cannot restore a packed ring's base after a backend crash
(``virtio_queue_packed_restore_last_avail_idx`` does nothing): SET_VRING_BASE then carries the
positions of the last GET_VRING_BASE, or of the device's start. The region holds the truth:
the used position and wrap counter, and the descriptors taken and not returned, which occupy
the ring from the used position on (a buffer's used descriptor advances the used position by
the descriptors it took), so the avail position is the used position plus their number.
"""

from __future__ import annotations

import array
import itertools
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vhostmem.descriptors import VRING_DESC_F_NEXT
from vhostmem.inflight import REGION_VERSION, SPLIT_LAYOUT, InflightError, QueueLayout
from vhostmem.packed_ring import VIRTIO_F_RING_PACKED, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED

log = logging.getLogger("vhostmem.inflight")

HEADER = struct.Struct("<QHHHHHHBB7x")  # QueueRegionPacked without desc[] (29 bytes)
HEADER_SIZE = 32  # desc[] starts 8-byte aligned: sizeof(QueueRegionPacked)
DESC = struct.Struct("<BxHHHQHHIQ")  # DescStatePacked
DESC_SIZE = 32
# Byte offsets of header fields.
O_VERSION = 8
O_FREE_HEAD = 12
O_OLD_FREE_HEAD = 14
O_USED_IDX = 16
O_OLD_USED_IDX = 18
O_USED_WRAP = 20
O_OLD_USED_WRAP = 21
# Byte offsets inside a DescStatePacked.
D_INFLIGHT = 0
D_NEXT = 2
D_LAST = 4
D_NUM = 6
D_COUNTER = 8
D_COPY = 16  # id u16 | flags u16 | len u32 | addr u64: the descriptor copy
U16 = struct.Struct("<H")
# The same fields as indices of u16 / u64 views of a queue's region (entry e starts at u16
# E16_0 + E16 * e, u64 E64_0 + E64 * e); id, flags and len share one u64 (little-endian).
H16_FREE_HEAD = O_FREE_HEAD // 2
H32_FREE_HEADS = O_FREE_HEAD // 4  # free_head | old_free_head
H64_USED = O_USED_IDX // 8  # used_idx | old_used_idx | used_wrap | old_used_wrap | padding
# Bit positions of those four fields in that u64 (little-endian: byte offset * 8).
S_USED_IDX = (O_USED_IDX - O_USED_IDX) * 8
S_OLD_USED_IDX = (O_OLD_USED_IDX - O_USED_IDX) * 8
S_USED_WRAP = (O_USED_WRAP - O_USED_IDX) * 8
S_OLD_USED_WRAP = (O_OLD_USED_WRAP - O_USED_IDX) * 8
E16_0, E16 = HEADER_SIZE // 2, DESC_SIZE // 2
E16_NEXT = D_NEXT // 2
E64_0, E64 = HEADER_SIZE // 8, DESC_SIZE // 8
E64_COUNTER, E64_ID_FLAGS_LEN, E64_ADDR = D_COUNTER // 8, D_COPY // 8, D_COPY // 8 + 1
# A packed ring descriptor (virtio 1.2 2.8.13): addr u64, len u32, id u16, flags u16.
RING_DESC = struct.Struct("<QIHH")
WRAP_FLAGS = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


def available_flags(wrap: int) -> int:
    """AVAIL/USED bits of a descriptor the driver made available in lap ``wrap`` (2.8.1)."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


@dataclass
class Resubmit:
    """A buffer in flight at the crash: its id, descriptors taken, and a copy of them in the
    ring's format (NEXT on all but the last), the chain the ring walks again."""

    buffer_id: int
    count: int
    descs: bytes


@dataclass
class Recovery:
    """Where the ring continues after a crash, and what it serves first (oldest first)."""

    avail_pos: int
    avail_wrap: int
    used_pos: int
    used_wrap: int
    resubmits: list[Resubmit] = field(default_factory=list)


@dataclass
class _Header:
    version: int
    free_head: int
    old_free_head: int
    used_idx: int
    old_used_idx: int
    used_wrap: int
    old_used_wrap: int


class PackedInflightQueue:
    """One packed queue's region, and this process's private copy of its bookkeeping."""

    packed = True

    def __init__(self, view: memoryview) -> None:
        self._bytes = view
        self._u16 = view.cast("H")
        self._u32 = view.cast("I")
        self._u64 = view.cast("Q")
        self.desc_num = self._u16[O_VERSION // 2 + 1]  # set by the region's attach
        self.counter = 1
        # The completing side holds it (thread io_mode); fetches take it too.
        self.lock: Any = threading.Lock()
        self._next = list(range(1, self.desc_num + 1))  # free-list links (private)
        self._free_head = 0
        self._free = self.desc_num  # entries on the free list
        self._head_of = [-1] * self.desc_num  # buffer id -> head entry (-1: none)
        # head entry -> (its chain's last entry, descriptors in the chain)
        self._extent: list[tuple[int, int]] = [(0, 0)] * self.desc_num
        # The used word (H64_USED) as committed: its old_* half, and the whole word the
        # pending completion commits (completing() computes both, completed() stores).
        self._old_used = self._commit_used = 0
        self._set_used(0, 1)
        # Per entry: the u64 index of its descriptor copy, the u16 index of its next link,
        # the byte offset of its inflight flag (looked up on the hot path, not computed).
        entries = range(self.desc_num)
        self._copy_q = [E64_0 + E64 * e + E64_ID_FLAGS_LEN for e in entries]
        self._next_h = [E16_0 + E16 * e + E16_NEXT for e in entries]
        self._inflight_b = [HEADER_SIZE + DESC_SIZE * e + D_INFLIGHT for e in entries]

    # ------------------------------------------------------------- fields

    def _set_used(self, pos: int, wrap: int) -> None:
        """The private copy of the committed used position (the region holds the same)."""
        self._old_used = pos << S_OLD_USED_IDX | wrap << S_OLD_USED_WRAP
        self._commit_used = pos << S_USED_IDX | wrap << S_USED_WRAP | self._old_used

    @property
    def version(self) -> int:
        return self._u16[O_VERSION // 2]

    def _off(self, entry: int, field_offset: int) -> int:
        return HEADER_SIZE + DESC_SIZE * entry + field_offset

    # ----------------------------------------------------------- hot path

    def fetched(self, buffer_id: int, descs: list[tuple[int, int, int, int]]) -> None:
        """A chain was taken: ``descs`` are its ring descriptors (addr, len, id, flags) as
        the ring copied them. Written before the request is served, in whole words (the
        fields that share a u64 are stored together: fewer stores on the hot path, and an
        x86 aligned store is seen whole). The u64 index of every entry's copy is looked up,
        not computed: this runs once per descriptor of every request."""
        n = len(descs)
        u64, nxt, head_of, copy_q = self._u64, self._next, self._head_of, self._copy_q
        lock = self.lock
        lock.acquire()
        try:
            if n > self._free or buffer_id >= self.desc_num or head_of[buffer_id] >= 0:
                # Cannot happen while the ring bounds what is in flight; pop never raises.
                log.error("inflight: buffer %d (%d descriptors) not tracked: %d entries free",
                          buffer_id, n, self._free)
                return
            head = entry = last = self._free_head
            for addr, length, desc_id, flags in descs:
                q = copy_q[entry]
                u64[q] = desc_id | flags << 16 | length << 32
                u64[q + 1] = addr  # E64_ADDR follows
                last, entry = entry, nxt[entry]
            self._free_head = entry
            self._free -= n
            head_of[buffer_id] = head
            self._extent[head] = (last, n)
            q = copy_q[head] - E64_ID_FLAGS_LEN
            counter = self.counter
            u64[q + E64_COUNTER] = counter
            self.counter = counter + 1
            # inflight = 1 | next (unchanged) | last | num: one store
            u64[q] = 1 | nxt[head] << 16 | last << 32 | n << 48
            # free_head and old_free_head together: the fetch is committed
            self._u32[H32_FREE_HEADS] = entry | entry << 16
        finally:
            lock.release()

    def completing(self, buffer_id: int, used_pos: int, used_wrap: int) -> int:
        """Before the ring stores the used flags of ``buffer_id``: its entries go back to the
        free list and the region's used position becomes (``used_pos``, ``used_wrap``), the
        position after it; the old_* fields keep the committed one. Returns the head entry
        for :meth:`completed` (-1: not tracked). The words :meth:`completed` stores are
        computed here, with the values at hand."""
        head_of = self._head_of
        head = head_of[buffer_id] if buffer_id < self.desc_num else -1
        u16 = self._u16
        if head >= 0:
            head_of[buffer_id] = -1
            last, n = self._extent[head]
            nxt, free = self._next, self._free_head
            if nxt[last] != free:  # a chain taken from the free list's front and returned
                nxt[last] = free  # before any other is returned links there already
                u16[self._next_h[last]] = free
            self._free_head = head
            self._free += n
            u16[H16_FREE_HEAD] = head
        used = used_pos << S_USED_IDX | used_wrap << S_USED_WRAP
        self._u64[H64_USED] = used | self._old_used
        self._old_used = old = used_pos << S_OLD_USED_IDX | used_wrap << S_OLD_USED_WRAP
        self._commit_used = used | old
        return head

    def completed(self, head: int) -> None:
        """After the used flags store: the completion is committed (inflight cleared, the
        old_* fields take the new values)."""
        if head >= 0:
            self._bytes[self._inflight_b[head]] = 0
        free = self._free_head
        self._u32[H32_FREE_HEADS] = free | free << 16
        self._u64[H64_USED] = self._commit_used  # old_* = the new position

    # ------------------------------------------------------------- start

    def recover(self, num: int, used_pos: int, used_wrap: int,
                ring_flags: Callable[[int], int]) -> Recovery | None:
        """Bring the region in line with the ring at ring start (``num`` descriptors).

        (``used_pos``, ``used_wrap``) is the frontend's SET_VRING_BASE; ``ring_flags(i)``
        loads descriptor ``i``'s flags word once. Returns None for a fresh region (the
        frontend's base stands), else where the ring continues and what it resubmits.
        Raises InflightError for a region that cannot be used, having written nothing."""
        if num > self.desc_num:
            raise InflightError(
                f"ring size {num} exceeds the inflight region's {self.desc_num} entries")
        raw = bytes(self._bytes)  # the one read of the shared region
        fields = HEADER.unpack_from(raw)
        header = _Header(fields[1], *fields[3:])  # features and desc_num are not used
        if header.version == 0:
            self._initialise(used_pos, used_wrap)
            return None
        if header.version != REGION_VERSION:
            raise InflightError(
                f"inflight region version {header.version}, expected {REGION_VERSION}")
        entries = list(DESC.iter_unpack(raw[HEADER_SIZE : HEADER_SIZE + DESC_SIZE
                                            * self.desc_num]))
        pos, wrap, free_head = self._settle(header, num, ring_flags)
        plan, chains = self._plan(entries, free_head, num, pos, wrap)
        self._install(entries, chains, pos, wrap)
        return plan

    def _initialise(self, used_pos: int, used_wrap: int) -> None:
        """A fresh region: every entry free, the used position the frontend's, version 1 last
        (a crash before it leaves a region that is initialised again)."""
        n = self.desc_num
        table = bytearray(DESC_SIZE * n)
        links = memoryview(table).cast("H")
        links[E16_NEXT::E16] = array.array("H", range(1, n + 1))
        links.release()
        self._bytes[HEADER_SIZE : HEADER_SIZE + len(table)] = table
        self._write_header(0, used_pos, used_wrap)
        self._reset_private(list(range(1, n + 1)), 0, n, used_pos, used_wrap)
        self._u16[O_VERSION // 2] = REGION_VERSION

    def _settle(self, h: _Header, num: int,
                ring_flags: Callable[[int], int]) -> tuple[int, int, int]:
        """Commit or roll back a completion cut short (the spec's first two steps): the used
        position, its wrap counter and the free-list head to continue from."""
        self._check_position("old_used_idx", h.old_used_idx, h.old_used_wrap, num)
        if (h.used_idx, h.used_wrap) != (h.old_used_idx, h.old_used_wrap):
            flags = ring_flags(h.old_used_idx)  # read once
            if flags & WRAP_FLAGS != available_flags(h.old_used_wrap):
                # The used flags were stored: the guest may have seen it. Commit.
                self._check_position("used_idx", h.used_idx, h.used_wrap, num)
                if h.free_head > self.desc_num:
                    raise InflightError(f"inflight free_head {h.free_head} is beyond the "
                                        f"{self.desc_num} entries")
                log.info("inflight: committing the completion cut short at used position %d",
                         h.old_used_idx)
                return h.used_idx, h.used_wrap, h.free_head
            log.info("inflight: rolling back the completion cut short at used position %d",
                     h.old_used_idx)
        if h.old_free_head > self.desc_num:
            raise InflightError(f"inflight old_free_head {h.old_free_head} is beyond the "
                                f"{self.desc_num} entries")
        return h.old_used_idx, h.old_used_wrap, h.old_free_head

    @staticmethod
    def _check_position(name: str, pos: int, wrap: int, num: int) -> None:
        if pos >= num or wrap > 1:
            raise InflightError(f"inflight {name} {pos} (wrap counter {wrap}) is not a position "
                                f"of the ring of {num}")

    def _plan(self, entries: list[tuple[int, ...]], free_head: int, num: int, pos: int,
              wrap: int) -> tuple[Recovery, list[tuple[int, int, list[int]]]]:
        """The buffers in flight (head entries flagged and off the free list), validated, in
        counter order; and (counter, head, chain entries) of each."""
        on_free = self._free_list(entries, free_head)
        used: set[int] = set()
        chains: list[tuple[int, int, list[int]]] = []
        for head, entry in enumerate(entries):
            if entry[0] and head not in on_free:
                chain = self._chain(entries, head, num, used)
                chains.append((entry[4], head, chain))  # counter
        chains.sort()
        total = sum(len(c) for _, _, c in chains)
        if total > num:
            raise InflightError(f"inflight region holds {total} descriptors in flight, more "
                                f"than the ring of {num}")
        resubmits: list[Resubmit] = []
        ids: set[int] = set()
        for _, head, chain in chains:
            resubmits.append(self._resubmit(entries, head, chain, num, ids))
        avail_pos, avail_wrap = pos + total, wrap
        if avail_pos >= num:
            avail_pos -= num
            avail_wrap ^= 1
        return Recovery(avail_pos, avail_wrap, pos, wrap, resubmits), chains

    def _free_list(self, entries: list[tuple[int, ...]], free_head: int) -> set[int]:
        """The entries on the free list from ``free_head`` (walked at most desc_num steps;
        a link out of range ends it: what lies beyond is judged by its own flags)."""
        out: set[int] = set()
        entry = free_head
        while entry < self.desc_num and entry not in out:
            out.add(entry)
            entry = entries[entry][1]
        return out

    def _chain(self, entries: list[tuple[int, ...]], head: int, num: int,
               used: set[int]) -> list[int]:
        """The entries of the chain at head entry ``head``: ``num`` of them by ``next``, the
        last one ``last``, none shared with another chain."""
        count, last = entries[head][3], entries[head][2]
        if not 1 <= count <= num:
            raise InflightError(f"inflight entry {head}: num {count} not in 1..{num}")
        chain, entry = [], head
        for k in range(count):
            if entry >= self.desc_num or entry in used:
                raise InflightError(f"inflight entry {head}: descriptor {k} of its chain is "
                                    f"entry {entry}, outside the region or taken twice")
            used.add(entry)
            chain.append(entry)
            if k < count - 1:
                entry = entries[entry][1]
        if chain[-1] != last:
            raise InflightError(f"inflight entry {head}: last {last}, but its chain of {count} "
                                f"ends at entry {chain[-1]}")
        return chain

    @staticmethod
    def _resubmit(entries: list[tuple[int, ...]], head: int, chain: list[int], num: int,
                  ids: set[int]) -> Resubmit:
        """The ring-format copy of a chain; its buffer id is the last descriptor's (2.8.6)."""
        out = bytearray()
        for k, entry in enumerate(chain):
            _, _, _, _, _, desc_id, flags, length, addr = entries[entry]
            flags &= ~VRING_DESC_F_NEXT
            if k < len(chain) - 1:
                flags |= VRING_DESC_F_NEXT
            out += RING_DESC.pack(addr, length, desc_id, flags)
        buffer_id = entries[chain[-1]][5]
        if buffer_id >= num or buffer_id in ids:
            raise InflightError(f"inflight entry {head}: buffer id {buffer_id} is out of the "
                                f"ring of {num} or in flight twice")
        ids.add(buffer_id)
        return Resubmit(buffer_id, len(chain), bytes(out))

    def _install(self, entries: list[tuple[int, ...]],
                 chains: list[tuple[int, int, list[int]]], pos: int, wrap: int) -> None:
        """Write the recovered state: a free list of every entry not in flight, flags cleared
        off the chains, the header's fields and their old_* twins equal; the private copy."""
        taken = {e for _, _, chain in chains for e in chain}
        free = [e for e in range(self.desc_num) if e not in taken]
        links = list(range(1, self.desc_num + 1))
        for a, b in itertools.pairwise(free):
            links[a] = b
        free_head = free[0] if free else self.desc_num
        if free:
            links[free[-1]] = self.desc_num
        for _, _, chain in chains:  # a chain goes back to the free list in its own order
            for a, b in itertools.pairwise(chain):
                links[a] = b
        mm = self._bytes
        heads = {head for _, head, _ in chains}
        for e, entry in enumerate(entries):
            if entry[1] != links[e] and e not in taken:
                U16.pack_into(mm, self._off(e, D_NEXT), links[e])
            if entry[0] and e not in heads:
                mm[self._off(e, D_INFLIGHT)] = 0
        self._write_header(free_head, pos, wrap)
        self._reset_private(links, free_head, len(free), pos, wrap)
        for counter, head, chain in chains:
            self._extent[head] = (chain[-1], len(chain))
            self._head_of[entries[chain[-1]][5]] = head
            self.counter = max(self.counter, counter + 1)
        if chains:
            log.info("resubmitting %d in-flight requests: buffer ids %s", len(chains),
                     [entries[c[-1]][5] for _, _, c in chains])

    def _write_header(self, free_head: int, pos: int, wrap: int) -> None:
        mm = self._bytes
        for off in (O_FREE_HEAD, O_OLD_FREE_HEAD):
            U16.pack_into(mm, off, free_head)
        for off in (O_USED_IDX, O_OLD_USED_IDX):
            U16.pack_into(mm, off, pos)
        mm[O_USED_WRAP] = mm[O_OLD_USED_WRAP] = wrap

    def _reset_private(self, links: list[int], free_head: int, free: int, pos: int,
                       wrap: int) -> None:
        self._next = links
        self._free_head, self._free = free_head, free
        self._head_of = [-1] * self.desc_num
        self._set_used(pos, wrap)

    def release(self) -> None:
        self._u16.release()
        self._u32.release()
        self._u64.release()
        self._bytes.release()


PACKED_LAYOUT = QueueLayout("packed", HEADER_SIZE, DESC_SIZE, PackedInflightQueue)


def layout_for(features: int) -> QueueLayout:
    """The region layout of the ring layout ``features`` negotiated (the session and a
    data-plane worker map one region the same way)."""
    return PACKED_LAYOUT if features >> VIRTIO_F_RING_PACKED & 1 else SPLIT_LAYOUT
