"""Inflight I/O tracking (INFLIGHT_SHMFD): region layout, tracking, crash recovery.

Real memfds throughout: the region is a sealed memfd from ``create_inflight_fd`` that the test
keeps open like QEMU does; guest RAM and rings are a memfd written by a driver-side ring. A
"crash" is dropping the Virtqueue (or Session) without completing its requests and without any
cleanup touching the region; the "restarted backend" is a new one attached to the same fd.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from protocol import FrontendRequest, ProtocolFeature, encode_request, parse_message
from tests.vhostmem.ringhelpers import (
    ALL_RING_FEATURES,
    USED_ELEM,
    DriverRing,
    GuestRam,
    eventfd_count,
)
from vhostmem.device import RING_FEATURES, VhostUserDevice
from vhostmem.guest_memory import GuestMemory
from vhostmem.inflight import (
    DEVICE_STATE_SIZE,
    InflightError,
    InflightRegion,
    create_inflight_fd,
    queue_region_size,
    region_size,
)
from vhostmem.memmap import MemRegistry
from vhostmem.session import BASE_PROTOCOL_FEATURES, Session, SessionError
from vhostmem.virtqueue import VIRTIO_F_RING_PACKED, DescChain, Virtqueue

NUM = 16
SECTOR = 512
# The spec's C structs, little-endian: QueueRegionSplit header and DescStateSplit.
HEADER = struct.Struct("<QHHHH")
DESC_STATE = struct.Struct("<B5xHQ")


def fd_targets() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return out


def inflight_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("vhostmem-inflight" in line or "test-inflight" in line for line in f)


def raw_header(fd: int, queue: int = 0, queue_size: int = NUM) -> tuple[int, ...]:
    return HEADER.unpack(os.pread(fd, HEADER.size, queue * queue_region_size(queue_size)))


def raw_desc(fd: int, head: int, queue: int = 0, queue_size: int = NUM) -> tuple[int, int, int]:
    off = queue * queue_region_size(queue_size) + HEADER.size + DESC_STATE.size * head
    return DESC_STATE.unpack(os.pread(fd, DESC_STATE.size, off))  # type: ignore[return-value]


# ------------------------------------------------------------------ layout


def test_region_sizes_match_the_libvhost_user_formula() -> None:
    for qs in (1, 2, 3, 4, 5, 64, 127, 128, 256, 1000, 1024, 32768):
        # libvhost-user: ALIGN_UP(16 * queue_size + 2, 64); the header fits in that slack.
        expected = -(-(16 * qs + 2) // 64) * 64
        assert queue_region_size(qs) == expected
        assert queue_region_size(qs) >= 16 + 16 * qs
        assert region_size(3, qs) == 3 * expected
    assert queue_region_size(128) == 2112


def test_get_inflight_fd_creates_a_sealed_zeroed_memfd() -> None:
    fd, payload = create_inflight_fd(2, 128, max_queues=4)
    try:
        # two queue areas of 2112 bytes, then the device state trailer
        size = 4224 + DEVICE_STATE_SIZE
        assert payload == {"mmap_size": size, "mmap_offset": 0, "num_queues": 2,
                           "queue_size": 128}
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, size, 0) == bytes(size)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SHRINK
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 8192)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("num_queues", "queue_size", "match"), [
    (0, 128, "num_queues 0 not in 1..4"),
    (5, 128, "num_queues 5 not in 1..4"),
    (1, 0, "queue_size 0 not in 1..32768"),
    (1, 40000, "queue_size 40000"),
])
def test_get_inflight_fd_rejects_bad_shapes(num_queues: int, queue_size: int, match: str) -> None:
    before = fd_targets()
    with pytest.raises(InflightError, match=match):
        create_inflight_fd(num_queues, queue_size, max_queues=4)
    assert fd_targets() == before


def _memfd(size: int) -> int:
    fd = os.memfd_create("test-inflight")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(("make_fd", "args", "match"), [
    (lambda: _memfd(4096), (2112, 0, 0, 16), "num_queues 0"),
    (lambda: _memfd(4096), (2112, 0, 3, 16), "num_queues 3 not in 1..2"),
    (lambda: _memfd(4096), (2112, 0, 1, 0), "queue_size 0"),
    (lambda: _memfd(4096), (100, 0, 1, 16), "mmap_size 100 is smaller than the 320 bytes"),
    (lambda: _memfd(4096), (4096, 4096, 1, 16), "exceeds the fd's size 4096"),
    (lambda: _memfd(8192), (320, 100, 1, 16), "mmap_offset 100 is not a multiple"),
    (lambda: _memfd(100), (320, 0, 1, 16), "exceeds the fd's size 100"),
    (lambda: os.eventfd(0), (320, 0, 1, 16), "not a memory file"),
    (lambda: _memfd(4096), (4096, 0, 1, 16), "not a memfd sealed against shrinking"),
])
def test_set_inflight_fd_rejects_bad_regions_and_leaks_nothing(
    make_fd: object, args: tuple[int, int, int, int], match: str
) -> None:
    before_fds, before_maps = fd_targets(), inflight_mappings()
    fd = make_fd()  # type: ignore[operator]
    with pytest.raises(InflightError, match=match):
        InflightRegion.attach(fd, *args, max_queues=2)
    assert fd_targets() == before_fds  # the fd was closed
    assert inflight_mappings() == before_maps  # nothing stayed mapped


def test_attach_sets_desc_num_and_close_releases_everything() -> None:
    before_fds, before_maps = fd_targets(), inflight_mappings()
    fd, p = create_inflight_fd(2, NUM)
    keep = os.dup(fd)  # the frontend's copy
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 2, NUM)
    assert inflight_mappings() == before_maps + 1
    q1 = region.queue(1)
    assert q1 is region.queue(1) and q1.desc_num == NUM and q1.version == 0
    assert raw_header(keep, 1) == (0, 0, NUM, 0, 0)
    with pytest.raises(InflightError, match="queue 2 not in"):
        region.queue(2)
    region.close()
    assert inflight_mappings() == before_maps
    os.close(keep)
    assert fd_targets() == before_fds


# ------------------------------------------------------------ virtqueue level


@dataclass
class Guest:
    """Guest RAM with one ring, and the inflight memfd the frontend keeps across crashes."""

    ram: GuestRam = field(default_factory=GuestRam)
    ring: DriverRing = field(init=False)
    region_fd: int = -1
    region_size: int = 0
    data: int = 0

    def __post_init__(self) -> None:
        self.ring = DriverRing(self.ram, NUM)
        self.region_fd, p = create_inflight_fd(1, NUM)
        self.region_size = p["mmap_size"]
        self.data = self.ram.alloc(4096, 4096)

    def add(self, n: int) -> list[int]:
        return [self.ring.add([(self.data, 8, False)]) for _ in range(n)]

    def used(self) -> list[int]:
        return [head for head, _ in self.ring.take_used()]

    def close(self) -> None:
        os.close(self.region_fd)
        self.ram.close()


@dataclass
class Backend:
    """One backend "process": its own mapping of guest RAM and of the region."""

    mem: GuestMemory
    vq: Virtqueue
    region: InflightRegion
    call: int

    def pop_all(self) -> list[DescChain]:
        out = []
        while (chain := self.vq.pop()) is not None:
            out.append(chain)
        return out

    def complete(self, *chains: DescChain) -> None:
        for chain in chains:
            self.vq.push_used(chain.head, 0)
        self.vq.notify()

    def crash(self) -> None:
        """The process dies: its mappings and fds vanish, nothing else happens."""
        self.vq._inflight = None  # a dead process runs no cleanup on the shared region
        self.vq.close()
        self.region.close()
        self.mem.close()


def start_backend(g: Guest, base: int | None = None) -> Backend:
    mem = GuestMemory(MemRegistry())
    g.ram.add_to(mem)
    vq = Virtqueue(0, mem)
    region = InflightRegion.attach(os.dup(g.region_fd), g.region_size, 0, 1, NUM)
    vq.set_inflight(region.queue(0))
    call = os.eventfd(0, os.EFD_NONBLOCK)
    vq.set_call_fd(call)
    vq.set_num(NUM)
    vq.set_addr(g.ring.desc, g.ring.used, g.ring.avail)
    vq.set_features(ALL_RING_FEATURES)
    # QEMU after a backend crash: last_avail_idx restored to the used idx.
    vq.set_base(g.ring.used_idx() if base is None else base)
    vq.start()
    vq.enable(True)
    return Backend(mem, vq, region, call)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_fetch_flags_heads_with_increasing_counters_and_completion_clears(guest: Guest) -> None:
    b = start_backend(guest)
    q = b.region.queue(0)
    assert q.version == 1 and q.used_idx == 0  # initialised at the first start
    heads = guest.add(3)
    chains = b.pop_all()
    assert [c.head for c in chains] == heads
    states = [raw_desc(guest.region_fd, h) for h in heads]
    assert [s[0] for s in states] == [1, 1, 1]
    counters = [s[2] for s in states]
    assert counters == sorted(counters) and len(set(counters)) == 3
    b.complete(chains[1])
    assert raw_desc(guest.region_fd, heads[1])[0] == 0
    assert raw_desc(guest.region_fd, heads[0])[0] == 1
    _, version, desc_num, last_batch, used_idx = raw_header(guest.region_fd)
    assert (version, desc_num, last_batch, used_idx) == (1, NUM, heads[1], 1)
    assert guest.ring.used_idx() == 1
    b.crash()


def test_crash_resubmits_in_fetch_order_before_new_requests(guest: Guest) -> None:
    b = start_backend(guest)
    a, b1, c, d = guest.add(4)
    chains = {ch.head: ch for ch in b.pop_all()}
    b.complete(chains[b1], chains[d])  # out of order
    assert guest.used() == [b1, d]
    # The driver reuses b1's descriptor: the new request's head (b1 again) is fetched last.
    guest.ring.free.remove(b1)
    guest.ring.free.insert(0, b1)
    (again,) = guest.add(1)
    assert again == b1
    (newest,) = b.pop_all()
    assert newest.head == b1
    b.crash()

    (fresh,) = guest.add(1)  # queued while the backend was down
    b2 = start_backend(guest)
    assert eventfd_count(b2.call) == 1  # the restarted backend pokes the driver once
    # a, c, b1(new) were in flight: resubmitted in fetch order, then the new request.
    assert b2.vq.get_base() == guest.ring.used_idx() + 3
    got = b2.pop_all()
    assert [ch.head for ch in got] == [a, c, b1, fresh]
    b2.complete(*got)
    assert guest.used() == [a, c, b1, fresh]
    assert b2.region.queue(0).inflight_heads() == []
    assert raw_header(guest.region_fd)[4] == guest.ring.used_idx() == 6
    b2.crash()

    b3 = start_backend(guest)  # nothing in flight any more: nothing is resubmitted
    assert b3.pop_all() == []
    assert b3.vq.get_base() == guest.ring.used_idx()
    b3.crash()


def test_resubmitted_chains_carry_their_buffers(guest: Guest) -> None:
    b = start_backend(guest)
    buf = guest.ram.alloc(64, 16)
    guest.ram.write(buf, b"payload!" * 8)
    head = guest.ring.add([(buf, 64, False), (guest.data, 1, True)])
    (chain,) = b.pop_all()
    b.crash()
    b2 = start_backend(guest)
    (again,) = b2.pop_all()
    assert again.head == chain.head == head
    assert b"".join(bytes(v) for v in again.readable) == b"payload!" * 8
    assert again.writable_len == 1
    b2.complete(again)
    b2.crash()


def test_crash_between_used_idx_store_and_region_update(guest: Guest) -> None:
    b = start_backend(guest)
    x, y = guest.add(2)
    b.pop_all()
    # What push_used stores before the region is touched: the used element and used idx.
    slot = guest.ring.used_idx() % NUM
    guest.ram.write(guest.ring.used + 4 + 8 * slot, USED_ELEM.pack(x, 0))
    guest.ram.write(guest.ring.used + 2, struct.pack("<H", guest.ring.used_idx() + 1))
    assert raw_desc(guest.region_fd, x)[0] == 1 and raw_header(guest.region_fd)[4] == 0
    b.crash()

    b2 = start_backend(guest)
    # x completed (it is in the used ring): its flag is settled, only y is resubmitted.
    assert raw_desc(guest.region_fd, x)[0] == 0
    assert raw_header(guest.region_fd)[4] == 1
    got = b2.pop_all()
    assert [ch.head for ch in got] == [y]
    b2.complete(*got)
    assert guest.used() == [x, y]
    b2.crash()


def test_crash_after_clearing_but_before_region_used_idx(guest: Guest) -> None:
    b = start_backend(guest)
    (x,) = guest.add(1)
    (chain,) = b.pop_all()
    b.vq.push_used(chain.head, 0)
    # Roll the region's used_idx back: the crash hit right after the flag was cleared.
    os.pwrite(guest.region_fd, struct.pack("<H", 0), 14)
    b.crash()
    b2 = start_backend(guest)
    assert b2.pop_all() == []
    assert raw_header(guest.region_fd)[4] == 1
    assert guest.used() == [x]
    b2.crash()


def test_fresh_region_keeps_the_frontend_base(guest: Guest) -> None:
    # Some traffic before the region exists (e.g. a backend without tracking).
    plain_mem = GuestMemory(MemRegistry())
    guest.ram.add_to(plain_mem)
    vq = Virtqueue(0, plain_mem)
    guest.ring.attach(vq)
    guest.add(2)
    while (ch := vq.pop()) is not None:
        vq.push_used(ch.head, 0)
    vq.close()
    plain_mem.close()
    b = start_backend(guest, base=2)
    assert b.vq.get_base() == 2
    assert raw_header(guest.region_fd)[1:] == (1, NUM, 0, 2)  # version 1, used_idx synced
    (h,) = guest.add(1)
    assert [c.head for c in b.pop_all()] == [h]
    b.crash()


def test_ring_larger_than_the_region_is_refused(guest: Guest) -> None:
    mem = GuestMemory(MemRegistry())
    guest.ram.add_to(mem)
    fd, p = create_inflight_fd(1, NUM // 2)
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 1, NUM // 2)
    vq = Virtqueue(0, mem)
    vq.set_inflight(region.queue(0))
    vq.set_num(NUM)
    vq.set_addr(guest.ring.desc, guest.ring.used, guest.ring.avail)
    with pytest.raises(InflightError, match="ring size 16 exceeds the inflight region's 8"):
        vq.start()
    assert not vq.started
    vq.close()
    region.close()
    mem.close()


def test_unknown_region_version_is_refused(guest: Guest) -> None:
    os.pwrite(guest.region_fd, struct.pack("<H", 7), 8)
    mem = GuestMemory(MemRegistry())
    guest.ram.add_to(mem)
    region = InflightRegion.attach(os.dup(guest.region_fd), guest.region_size, 0, 1, NUM)
    vq = Virtqueue(0, mem)
    vq.set_inflight(region.queue(0))
    vq.set_num(NUM)
    vq.set_addr(guest.ring.desc, guest.ring.used, guest.ring.avail)
    with pytest.raises(InflightError, match="version 7, expected 1"):
        vq.start()
    vq.close()
    region.close()
    mem.close()


def test_thread_completion_clears_flags(guest: Guest) -> None:
    import threading

    b = start_backend(guest)
    heads = guest.add(4)
    chains = b.pop_all()
    for _ in chains:
        b.vq.hold()
    workers = [threading.Thread(target=b.vq.complete, args=(c.head, 0)) for c in chains]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(guest.used()) == sorted(heads)
    assert b.region.queue(0).inflight_heads() == []
    assert raw_header(guest.region_fd)[4] == 4
    b.crash()


# -------------------------------------------------------------- session level


class HoldingDevice(VhostUserDevice):
    """A device that takes requests and completes them only when told (work in progress)."""

    num_queues = 2
    max_queue_size = 256

    def __init__(self) -> None:
        self.held: list[DescChain] = []
        self.vq: Virtqueue | None = None

    def features(self) -> int:
        return RING_FEATURES

    def handle_queue(self, vq: Virtqueue) -> None:
        self.vq = vq
        while (chain := vq.pop()) is not None:
            self.held.append(chain)

    def finish(self, head: int) -> None:
        assert self.vq is not None
        (chain,) = [c for c in self.held if c.head == head]
        self.held.remove(chain)
        self.vq.push_used(chain.head, 0)
        self.vq.notify()


class Watcher:
    def __init__(self) -> None:
        self.watched: dict[int, object] = {}

    def watch(self, fd: int, callback: object) -> None:
        self.watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def defer(self, callback: Callable[[], None]) -> None:
        callback()


def send(s: Session, request: FrontendRequest, payload: object = None,
         fds: list[int] | None = None) -> list[tuple[bytes, list[int]]]:
    fds = fds or []
    wire = encode_request(request, payload, fds_count=len(fds))
    return s.handle(parse_message(wire, sender="frontend", fds=fds))


def reply_of(replies: list[tuple[bytes, list[int]]], request: FrontendRequest) -> object:
    ((data, fds),) = replies
    return parse_message(data, sender="backend", fds=fds)


def connect(g: Guest, region_fd: int, region_size: int) -> tuple[Session, HoldingDevice]:
    """What QEMU sends on (re)connect to a ring that is already running in the guest."""
    dev = HoldingDevice()
    s = Session(dev, MemRegistry(), Watcher())
    send(s, FrontendRequest.SET_OWNER)
    send(s, FrontendRequest.SET_PROTOCOL_FEATURES, BASE_PROTOCOL_FEATURES)
    send(s, FrontendRequest.SET_INFLIGHT_FD, {
        "mmap_size": region_size, "mmap_offset": 0,
        "num_queues": region_size // queue_region_size(NUM), "queue_size": NUM},
        [os.dup(region_fd)])
    send(s, FrontendRequest.SET_FEATURES,
         RING_FEATURES & ~(1 << VIRTIO_F_RING_PACKED) | (1 << 30))  # split rings
    send(s, FrontendRequest.SET_MEM_TABLE, {"regions": [{
        "guest_phys_addr": g.ram.gpa, "memory_size": g.ram.size,
        "userspace_addr": g.ram.uaddr, "mmap_offset": 0}]}, [os.dup(g.ram.fd)])
    to_uva = g.ram.uaddr - g.ram.gpa
    send(s, FrontendRequest.SET_VRING_NUM, {"index": 0, "num": NUM})
    send(s, FrontendRequest.SET_VRING_BASE, {"index": 0, "num": g.ring.used_idx()})
    send(s, FrontendRequest.SET_VRING_ADDR, {
        "index": 0, "flags": 0, "desc_user_addr": g.ring.desc + to_uva,
        "used_user_addr": g.ring.used + to_uva, "avail_user_addr": g.ring.avail + to_uva,
        "log_guest_addr": 0})
    send(s, FrontendRequest.SET_VRING_CALL, {"index": 0, "nofd": 0},
         [os.eventfd(0, os.EFD_NONBLOCK)])
    send(s, FrontendRequest.SET_VRING_KICK, {"index": 0, "nofd": 0},
         [os.eventfd(0, os.EFD_NONBLOCK)])
    send(s, FrontendRequest.SET_VRING_ENABLE, {"index": 0, "num": 1})
    return s, dev


def test_session_offers_inflight_and_survives_a_backend_crash(guest: Guest) -> None:
    assert BASE_PROTOCOL_FEATURES >> ProtocolFeature.INFLIGHT_SHMFD & 1
    before_fds = fd_targets()
    # First backend: QEMU asks for the region, keeps its fd, hands it back.
    dev0 = HoldingDevice()
    s0 = Session(dev0, MemRegistry(), Watcher())
    msg = reply_of(send(s0, FrontendRequest.GET_INFLIGHT_FD, {
        "mmap_size": 0, "mmap_offset": 0, "num_queues": 2, "queue_size": NUM}),
        FrontendRequest.GET_INFLIGHT_FD)
    p = msg.payload  # type: ignore[attr-defined]
    assert (p.mmap_size, p.mmap_offset, p.num_queues, p.queue_size) == (
        2 * queue_region_size(NUM) + DEVICE_STATE_SIZE, 0, 2, NUM)
    qemu_fd = os.dup(msg.fds[0])  # what sendmsg would give QEMU  # type: ignore[attr-defined]
    s0.close()  # the session's own copy of the offered fd goes with it
    with pytest.raises(OSError):
        os.fstat(msg.fds[0])  # type: ignore[attr-defined]

    s1, dev1 = connect(guest, qemu_fd, p.mmap_size)
    heads = guest.add(3)
    s1.on_kick(0)
    assert [c.head for c in dev1.held] == heads
    dev1.finish(heads[1])
    # Crash: the process is gone with requests in progress (no cleanup runs).
    s1.queues[0]._inflight = None
    dev1.held.clear()  # its buffer views die with the process
    s1.close()

    s2, dev2 = connect(guest, qemu_fd, p.mmap_size)
    assert [c.head for c in dev2.held] == [heads[0], heads[2]]  # resubmitted at start
    for head in [c.head for c in dev2.held]:
        dev2.finish(head)
    assert guest.used() == [heads[1], heads[0], heads[2]]
    s2.close()
    os.close(qemu_fd)
    assert fd_targets() == before_fds


def test_session_set_inflight_fd_errors(guest: Guest) -> None:
    s = Session(HoldingDevice(), MemRegistry(), Watcher())
    send(s, FrontendRequest.SET_PROTOCOL_FEATURES, BASE_PROTOCOL_FEATURES)
    before_fds, before_maps = fd_targets(), inflight_mappings()
    fd = _memfd(100)
    with pytest.raises(SessionError, match=r"SET_INFLIGHT_FD: .*exceeds the fd's size 100"):
        send(s, FrontendRequest.SET_INFLIGHT_FD, {"mmap_size": 640, "mmap_offset": 0,
                                                  "num_queues": 2, "queue_size": NUM}, [fd])
    fd = _memfd(8192)
    with pytest.raises(SessionError, match=r"num_queues 3 not in 1\.\.2"):
        send(s, FrontendRequest.SET_INFLIGHT_FD, {"mmap_size": 960, "mmap_offset": 0,
                                                  "num_queues": 3, "queue_size": NUM}, [fd])
    assert fd_targets() == before_fds and inflight_mappings() == before_maps
    # GET with an impossible shape: the reply's error form (mmap_size 0, no fd).
    msg = reply_of(send(s, FrontendRequest.GET_INFLIGHT_FD, {
        "mmap_size": 0, "mmap_offset": 0, "num_queues": 9, "queue_size": NUM}),
        FrontendRequest.GET_INFLIGHT_FD)
    assert msg.payload.mmap_size == 0 and msg.fds == []  # type: ignore[attr-defined]
    s.close()
    assert fd_targets() == before_fds


def test_session_refuses_set_inflight_fd_on_a_started_ring(guest: Guest) -> None:
    s, _ = connect(guest, guest.region_fd, guest.region_size)
    before = fd_targets()
    with pytest.raises(SessionError, match=r"rings \[0\] are started"):
        send(s, FrontendRequest.SET_INFLIGHT_FD, {"mmap_size": 640, "mmap_offset": 0,
                                                  "num_queues": 2, "queue_size": NUM},
             [os.dup(guest.region_fd)])
    assert fd_targets() == before
    s.close()


def test_reset_device_drops_the_region(guest: Guest) -> None:
    maps = inflight_mappings()
    fd, p = create_inflight_fd(2, NUM)
    s, _ = connect(guest, fd, p["mmap_size"])
    assert inflight_mappings() == maps + 1
    send(s, FrontendRequest.RESET_DEVICE)
    assert s.queues[0]._inflight is None and s.inflight.region is None
    assert inflight_mappings() == maps
    s.close()
    os.close(fd)


def test_mmap_of_region_is_shared_with_the_frontend(guest: Guest) -> None:
    """What the backend writes is what the frontend's own mapping sees, byte for byte."""
    b = start_backend(guest)
    (h,) = guest.add(1)
    b.pop_all()
    with mmap.mmap(guest.region_fd, guest.region_size) as mm:
        off = HEADER.size + DESC_STATE.size * h
        inflight, _next, counter = DESC_STATE.unpack(mm[off : off + DESC_STATE.size])
        assert inflight == 1 and counter >= 1
        assert HEADER.unpack(mm[: HEADER.size])[1:3] == (1, NUM)
    b.crash()
