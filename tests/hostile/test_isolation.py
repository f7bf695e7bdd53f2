"""Isolation of devices in one ``vhostmem serve`` process (issue 10): whatever a guest or a
frontend does to device A, device B of the same process keeps answering.

Every test starts ``vhostmem serve --blk socket=A.sock,... --blk socket=B.sock,ram=16M``
(`TwoDevices`), attacks A, and meanwhile a `Probe` on B sends GET_FEATURES back to back and
records the worst reply latency, which must stay under `LATENCY_BOUND` (1 s). The attacks make
an unfixed backend stall for seconds (3 s, the probe's own timeout) or forever, so the bound is
a hang detector, not a performance claim. Afterwards the process must be alive, a fresh
frontend on A reads the image and one on B writes and reads, and no traceback was logged.

1. A double fetch: a request whose data buffer is outside guest memory fails, and its IOERR
   status is written after a second walk of the chain in guest memory; the guest's vCPU (this
   thread, pinned to another CPU than the server's loop) rewrites the status descriptor
   between the two walks.
2. No work budget per kick: a guest thread keeps A's ring full of 1 MiB reads.
3. ``io-mode=thread`` on a slow disk (`tests.hostile.slowfs`, a FUSE file system whose reads
   take 3 s): GET_VRING_BASE, SET_VRING_CALL or a disconnect of A while its reads are in flight.
4. A malformed but framable message with NEED_REPLY after REPLY_ACK was negotiated: a failure
   REPLY_ACK, and the connection stays usable.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protocol import FrontendRequest, ProtocolFeature
from tests.hostile.env import HOLE, guarded_ram
from tests.hostile.guarded import GuardedRam
from tests.hostile.isolation import Probe, TwoDevices
from tests.hostile.slowfs import SlowDisk, pattern
from tests.hostile.wire import (
    HDR,
    NEED_REPLY,
    config,
    message,
    u64,
    vring_addr,
    vring_state,
)
from vhostmem.frontend import (
    BlkQueue,
    BlkStatus,
    BlkType,
    EventFd,
    GuestRam,
    Request,
    VhostUserBlk,
    VhostUserError,
    blk_header,
)
from vhostmem.frontend.blk import STATUS_UNSET
from vhostmem.frontend.ring import VIRTQ_DESC_F_INDIRECT as INDIRECT
from vhostmem.frontend.ring import VIRTQ_DESC_F_NEXT as NEXT
from vhostmem.frontend.ring import VIRTQ_DESC_F_WRITE as WRITE
from vhostmem.frontend.ring import VIRTQ_USED_F_NO_NOTIFY

SECTOR = 512
A_IMAGE_SIZE = 16 << 20
IO_SECTOR = 2048
OUTCOME_TIMEOUT = 3.0  # a request neither completed nor breaking its queue by then: a hang


def serve_two(workdir: Path, a_spec: str) -> Iterator[TwoDevices]:
    devices = TwoDevices(workdir, a_spec)
    try:
        yield devices
    finally:
        devices.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vhm-isolation-") as d:
        yield Path(d)


@pytest.fixture
def file_a(workdir: Path) -> Iterator[TwoDevices]:
    """A: a 16 MiB image file (`pattern`), one queue, served inline; B: a 16 MiB RAM disk."""
    image = workdir / "a.img"
    image.write_bytes(pattern(0, A_IMAGE_SIZE))
    yield from serve_two(workdir, f"disk={image},num-queues=1")


def assert_still_serves(devices: TwoDevices) -> None:
    """The process is alive, a fresh frontend on A reads the image, one on B writes and reads
    back, and nothing was logged with a traceback."""
    assert devices.alive(), f"vhostmem serve died: {devices.stderr()}"
    with VhostUserBlk.open(devices.a, ram_size=8 << 20) as dev:
        data = dev.start_queue(0, size=64).read(IO_SECTOR, 4096)
        assert data == pattern(IO_SECTOR * SECTOR, 4096), "device A returned wrong data"
    with VhostUserBlk.open(devices.b, ram_size=8 << 20) as dev:
        dev.start_queue(0, size=64).write(0, b"b" * 4096)
        assert dev.queue(0).read(0, 4096) == b"b" * 4096
    assert "Traceback" not in devices.stderr(), devices.stderr()


# ------------------------------------------------------------- 1. double fetch

QUEUE_SIZE = 1024
# Readable zero-length descriptors between header and data: both walks of the chain take a
# while, so a guest thread can time its rewrite to land between them.
PADDING = QUEUE_SIZE - 4
CALIBRATION_RUNS = 9
# Both walks of PADDING descriptors take far longer than this; a shorter time measured means
# the vCPU missed the moment the device started.
MIN_SPAN = 50e-6
DEFAULT_SPAN = 1e-3
ATTACK_ATTEMPTS = 300
ATTACK_SECONDS = 5.0
SIGNAL_WAIT = 0.005  # how long the vCPU waits for the device to start on a kick
OUTCOME_POLL = 0.0001


@contextlib.contextmanager
def separate_cpus(server_pid: int) -> Iterator[None]:
    """Pin the server's event loop thread and this thread (the guest's vCPU) to different
    CPUs while they race, so that neither preempts the other (where there are two)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield
        return
    server_cpus = os.sched_getaffinity(server_pid)
    os.sched_setaffinity(server_pid, {cpus[0]})
    os.sched_setaffinity(0, {cpus[1]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(server_pid, server_cpus)


class DoubleFetchGuest:
    """A guest whose chain is header -> PADDING empty descriptors -> data outside guest
    memory -> status (descriptor S). The backend fails the request (the data buffer is not
    guest memory) and writes IOERR into the status byte of the chain's last descriptor.

    Each attempt submits the chain with S terminal, and the vCPU thread rewrites S (in the
    ring's descriptor table, through the guest RAM mapping) at a random moment while the
    backend serves it. Without EVENT_IDX the backend sets NO_NOTIFY in the used ring when it
    starts fetching, which gives the moment a reference."""

    def __init__(self, path: str, rewritten: str) -> None:
        self.path = path
        self.ram: GuardedRam = guarded_ram()
        self.hdr = self.buf(blk_header(BlkType.IN, 0))
        self.status = self.buf(bytes([STATUS_UNSET]))
        self.data = HOLE + 0x1000  # unmapped: the request fails
        self.s = PADDING + 2  # index of the status descriptor
        # An indirect table of one descriptor that loops to itself.
        self.loop_table = self.buf(struct.pack("<QIHH", self.status, 1, WRITE | NEXT, 0))
        self.terminal = (self.status, 1, WRITE, 0)
        self.rewritten = {
            "next-to-itself": (self.status, 1, WRITE | NEXT, self.s),
            "next-out-of-range": (self.status, 1, WRITE | NEXT, QUEUE_SIZE),
            "indirect-outside-memory": (HOLE, 16, INDIRECT, 0),
            "indirect-table-that-loops": (self.loop_table, 16, INDIRECT, 0),
        }[rewritten]
        self.dev: VhostUserBlk | None = None
        self.connect()

    def buf(self, data: bytes) -> int:
        gpa = self.ram.alloc(max(len(data), 16), 16)
        self.ram.write(gpa, data)
        return gpa

    def connect(self) -> None:
        if self.dev is not None:
            self.dev.close()
        self.dev = VhostUserBlk.open(self.path, ram=self.ram, event_idx=False)
        self.dev.start_queue(0, size=QUEUE_SIZE, depth=1, max_data=4096)
        ring = self.dev.queues[0].ring
        ring.write_desc(0, self.hdr, 16, NEXT, 1)
        for i in range(1, PADDING + 1):
            ring.write_desc(i, self.hdr, 0, NEXT, i + 1)
        ring.write_desc(PADDING + 1, self.data, 4096, WRITE | NEXT, self.s)
        ring.write_desc(self.s, *self.terminal)

    def attempt(self, delay: float | None) -> tuple[str, float]:
        """Submit the chain once; rewrite S ``delay`` seconds after the device started on it
        (None: never). Returns the outcome ("ioerr", "completed <status> <len>", "broken",
        "hang") and how long after the reference the request completed."""
        assert self.dev is not None
        st = self.dev.queues[0]
        ring = st.ring
        ring.write_desc(self.s, *self.terminal)
        self.ram.write(self.status, bytes([STATUS_UNSET]))
        used = ring.used_idx
        # The device clears NO_NOTIFY once idle again after the previous request.
        idle_by = time.monotonic() + SIGNAL_WAIT
        while ring.used_flags & VIRTQ_USED_F_NO_NOTIFY and time.monotonic() < idle_by:
            time.sleep(OUTCOME_POLL)
        slot = ring.next_avail
        ring.set_avail_entry(slot, 0)
        ring.avail_idx = slot + 1
        st.kick.signal()
        clock = time.perf_counter
        started = reference = clock()
        while clock() - started < SIGNAL_WAIT and ring.used_idx == used:
            if ring.used_flags & VIRTQ_USED_F_NO_NOTIFY:
                reference = clock()
                break
        if delay is not None:
            while clock() - reference < delay:
                pass
            ring.write_desc(self.s, *self.rewritten)
        while ring.used_idx == used and clock() - reference < OUTCOME_TIMEOUT:
            if st.err.drain():
                return "broken", 0.0
            time.sleep(OUTCOME_POLL)
        took = clock() - reference
        if ring.used_idx == used:
            return ("broken", 0.0) if st.err.wait(0.05) else ("hang", took)
        _, length = ring.read_used(used)
        status = self.ram.read(self.status, 1)[0]
        if (status, length) == (BlkStatus.IOERR, 1):
            return "ioerr", took
        return f"completed with status {status:#x}, used length {length}", took

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
        self.ram.close()


def spinning(devices: TwoDevices, seconds: float = 0.5) -> str:
    """How busy the server is over ``seconds`` (a hung loop spins at 100% of a CPU)."""
    before = devices.cpu_seconds()
    time.sleep(seconds)
    busy = (devices.cpu_seconds() - before) / seconds
    return f"the server then used {busy:.0%} of a CPU for {seconds}s"


@pytest.mark.parametrize("rewritten", ["next-to-itself", "next-out-of-range",
                                       "indirect-outside-memory", "indirect-table-that-loops"])
def test_double_fetch_of_a_failed_chain(file_a: TwoDevices, rewritten: str) -> None:
    """A guest thread rewrites the status descriptor of a failing request while the backend
    serves it: to NEXT pointing to itself, NEXT out of range, INDIRECT outside guest memory,
    or INDIRECT to a table that loops. Every attempt must end with IOERR in the status byte or
    with the queue broken (err eventfd), with no traceback logged; never a hang, and B keeps
    answering."""
    devices = file_a
    guest = DoubleFetchGuest(devices.a, rewritten)
    probe = Probe(devices.b)
    outcomes: dict[str, int] = {}
    failure = ""
    with separate_cpus(devices.proc.pid):
        try:
            # Calibration: how long the backend takes to fail the request when nobody interferes.
            times: list[float] = []
            for _ in range(CALIBRATION_RUNS):
                outcome, took = guest.attempt(None)
                assert outcome == "ioerr", f"unmodified chain: {outcome}"
                if took >= MIN_SPAN:  # else the vCPU saw NO_NOTIFY late (it was descheduled)
                    times.append(took)
            span = sorted(times)[len(times) // 2] if len(times) >= 3 else DEFAULT_SPAN
            probe.start()
            # The rewrite must land after the first walk and before the second one reads S: too
            # early breaks the queue (the first walk sees the bad descriptor), too late only fails
            # the request. Move the moment towards the boundary between the two, where that window
            # is, with some jitter.
            rng = random.Random(10)
            delay, step = span / 2, span / 8
            deadline = time.monotonic() + ATTACK_SECONDS
            for n in range(ATTACK_ATTEMPTS):
                if time.monotonic() > deadline:
                    break
                outcome, took = guest.attempt(max(0.0, delay + rng.uniform(-step, step)))
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "broken":
                    if "Traceback" in devices.stderr():
                        failure = f"attempt {n}: the queue broke with a traceback logged"
                        break
                    delay = min(delay + step, 2 * span)
                    guest.connect()
                elif outcome == "ioerr":
                    if took >= MIN_SPAN:  # else the vCPU missed the start: no verdict on delay
                        delay = max(delay - step, 0.0)
                else:
                    failure = f"attempt {n}: request {outcome}"
                    if outcome == "hang":
                        failure += f" ({spinning(devices)})"
                    break
            if not failure and "Traceback" in devices.stderr():
                failure = "a queue broke with a traceback logged"
        finally:
            probe.stop()
            guest.close()
    summary = (f"{rewritten}: outcomes {outcomes} (backend fails the request in "
               f"{span * 1e6:.0f} us); {probe.verdict()}")
    print(summary)
    assert not failure, f"{failure}; {summary}\n{devices.stderr()[-3000:]}"
    probe.assert_prompt(f"; {summary}")
    assert_still_serves(devices)


# ------------------------------------------------------- 2. no work budget per kick

FLOOD_QUEUE_SIZE = 1024
FLOOD_READ = 1 << 20
FLOOD_MIN_SECONDS = 1.0
FLOOD_MAX_SECONDS = 4.0
FLOOD_MIN_PROBES = 20
REFILL_POLL = 0.0002
DRAIN_TIMEOUT = 10.0


class Flood:
    """A guest thread that keeps A's ring full of 1 MiB reads: the whole ring is submitted
    (each request behind its own indirect descriptor, all reading into one buffer), and every
    completion is resubmitted at once, so the device never finds the ring empty."""

    def __init__(self, path: str) -> None:
        self.ram = GuestRam()
        self.ram.add_region(0, 64 << 20)
        self.dev = VhostUserBlk.open(path, ram=self.ram)
        self.q = self.dev.start_queue(0, size=FLOOD_QUEUE_SIZE, max_data=SECTOR)
        hdr = self.ram.alloc(16)
        self.ram.write(hdr, blk_header(BlkType.IN, 0))
        self.data = self.ram.alloc(FLOOD_READ, 4096)
        self.status = self.ram.alloc(16)
        self.pieces = [(hdr, 16, 0), (self.data, FLOOD_READ, WRITE), (self.status, 1, WRITE)]
        self.completed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Flood:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            q = self.q
            for _ in range(FLOOD_QUEUE_SIZE):
                q.prepare_chain(self.pieces, indirect=True)
            q.notify()
            while not self._stop.is_set():
                done = q.poll()
                for _ in done:
                    q.prepare_chain(self.pieces, indirect=True)
                if done:
                    self.completed += len(done)
                    q.notify()
                else:
                    time.sleep(REFILL_POLL)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        """Stop refilling and wait until every request in flight completed."""
        self._stop.set()
        self._thread.join(DRAIN_TIMEOUT)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.q.in_flight and time.monotonic() < deadline:
            self.completed += len(self.q.wait(max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        self.dev.close()
        self.ram.close()


def test_a_ring_kept_full_does_not_starve_the_other_device(file_a: TwoDevices) -> None:
    """A guest keeps A's 1024-entry ring full of 1 MiB reads and refills it as completions
    come back, for as long as B has not been probed FLOOD_MIN_PROBES times (at least 1 s, at
    most 4 s). A backend that serves a kick until the ring is empty never returns to its event
    loop while the flood lasts; B must answer within the bound all along."""
    devices = file_a
    flood = Flood(devices.a)
    probe = Probe(devices.b)
    try:
        flood.start()
        deadline = time.monotonic() + FLOOD_MAX_SECONDS
        while not flood.completed and time.monotonic() < deadline:  # the flood is running
            time.sleep(0.01)
        probe.start()
        started = time.monotonic()
        while time.monotonic() < deadline and flood.error is None and probe.error is None \
                and not (time.monotonic() - started >= FLOOD_MIN_SECONDS
                         and len(probe.latencies) >= FLOOD_MIN_PROBES):
            time.sleep(0.01)
        flooded = time.monotonic() - started
        in_flight = flood.q.in_flight
        flood.stop()
        probe.stop()
        print(probe.verdict())
        assert flood.error is None, f"the flooding guest failed: {flood.error!r}"
        assert flood.q.in_flight == 0, f"{flood.q.in_flight} flood requests never completed"
        assert flood.ram.read(flood.status, 1) == bytes([BlkStatus.OK])
        assert flood.ram.read(flood.data, 4096) == pattern(0, 4096)
    finally:
        probe.stop()
        flood.close()
    summary = (f"; {flood.completed} reads of 1 MiB completed, {in_flight} in flight after "
               f"{flooded:.1f}s of flood")
    probe.assert_prompt(summary)
    assert_still_serves(devices)


# --------------------------------------------- 3. thread io_mode on a slow disk

SLOW_READ_SECONDS = 3.0
SLOW_BYTES = 64 << 10  # reads below this offset of the slow image take SLOW_READ_SECONDS
SLOW_READS = 2  # 4 KiB reads at sectors 0 and 8, in flight together
SLOW_WAIT = 10.0  # for the slow reads to start, and for A's control reply
AFTER_READS = 0.3  # B is probed this long after the slow reads completed
UNREAD = 0xEE  # what a read buffer holds until the device writes it


@pytest.fixture
def slow_a(workdir: Path) -> Iterator[tuple[TwoDevices, SlowDisk]]:
    """A: ``io-mode=thread`` on an image in a FUSE file system whose reads of the first 64 KiB
    take 3 s each; B: a 16 MiB RAM disk."""
    disk = SlowDisk(workdir / "mnt", SLOW_READ_SECONDS, SLOW_BYTES)
    try:
        for devices in serve_two(workdir, f"disk={disk.path},num-queues=1,io-mode=thread"):
            yield devices, disk
    finally:
        disk.close()


class Background:
    """Run ``fn`` on a thread; `join` returns its result or raises what it raised."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc
        self.finished_at = time.monotonic()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def completions(q: BlkQueue, want: int, timeout: float) -> list[Request]:
    """Reap until ``want`` requests completed or ``timeout`` passed (polling the used ring:
    the call fd may have been replaced); at least one look."""
    done = q.poll()
    deadline = time.monotonic() + timeout
    while len(done) < want and time.monotonic() < deadline:
        time.sleep(0.005)
        done += q.poll()
    return done


def reset_and_restart(dev: VhostUserBlk) -> float:
    """RESET_DEVICE, then what a driver does next: features again, and ring 0 restarted from
    scratch (its memory zeroed: avail and used index 0). Returns when the reset was acked."""
    dev.client.reset_device()
    acked_at = time.monotonic()
    dev.client.set_features(dev.client.features)
    dev.queues[0].ring.reset()
    dev.resume_queue(0, 0)
    return acked_at


@pytest.mark.parametrize("action", ["get-vring-base", "set-vring-call", "reset-device",
                                    "disconnect"])
def test_slow_reads_in_flight_do_not_stall_the_control_plane(
        slow_a: tuple[TwoDevices, SlowDisk], action: str) -> None:
    """Two 4 KiB reads of A, served by its I/O threads, sit for 3 s in the slow file system;
    then A's frontend stops the ring (SET_VRING_ENABLE 0 + GET_VRING_BASE), replaces its call
    fd (SET_VRING_CALL), resets the device (RESET_DEVICE, then restarts the ring) or
    disconnects. B must keep answering meanwhile. GET_VRING_BASE may only be answered once the
    reads completed (their used entries written); after RESET_DEVICE their completions must
    not land in the restarted ring; instead of answering, after a bounded wait, the backend
    may drop A's frontend with an error logged."""
    devices, disk = slow_a
    probe = Probe(devices.b).start()
    dev = VhostUserBlk.open(devices.a, ram_size=8 << 20, timeout=SLOW_WAIT)
    new_call = EventFd()
    try:
        q = dev.start_queue(0, size=64, depth=SLOW_READS)
        reqs = [q.prepare(BlkType.IN, 8 * k, in_len=4096) for k in range(SLOW_READS)]
        for req in reqs:
            dev.ram.fill(req.in_gpa, 4096, UNREAD)
        q.notify()
        assert disk.wait_started(SLOW_READS, SLOW_WAIT), \
            f"{disk.started} of {SLOW_READS} slow reads started"
        acted_at = time.monotonic()
        if action == "get-vring-base":
            work = Background(lambda: dev.stop_queue(0))
        elif action == "set-vring-call":
            work = Background(lambda: dev.client.set_vring_call(0, new_call.fd))
        elif action == "reset-device":
            work = Background(lambda: reset_and_restart(dev))
        else:
            work = Background(dev.client.close)
        finished = work.join(SLOW_WAIT + SLOW_READ_SECONDS)
        # Probe on until the reads have completed and the backend had time to catch up (a
        # disconnect returns at once here, the backend handles it meanwhile).
        disk.wait_done(SLOW_READS, SLOW_WAIT)
        time.sleep(AFTER_READS)
        probe.stop()
        assert finished, f"{action} on A did not return in {SLOW_WAIT + SLOW_READ_SECONDS}s"
        dropped = isinstance(work.error, VhostUserError)
        if work.error is not None and not dropped:
            raise work.error
        if action == "disconnect":
            what = "A's frontend disconnected"
        else:
            what = (f"A: {action} {'dropped' if dropped else 'answered'} after "
                    f"{work.finished_at - acted_at:.2f}s")
        summary = f"; {what}, slow reads completed: {disk.done} of {SLOW_READS}"
        print(probe.verdict() + summary)
        probe.assert_prompt(summary)
        if dropped:
            assert "ERROR" in devices.stderr(), f"A's frontend was dropped silently{summary}"
        elif action == "reset-device":
            # The reads were popped before the reset: their completions belong to no ring the
            # driver has now; the restarted ring must not receive them.
            ring = dev.queues[0].ring
            stale = [ring.read_used(k) for k in range(ring.used_idx)]
            # Acked before the file system answered the reads: their data must not be written
            # into guest memory after the reset either.
            assert isinstance(work.result, float)
            written = [k for k, req in enumerate(reqs)
                       if dev.ram.read(req.in_gpa, 4096) != bytes([UNREAD]) * 4096
                       and work.result < min(disk.done_at)]
            assert not stale and not written, (
                f"after RESET_DEVICE was acked, reads popped before it wrote their data into "
                f"guest memory (reads {written}) and completed (head, len) {stale} into the "
                f"ring restarted since{summary}")
        elif action != "disconnect":
            # GET_VRING_BASE answers for a settled ring: every request popped is in the used
            # ring when the reply comes. After SET_VRING_CALL the reads still complete.
            wait = 0.0 if action == "get-vring-base" else SLOW_WAIT
            done = completions(q, SLOW_READS, wait)
            assert len(done) == SLOW_READS, \
                f"{len(done)} of {SLOW_READS} reads in the used ring after the reply{summary}"
            for k, req in enumerate(reqs):
                assert req.status == BlkStatus.OK, f"read {k}: status {req.status:#x}"
                assert dev.ram.read(req.in_gpa, 4096) == pattern(8 * k * SECTOR, 4096)
            if action == "get-vring-base":
                assert work.result == SLOW_READS, f"GET_VRING_BASE answered {work.result}"
    finally:
        probe.stop()
        dev.close()
        new_call.close()
    assert_still_serves(devices)


# ------------------------------------- 4. malformed but framable message with NEED_REPLY

R = FrontendRequest
EVENTFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
# Messages whose header frames them correctly (the stream stays in step) but whose payload
# protocol/ rejects, each sent with NEED_REPLY.
FRAMABLE_BUT_MALFORMED: dict[str, tuple[FrontendRequest, bytes, bool]] = {
    # name: (request, wire bytes, carries an eventfd)
    "vring-num-index-300": (R.SET_VRING_NUM, vring_state(R.SET_VRING_NUM, 300, 64), False),
    "vring-addr-index-300": (R.SET_VRING_ADDR, vring_addr(300, 0, 0, 0), False),
    "vring-call-reserved-bits": (R.SET_VRING_CALL, u64(R.SET_VRING_CALL, 1 << 9), True),
    "set-config-size-300": (R.SET_CONFIG, config(R.SET_CONFIG, 0, 300, bytes(300)), False),
    "set-features-4-byte-payload": (R.SET_FEATURES, message(R.SET_FEATURES, bytes(4)), False),
}


@pytest.mark.parametrize("name", list(FRAMABLE_BUT_MALFORMED))
def test_malformed_framable_message_gets_a_failure_ack(file_a: TwoDevices, name: str) -> None:
    """After REPLY_ACK was negotiated, a message that is framed correctly but fails
    validation (a ring index past 255, reserved bits in a vring-file u64, a config payload
    larger than 256 bytes, a u64 payload of 4 bytes) and asks for a reply gets a REPLY_ACK
    with a non-zero status; the same connection then starts a ring and reads. B answers
    throughout."""
    devices = file_a
    request, data, with_fd = FRAMABLE_BUT_MALFORMED[name]
    assert HDR.unpack_from(data)[1] & NEED_REPLY
    probe = Probe(devices.b).start()
    try:
        with VhostUserBlk.open(devices.a, ram_size=8 << 20) as dev:
            assert dev.client.has_protocol(ProtocolFeature.REPLY_ACK)
            fds = [os.eventfd(0, EVENTFD_FLAGS)] if with_fd else []
            try:
                dev.client.send_raw(data, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            failure = ""
            try:
                reply = dev.client.recv()
            except (VhostUserError, TimeoutError) as exc:
                reply, failure = None, f"{type(exc).__name__}: {exc}"
            assert reply is not None, \
                f"{name}: no REPLY_ACK, the backend answered with {failure}\n{devices.stderr()}"
            assert reply.is_reply and reply.request == request, reply
            assert isinstance(reply.payload, int) and reply.payload != 0, \
                f"{name}: REPLY_ACK {reply.payload!r}, expected a failure status"
            data_read = dev.start_queue(0, size=64).read(IO_SECTOR, 4096)
            assert data_read == pattern(IO_SECTOR * SECTOR, 4096)
    finally:
        probe.stop()
    print(probe.verdict())
    probe.assert_prompt()
    assert_still_serves(devices)
