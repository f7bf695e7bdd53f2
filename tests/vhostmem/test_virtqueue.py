"""Split virtqueue against a driver-side ring writer in a real memfd."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.vhostmem.ringhelpers import (
    ALL_RING_FEATURES,
    GPA_BASE,
    DriverRing,
    GuestRam,
    eventfd_count,
)
from tests.vhostmem.test_eventfd import SATURATED, returns_promptly
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import (
    VIRTIO_RING_F_EVENT_IDX,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_USED_F_NO_NOTIFY,
    Virtqueue,
    VirtqueueError,
)

NUM = 16
UNMAPPED = 0x10_0000_0000  # far outside the test RAM


@dataclass
class Env:
    mem: GuestMemory
    ram: GuestRam
    vq: Virtqueue
    ring: DriverRing
    call: int
    err: int

    def serve_all(self, written: int = 0) -> list[int]:
        heads = []
        while (chain := self.vq.pop()) is not None:
            heads.append(chain.head)
            self.vq.push_used(chain.head, written)
        self.vq.notify()
        return heads


def make_env(features: int = ALL_RING_FEATURES, start: bool = True) -> Env:
    registry = MemRegistry()
    mem = GuestMemory(registry)
    ram = GuestRam()
    ram.add_to(mem)
    vq = Virtqueue(0, mem)
    ring = DriverRing(ram, NUM)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    err = os.eventfd(0, os.EFD_NONBLOCK)
    vq.set_call_fd(os.dup(call))
    vq.set_err_fd(os.dup(err))
    if start:
        ring.attach(vq, features)
    return Env(mem, ram, vq, ring, call, err)


@pytest.fixture
def env() -> Iterator[Env]:
    e = make_env()
    yield e
    close_env(e)


def close_env(e: Env) -> None:
    e.vq.close()
    e.mem.close()
    e.ram.close()
    os.close(e.call)
    os.close(e.err)


def test_chain_views_and_used_element(env: Env) -> None:
    out = env.ram.alloc(100)
    inb = env.ram.alloc(50)
    env.ram.write(out, bytes(range(100)))
    head = env.ring.add([(out, 100, False), (inb, 50, True)])
    chain = env.vq.pop()
    assert chain is not None and chain.head == head
    assert b"".join(chain.readable) == bytes(range(100))
    assert chain.readable_len == 100 and chain.writable_len == 50
    chain.writable[0][:] = b"z" * 50
    env.vq.push_used(head, 50)
    assert env.vq.pop() is None
    assert env.vq.notify() is True
    assert eventfd_count(env.call) == 1
    assert env.ring.take_used() == [(head, 50)]
    assert env.ram.read(inb, 50) == b"z" * 50


def test_indirect_chain(env: Env) -> None:
    a, b, c = env.ram.alloc(16), env.ram.alloc(4096), env.ram.alloc(1)
    env.ram.write(a, b"H" * 16)
    head = env.ring.add([(a, 16, False), (b, 4096, True), (c, 1, True)], indirect=True)
    chain = env.vq.pop()
    assert chain is not None and chain.head == head
    assert [len(v) for v in chain.readable] == [16]
    assert [len(v) for v in chain.writable] == [4096, 1]
    assert bytes(chain.readable[0]) == b"H" * 16


def test_zero_length_descriptor_yields_no_view(env: Env) -> None:
    a = env.ram.alloc(8)
    env.ring.add([(a, 0, False), (a, 8, True)])
    chain = env.vq.pop()
    assert chain is not None
    assert chain.readable == [] and chain.readable_len == 0
    assert chain.writable_len == 8


def test_batch_signals_once(env: Env) -> None:
    buf = env.ram.alloc(8)
    heads = [env.ring.add([(buf, 8, True)]) for _ in range(5)]
    assert env.serve_all(8) == heads
    assert eventfd_count(env.call) == 1
    assert [h for h, _ in env.ring.take_used()] == heads


def test_no_signal_without_new_used(env: Env) -> None:
    assert env.serve_all() == []
    assert eventfd_count(env.call) == 0


def test_no_interrupt_flag_suppresses_call() -> None:
    e = make_env(features=0)
    try:
        buf = e.ram.alloc(8)
        e.ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
        e.ring.add([(buf, 8, True)])
        e.serve_all()
        assert eventfd_count(e.call) == 0
        e.ring.set_avail_flags(0)
        e.ring.add([(buf, 8, True)])
        e.serve_all()
        assert eventfd_count(e.call) == 1
    finally:
        close_env(e)


def test_no_notify_flag_while_busy_cleared_when_idle() -> None:
    e = make_env(features=0)
    try:
        buf = e.ram.alloc(8)
        e.ring.add([(buf, 8, True)])
        e.ring.add([(buf, 8, True)])
        assert e.vq.pop() is not None
        assert e.ring.used_flags() & VRING_USED_F_NO_NOTIFY
        assert e.vq.pop() is not None
        assert e.vq.pop() is None
        assert e.ring.used_flags() == 0
    finally:
        close_env(e)


def test_event_idx_used_event_controls_calls(env: Env) -> None:
    buf = env.ram.alloc(8)
    # The first notify always signals (nothing signalled yet).
    env.ring.add([(buf, 8, True)])
    env.serve_all()
    assert eventfd_count(env.call) == 1
    # Driver wants a call only once used idx passes 3 (i.e. after entry 3 is used).
    env.ring.set_used_event(3)
    env.ring.add([(buf, 8, True)])
    env.serve_all()  # used idx 1 -> 2
    assert eventfd_count(env.call) == 0
    env.ring.add([(buf, 8, True)])
    env.serve_all()  # 2 -> 3
    assert eventfd_count(env.call) == 0
    env.ring.add([(buf, 8, True)])
    env.serve_all()  # 3 -> 4 crosses used_event 3
    assert eventfd_count(env.call) == 1


def test_event_idx_avail_event_published_when_idle(env: Env) -> None:
    buf = env.ram.alloc(8)
    for _ in range(3):
        env.ring.add([(buf, 8, True)])
    env.serve_all()
    assert env.ring.avail_event() == 3
    assert env.vq.get_base() == 3


def test_wraparound_of_16bit_indices() -> None:
    e = make_env(start=False)
    try:
        base = 0xFFFE
        e.ring.avail_idx = base
        e.ring.set_avail_idx(base)
        e.ring.set_used_idx(base)
        e.vq.set_base(base)
        e.ring.attach(e.vq)
        buf = e.ram.alloc(8)
        heads = [e.ring.add([(buf, 8, True)]) for _ in range(5)]
        assert e.serve_all(8) == heads
        assert e.vq.get_base() == (base + 5) & 0xFFFF == 3
        assert e.ring.used_idx() == 3
        assert [h for h, _ in e.ring.take_used()] == heads
        assert e.ring.avail_event() == 3
    finally:
        close_env(e)


def test_stopped_or_disabled_queue_pops_nothing(env: Env) -> None:
    buf = env.ram.alloc(8)
    env.ring.add([(buf, 8, True)])
    env.vq.enable(False)
    assert env.vq.pop() is None
    env.vq.enable(True)
    env.vq.stop()
    assert env.vq.pop() is None
    env.vq.start()
    assert env.vq.pop() is not None


def test_drain_kick(env: Env) -> None:
    kick = os.eventfd(0)
    env.vq.set_kick_fd(os.dup(kick))
    os.eventfd_write(kick, 3)
    assert env.vq.drain_kick() is True
    assert env.vq.drain_kick() is False
    env.vq.set_kick_fd(-1)
    assert env.vq.drain_kick() is False
    os.close(kick)


def assert_broken(env: Env, words: str) -> None:
    assert env.vq.broken
    assert words in env.vq.broken_reason
    assert eventfd_count(env.err) == 1
    assert env.vq.pop() is None
    assert env.ring.used_idx() == 0  # nothing completed


def test_loop_breaks_queue(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    buf = env.ram.alloc(8)
    env.ring.write_desc(0, buf, 8, VRING_DESC_F_NEXT, 1)
    env.ring.write_desc(1, buf, 8, VRING_DESC_F_NEXT, 0)
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert_broken(env, "loops")
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert sum("broken" in r.message for r in caplog.records) == 1  # logged once


def test_next_out_of_range_breaks_queue(env: Env) -> None:
    buf = env.ram.alloc(8)
    env.ring.write_desc(0, buf, 8, VRING_DESC_F_NEXT, NUM)
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert_broken(env, "out of range")


def test_head_out_of_range_breaks_queue(env: Env) -> None:
    env.ring.publish(NUM + 3)
    assert env.vq.pop() is None
    assert_broken(env, "head")


def test_avail_jump_breaks_queue(env: Env) -> None:
    env.ring.set_avail_idx(NUM + 1)
    assert env.vq.pop() is None
    assert_broken(env, "ahead")


def test_nested_indirect_breaks_queue(env: Env) -> None:
    inner = env.ram.alloc(16)
    table = env.ram.alloc(16)
    env.ram.write(inner, bytes(16))
    env.ram.write(table, struct.pack("<QIHH", inner, 16, VRING_DESC_F_INDIRECT, 0))
    env.ring.write_desc(0, table, 16, VRING_DESC_F_INDIRECT)
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert_broken(env, "inside an indirect")


@pytest.mark.parametrize("length", [0, 24, 16 * NUM + 16])
def test_bad_indirect_length_breaks_queue(env: Env, length: int) -> None:
    table = env.ram.alloc(16 * NUM + 16)
    env.ring.write_desc(0, table, length, VRING_DESC_F_INDIRECT)
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert_broken(env, "indirect table length")


def test_unmapped_indirect_table_breaks_queue(env: Env) -> None:
    env.ring.write_desc(0, UNMAPPED, 32, VRING_DESC_F_INDIRECT)
    env.ring.publish(0)
    assert env.vq.pop() is None
    assert_broken(env, "not in guest memory")


def test_indirect_without_feature_breaks_queue() -> None:
    e = make_env(features=1 << VIRTIO_RING_F_EVENT_IDX)
    try:
        buf = e.ram.alloc(8)
        e.ring.add([(buf, 8, True)], indirect=True)
        assert e.vq.pop() is None
        assert_broken(e, "not negotiated")
    finally:
        close_env(e)


def test_readable_after_writable_breaks_queue(env: Env) -> None:
    buf = env.ram.alloc(8)
    env.ring.add([(buf, 8, True), (buf, 8, False)])
    assert env.vq.pop() is None
    assert_broken(env, "follows a writable")


def test_unmapped_buffer_fails_only_that_request(env: Env) -> None:
    buf = env.ram.alloc(8)
    bad = env.ring.add([(UNMAPPED, 8, True)])
    # Straddles the end of guest RAM: partly outside.
    straddle = env.ring.add([(GPA_BASE + env.ram.size - 4, 8, True)])
    good = env.ring.add([(buf, 8, True)])
    chain = env.vq.pop()
    assert chain is not None and chain.head == good
    env.vq.push_used(good, 8)
    assert not env.vq.broken
    assert env.ring.take_used() == [(bad, 0), (straddle, 0), (good, 8)]


def test_set_addr_checks_alignment_and_memory(env: Env) -> None:
    with pytest.raises(VirtqueueError, match="16-byte aligned"):
        env.vq.set_addr(env.ring.desc + 8, env.ring.used, env.ring.avail)
    with pytest.raises(VirtqueueError, match="not in guest memory"):
        env.vq.set_addr(UNMAPPED, env.ring.used, env.ring.avail)


def test_ring_overlaps(env: Env) -> None:
    assert env.vq.ring_overlaps(env.ring.desc, 1)
    assert env.vq.ring_overlaps(GPA_BASE, env.ram.size)
    assert not env.vq.ring_overlaps(GPA_BASE + env.ram.size, 4096)


def test_memory_replacement_remaps_rings_and_unmaps_old(env: Env) -> None:
    buf = env.ram.alloc(8)
    env.ring.add([(buf, 8, True)])
    # Same memfd mapped again: the old mmap waits for the ring views to go.
    env.mem.set_table([(GPA_BASE, env.ram.size, env.ram.uaddr, 0, os.dup(env.ram.fd))])
    assert env.mem.pending_unmaps == 1
    chain = env.vq.pop()  # notices the new generation and re-resolves the rings
    assert chain is not None
    env.vq.push_used(chain.head, 8)
    del chain
    assert env.mem.reap() == 0
    assert env.ring.take_used() == [(0, 8)]


def test_reset_releases_everything(env: Env) -> None:
    env.vq.set_kick_fd(os.eventfd(0))
    env.vq.reset()
    assert env.vq.kick_fd == env.vq.call_fd == env.vq.err_fd == -1
    assert not env.vq.started and not env.vq.enabled and not env.vq.ready_to_start()
    env.mem.clear()
    assert env.mem.pending_unmaps == 0


def test_completions_from_threads_survive_ring_remaps(env: Env) -> None:
    """Worker threads complete requests while the loop re-resolves the rings (as a new memory
    table or SET_VRING_ADDR does): every used entry is written, none raises."""
    completions = 20000
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for n in range(completions):
                env.vq.hold()
                env.vq.begin()
                env.vq.complete(n % NUM, 1)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        env.vq.set_addr(env.ring.desc, env.ring.used, env.ring.avail)
    t.join()
    assert errors == []
    used_idx = struct.unpack_from("<H", env.ram.read(env.ring.used + 2, 2))[0]
    assert used_idx == completions & 0xFFFF


def test_held_requests_signal_once_the_last_queued_one_completes(env: Env) -> None:
    """Completions on worker threads batch their interrupt: none while another held request
    still waits for a worker, one when the last of them completes."""
    env.vq.set_features(0)  # no EVENT_IDX: every notify that may signal does
    for _ in range(3):
        env.vq.hold()
    env.vq.begin()
    env.vq.complete(0, 1)  # two still wait for a worker
    assert eventfd_count(env.call) == 0
    env.vq.begin()
    env.vq.begin()
    env.vq.complete(1, 1)  # nothing waits any more: signal
    assert eventfd_count(env.call) == 1
    env.vq.complete(2, 1)
    assert eventfd_count(env.call) == 1
    assert env.vq.inflight == 0 and env.vq.wait_idle(0)


IDLE_WAIT_S = 10.0  # a bound, not a timing: a missed wake-up returns False after it


@pytest.mark.parametrize("last", ["complete", "complete_many"])
def test_a_thread_in_wait_idle_is_woken_by_the_last_completion(env: Env, last: str) -> None:
    """Completions wake idle waiters only when there are some (Virtqueue counts them under
    its lock): one blocked in wait_idle is woken by the completion that leaves nothing in
    flight, not by an earlier one."""
    env.vq.hold(2, waiting=False)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(env.vq.wait_idle(IDLE_WAIT_S)))
    waiter.start()
    while env.vq._idle_waiters == 0 and waiter.is_alive():  # until it is waiting
        time.sleep(0.001)
    env.vq.complete_many([(0, 1)])
    assert waiter.is_alive() and result == []  # one request is still in flight
    if last == "complete":
        env.vq.complete(1, 1)
    else:
        env.vq.complete_many([(1, 1)])
    waiter.join()
    assert result == [True]
    assert env.vq._idle_waiters == 0


def test_a_saturated_blocking_call_fd_cannot_stall_the_queue(env: Env) -> None:
    """A frontend hands over a blocking call eventfd whose counter is full: signalling must
    not block (the fd is made non-blocking when received)."""
    call = os.eventfd(0)
    os.eventfd_write(call, SATURATED)
    env.vq.set_call_fd(os.dup(call))
    try:
        env.ring.add([(env.ram.alloc(8), 8, True)])
        assert returns_promptly(env.serve_all) == [0]
        assert env.ring.take_used() == [(0, 0)]
    finally:
        os.close(call)
