"""What each vhost-user-blk peer is documented to do where the two legitimately differ.

The conformance suite runs every case against every peer; where behaviour is allowed to differ
(features offered, serial, memory slots, STATUS/RESET_DEVICE, how a malformed or unservable
request ends), a case asserts the documented behaviour of the peer it got, looked up here.
docs/conformance.md lists the same differences with their reasons.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from protocol import BlkFeature, FrontendRequest, ProtocolFeature, VirtioFeature
from tests.peers import QSD_SERIAL, VHOSTMEM_SERIAL, PeerHandle
from vhostmem.session import BASE_PROTOCOL_FEATURES

MIB = 1 << 20
SECTOR = 512
# vhost-user message header flags.
FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8


def mask(*bits: int) -> int:
    out = 0
    for bit in bits:
        out |= 1 << bit
    return out


# Offered by both (writable export; RO is added for read-only ones).
COMMON_FEATURES = mask(
    VirtioFeature.VERSION_1, VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES,
    VirtioFeature.INDIRECT_DESC, VirtioFeature.EVENT_IDX,
    BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH,
    BlkFeature.CONFIG_WCE, BlkFeature.MQ, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES)
COMMON_PROTOCOL = mask(
    ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS)


@dataclass(frozen=True)
class Profile:
    name: str
    features: int  # exactly what GET_FEATURES returns for a writable export
    protocol_features: int  # exactly what GET_PROTOCOL_FEATURES returns
    max_mem_slots: int
    serial: bytes  # GET_ID answer (cut at the first NUL)
    writeback_at_start: int  # config-space `writeback` before the driver writes it
    # A request whose header and status share one descriptor: vhostmem completes it with
    # IOERR; qemu-storage-daemon never completes it (libvhost-user drops the malformed chain).
    completes_malformed_chain: bool
    # libvhost-user (qsd) counts iovecs, not descriptors, against an indirect table's length:
    # a buffer crossing a region boundary inside an indirect table panics the connection.
    serves_indirect_region_crossing: bool
    # One ADD_MEM_REG past max_mem_slots: vhostmem refuses it with a failed REPLY_ACK and keeps
    # serving; libvhost-user acks it with 0, panics ("no free ram slots") and drops the
    # connection.
    refuses_extra_slot_with_ack: bool
    # GET_* requests sent with NEED_REPLY whose reply carries NEED_REPLY back: vhostmem answers
    # every reply with version 1 | REPLY; libvhost-user copies the request's flags into its
    # GET_FEATURES reply (our own protocol framer rejects such a reply as malformed).
    echoes_need_reply_on: frozenset[FrontendRequest]
    # A descriptor pointing outside guest memory: vhostmem fails that request alone (IOERR in
    # its status byte, used length 1, no data moved) and keeps serving; libvhost-user panics
    # ("invalid address for buffers") and drops the connection.
    fails_unmapped_buffer_with_ioerr: bool
    # REM_MEM_REG of the region a started ring lives in: vhostmem refuses it (REPLY_ACK 1)
    # and the ring keeps running; qsd acks it, and the next kick crashes the daemon (SIGSEGV).
    refuses_removing_ring_region: bool
    # SET_FEATURES with a bit that was never offered: vhostmem refuses it (failed REPLY_ACK);
    # libvhost-user stores whatever the frontend acks.
    refuses_unoffered_features: bool
    # SET_LOG_BASE's u64 reply: vhostmem answers 0; libvhost-user turns the request into its
    # reply without clearing the payload, so the u64 is the request's first field, mmap_size.
    # QEMU only waits for the reply (vhost_user_set_log_base) and never reads its value.
    log_base_reply_is_mmap_size: bool
    # LOG_ALL on, SET_VRING_ADDR without VHOST_VRING_F_LOG: vhostmem does not log used-ring
    # writes (vhost-user.rst: they are marked "if VHOST_VRING_F_LOG is part of ring's flags");
    # libvhost-user ignores the flag and marks them at log_guest_addr, whatever that holds.
    # QEMU always sends log_guest_addr = the used ring's guest address (and the flag whenever
    # LOG_ALL is on), so under QEMU both mark the same pages.
    logs_used_ring_without_log_flag: bool
    # avail_event (EVENT_IDX; the used ring's last field, written by the device): vhostmem
    # marks its page like every used-ring write; libvhost-user stores it
    # (vring_set_avail_event) without vu_log_write, so on a ring whose avail_event has a page
    # to itself (512 entries and up) that page is written and never marked. Linux vhost logs
    # it (vhost_update_avail_event). After a migration the guest may read a stale avail_event
    # there (and skip a kick it owes) until the destination's device writes it again.
    logs_avail_event: bool

    def reply_flags(self, request: FrontendRequest) -> int:
        """Header flags of the reply to `request` sent with NEED_REPLY."""
        echoed = FLAG_NEED_REPLY if request in self.echoes_need_reply_on else 0
        return FLAG_VERSION | FLAG_REPLY | echoed

    @property
    def has_status(self) -> bool:
        return bool(self.protocol_features >> ProtocolFeature.STATUS & 1)

    @property
    def has_reset_device(self) -> bool:
        return bool(self.protocol_features >> ProtocolFeature.RESET_DEVICE & 1)


VHOSTMEM = Profile(
    name="vhostmem",
    # LOG_ALL: dirty logging for live migration (vhostmem/dirty_log.py); RING_PACKED: the
    # packed layout (vhostmem/packed_ring.py).
    features=COMMON_FEATURES | mask(VirtioFeature.LOG_ALL, VirtioFeature.RING_PACKED),
    # The server's own protocol bits (they grow with the server) plus the blk device's.
    protocol_features=BASE_PROTOCOL_FEATURES | COMMON_PROTOCOL,
    max_mem_slots=509,
    serial=VHOSTMEM_SERIAL.encode(),
    writeback_at_start=1,
    completes_malformed_chain=True,
    serves_indirect_region_crossing=True,
    refuses_extra_slot_with_ack=True,
    echoes_need_reply_on=frozenset(),
    refuses_unoffered_features=True,
    fails_unmapped_buffer_with_ioerr=True,
    refuses_removing_ring_region=True,
    log_base_reply_is_mmap_size=False,
    logs_used_ring_without_log_flag=False,
    logs_avail_event=True,
)
QSD = Profile(
    name="qsd",
    # libvhost-user also offers the legacy NOTIFY_ON_EMPTY and LOG_ALL bits; qsd adds TOPOLOGY.
    features=COMMON_FEATURES | mask(VirtioFeature.NOTIFY_ON_EMPTY, VirtioFeature.LOG_ALL,
                                    BlkFeature.TOPOLOGY),
    protocol_features=COMMON_PROTOCOL | mask(
        ProtocolFeature.LOG_SHMFD, ProtocolFeature.PAGEFAULT, ProtocolFeature.BACKEND_SEND_FD,
        ProtocolFeature.HOST_NOTIFIER),
    max_mem_slots=32,
    serial=QSD_SERIAL,
    writeback_at_start=0,
    completes_malformed_chain=False,
    serves_indirect_region_crossing=False,
    refuses_extra_slot_with_ack=False,
    echoes_need_reply_on=frozenset({FrontendRequest.GET_FEATURES}),
    refuses_unoffered_features=False,
    fails_unmapped_buffer_with_ioerr=False,
    refuses_removing_ring_region=False,
    log_base_reply_is_mmap_size=True,
    logs_used_ring_without_log_flag=True,
    logs_avail_event=False,
)
# vhostmem with --workers 2 documents exactly what vhostmem does (docs/architecture.md).
VHOSTMEM_WORKERS = dataclasses.replace(VHOSTMEM, name="vhostmem-workers")
# vhostmem on an NBD export (nbdkit's file plugin, which offers FLUSH, FUA, TRIM and
# WRITE_ZEROES): the same device, so the same documented behaviour (docs/nbd.md).
VHOSTMEM_NBD = dataclasses.replace(VHOSTMEM, name="vhostmem-nbd")
PROFILES = {p.name: p for p in (VHOSTMEM, QSD, VHOSTMEM_WORKERS, VHOSTMEM_NBD)}
# What vhostmem documents beyond qsd, whatever else the server grows.
VHOSTMEM_PROTOCOL_MINIMUM = COMMON_PROTOCOL | mask(ProtocolFeature.RESET_DEVICE,
                                                   ProtocolFeature.STATUS)


def profile(peer: PeerHandle) -> Profile:
    return PROFILES[peer.kind]  # type: ignore[attr-defined]


def image(peer: PeerHandle, offset: int, length: int) -> bytes:
    """Bytes of the peer's image file, read from the host side."""
    with open(peer.image_path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def initial(peer: PeerHandle, sector: int, length: int) -> bytes:
    """What the image held at `sector` before the test touched it."""
    start = sector * SECTOR
    return peer.initial[start:start + length]  # type: ignore[attr-defined]


def image_size(peer: PeerHandle) -> int:
    return os.path.getsize(peer.image_path)
