"""The frontend's dirty-log helpers: QEMU's log sizing, the sealed memfd, fetch-and-clear, the
pages a request or a used ring gives a device, and `VhostUserBlk`'s migration messages in
QEMU's order against a scripted backend."""

from __future__ import annotations

import fcntl
import mmap
import os
import random

import pytest

from protocol import FrontendRequest, Message, ProtocolFeature, VirtioFeature, encode_reply
from tests.vhostmem.frontend.scripted import Responder
from vhostmem.frontend.blk import MERGED, BlkType
from vhostmem.frontend.client import VhostUserError
from vhostmem.frontend.device import VHOST_VRING_F_LOG, VhostUserBlk
from vhostmem.frontend.dirty import (
    LOG_CHUNK,
    LOG_PAGE,
    LOG_SEALS,
    DirtyBitmap,
    log_pages,
    log_size_for,
    pages_of,
    used_ring_pages,
    used_write_pages,
)
from vhostmem.frontend.memory import GuestRam
from vhostmem.frontend.queue import BlkQueue
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE, EventFd, SplitRing

MIB = 1 << 20
GIB = 1 << 30
LOG_ALL = 1 << VirtioFeature.LOG_ALL
OFFERED = (1 << VirtioFeature.VERSION_1 | 1 << VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES
           | 1 << VirtioFeature.EVENT_IDX | LOG_ALL)
REPLY_ACK = 1 << ProtocolFeature.REPLY_ACK
LOG_SHMFD = 1 << ProtocolFeature.LOG_SHMFD


def _mark(mm: mmap.mmap, page: int) -> None:
    """A backend marking a page: vhost-user.rst's pseudo-code."""
    mm[page // 8] |= 1 << page % 8


# -- sizing and pages --------------------------------------------------------------------------
@pytest.mark.parametrize(("regions", "size"), [
    ([(0, 64 * MIB)], 2048),  # QEMU's 64 MiB guest: 256 u64 chunks
    ([(0, LOG_CHUNK)], 8),  # the last address is the chunk's last byte
    ([(0, LOG_CHUNK + LOG_PAGE)], 16),  # one page more needs a second chunk
    ([(0, 4096), (4 * GIB, 16 * MIB)], ((4 * GIB + 16 * MIB - 1) // LOG_CHUNK + 1) * 8),
    ([(4 * GIB, 16 * MIB), (0, 4096)], ((4 * GIB + 16 * MIB - 1) // LOG_CHUNK + 1) * 8),
    ([], 8),
])
def test_log_size_is_qemus(regions: list[tuple[int, int]], size: int) -> None:
    assert log_size_for(regions) == size
    if regions:  # every guest address has its bit
        last = max(g + s for g, s in regions) - 1
        assert (last >> 12) // 8 < size


def test_pages_of() -> None:
    assert pages_of(0, 1) == {0}
    assert pages_of(4095, 2) == {0, 1}
    assert pages_of(4096, 4096) == {1}
    assert pages_of(4 * GIB + 10, 3 * LOG_PAGE) == {1 << 20, (1 << 20) + 1, (1 << 20) + 2,
                                                      (1 << 20) + 3}
    assert pages_of(4096, 0) == set()
    # Log bytes to pages: bit b of byte k (counted from byte_offset) is page 8 * k + b.
    assert log_pages(b"\x01\x80", 2) == {16, 31}
    assert log_pages(bytes(8)) == set()


# -- the log memfd -----------------------------------------------------------------------------
def test_log_is_a_sealed_memfd_like_qemus() -> None:
    with GuestRam() as ram:
        ram.add_region(0, 64 * MIB)
        with DirtyBitmap.for_ram(ram) as log:
            assert log.size == 2048 and os.fstat(log.fd).st_size == 2048
            assert log.payload == {"mmap_size": 2048, "mmap_offset": 0}
            assert log.covers_below == 64 * MIB
            assert fcntl.fcntl(log.fd, fcntl.F_GET_SEALS) & LOG_SEALS == LOG_SEALS
            with pytest.raises(PermissionError):
                os.ftruncate(log.fd, 1024)
            assert not any(bytes(log.mm))
        assert log.fd == -1
        log.close()  # twice is fine


def test_fetch_and_clear_returns_exactly_the_marked_pages() -> None:
    rng = random.Random(11)
    with DirtyBitmap(4096) as log:
        backend = mmap.mmap(log.fd, log.size)  # the backend's own mapping
        try:
            pages = {0, 7, 8, 63, 64, 4096 * 8 - 1, *rng.sample(range(4096 * 8), 200)}
            for page in pages:
                _mark(backend, page)
            assert log.peek() == pages  # peek leaves them
            assert log.fetch_and_clear() == pages
            assert not any(bytes(backend)) and log.fetch_and_clear() == set()
            _mark(backend, 12345)  # the backend goes on marking after a clear
            assert log.fetch_and_clear() == {12345}
        finally:
            backend.close()


def test_fetch_and_clear_handles_a_size_not_a_multiple_of_a_word() -> None:
    with DirtyBitmap(13) as log:
        _mark(log.mm, 13 * 8 - 1)
        _mark(log.mm, 9)
        assert log.fetch_and_clear() == {13 * 8 - 1, 9}
        assert not any(bytes(log.mm))


def test_bad_log_size_is_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        DirtyBitmap(0)


# -- what a device may write -------------------------------------------------------------------
def test_used_ring_pages_and_the_pages_completions_write() -> None:
    with GuestRam() as ram:
        ram.add_region(0, MIB)
        ram.reserve(0, 3 * LOG_PAGE)  # the ring starts at a page boundary after these
        ring = SplitRing(ram, 512)  # used ring: 4 + 8 * 512 + 2 bytes, over two pages
        used = ring.addr.used
        assert used_ring_pages(ring) == pages_of(used, 4 + 8 * 512 + 2)
        assert len(used_ring_pages(ring)) == 2
        assert used_write_pages(ring, 5, 5) == set()  # no completion, nothing written
        assert used_write_pages(ring, 0, 1) == pages_of(used, 4 + 8)
        last_entry = used + 4 + 8 * 511
        # Wrapping around the ring (and the 16-bit index): the last entry and the first.
        assert used_write_pages(ring, 0xFFFF, 1) == pages_of(used, 4) | \
            pages_of(last_entry, 8) | pages_of(used + 4, 8)
        assert used_write_pages(ring, 0, 512) == pages_of(used, 4 + 8 * 512)
        ring.free()


def test_requests_record_their_writable_pieces() -> None:
    with GuestRam() as ram:
        ram.add_region(0, 4 * MIB)
        ring = SplitRing(ram, 16)
        kick, call = EventFd(), EventFd()
        try:
            q = BlkQueue(ram, ring, kick, call, depth=4)
            read = q.prepare(BlkType.IN, 0, in_len=8192)
            assert read.writable == [(read.in_gpa, 8192), (read.status_gpa, 1)]
            write = q.prepare(BlkType.OUT, 0, data=b"x" * 4096)
            assert write.writable == [(write.status_gpa, 1)]
            merged = q.prepare(BlkType.IN, 0, in_len=512, layout=MERGED)
            assert merged.writable == [(merged.in_gpa, 513)]
            base = ram.alloc(64)
            chain = q.prepare_chain([(base, 16, 0), (base + 16, 32, VIRTQ_DESC_F_WRITE),
                                     (base + 48, 1, VIRTQ_DESC_F_WRITE)])
            assert chain.writable == [(base + 16, 32), (base + 48, 1)]
        finally:
            kick.close()
            call.close()


# -- VhostUserBlk against a scripted backend --------------------------------------------------
class Backend:
    """Answers a blk frontend; on SET_LOG_BASE checks the log fd like a backend would, maps it
    and marks `mark_pages` in it before replying `log_base_reply`."""

    def __init__(self, protocol: int, *, features: int = OFFERED, log_base_reply: int = 0,
                 mark_pages: tuple[int, ...] = ()) -> None:
        self.protocol, self.features = protocol, features
        self.log_base_reply, self.mark_pages = log_base_reply, mark_pages
        self.log_fd_size = -1
        self.log_fd_seals = 0

    def __call__(self, msg: Message) -> bytes | None:
        r = FrontendRequest(msg.request)
        if r == FrontendRequest.GET_FEATURES:
            return encode_reply(r, self.features)
        if r == FrontendRequest.GET_PROTOCOL_FEATURES:
            return encode_reply(r, self.protocol)
        if r == FrontendRequest.GET_VRING_BASE:
            return encode_reply(r, {"index": msg.payload.index, "num": 0})
        if r == FrontendRequest.SET_LOG_BASE:
            (fd,) = msg.fds
            self.log_fd_size = os.fstat(fd).st_size
            self.log_fd_seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            mm = mmap.mmap(fd, msg.payload.mmap_size, offset=msg.payload.mmap_offset)
            for page in self.mark_pages:
                _mark(mm, page)
            mm.close()
            return encode_reply(r, self.log_base_reply)
        return encode_reply(r, 0) if msg.need_reply else None


def _device(scripted, backend: Responder, queues: int = 1) -> tuple[VhostUserBlk,
                                                                     list[Message]]:
    client, seen = scripted(backend)
    ram = GuestRam()
    ram.add_region(0, 4 * MIB)
    dev = VhostUserBlk(client, ram, own_ram=True)
    dev.negotiate()
    dev.send_memory()
    for i in range(queues):
        dev.start_queue(i, size=16, depth=2)
    _sync(dev)
    seen.clear()
    return dev, seen


def _sync(dev: VhostUserBlk) -> None:
    """A round trip: the backend has seen every message sent before (some have no answer)."""
    dev.client.get_features()


def _requests(seen: list[Message]) -> list[tuple[str, bool]]:
    return [(FrontendRequest(m.request).name, m.need_reply) for m in seen]


def test_set_logging_sends_qemus_sequence(scripted) -> None:
    backend = Backend(REPLY_ACK | LOG_SHMFD, log_base_reply=77)
    dev, seen = _device(scripted, backend, queues=2)
    with dev:
        assert dev.client.has_protocol(ProtocolFeature.LOG_SHMFD)  # acked by default
        assert not dev.logging and not dev.client.features & LOG_ALL  # never at start
        dev.stop_queue(1)
        seen.clear()
        dev.set_logging(True)
        assert dev.logging and dev.log is not None
        assert _requests(seen) == [("SET_LOG_BASE", False), ("SET_FEATURES", True),
                                   ("SET_VRING_ADDR", True)]  # queue 1 is stopped
        base, features, addr = seen
        assert len(base.fds) == 1
        assert base.payload.mmap_size == dev.log.size == log_size_for([(0, 4 * MIB)])
        assert base.payload.mmap_offset == 0
        assert backend.log_fd_size == dev.log.size
        assert backend.log_fd_seals & LOG_SEALS == LOG_SEALS
        assert features.payload == dev.client.features and features.payload & LOG_ALL
        ring = dev.queues[0].ring
        assert addr.payload.index == 0 and addr.payload.flags == VHOST_VRING_F_LOG
        assert addr.payload.log_guest_addr == ring.addr.used
        assert addr.payload.used_user_addr == dev.ram.host_address(ring.addr.used)

        seen.clear()
        dev.resume_queue(1, 0)  # a ring started while logging gets the flag at once
        (resumed,) = [m for m in seen if m.request == FrontendRequest.SET_VRING_ADDR]
        assert resumed.payload.flags == VHOST_VRING_F_LOG
        assert resumed.payload.log_guest_addr == dev.queues[1].ring.addr.used

        seen.clear()
        dev.set_logging(False)  # the log stays; no new SET_LOG_BASE either way
        assert not dev.logging and dev.log is not None
        assert _requests(seen) == [("SET_FEATURES", True), ("SET_VRING_ADDR", True),
                                   ("SET_VRING_ADDR", True)]
        assert not seen[0].payload & LOG_ALL
        assert [m.payload.flags for m in seen[1:]] == [0, 0]
        # QEMU sends the used ring's guest address whether or not it asks for logging.
        assert [m.payload.log_guest_addr for m in seen[1:]] == \
            [dev.queues[i].ring.addr.used for i in (0, 1)]
        seen.clear()
        dev.set_logging(True)
        assert _requests(seen)[0] == ("SET_FEATURES", True)


def test_set_log_base_returns_the_reply_and_replaces_the_log(scripted) -> None:
    dev, seen = _device(scripted, Backend(REPLY_ACK | LOG_SHMFD, log_base_reply=2048))
    with dev:
        assert dev.set_log_base() == 2048
        first = dev.log
        assert first is not None
        mine = DirtyBitmap(4096)
        assert dev.set_log_base(mine) == 2048
        assert dev.log is mine and first.fd == -1  # the old one is closed
        assert seen[-1].payload.mmap_size == 4096
    assert mine.fd == -1  # closing the device closes its log


def test_logging_without_reply_ack_syncs_with_get_features(scripted) -> None:
    """QEMU's enforce_reply: without REPLY_ACK, a GET_FEATURES round trip after SET_FEATURES
    tells the frontend the backend took LOG_ALL."""
    dev, seen = _device(scripted, Backend(LOG_SHMFD))
    with dev:
        dev.set_logging(True)
        _sync(dev)
        assert _requests(seen) == [("SET_LOG_BASE", False), ("SET_FEATURES", False),
                                   ("GET_FEATURES", False), ("SET_VRING_ADDR", False),
                                   ("GET_FEATURES", False)]
        seen.clear()
        dev.set_logging(False)
        _sync(dev)
        assert _requests(seen) == [("SET_FEATURES", False), ("SET_VRING_ADDR", False),
                                   ("GET_FEATURES", False)]


def test_fetch_dirty_reads_what_the_backend_marked(scripted) -> None:
    dev, _ = _device(scripted, Backend(REPLY_ACK | LOG_SHMFD, mark_pages=(0, 9, 1023)))
    with dev:
        with pytest.raises(VhostUserError, match="no dirty log"):
            dev.fetch_dirty()
        dev.set_logging(True)
        assert dev.fetch_dirty() == {0, 9, 1023}
        assert dev.fetch_dirty() == set()


def test_logging_needs_what_the_backend_offers(scripted) -> None:
    dev, seen = _device(scripted, Backend(REPLY_ACK))  # no LOG_SHMFD
    with dev:
        with pytest.raises(VhostUserError, match="LOG_SHMFD"):
            dev.set_log_base()
        with pytest.raises(VhostUserError, match="LOG_SHMFD"):
            dev.set_logging(True)
        assert seen == []
    dev, seen = _device(scripted, Backend(REPLY_ACK | LOG_SHMFD, features=OFFERED & ~LOG_ALL))
    with dev:
        with pytest.raises(VhostUserError, match="does not offer VHOST_F_LOG_ALL"):
            dev.set_logging(True)
        assert seen == []
