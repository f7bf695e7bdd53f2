"""Dirty logging through the session: SET_LOG_BASE, LOG_ALL on and off, the used ring's log
flag, switching on while requests are in flight on I/O threads, hostile log bases."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator

import pytest

from protocol import FrontendRequest, encode_request, parse_message
from tests.vhostmem.ringhelpers import DriverRing, GuestRam
from tests.vhostmem.test_dirty_log import dirty_pages, log_fd
from tests.vhostmem.test_inflight import Watcher
from vhostmem.device import RING_FEATURES, VhostUserDevice
from vhostmem.memmap import MemRegistry
from vhostmem.session import BASE_PROTOCOL_FEATURES, Session, SessionError
from vhostmem.session_base import ACK_OK, Deferred
from vhostmem.session_log import LOG_ALL_BIT
from vhostmem.virtqueue import VHOST_VRING_F_LOG, VIRTIO_F_RING_PACKED, DescChain, Virtqueue

NUM = 16
PAGE = 4096
PROTOCOL_BIT = 1 << 30
FEATURES = RING_FEATURES & ~(1 << VIRTIO_F_RING_PACKED) | PROTOCOL_BIT  # split rings here
LOG_SIZE = 64 << 10  # covers guest addresses below 2 GiB


class Device(VhostUserDevice):
    """Inline: fills every writable buffer with 0xAA. Held: hands chains to 'threads'."""

    num_queues = 1
    max_queue_size = 256

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.held: list[tuple[Virtqueue, DescChain]] = []

    def features(self) -> int:
        return RING_FEATURES

    def handle_queue(self, vq: Virtqueue) -> None:
        while (chain := vq.pop()) is not None:
            if self.hold:
                vq.hold()
                self.held.append((vq, chain))
                continue
            vq.push_used(chain.head, self.fill(chain))
        vq.notify()

    @staticmethod
    def fill(chain: DescChain) -> int:
        for view in chain.writable:
            view[:] = b"\xaa" * len(view)
        return chain.writable_len

    def finish_all(self) -> None:
        for vq, chain in self.held:
            vq.begin()
            vq.complete(chain.head, self.fill(chain))
        self.held.clear()


def send(s: Session, request: FrontendRequest, payload: object = None,
         fds: list[int] | None = None, need_reply: bool = False) -> object:
    fds = fds or []
    wire = encode_request(request, payload, fds_count=len(fds), need_reply=need_reply)
    return s.handle(parse_message(wire, sender="frontend", fds=fds))


class Env:
    def __init__(self, hold: bool = False) -> None:
        self.ram = GuestRam(size=8 << 20)
        self.ring = DriverRing(self.ram, NUM)
        self.dev = Device(hold)
        self.s = Session(self.dev, MemRegistry(), Watcher())
        s, ram = self.s, self.ram
        send(s, FrontendRequest.SET_OWNER)
        send(s, FrontendRequest.SET_PROTOCOL_FEATURES, BASE_PROTOCOL_FEATURES)
        send(s, FrontendRequest.SET_FEATURES, FEATURES)
        send(s, FrontendRequest.SET_MEM_TABLE, {"regions": [{
            "guest_phys_addr": ram.gpa, "memory_size": ram.size,
            "userspace_addr": ram.uaddr, "mmap_offset": 0}]}, [os.dup(ram.fd)])
        send(s, FrontendRequest.SET_VRING_NUM, {"index": 0, "num": NUM})
        send(s, FrontendRequest.SET_VRING_BASE, {"index": 0, "num": 0})
        self.set_addr(0)
        send(s, FrontendRequest.SET_VRING_CALL, {"index": 0, "nofd": 0},
             [os.eventfd(0, os.EFD_NONBLOCK)])
        send(s, FrontendRequest.SET_VRING_KICK, {"index": 0, "nofd": 0},
             [os.eventfd(0, os.EFD_NONBLOCK)])
        send(s, FrontendRequest.SET_VRING_ENABLE, {"index": 0, "num": 1})
        self.log = log_fd(LOG_SIZE)

    def set_addr(self, flags: int) -> None:
        to_uva = self.ram.uaddr - self.ram.gpa
        send(self.s, FrontendRequest.SET_VRING_ADDR, {
            "index": 0, "flags": flags, "desc_user_addr": self.ring.desc + to_uva,
            "used_user_addr": self.ring.used + to_uva,
            "avail_user_addr": self.ring.avail + to_uva, "log_guest_addr": self.ring.used})

    def set_log_base(self) -> object:
        return send(self.s, FrontendRequest.SET_LOG_BASE, {"mmap_size": LOG_SIZE,
                                                           "mmap_offset": 0}, [os.dup(self.log)])

    def collect(self) -> set[int]:
        """What QEMU's log sync does: read the log and clear it."""
        raw = os.pread(self.log, LOG_SIZE, 0)
        os.pwrite(self.log, bytes(LOG_SIZE), 0)
        return dirty_pages(raw)

    def read_into(self, gpa: int, length: int) -> int:
        return self.ring.add([(gpa, length, True)])

    def close(self) -> None:
        self.s.close()
        os.close(self.log)
        self.ram.close()


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))


def test_what_the_device_writes_is_marked_while_log_all_is_on(env: Env) -> None:
    (reply_bytes, _), = env.set_log_base()  # type: ignore[misc]
    assert parse_message(reply_bytes, sender="backend").payload == 0
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    env.set_addr(VHOST_VRING_F_LOG)
    buf = env.ram.alloc(3 * PAGE, PAGE) + 100  # straddles 4 pages
    env.read_into(buf, 3 * PAGE)
    env.s.on_kick(0)
    assert env.ring.take_used()[0][1] == 3 * PAGE
    used_ring = pages(env.ring.used, 4 + 8 * NUM + 2)
    dirty = env.collect()
    assert pages(buf, 3 * PAGE) <= dirty
    assert pages(env.ring.used, 4 + 8) <= dirty  # used idx and the first used entry
    assert dirty <= pages(buf, 3 * PAGE) | used_ring

    # LOG_ALL off: nothing more is marked
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES)
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert env.ring.take_used() and env.collect() == set()


def test_used_ring_not_logged_without_the_ring_flag(env: Env) -> None:
    env.set_log_base()
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    buf = env.ram.alloc(PAGE, PAGE)
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert env.collect() == pages(buf, PAGE)


def test_log_all_waits_for_requests_in_flight_on_threads() -> None:
    """Chains walked before logging was on carry no ranges to mark: LOG_ALL is acknowledged
    only once they completed, and meanwhile no new chain is taken."""
    env = Env(hold=True)
    try:
        env.set_log_base()
        early = env.ram.alloc(PAGE, PAGE)
        env.read_into(early, PAGE)
        env.s.on_kick(0)
        assert len(env.dev.held) == 1
        result = send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT,
                      need_reply=True)
        assert isinstance(result, Deferred) and not result.ready()
        late = env.ram.alloc(PAGE, PAGE)
        env.read_into(late, PAGE)
        env.s.on_kick(0)
        assert len(env.dev.held) == 1  # paused: the late chain waits
        env.dev.finish_all()
        assert result.ready()
        (ack, _), = result.finish()
        assert parse_message(ack, sender="backend").payload == ACK_OK
        assert len(env.dev.held) == 1  # the late chain, taken with logging on
        env.dev.finish_all()
        assert pages(late, PAGE) <= env.collect()
    finally:
        env.close()


def test_log_all_without_a_log_base_marks_nothing_until_one_arrives(env: Env) -> None:
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    buf = env.ram.alloc(PAGE, PAGE)
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert env.collect() == set()
    env.set_log_base()
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert env.collect() == pages(buf, PAGE)


@pytest.mark.parametrize("case, size, sealed, message", [
    ("smaller than guest memory", 4096, True, "smaller than"),
    ("unsealed", LOG_SIZE, False, "sealed"),
])
def test_a_bad_log_base_is_refused_and_the_old_one_kept(env: Env, case: str, size: int,
                                                        sealed: bool, message: str) -> None:
    env.set_log_base()
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    bad = log_fd(max(size, 4096), sealed)
    with pytest.raises(SessionError, match=f"SET_LOG_BASE: .*{message}"):
        send(env.s, FrontendRequest.SET_LOG_BASE, {"mmap_size": size, "mmap_offset": 0},
             [bad])
    with pytest.raises(OSError):
        os.fstat(bad)
    buf = env.ram.alloc(PAGE, PAGE)
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert env.collect() == pages(buf, PAGE)  # still logging into the old log


def test_memory_beyond_the_log_is_refused_while_logging(env: Env) -> None:
    env.set_log_base()
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    far = GuestRam(size=1 << 20, gpa=4 << 30, uaddr=0x7E00_0000_0000)
    try:
        with pytest.raises(SessionError, match="beyond the dirty log"):
            send(env.s, FrontendRequest.ADD_MEM_REG, {"padding": 0, "region": {
                "guest_phys_addr": far.gpa, "memory_size": far.size,
                "userspace_addr": far.uaddr, "mmap_offset": 0}}, [os.dup(far.fd)])
    finally:
        far.close()


def test_log_fd_is_kept_and_closed_with_the_session() -> None:
    env = Env()
    efd = os.eventfd(0)
    send(env.s, FrontendRequest.SET_LOG_FD, None, [os.dup(efd)])
    kept = env.s.log_fd
    assert kept >= 0 and fcntl.fcntl(kept, fcntl.F_GETFD) >= 0
    env.close()
    with pytest.raises(OSError):
        os.fstat(kept)
    os.close(efd)


def test_a_new_log_base_while_requests_are_in_flight_gets_their_pages() -> None:
    """QEMU resizes the log (a new SET_LOG_BASE) while migrating: chains in flight on I/O
    threads, walked while logging into the old log, are marked in the new one."""
    env = Env(hold=True)
    try:
        env.set_log_base()
        send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
        buf = env.ram.alloc(2 * PAGE, PAGE)
        env.read_into(buf, 2 * PAGE)
        env.s.on_kick(0)
        assert len(env.dev.held) == 1
        new = log_fd(LOG_SIZE)
        send(env.s, FrontendRequest.SET_LOG_BASE, {"mmap_size": LOG_SIZE, "mmap_offset": 0},
             [os.dup(new)])
        env.dev.finish_all()
        assert pages(buf, 2 * PAGE) <= dirty_pages(os.pread(new, LOG_SIZE, 0))
        os.close(new)
    finally:
        env.close()


def all_pages() -> set[int]:
    return set(range(LOG_SIZE * 8))


def test_a_backend_joining_a_migration_marks_every_page_once() -> None:
    """QEMU reconnecting mid-migration to a restarted backend: LOG_ALL in the first
    SET_FEATURES, then the log. The old backend's uncollected marks may be gone; all pages
    are marked once, and after that only what the device writes."""
    ram = GuestRam(size=8 << 20)
    s = Session(Device(), MemRegistry(), Watcher())
    log = log_fd(LOG_SIZE)
    try:
        send(s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
        send(s, FrontendRequest.SET_MEM_TABLE, {"regions": [{
            "guest_phys_addr": ram.gpa, "memory_size": ram.size,
            "userspace_addr": ram.uaddr, "mmap_offset": 0}]}, [os.dup(ram.fd)])
        assert dirty_pages(os.pread(log, LOG_SIZE, 0)) == set()
        send(s, FrontendRequest.SET_LOG_BASE, {"mmap_size": LOG_SIZE, "mmap_offset": 0},
             [os.dup(log)])
        assert dirty_pages(os.pread(log, LOG_SIZE, 0)) == all_pages()
        os.pwrite(log, bytes(LOG_SIZE), 0)  # QEMU collects
        send(s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
        send(s, FrontendRequest.SET_LOG_BASE, {"mmap_size": LOG_SIZE, "mmap_offset": 0},
             [os.dup(log)])
        assert dirty_pages(os.pread(log, LOG_SIZE, 0)) == set()  # once only
    finally:
        s.close()
        os.close(log)
        ram.close()


def test_a_migration_started_on_a_running_session_marks_only_writes(env: Env) -> None:
    env.set_log_base()
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    assert env.collect() == set()
    buf = env.ram.alloc(PAGE, PAGE)
    env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert pages(buf, PAGE) <= env.collect() != all_pages()


def test_the_used_idx_page_is_marked_when_the_entries_are_on_the_next_page(env: Env) -> None:
    """The used idx is marked once per batch (in notify), apart from the entries: a used ring
    whose header ends a page and whose entries start the next one gets both pages."""
    env.ring.used = env.ram.alloc(2 * PAGE, PAGE) + PAGE - 4  # flags, idx | entries
    env.set_addr(VHOST_VRING_F_LOG)
    env.set_log_base()
    send(env.s, FrontendRequest.SET_FEATURES, FEATURES | LOG_ALL_BIT)
    buf = env.ram.alloc(PAGE, PAGE)
    for _ in range(3):
        env.read_into(buf, PAGE)
    env.s.on_kick(0)
    assert len(env.ring.take_used()) == 3
    header_page, entries_page = env.ring.used // PAGE, env.ring.used // PAGE + 1
    assert {header_page, entries_page} | pages(buf, PAGE) <= env.collect()
