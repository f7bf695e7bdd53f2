"""`VhostUserBlk`: the whole fake guest for one vhost-user-blk backend, in QEMU's order:
SET_OWNER, feature and protocol-feature negotiation, memory table (SET_MEM_TABLE or ADD_MEM_REG),
then per queue SET_VRING_NUM/BASE/ADDR/CALL/ERR/KICK and SET_VRING_ENABLE; GET_VRING_BASE stops.
Migration's dirty log as QEMU drives it: SET_LOG_BASE, SET_FEATURES with or without
VHOST_F_LOG_ALL, SET_VRING_ADDR with or without VHOST_VRING_F_LOG on every started ring.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from protocol import BlkFeature, ProtocolFeature, VirtioFeature
from vhostmem.frontend.blk import CONFIG_SIZE, parse_blk_config
from vhostmem.frontend.client import DEFAULT_TIMEOUT, VhostUserClient, VhostUserError
from vhostmem.frontend.dirty import DirtyBitmap
from vhostmem.frontend.memory import GuestRam, GuestRegion
from vhostmem.frontend.packed import FRESH_BASE, PackedBlkQueue, PackedRing
from vhostmem.frontend.queue import DEFAULT_MAX_DATA, BlkQueue
from vhostmem.frontend.ring import EventFd, SplitRing

DEFAULT_RAM_SIZE = 64 << 20
DEFAULT_QUEUE_SIZE = 128

# virtio device status bits (virtio 1.2, 2.1), for SET_STATUS.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_RUNNING = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK

# SET_VRING_ADDR flags: log used-ring writes at log_guest_addr (vhost-user.rst, Linux vhost.h).
VHOST_VRING_F_LOG = 1


def _mask(*bits: int) -> int:
    out = 0
    for bit in bits:
        out |= 1 << bit
    return out


# What this driver can handle; anything else a backend offers is left unacked.
SUPPORTED_FEATURES = _mask(
    VirtioFeature.VERSION_1, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES,
    VirtioFeature.INDIRECT_DESC, VirtioFeature.EVENT_IDX, VirtioFeature.RING_PACKED,
    BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.GEOMETRY, BlkFeature.RO,
    BlkFeature.BLK_SIZE, BlkFeature.FLUSH, BlkFeature.TOPOLOGY, BlkFeature.CONFIG_WCE,
    BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES)
SUPPORTED_PROTOCOL_FEATURES = _mask(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
    ProtocolFeature.RESET_DEVICE, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS,
    ProtocolFeature.LOG_SHMFD)
# VHOST_F_LOG_ALL is never acked at start (QEMU neither): `set_logging` switches it.
LOG_ALL_MASK = 1 << VirtioFeature.LOG_ALL

MemMode = Literal["table", "slots"]


@dataclass
class QueueState:
    ring: SplitRing | PackedRing
    kick: EventFd
    call: EventFd
    err: EventFd
    queue: BlkQueue | None = None
    started: bool = False
    base: int = 0  # the vring base this frontend last sent or got back (QEMU's copy of it)


@dataclass
class InflightRegion:
    """The inflight region a backend gave (GET_INFLIGHT_FD), kept across backend restarts
    as QEMU keeps it; read-only to this driver."""

    payload: dict[str, int]
    fd: int

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Offer:
    """What the backend offered during negotiation."""

    features: int = 0
    protocol_features: int = 0
    queue_num: int = 1
    max_mem_slots: int = 0
    regions_sent: list[GuestRegion] = field(default_factory=list)


class VhostUserBlk:
    """A connected, negotiated vhost-user-blk device with its guest RAM and queues."""

    def __init__(self, client: VhostUserClient, ram: GuestRam, *, own_ram: bool = False) -> None:
        self.client, self.ram, self._own_ram = client, ram, own_ram
        self.offer = Offer()
        self.queues: dict[int, QueueState] = {}
        self.log: DirtyBitmap | None = None  # the dirty log last sent by SET_LOG_BASE
        self.inflight: InflightRegion | None = None  # INFLIGHT_SHMFD, see use_inflight
        self._mem_mode: MemMode = "table"

    @classmethod
    def open(cls, socket_path: str, *, ram: GuestRam | None = None,
             ram_size: int = DEFAULT_RAM_SIZE, features: int | None = None,
             event_idx: bool = True, indirect: bool = True, packed: bool = False,
             protocol_features: int | None = None, mem: MemMode = "table",
             inflight: bool = False, timeout: float = DEFAULT_TIMEOUT) -> VhostUserBlk:
        """Connect, negotiate and send the memory table; queues are started separately.
        ``inflight``: ack INFLIGHT_SHMFD too (then ``use_inflight`` before starting queues)."""
        if inflight:
            protocol_features = (SUPPORTED_PROTOCOL_FEATURES if protocol_features is None
                                 else protocol_features) | 1 << ProtocolFeature.INFLIGHT_SHMFD
        own = ram is None
        if ram is None:
            ram = GuestRam()
            ram.add_region(0, ram_size)
        try:
            dev = cls(VhostUserClient.connect(socket_path, timeout=timeout), ram, own_ram=own)
        except BaseException:
            if own:
                ram.close()
            raise
        try:
            dev.negotiate(features, protocol_features, event_idx=event_idx, indirect=indirect,
                          packed=packed)
            dev.send_memory(mem)
        except BaseException:
            dev.close()
            raise
        return dev

    # -- negotiation -------------------------------------------------------------------------
    def negotiate(self, features: int | None = None, protocol_features: int | None = None, *,
                  event_idx: bool = True, indirect: bool = True, packed: bool = False) -> int:
        """SET_OWNER, GET_FEATURES, protocol features, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
        SET_FEATURES. `features=None` acks everything offered that the driver supports."""
        c, o = self.client, self.offer
        c.set_owner()
        o.features = c.get_features()
        if o.features >> VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES & 1:
            o.protocol_features = c.get_protocol_features()
            want = SUPPORTED_PROTOCOL_FEATURES if protocol_features is None else protocol_features
            c.set_protocol_features(o.protocol_features & want)
            if c.has_protocol(ProtocolFeature.MQ):
                o.queue_num = c.get_queue_num()
            if c.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                o.max_mem_slots = c.get_max_mem_slots()
        if features is None:
            features = o.features & SUPPORTED_FEATURES
            if not event_idx:
                features &= ~(1 << VirtioFeature.EVENT_IDX)
            if not indirect:
                features &= ~(1 << VirtioFeature.INDIRECT_DESC)
            if not packed:
                features &= ~(1 << VirtioFeature.RING_PACKED)
        c.set_features(features)
        return features

    @property
    def packed(self) -> bool:
        """VIRTIO_F_RING_PACKED is negotiated: queues use the packed layout."""
        return self.has_feature(VirtioFeature.RING_PACKED)

    def has_feature(self, bit: int) -> bool:
        return bool(self.client.features >> bit & 1)

    # -- memory ------------------------------------------------------------------------------
    def send_memory(self, mem: MemMode = "table") -> None:
        """Announce every guest region: one SET_MEM_TABLE, or one ADD_MEM_REG each."""
        self._mem_mode = mem
        regions = list(self.ram.regions)
        if mem == "slots":
            if not self.client.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                raise VhostUserError("ADD_MEM_REG needs CONFIGURE_MEM_SLOTS, not negotiated")
            for r in regions:
                self.client.add_mem_reg(r.as_dict(), r.fd)
        else:
            self.client.set_mem_table([r.as_dict() for r in regions], [r.fd for r in regions])
        self.offer.regions_sent = regions

    def add_region(self, region: GuestRegion) -> None:
        self.client.add_mem_reg(region.as_dict(), region.fd)

    def remove_region(self, region: GuestRegion) -> None:
        self.client.rem_mem_reg(region.as_dict())

    # -- queues ------------------------------------------------------------------------------
    def start_queue(self, index: int, *, size: int = DEFAULT_QUEUE_SIZE, depth: int | None = None,
                    max_data: int = DEFAULT_MAX_DATA, base: int = 0) -> BlkQueue:
        """Lay out a split ring in guest RAM and hand it to the backend."""
        if index in self.queues:
            raise VhostUserError(f"queue {index} is already set up")
        event_idx = self.has_feature(VirtioFeature.EVENT_IDX)
        state = QueueState(SplitRing(self.ram, size, event_idx=event_idx) if not self.packed
                           else PackedRing(self.ram, size, event_idx=event_idx),
                           EventFd(), EventFd(), EventFd())
        self.queues[index] = state
        queue_class = PackedBlkQueue if self.packed else BlkQueue
        state.queue = queue_class(self.ram, state.ring, state.kick, state.call,  # type: ignore[arg-type]
                                  depth=depth, max_data=max_data)
        if self.packed and base == 0:
            base = FRESH_BASE  # both wrap counters start at 1 (virtio 1.2 2.8.1)
        self._program_ring(index, state, base)
        return state.queue

    def _program_ring(self, index: int, st: QueueState, base: int, *,
                      driver: bool = True) -> None:
        """Hand a ring to the backend; ``driver``: the guest's driver starts from ``base``
        too (not after a backend crash: the guest knows nothing of it)."""
        c, ring = self.client, st.ring
        c.set_vring_num(index, ring.num)
        c.set_vring_base(index, base)
        st.base = base
        if driver:
            ring.set_base(base)
        self._send_ring_addr(index, ring)
        c.set_vring_call(index, st.call.fd)
        c.set_vring_err(index, st.err.fd)
        c.set_vring_kick(index, st.kick.fd)
        if self.has_feature(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES):
            c.set_vring_enable(index, True)
        st.started = True

    def _send_ring_addr(self, index: int, ring: SplitRing | PackedRing) -> None:
        """SET_VRING_ADDR as QEMU sends it (vhost_virtqueue_set_addr): log_guest_addr is always
        the used ring's guest-physical address, VHOST_VRING_F_LOG is set while logging."""
        host = self.ram.host_address
        self.client.set_vring_addr(index, host(ring.addr.desc), host(ring.addr.used),
                                   host(ring.addr.avail),
                                   flags=VHOST_VRING_F_LOG if self.logging else 0,
                                   log=ring.addr.used)

    def stop_queue(self, index: int, *, disable: bool = True) -> int:
        """GET_VRING_BASE: the backend stops the ring and returns its next avail index.
        Like QEMU, first SET_VRING_ENABLE 0 when PROTOCOL_FEATURES is negotiated."""
        st = self.queues[index]
        if disable and self.has_feature(VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES):
            self.client.set_vring_enable(index, False)
        base = self.client.get_vring_base(index)
        st.started = False
        st.base = base
        return base

    def resume_queue(self, index: int, base: int) -> BlkQueue:
        """Re-program a stopped queue from `base` (what GET_VRING_BASE returned)."""
        st = self.queues[index]
        self._program_ring(index, st, base)
        assert st.queue is not None
        return st.queue

    # -- backend crashes: the inflight region (INFLIGHT_SHMFD) --------------------------------
    def use_inflight(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> InflightRegion:
        """GET_INFLIGHT_FD for every queue the backend has (once: the region is kept), then
        SET_INFLIGHT_FD, as QEMU's vhost_user_blk_start does before it starts the rings.
        Needs INFLIGHT_SHMFD negotiated (``open(..., inflight=True)``)."""
        if not self.client.has_protocol(ProtocolFeature.INFLIGHT_SHMFD):
            raise VhostUserError("the inflight region needs INFLIGHT_SHMFD, not negotiated")
        if self.inflight is None:
            payload, fd = self.client.get_inflight_fd(self.offer.queue_num, queue_size)
            self.inflight = InflightRegion(payload, fd)
        self.client.set_inflight_fd(self.inflight.payload, self.inflight.fd)
        return self.inflight

    def reconnect(self, socket_path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """After the backend died: connect to its successor and bring it where QEMU 7.2
        does (vhost_user_blk_connect): the same features, SET_INFLIGHT_FD with the kept
        region, the memory table, and every started ring again with the base QEMU has for
        it: a split ring's used index from guest memory (virtio_queue_restore_last_avail_idx),
        a packed ring's last base unchanged (QEMU restores nothing for packed rings)."""
        features, protocol = self.client.features, self.client.protocol_features
        self.client.close()
        self.client = VhostUserClient.connect(socket_path, timeout=timeout)
        self.negotiate(features, protocol)
        if self.inflight is not None:
            self.client.set_inflight_fd(self.inflight.payload, self.inflight.fd)
        self.send_memory(self._mem_mode)
        for index, st in self.queues.items():
            if st.started:
                base = st.base if st.ring.packed else st.ring.used_idx
                self._program_ring(index, st, base, driver=False)

    def queue(self, index: int = 0) -> BlkQueue:
        q = self.queues[index].queue
        assert q is not None
        return q

    # -- migration: the dirty log -----------------------------------------------------------
    @property
    def logging(self) -> bool:
        """VHOST_F_LOG_ALL is acked: the backend marks every guest page it writes."""
        return self.has_feature(VirtioFeature.LOG_ALL)

    def set_log_base(self, log: DirtyBitmap | None = None) -> int:
        """SET_LOG_BASE (LOG_SHMFD) with `log`, by default a new log sized for guest RAM the
        way QEMU sizes it; it becomes `self.log` and the previous one is closed once the
        backend answered. Returns the backend's u64 reply (QEMU only waits for it)."""
        if not self.client.has_protocol(ProtocolFeature.LOG_SHMFD):
            raise VhostUserError("SET_LOG_BASE needs LOG_SHMFD, not negotiated")
        new = DirtyBitmap.for_ram(self.ram) if log is None else log
        try:
            value = self.client.set_log_base(new.size, 0, new.fd)
        except BaseException:
            if log is None:
                new.close()
            raise
        old, self.log = self.log, new
        if old is not None and old is not new:
            old.close()
        return value

    def set_logging(self, on: bool) -> None:
        """Switch dirty logging on or off as QEMU does (vhost_dev_set_log): SET_FEATURES with
        or without VHOST_F_LOG_ALL, then SET_VRING_ADDR with or without VHOST_VRING_F_LOG for
        every started ring. Switching on first sends SET_LOG_BASE when no log was sent yet,
        and waits until the backend took LOG_ALL: its REPLY_ACK (NEED_REPLY when REPLY_ACK is
        negotiated), else a GET_FEATURES round trip (QEMU's enforce_reply)."""
        if on and not self.offer.features & LOG_ALL_MASK:
            raise VhostUserError("the backend does not offer VHOST_F_LOG_ALL")
        if on and self.log is None:
            self.set_log_base()
        c = self.client
        features = c.features | LOG_ALL_MASK if on else c.features & ~LOG_ALL_MASK
        c.set_features(features)
        if on and not c.has_protocol(ProtocolFeature.REPLY_ACK):
            c.get_features()
        for index, st in self.queues.items():
            if st.started:
                self._send_ring_addr(index, st.ring)

    def fetch_dirty(self) -> set[int]:
        """Page numbers (gpa >> 12) the backend marked since the last fetch; clears them.
        Not atomic per word (unlike QEMU): call it with no request in flight."""
        if self.log is None:
            raise VhostUserError("no dirty log: call set_log_base or set_logging first")
        return self.log.fetch_and_clear()

    # -- config and status -------------------------------------------------------------------
    def config(self) -> dict[str, int]:
        return parse_blk_config(self.client.get_config(0, CONFIG_SIZE))

    def set_running(self) -> None:
        """SET_STATUS with DRIVER_OK, when the STATUS protocol feature is negotiated."""
        if self.client.has_protocol(ProtocolFeature.STATUS):
            self.client.set_status(STATUS_RUNNING)

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the connection (the backend sees a disconnect) and free everything."""
        self.client.close()
        for st in self.queues.values():
            for fd in (st.kick, st.call, st.err):
                fd.close()
            if not self._own_ram:  # a shared GuestRam gets its memory back
                if st.queue is not None:
                    st.queue.close()
                st.ring.free()
        self.queues.clear()
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if self._own_ram:
            self.ram.close()

    def __enter__(self) -> VhostUserBlk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
