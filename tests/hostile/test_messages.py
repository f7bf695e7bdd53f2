"""Hostile control messages against the running server: named cases, then hypothesis sequences.

After every case the frontend hangs up and the server must be back where it started: no
registration left in the MemRegistry, no guest memfd mapped, exactly the fds it had before,
nothing escaped to the event loop or was logged with a traceback, and a fresh frontend does
real I/O verified against the image.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import CHECK_SECTOR_A, CHECK_SECTOR_B
from tests.hostile.env import (
    ServerThread,
    assert_no_bounds_violations,
    guarded_ram,
    memfd_mappings,
    open_fds,
    open_guest,
    real_io,
)
from tests.hostile.wire import (
    EMPTY_REPLY,
    NEED_REPLY,
    VERSION,
    Fds,
    R,
    RawConnection,
    config,
    hugetlb_beyond_pool,
    inflight,
    log_base,
    mem_table,
    message,
    region,
    single_region,
    u64,
    vring_addr,
    vring_file,
    vring_state,
)

MiB = 1 << 20
UADDR = 0x7000_0000_0000
ACK_OK = 0
PROTOCOL_FEATURES_BIT = 1 << 30
REPLY_ACK_BIT = 1 << 3
CONFIGURE_MEM_SLOTS_BIT = 1 << 15
GOOD_REGION = region(0, 2 * MiB, UADDR, 0)
EVENTFD = Fds(["eventfd"])
MEMFD = Fds(["memfd"])
HUGE = hugetlb_beyond_pool()
SEALED_LOG = Fds(["sealed-memfd"], memfd_size=4096)  # a log for 128 MiB of guest memory
VRING_F_LOG = 1  # SET_VRING_ADDR flags: log used ring writes at log_guest_addr
# VERSION_1 | PROTOCOL_FEATURES | VHOST_F_LOG_ALL (virtio bit 26)
LOG_ALL_FEATURES = 1 << 32 | PROTOCOL_FEATURES_BIT | 1 << 26
RING_PACKED_BIT = 1 << 34  # VIRTIO_F_RING_PACKED (virtio 1.2 section 6)
NACK = "nack"
HANGUP = "hangup"
EMPTY = "empty reply"


def negotiate(conn: RawConnection) -> None:
    """SET_OWNER, features with PROTOCOL_FEATURES, protocol features with REPLY_ACK."""
    conn.send(message(R.SET_OWNER, flags=VERSION))
    conn.send(message(R.GET_FEATURES, flags=VERSION))
    features = conn.reply()
    assert features is not None
    # Split rings: the ring cases here (sizes, log_guest_addr ranges) are split-ring ones.
    conn.send(u64(R.SET_FEATURES, features & ~RING_PACKED_BIT, flags=VERSION))
    conn.send(message(R.GET_PROTOCOL_FEATURES, flags=VERSION))
    protocol = conn.reply()
    assert protocol is not None and protocol & REPLY_ACK_BIT
    conn.send(u64(R.SET_PROTOCOL_FEATURES, protocol, flags=VERSION))


@dataclass
class Baseline:
    fds: set[str]


@pytest.fixture
def clean(server: ServerThread) -> Iterator[Baseline]:
    """Record the server's fds; after the test check that it came back to them and serves."""
    base = Baseline(open_fds())
    yield base
    check_recovered(server, base)


def check_recovered(srv: ServerThread, base: Baseline) -> None:
    srv.wait_disconnected(srv.a)
    assert srv.call(srv.registry.chunks) == [], "registrations left after disconnect"
    assert not memfd_mappings(), "guest memory still mapped after disconnect"
    assert open_fds() == base.fds, "server fds differ from before the case"
    srv.assert_no_crashes()
    ram = guarded_ram()
    try:
        with open_guest(srv.path(srv.a), ram) as dev:
            real_io(dev, 0, srv.images["a"], CHECK_SECTOR_A)
    finally:
        ram.close()
    srv.wait_disconnected(srv.a)
    assert srv.call(srv.registry.chunks) == []
    assert not memfd_mappings()
    assert open_fds() == base.fds
    assert srv.images["a"].unchanged_elsewhere()
    assert_no_bounds_violations()


Step = tuple[bytes, Fds | None]


def memory() -> Step:
    return mem_table([GOOD_REGION]), MEMFD


def ring0() -> list[Step]:
    """Memory plus a complete, valid ring 0 (size 64 at the start of guest RAM)."""
    return [memory(), (vring_state(R.SET_VRING_NUM, 0, 64), None),
            (vring_addr(0, UADDR, UADDR + 0x1000, UADDR + 0x800), None),
            (vring_file(R.SET_VRING_CALL, 0), EVENTFD), (vring_file(R.SET_VRING_KICK, 0), EVENTFD)]


CASES: dict[str, tuple[list[Step], str]] = {
    "kick-before-mem-table": ([(vring_file(R.SET_VRING_KICK, 0), EVENTFD)], NACK),
    "ring-addr-before-mem-table": ([(vring_state(R.SET_VRING_NUM, 0, 64), None),
                                    (vring_addr(0, UADDR, UADDR + 0x1000, UADDR + 0x800), None)],
                                   NACK),
    "add-mem-reg-overlapping": ([(single_region(R.ADD_MEM_REG, GOOD_REGION), MEMFD),
                                 (single_region(R.ADD_MEM_REG, region(MiB, 2 * MiB, UADDR, 0)),
                                  MEMFD)], NACK),
    "rem-mem-reg-unknown": ([(single_region(R.REM_MEM_REG, GOOD_REGION), None)], NACK),
    "rem-mem-reg-under-a-started-ring": (
        [*ring0(), (single_region(R.REM_MEM_REG, GOOD_REGION), None)], NACK),
    "mem-table-replaced-under-a-started-ring": (
        [*ring0(), (mem_table([region(4 * MiB, 2 * MiB, UADDR + 8 * MiB, 0)]), MEMFD)], NACK),
    "vring-num-0": ([(vring_state(R.SET_VRING_NUM, 0, 0), None)], NACK),
    "vring-num-not-power-of-2": ([(vring_state(R.SET_VRING_NUM, 0, 100), None)], NACK),
    "vring-num-over-32768": ([(vring_state(R.SET_VRING_NUM, 0, 65536), None)], NACK),
    "vring-num-while-started": ([*ring0(), (vring_state(R.SET_VRING_NUM, 0, 32), None)], NACK),
    "vring-num-index-2": ([(vring_state(R.SET_VRING_NUM, 2, 64), None)], NACK),
    "vring-addr-index-2": ([(vring_addr(2, UADDR, UADDR, UADDR), None)], NACK),
    "vring-base-index-2": ([(vring_state(R.SET_VRING_BASE, 2, 0), None)], NACK),
    # GET_VRING_BASE must answer with a vring state; there is no way to refuse it
    "get-vring-base-index-2": ([(vring_state(R.GET_VRING_BASE, 2, 0), None)], HANGUP),
    "vring-enable-index-2": ([(vring_state(R.SET_VRING_ENABLE, 2, 1), None)], NACK),
    "vring-kick-index-2": ([(vring_file(R.SET_VRING_KICK, 2), EVENTFD)], NACK),
    "vring-call-index-2": ([(vring_file(R.SET_VRING_CALL, 2), EVENTFD)], NACK),
    "vring-err-index-255": ([(vring_file(R.SET_VRING_ERR, 255), EVENTFD)], NACK),
    "vring-num-index-256": ([(vring_state(R.SET_VRING_NUM, 256, 64), None)], NACK),
    "vring-enable-state-2": ([(vring_state(R.SET_VRING_ENABLE, 0, 2), None)], NACK),
    "mem-table-zero-size": ([(mem_table([region(0, 0, UADDR, 0)]), MEMFD)], NACK),
    "mem-table-overlapping": ([(mem_table([GOOD_REGION, region(MiB, MiB, UADDR, 0)]),
                                Fds(["memfd", "memfd"]))], NACK),
    "mem-table-unaligned-gpa": ([(mem_table([region(0x800, MiB, UADDR, 0)]), MEMFD)], NACK),
    "mem-table-offset-beyond-fd": ([(mem_table([region(0, MiB, UADDR, 1 << 40)]), MEMFD)],
                                   NACK),
    "mem-table-offset-plus-size-beyond-fd": (
        [(mem_table([region(0, 2 * MiB, UADDR, MiB)]), MEMFD)], NACK),
    "mem-table-size-beyond-fd": ([(mem_table([region(0, 1 << 40, UADDR, 0)]), MEMFD)], NACK),
    "mem-table-gpa-wraps": ([(mem_table([region(2**64 - MiB, 2 * MiB, UADDR, 0)]), MEMFD)],
                            NACK),
    "mem-table-fd-is-an-eventfd": ([(mem_table([GOOD_REGION]), EVENTFD)], NACK),
    "mem-table-fewer-fds-than-regions": (
        [(mem_table([GOOD_REGION, region(4 * MiB, MiB, UADDR, 0)]), MEMFD)], NACK),
    "mem-table-9-regions": ([(mem_table([GOOD_REGION] * 9), Fds(["memfd"] * 8))], NACK),
    "more-than-8-fds": ([(mem_table([GOOD_REGION]), Fds(["eventfd"] * 12))], NACK),
    "fd-on-get-features": ([(message(R.GET_FEATURES), EVENTFD)], HANGUP),
    "fd-on-set-vring-num": ([(vring_state(R.SET_VRING_NUM, 0, 64), EVENTFD)], NACK),
    "fd-with-nofd-kick": ([(vring_file(R.SET_VRING_CALL, 0, nofd=True), EVENTFD)], NACK),
    "kick-without-fd": ([(vring_file(R.SET_VRING_KICK, 0), None)], NACK),
    "nofd-kick-polling": ([*ring0()[:3], (vring_file(R.SET_VRING_KICK, 0, nofd=True), None)],
                          NACK),
    "set-features-not-offered": ([(u64(R.SET_FEATURES, 1 << 63), None)], NACK),
    "set-config-outside": ([(config(R.SET_CONFIG, 250, 8, bytes(8)), None)], NACK),
    "get-config-outside": ([(config(R.GET_CONFIG, 200, 100, bytes(100)), None)], EMPTY),
    "unknown-request": ([(message(99), None)], HANGUP),
    "payload-over-4096": ([(message(R.SET_CONFIG, bytes(5000)), None)], HANGUP),
    "reply-flag-from-frontend": ([(message(R.GET_FEATURES, flags=VERSION | 0x4), None)],
                                 HANGUP),
    # Notifier fds that are not eventfds: reads, writes and poll behave differently
    "kick-fd-is-a-pipe": ([*ring0()[:4], (vring_file(R.SET_VRING_KICK, 0), Fds(["pipe"]))],
                          NACK),
    "kick-fd-is-a-regular-file": (
        [*ring0()[:4], (vring_file(R.SET_VRING_KICK, 0), Fds(["file"]))], NACK),
    "call-fd-is-a-regular-file": ([(vring_file(R.SET_VRING_CALL, 0), Fds(["file"]))], NACK),
    "err-fd-is-a-socket": ([(vring_file(R.SET_VRING_ERR, 1), Fds(["socket"]))], NACK),
    # A sealed hugetlb memfd larger than the free huge pages: refused at mmap, never a SIGBUS
    "mem-table-hugetlb-beyond-pool": (
        [(mem_table([region(0, HUGE, UADDR, 0)]), Fds(["hugetlb"], memfd_size=HUGE))], NACK),
    "add-mem-reg-hugetlb-beyond-pool": (
        [(single_region(R.ADD_MEM_REG, region(0, HUGE, UADDR, 0)),
          Fds(["hugetlb"], memfd_size=HUGE))], NACK),
    # INFLIGHT_SHMFD: shapes, an fd that could be truncated under the mapping, started rings
    "get-inflight-fd-65535-queues": ([(inflight(R.GET_INFLIGHT_FD, 0, 65535, 128), None)],
                                     "ok"),
    "get-inflight-fd-queue-size-0": ([(inflight(R.GET_INFLIGHT_FD, 0, 2, 0), None)], "ok"),
    "set-inflight-fd-unsealed": (
        [(inflight(R.SET_INFLIGHT_FD, 4096, 2, 64), Fds(["memfd"], memfd_size=4096))], NACK),
    "set-inflight-fd-too-small": (
        [(inflight(R.SET_INFLIGHT_FD, 4096, 2, 1024), Fds(["sealed-memfd"], memfd_size=4096))],
        NACK),
    "set-inflight-fd-beyond-fd": (
        [(inflight(R.SET_INFLIGHT_FD, 8192, 1, 64), Fds(["sealed-memfd"], memfd_size=4096))],
        NACK),
    "set-inflight-fd-while-started": (
        [*ring0(), (inflight(R.SET_INFLIGHT_FD, 4096, 2, 64),
                    Fds(["sealed-memfd"], memfd_size=4096))], NACK),
    "set-inflight-fd-without-fd": ([(inflight(R.SET_INFLIGHT_FD, 4096, 2, 64), None)], NACK),
    "set-inflight-fd-valid": (
        [(inflight(R.SET_INFLIGHT_FD, 4096, 2, 64), Fds(["sealed-memfd"], memfd_size=4096)),
         *ring0()], "ok"),
    # Dirty logging (live migration). SET_LOG_BASE has its own reply and no error form: a
    # refused log is a disconnect (QEMU must not migrate believing we log).
    "log-base-smaller-than-memory": ([memory(), (log_base(8), SEALED_LOG)], HANGUP),
    "log-base-unsealed": ([memory(), (log_base(4096), Fds(["memfd"], memfd_size=4096))],
                          HANGUP),
    "log-base-eventfd": ([memory(), (log_base(4096), EVENTFD)], HANGUP),
    "log-base-without-fd": ([memory(), (log_base(4096), None)], HANGUP),
    "log-base-offset-unaligned": ([memory(), (log_base(4096, 100), SEALED_LOG)], HANGUP),
    "log-base-beyond-fd": ([memory(), (log_base(4096, 4096), SEALED_LOG)], HANGUP),
    "log-base-size-2-to-the-63": ([memory(), (log_base(1 << 63), SEALED_LOG)], HANGUP),
    "log-all-then-memory-beyond-the-log": (
        [(log_base(8), SEALED_LOG), (u64(R.SET_FEATURES, LOG_ALL_FEATURES), None),
         (single_region(R.ADD_MEM_REG, region(0, 4 * MiB, UADDR, 0)), MEMFD)], NACK),
    "vring-addr-log-outside-memory": (
        [memory(), (vring_state(R.SET_VRING_NUM, 0, 64), None),
         (vring_addr(0, UADDR, UADDR + 0x1000, UADDR + 0x800, flags=VRING_F_LOG,
                     log=2**64 - 0x100), None)], NACK),
    "vring-addr-log-past-memory-end": (
        [memory(), (vring_state(R.SET_VRING_NUM, 0, 64), None),
         (vring_addr(0, UADDR, UADDR + 0x1000, UADDR + 0x800, flags=VRING_F_LOG,
                     log=2 * MiB - 0x10), None)], NACK),
    "vring-addr-log-valid": (
        [memory(), (log_base(4096), SEALED_LOG), (vring_state(R.SET_VRING_NUM, 0, 64), None),
         (vring_addr(0, UADDR, UADDR + 0x1000, UADDR + 0x800, flags=VRING_F_LOG,
                     log=0x800), None)], "ok"),
    "backend-req-fd-twice": ([(message(R.SET_BACKEND_REQ_FD), EVENTFD),
                              (message(R.SET_BACKEND_REQ_FD), EVENTFD),
                              (message(R.SET_BACKEND_REQ_FD), None)], NACK),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_message(server: ServerThread, clean: Baseline, name: str) -> None:
    steps, expected = CASES[name]
    conn = RawConnection(server.path(server.a))
    try:
        negotiate(conn)
        outcome = None
        for data, fds in steps:
            if not conn.send(data, fds):
                outcome = HANGUP
                break
            ack = conn.reply()
            if ack is None:
                outcome = HANGUP
                break
            outcome = {ACK_OK: "ok", EMPTY_REPLY: EMPTY}.get(ack, NACK)
        assert outcome == expected, f"{name}: {outcome}"
    finally:
        conn.close()


# ------------------------------------------------------------------ hypothesis sequences

indexes = st.one_of(st.sampled_from([0, 1, 0, 1, 2]), st.sampled_from([7, 255, 256, 2**32 - 1]))
sizes = st.sampled_from([0, 1, 3, 64, 100, 1024, 2048, 32768, 32769, 65535, 2**32 - 1])
addresses = st.one_of(
    st.sampled_from([0, 0x1000, MiB, 2 * MiB, UADDR, UADDR + 0x800, UADDR + 2 * MiB - 8,
                     2**48, 2**64 - 16]),
    st.integers(0, 2**64 - 1),
)
region_sizes = st.sampled_from([0, 0x1000, MiB, 2 * MiB, 4 * MiB, 0x1234, 1 << 40])
offsets = st.sampled_from([0, 0x1000, 0x800, MiB, 2 * MiB, 1 << 40])
fd_kinds = st.lists(st.sampled_from(["eventfd", "memfd", "eventfd", "memfd", "sealed-memfd",
                                      "pipe", "file", "socket"]), max_size=10)


@st.composite
def regions(draw: st.DrawFn) -> bytes:
    return region(draw(st.sampled_from([0, 0x1000, MiB, 2 * MiB, 4 * MiB, 2**48 - MiB])),
                  draw(region_sizes), draw(addresses), draw(offsets))


def with_fds(data: st.SearchStrategy[bytes], fds: st.SearchStrategy[list[str]] = fd_kinds,
             ) -> st.SearchStrategy[Step]:
    return st.tuples(data, fds.map(lambda kinds: Fds(kinds)))


one_fd = st.sampled_from([[], ["eventfd"], ["memfd"], ["eventfd", "eventfd"], ["pipe"],
                          ["file"], ["sealed-memfd"]])
steps = st.one_of(
    with_fds(st.builds(u64, st.sampled_from([R.SET_FEATURES, R.SET_PROTOCOL_FEATURES,
                                             R.SET_STATUS]),
                       st.one_of(st.integers(0, 2**64 - 1),
                                 st.just(PROTOCOL_FEATURES_BIT | (1 << 32)))), st.just([])),
    with_fds(st.builds(message, st.sampled_from([R.GET_FEATURES, R.SET_OWNER,
                                                 R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS,
                                                 R.RESET_DEVICE, R.GET_STATUS,
                                                 R.GET_PROTOCOL_FEATURES])), st.just([])),
    with_fds(st.builds(vring_state, st.sampled_from([R.SET_VRING_NUM, R.SET_VRING_BASE,
                                                     R.GET_VRING_BASE, R.SET_VRING_ENABLE]),
                       indexes, sizes), st.just([])),
    with_fds(st.builds(vring_addr, indexes, addresses, addresses, addresses), st.just([])),
    with_fds(st.builds(vring_file, st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL,
                                                    R.SET_VRING_ERR]),
                       st.sampled_from([0, 1, 2, 255]), st.booleans()), one_fd),
    st.builds(lambda regs: (mem_table(regs), Fds(["memfd"] * len(regs))),
              st.lists(regions(), max_size=3)),
    with_fds(st.builds(mem_table, st.lists(regions(), max_size=9),
                       st.one_of(st.none(), st.integers(0, 12))), st.lists(st.just("memfd"))),
    with_fds(st.builds(single_region, st.sampled_from([R.ADD_MEM_REG, R.REM_MEM_REG]),
                       regions()), one_fd),
    with_fds(st.builds(config, st.sampled_from([R.GET_CONFIG, R.SET_CONFIG]),
                       st.integers(0, 300), st.integers(0, 300), st.binary(max_size=300)),
             st.just([])),
    with_fds(st.builds(inflight, st.sampled_from([R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD]),
                       st.sampled_from([0, 320, 4096, 8192, 2**64 - 1]),
                       st.sampled_from([0, 1, 2, 3, 65535]),
                       st.sampled_from([0, 1, 64, 1024, 32768, 65535]),
                       st.sampled_from([0, 100, 4096])),
             st.sampled_from([[], ["sealed-memfd"], ["memfd"], ["eventfd"]])),
    st.just(memory()),
    st.just((message(R.RESET_OWNER), None)),
    st.builds(lambda: ring0()[1]),
    st.builds(lambda: ring0()[2]),
    st.builds(lambda: ring0()[4]),
    with_fds(st.builds(message, st.integers(0, 60), st.binary(max_size=64),
                       st.sampled_from([VERSION, VERSION | NEED_REPLY, 0, 0xFF]))),
)


def alive(conn: RawConnection) -> bool:
    """Whether the server still answers on this connection (a GET_QUEUE_NUM probe)."""
    if not conn.send(message(R.GET_QUEUE_NUM, flags=VERSION)):
        return False
    while (value := conn.reply()) is not None:
        if value == 2:  # GET_QUEUE_NUM of device A; other values are replies sent earlier
            return True
    return False


TWO_U64_REPLIES = 2 * (12 + 8)  # header + u64 payload, twice
PEEK_WAIT = 5.0


def peek(conn: RawConnection, size: int) -> bytes:
    """What the socket holds (up to ``size`` bytes) without taking it; b"" after REPLY_WAIT."""
    try:
        return conn.sock.recv(size, socket.MSG_PEEK)
    except TimeoutError:
        return b""


def test_replies_read_together_are_each_handed_out(server: ServerThread, clean: Baseline) -> None:
    """Two replies the server sent back to back reach one read: the second is not lost (alive()
    above would otherwise wait out REPLY_WAIT and call a live connection hung up)."""
    conn = RawConnection(server.path(server.a))
    try:
        assert conn.send(message(R.GET_FEATURES, flags=VERSION))
        assert conn.send(message(R.GET_QUEUE_NUM, flags=VERSION))
        deadline = time.monotonic() + PEEK_WAIT
        while len(peek(conn, TWO_U64_REPLIES)) < TWO_U64_REPLIES:
            assert time.monotonic() < deadline, "the server did not answer both requests"
            time.sleep(0.01)
        features = conn.reply()
        assert features is not None and features & PROTOCOL_FEATURES_BIT
        assert conn.reply() == 2  # device A's two queues
    finally:
        conn.close()


def mutate(data: bytes, where: int, value: int) -> bytes:
    if not data:
        return data
    i = where % len(data)
    return data[:i] + bytes([value]) + data[i + 1:]


mutated = st.builds(lambda s, w, v: (mutate(s[0], w, v), s[1]), steps,
                    st.integers(0, 4096), st.integers(0, 255))


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from([True, True, True, False]),
       st.lists(st.one_of(steps, mutated), min_size=1, max_size=12))
def test_message_sequences(server: ServerThread, negotiated: bool, seq: list[Step]) -> None:
    base = Baseline(open_fds())
    conn = RawConnection(server.path(server.a))
    try:
        if negotiated:
            negotiate(conn)
        for data, fds in seq:  # replies are not awaited: the server handles messages in order
            if not conn.send(data, fds):
                break
        event("connection survived" if alive(conn) else "server hung up")
    finally:
        conn.close()
    check_recovered(server, base)


FLOOD_MESSAGES = 50_000


def test_frontend_that_never_reads_replies_does_not_stall_others(server: ServerThread,
                                                                 clean: Baseline) -> None:
    """Replies pile up unread until both socket buffers are full; device B still serves."""
    conn = RawConnection(server.path(server.a))
    try:
        conn.sock.setblocking(False)
        flood = message(R.GET_FEATURES, flags=VERSION) * FLOOD_MESSAGES
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(flood):
                sent += conn.sock.send(flood[sent:])
        assert sent < len(flood), "the server kept reading although nobody read its replies"
        ram = guarded_ram()
        try:
            with open_guest(server.path(server.b), ram) as dev:
                real_io(dev, 0, server.images["b"], CHECK_SECTOR_B)
        finally:
            ram.close()
        server.wait_disconnected(server.b)
    finally:
        conn.close()
