"""The vhostmem server with a fake guest: ring lifecycle, memory at run time, several devices,
client mode, socket files, both event loops. Everything is real: Unix sockets, memfds,
eventfds, a RAM disk behind a BlkDevice."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from protocol import FrontendRequest, ProtocolFeature, VirtioFeature, encode_request
from tests.vhostmem.serverenv import ServerThread, fd_snapshot, memfd_mappings, running_server
from vhostmem.device import RING_FEATURES
from vhostmem.devices.blk import BlkDevice
from vhostmem.frontend import (
    BlkQueue,
    BlkType,
    EventFd,
    GuestRam,
    Listener,
    SplitRing,
    VhostUserBlk,
    VhostUserClient,
    VhostUserError,
    blk_header,
)
from vhostmem.frontend.device import QueueState
from vhostmem.server import Endpoint, EndpointConfig, new_event_loop
from vhostmem.sockets import bind_unix_socket

SECTOR = 512
RAM = 8 << 20
EXTRA = 1 << 20
QUIET = 0.3  # how long "nothing happens" is watched
DESC_F_WRITE = 2
STATUS_OK = 0

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


@pytest.fixture
def srv() -> Iterator[ServerThread]:
    with running_server(new_event_loop) as s:
        yield s


@pytest.fixture(params=sorted(LOOPS))
def any_srv(request: pytest.FixtureRequest) -> Iterator[ServerThread]:
    """The server on each event loop (uvloop and the stdlib one)."""
    with running_server(LOOPS[request.param]) as s:
        yield s


@pytest.fixture
def ep(srv: ServerThread) -> Endpoint:
    return srv.add_blk()


def wait_disconnected(srv: ServerThread, ep: Endpoint) -> None:
    srv.wait_until(lambda: ep.connection is None)


def program(dev: VhostUserBlk, index: int = 0, size: int = 16, *, kick: bool = True,
            enable: bool = True, base: int = 0) -> BlkQueue:
    """start_queue, step by step: the ring is set up, then optionally KICK and ENABLE."""
    ring = SplitRing(dev.ram, size, event_idx=dev.has_feature(VirtioFeature.EVENT_IDX))
    st = QueueState(ring, EventFd(), EventFd(), EventFd())
    dev.queues[index] = st
    st.queue = BlkQueue(dev.ram, ring, st.kick, st.call)
    c, host = dev.client, dev.ram.host_address
    c.set_vring_num(index, size)
    c.set_vring_base(index, base)
    c.set_vring_addr(index, host(ring.addr.desc), host(ring.addr.used), host(ring.addr.avail))
    c.set_vring_call(index, st.call.fd)
    c.set_vring_err(index, st.err.fd)
    if kick:
        c.set_vring_kick(index, st.kick.fd)
    if enable:
        c.set_vring_enable(index, True)
    return st.queue


def drop_queue(dev: VhostUserBlk, index: int) -> None:
    st = dev.queues.pop(index)
    for e in (st.kick, st.call, st.err):
        e.close()
    if st.queue is not None:
        st.queue.close()
    st.ring.free()


def roundtrip(q: BlkQueue, sector: int, pattern: bytes) -> None:
    data = pattern * SECTOR
    q.write(sector, data)
    assert q.read(sector, SECTOR) == data


def io_at(q: BlkQueue, ram: GuestRam, gpa: int, sector: int, data: bytes) -> int:
    """Write `data` from buffers at `gpa` (header, data, status all there); returns status."""
    ram.write(gpa, blk_header(BlkType.OUT, sector))
    ram.write(gpa + 64, data)
    status = gpa + 64 + len(data)
    ram.write(status, b"\xff")
    req = q.prepare_chain([(gpa, 16, 0), (gpa + 64, len(data), 0), (status, 1, DESC_F_WRITE)],
                          status_gpa=status)
    q.notify()
    q.wait_for(req)
    return req.status


def nothing_completes(q: BlkQueue) -> bool:
    time.sleep(QUIET)
    return not q.poll()


# ------------------------------------------------------------------ ring lifecycle


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_io_on_both_event_loops(loop: str) -> None:
    with running_server(LOOPS[loop]) as s:
        ep = s.add_blk(num_queues=2)
        with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
            for i in range(2):
                roundtrip(dev.start_queue(i, size=16), 10 + i, bytes([65 + i]))
        wait_disconnected(s, ep)
        assert s.call(s.registry.chunks) == []


def test_ring_waits_for_kick_and_enable(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev, kick=False, enable=False)
        req = q.submit(BlkType.OUT, 0, data=b"a" * SECTOR)
        assert nothing_completes(q)  # no kick fd yet: stopped
        dev.client.set_vring_kick(0, dev.queues[0].kick.fd)
        assert nothing_completes(q)  # started, but disabled (PROTOCOL_FEATURES negotiated)
        dev.client.set_vring_enable(0, True)
        q.wait_for(req)  # enabling picks up what was queued meanwhile
        assert req.status == STATUS_OK


def test_enable_0_pauses_and_enable_1_resumes(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 1, b"1")
        dev.client.set_vring_enable(0, False)
        reqs = [q.prepare(BlkType.OUT, 2 + k, data=b"p" * SECTOR) for k in range(3)]
        q.notify()
        assert nothing_completes(q)
        dev.client.set_vring_enable(0, True)
        for req in reqs:
            q.wait_for(req)
            assert req.status == STATUS_OK
        assert q.read(4, SECTOR) == b"p" * SECTOR


def test_get_vring_base_stops_and_returns_the_next_avail_index(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        for k in range(5):
            roundtrip(q, k, b"s")  # 2 requests each
        base = dev.client.get_vring_base(0)  # no SET_VRING_ENABLE 0 first
        assert base == 10
        req = q.submit(BlkType.OUT, 30, data=b"z" * SECTOR)
        dev.queues[0].kick.signal()
        assert nothing_completes(q)  # stopped, kicks or not
        dev.client.set_vring_num(0, 16)
        dev.client.set_vring_base(0, base)
        dev.client.set_vring_kick(0, dev.queues[0].kick.fd)  # restart on the same ring
        q.wait_for(req)
        assert req.status == STATUS_OK
        assert dev.client.get_vring_base(0) == 11


def test_without_protocol_features_rings_are_enabled(ep: Endpoint) -> None:
    features = RING_FEATURES | BlkDevice.from_ram(SECTOR).features()
    features &= ~(1 << VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES)
    features &= ~(1 << VirtioFeature.RING_PACKED)  # program() lays out a split ring
    with VhostUserBlk.open(ep.config.path, ram_size=RAM, features=features) as dev:
        assert dev.client.protocol_features != 0  # GET/SET_PROTOCOL_FEATURES still happened
        q = program(dev, enable=False)  # no SET_VRING_ENABLE at all
        roundtrip(q, 7, b"e")


def test_seabios_like_start_stop_restart_on_one_connection(ep: Endpoint) -> None:
    """Firmware starts the device, stops it; the OS starts it again with new rings."""
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev, size=16)
        roundtrip(q, 0, b"b")
        dev.client.set_vring_enable(0, False)
        assert dev.client.get_vring_base(0) == 2
        drop_queue(dev, 0)
        dev.client.set_features(dev.client.features)  # QEMU sends SET_FEATURES again
        q = program(dev, size=64)  # a new ring elsewhere, from index 0
        roundtrip(q, 0, b"L")
        assert dev.client.get_vring_base(0) == 2


def test_reset_device_stops_rings_and_allows_a_new_start(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 0, b"r")
        dev.client.reset_device()
        req = q.submit(BlkType.OUT, 1, data=b"x" * SECTOR)
        assert nothing_completes(q)
        assert req.status != STATUS_OK
        drop_queue(dev, 0)
        dev.client.set_features(dev.client.features)
        roundtrip(program(dev), 2, b"n")


# ------------------------------------------------------------------------ memory


def test_set_mem_table_replaced_while_a_ring_runs(srv: ServerThread, ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 0, b"1")
        extra = dev.ram.add_region(RAM, EXTRA)
        regions = dev.ram.regions
        dev.client.set_mem_table([r.as_dict() for r in regions], [r.fd for r in regions])
        assert len(srv.call(srv.registry.chunks)) >= 1
        roundtrip(q, 1, b"2")
        assert io_at(q, dev.ram, extra.guest_phys_addr, 3, b"X" * SECTOR) == STATUS_OK
        assert q.read(3, SECTOR) == b"X" * SECTOR
        # Shrink back to the first region: the ring still lives there.
        first = regions[0]
        dev.client.set_mem_table([first.as_dict()], [first.fd])
        roundtrip(q, 4, b"3")


def test_add_and_remove_regions_at_run_time(srv: ServerThread, ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM, mem="slots") as dev:
        q = program(dev)
        roundtrip(q, 0, b"a")
        extra = dev.ram.add_region(RAM, EXTRA)
        dev.add_region(extra)
        assert io_at(q, dev.ram, extra.guest_phys_addr, 5, b"R" * SECTOR) == STATUS_OK
        assert q.read(5, SECTOR) == b"R" * SECTOR
        dev.remove_region(extra)
        roundtrip(q, 1, b"b")
        # A request whose buffers are in the removed region is not executed.
        assert io_at(q, dev.ram, extra.guest_phys_addr, 6, b"Q" * SECTOR) != STATUS_OK
        assert q.read(6, SECTOR) == bytes(SECTOR)
        roundtrip(q, 2, b"c")


def test_removing_the_region_a_running_ring_lives_in_is_refused(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM, mem="slots") as dev:
        q = program(dev)
        with pytest.raises(VhostUserError, match="REPLY_ACK"):
            dev.remove_region(dev.ram.regions[0])
        roundtrip(q, 0, b"k")


def test_a_table_without_a_started_ring_is_refused_and_the_old_one_kept(
    srv: ServerThread, ep: Endpoint
) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 0, b"o")
        chunks = srv.call(srv.registry.chunks)
        extra = dev.ram.add_region(RAM, EXTRA)
        with pytest.raises(VhostUserError, match="REPLY_ACK 1"):
            dev.client.set_mem_table([extra.as_dict()], [extra.fd])
        assert srv.call(srv.registry.chunks) == chunks  # nothing of the new table stayed
        roundtrip(q, 1, b"p")


def inode_mapped(inode: int) -> bool:
    return any(line.split()[4] == str(inode) for line in memfd_mappings())


def test_a_stopped_ring_lets_its_memory_go_with_a_new_table(
    srv: ServerThread, ep: Endpoint
) -> None:
    """A ring stopped by GET_VRING_BASE still names addresses in the old table: a new table
    without them is accepted, the old memory is unmapped at once, and the ring starts again
    in the new memory."""
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 0, b"s")
        assert dev.client.get_vring_base(0) == 2
        drop_queue(dev, 0)
        first = dev.ram.regions[0]
        inode = os.fstat(first.fd).st_ino
        extra = dev.ram.add_region(RAM, RAM)
        dev.client.set_mem_table([extra.as_dict()], [extra.fd])
        dev.ram.remove_region(first.guest_phys_addr)
        srv.wait_until(lambda: not inode_mapped(inode))  # the server let go of it too
        roundtrip(program(dev), 1, b"t")  # the ring now lives in the new region


def test_disconnect_releases_every_registration_fd_and_mapping(
    srv: ServerThread, ep: Endpoint
) -> None:
    fds, maps = fd_snapshot(), memfd_mappings()
    with VhostUserBlk.open(ep.config.path, ram_size=RAM, mem="slots") as dev:
        q = program(dev)
        extra = dev.ram.add_region(RAM, EXTRA)
        dev.add_region(extra)
        roundtrip(q, 0, b"m")
        assert srv.call(srv.registry.chunks) != []
    wait_disconnected(srv, ep)
    assert srv.call(srv.registry.chunks) == []
    assert fd_snapshot() == fds
    assert memfd_mappings() == maps


# ------------------------------------------------------------- several devices


def test_bad_message_disconnects_only_its_own_device(any_srv: ServerThread) -> None:
    a, b = any_srv.add_blk("a"), any_srv.add_blk("b")
    with VhostUserBlk.open(b.config.path, ram_size=RAM) as good:
        q = program(good)
        roundtrip(q, 0, b"1")
        bad = VhostUserClient.connect(a.config.path)
        bad.send_raw(b"\xff" * 12)
        with pytest.raises(VhostUserError, match="closed"):
            bad.recv()
        bad.close()
        roundtrip(q, 1, b"2")
        with VhostUserBlk.open(a.config.path, ram_size=RAM) as again:
            roundtrip(program(again), 2, b"3")
        roundtrip(q, 3, b"4")


def test_a_frontend_that_does_not_read_replies_blocks_nobody(any_srv: ServerThread) -> None:
    """Replies the frontend does not read are queued without stalling the event loop."""
    a, b = any_srv.add_blk("a"), any_srv.add_blk("b")
    count = 50000  # far more reply bytes than the socket buffers hold
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(a.config.path)
    sender = threading.Thread(
        target=greedy.sendall, args=(encode_request(FrontendRequest.GET_FEATURES) * count,)
    )
    sender.start()
    try:
        time.sleep(QUIET)
        assert sender.is_alive()  # the server stopped reading: back-pressure on the sender
        with VhostUserBlk.open(b.config.path, ram_size=RAM) as dev:
            roundtrip(program(dev), 0, b"g")
        replies = VhostUserClient(greedy, timeout=10)
        for _ in range(count):
            assert replies.recv().request == FrontendRequest.GET_FEATURES
    finally:
        sender.join(10)
        greedy.close()
    assert not sender.is_alive()


def test_second_frontend_is_refused_and_the_first_unaffected(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        with VhostUserClient.connect(ep.config.path) as second, pytest.raises(VhostUserError):
            second.get_features()
        roundtrip(q, 0, b"f")
        assert ep.connections_served == 1


def test_client_mode_connects_and_reconnects(any_srv: ServerThread) -> None:
    srv = any_srv
    path = str(srv.dir / "cl.sock")
    with Listener(path) as listener:
        ep = srv.add_blk("cl", client=True)
        assert ep.config.path == path
        for round_ in range(2):
            ram = GuestRam()
            ram.add_region(0, RAM)
            dev = VhostUserBlk(listener.accept(), ram, own_ram=True)
            dev.negotiate()
            dev.send_memory("table")
            roundtrip(program(dev), round_, b"c")
            dev.close()
            wait_disconnected(srv, ep)
        assert ep.connections_served == 2


# ------------------------------------------------------------------ socket files


def test_socket_file_mode_and_group(srv: ServerThread) -> None:
    ep = srv.add_blk("plain")
    assert stat.S_IMODE(os.stat(ep.config.path).st_mode) == 0o600
    group = grp.getgrgid(os.getgid()).gr_name
    ep2 = srv.add_blk("shared", socket_mode=0o660, socket_group=group)
    st = os.stat(ep2.config.path)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getgid())


def test_non_socket_path_is_refused_and_kept(tmp_path: os.PathLike[str]) -> None:
    victim = os.path.join(tmp_path, "file")
    with open(victim, "w") as f:
        f.write("keep")
    with pytest.raises(FileExistsError, match="not a socket"):
        bind_unix_socket(victim, 0o600, None)
    with open(victim) as f:
        assert f.read() == "keep"


def test_unknown_socket_group_is_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "g.sock")
    with pytest.raises(ValueError, match="no-such-group-xyz"):
        bind_unix_socket(path, 0o600, "no-such-group-xyz")
    assert not os.path.exists(path)


def test_stale_socket_replaced_live_socket_refused(srv: ServerThread) -> None:
    stale = str(srv.dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays, nobody listens
    ep = srv.add_blk("stale")
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        roundtrip(program(dev), 0, b"s")
    live = srv.dir / "stale.sock"
    with pytest.raises(FileExistsError, match="another process"):
        srv.call(srv.server.add, BlkDevice.from_ram(1 << 20), EndpointConfig(path=str(live)))
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        roundtrip(program(dev), 1, b"t")


def test_peer_credentials_are_logged(ep: Endpoint, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vhostmem.server")
    with VhostUserClient.connect(ep.config.path) as c:
        c.get_features()
    assert f"pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}" in caplog.text


def test_protocol_features_without_reply_ack_still_serve_io(ep: Endpoint) -> None:
    plain = (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.CONFIG)
    with VhostUserBlk.open(ep.config.path, ram_size=RAM, protocol_features=plain) as dev:
        roundtrip(program(dev), 0, b"p")


def test_reset_owner_resets_the_device_but_keeps_the_negotiation(ep: Endpoint) -> None:
    """QEMU uses RESET_OWNER as a device reset and goes on with REPLY_ACK and its memory."""
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        roundtrip(program(dev), 0, b"o")
        dev.client.call(FrontendRequest.RESET_OWNER)
        assert dev.client.has_protocol(ProtocolFeature.REPLY_ACK)
        drop_queue(dev, 0)
        dev.client.set_features(dev.client.features)  # acked: REPLY_ACK still on
        roundtrip(program(dev), 1, b"w")  # the memory table is still there


def test_a_broken_ring_signals_err_and_recovers_when_restarted(ep: Endpoint) -> None:
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q = program(dev)
        roundtrip(q, 0, b"1")
        ring = dev.queues[0].ring
        ring.avail_idx = (ring.avail_idx + ring.num + 5) & 0xFFFF  # far beyond the ring
        dev.queues[0].kick.signal()
        assert dev.queues[0].err.wait(5)
        dev.client.set_vring_enable(0, False)
        dev.client.get_vring_base(0)
        drop_queue(dev, 0)
        roundtrip(program(dev), 1, b"2")


def test_thread_mode_stop_waits_for_requests_in_flight(srv: ServerThread) -> None:
    ep = srv.add_blk("t", device_options={"io_mode": "thread"})
    with VhostUserBlk.open(ep.config.path, ram_size=4 * RAM) as dev:
        q = program(dev, size=128)
        roundtrip(q, 0, b"0")
        reqs = [q.prepare(BlkType.OUT, 8 * k, data=bytes([k]) * 4096) for k in range(32)]
        q.notify()
        done = q.wait()  # once one completed, all 32 were handed to the I/O threads
        new_call = EventFd()
        dev.client.set_vring_call(0, new_call.fd)  # swapped while requests may be in flight
        dev.queues[0].call.close()
        dev.queues[0].call = q.call_fd = new_call
        dev.client.set_vring_enable(0, False)
        base = dev.client.get_vring_base(0)
        assert base == 2 + 32
        # GET_VRING_BASE returned only once every popped request was completed.
        done += q.poll()
        assert len(done) == 32 and all(r.status == STATUS_OK for r in reqs)
        dev.client.set_vring_num(0, 128)
        dev.client.set_vring_base(0, base)
        dev.client.set_vring_kick(0, dev.queues[0].kick.fd)
        dev.client.set_vring_enable(0, True)
        assert q.read(8 * 31, 4096) == bytes([31]) * 4096


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_client_mode_waits_for_a_late_frontend_and_closes_cleanly(loop: str) -> None:
    LOOPS[loop]().close()  # uvloop keeps one process-wide pipe from its first loop on
    before = fd_snapshot()
    with running_server(LOOPS[loop]) as s:
        ep = s.add_blk("late", client=True)
        time.sleep(QUIET)  # several connect attempts to a path that does not exist yet
        assert s.call(lambda: ep.connection) is None
        with Listener(ep.config.path) as listener:
            ram = GuestRam()
            ram.add_region(0, RAM)
            with VhostUserBlk(listener.accept(), ram, own_ram=True) as dev:
                dev.negotiate()
                dev.send_memory("table")
                roundtrip(program(dev), 0, b"l")
        s.add_blk("never", client=True)  # still waiting when the server closes
        time.sleep(QUIET)
    assert fd_snapshot() == before


def test_new_event_loop_is_uvloop_with_a_stdlib_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = new_event_loop()
    assert type(loop).__module__.startswith("uvloop")
    loop.close()
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if uvloop were not installed
    loop = new_event_loop()
    assert type(loop).__module__.startswith("asyncio")
    loop.close()


def test_queues_stop_and_restart_independently(srv: ServerThread) -> None:
    ep = srv.add_blk("mq", num_queues=2)
    with VhostUserBlk.open(ep.config.path, ram_size=RAM) as dev:
        q0, q1 = program(dev, 0), program(dev, 1)
        roundtrip(q0, 0, b"0")
        roundtrip(q1, 1, b"1")
        dev.client.set_vring_enable(1, False)
        assert dev.client.get_vring_base(1) == 2
        pending = q1.submit(BlkType.OUT, 5, data=b"5" * SECTOR)
        roundtrip(q0, 2, b"2")  # queue 0 unaffected
        assert nothing_completes(q1)
        dev.client.set_vring_base(1, 2)
        dev.client.set_vring_kick(1, dev.queues[1].kick.fd)
        dev.client.set_vring_enable(1, True)
        q1.wait_for(pending)
        assert pending.status == STATUS_OK
        assert q0.read(5, SECTOR) == b"5" * SECTOR
