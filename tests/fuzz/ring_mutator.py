"""A concurrent hostile guest and a hang watchdog for the session fuzz target (fuzz_session.py).

:class:`RingMutator` is a thread that keeps rewriting guest memory (descriptor tables, indirect
tables, the avail and used rings, request buffers) while the main thread handles messages and
kicks, the way a guest vCPU can at any moment. It writes through its own ``MAP_SHARED`` mapping
of each guest memfd (:class:`GuestFiles`), never through the backend's objects, so it cannot
touch memory the backend has already let go of. The ring addresses come from a
:class:`Layout` the main thread computes from the session's state between messages. It writes
only while the main thread is in the backend (:meth:`RingMutator.busy`, which also waits until
the thread is awake): a write between chunks would be no more than another memory image.

What it writes is decided by a :class:`Program` taken from the fuzz input (op list, PRNG seed,
step budget and rate), so a finding replays the same sequence of writes. *When* each write
lands relative to the backend's reads is not deterministic: the two threads interleave where
CPython hands the GIL over (``sys.setswitchinterval``, set from the program, makes that often),
so a crash input reproduces a race with some probability, not every time: run it a few times.
Under the GIL each write lands between two bytecodes of the backend, which is where a Python
backend that reads a ring field twice ("double fetch") can be caught between the reads.

:class:`Watchdog` turns a hang into a finding: a chunk that takes longer than its deadline gets
every thread's stack dumped to stderr and :class:`WatchdogTimeout` (a BaseException, so the
backend's ``except Exception`` guards cannot swallow it) raised in the main thread, which
atheris reports as a crash with the input saved. A heartbeat re-arms
``faulthandler.dump_traceback_later(exit=True)`` as a backstop for a main thread that holds
the GIL forever (then the stacks are dumped and the process exits, without the input).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import mmap
import os
import random
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import NamedTuple

# Virtio ring layout (virtio 1.2 2.7), as the guest sees it.
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size
FLAGS_NEXT = struct.Struct("<HH")  # flags and next: one store
FLAGS_OFFSET = 12
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
RING_HEADER = 4  # flags u16, idx u16
USED_ELEM = 8
PR_SET_TIMERSLACK = 29

# Program encoding (the data of a program chunk): byte 0 = rate (bits 0-2: switch interval,
# bits 3-4: GIL yields per step - 1, bits 5-7: jitter, the bound of a random sleep before each
# step), bytes 1-2 = step budget (u16, 0 = DEFAULT_STEPS), bytes 3-4 = PRNG seed, then ops of 3
# bytes (kind, a, b). Without ops every step draws a random op.
SWITCH_INTERVALS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 5e-3)
JITTERS = (0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
DEFAULT_SWITCH_INTERVAL = sys.getswitchinterval()
DEFAULT_STEPS = 256
MAX_STEPS = 4096
MAX_OPS = 64
AWAKE_TIMEOUT = 0.05
PROGRAM_HEADER = struct.Struct("<BHH")

# Op kinds. ``a`` picks the queue (a % queues) and a mode (a >> 1); ``b`` picks a descriptor
# or ring slot (b % num).
OP_DESC = 0  # rewrite a descriptor of the table (link to itself / ahead / out of range, ...)
OP_INDIRECT = 1  # the same inside the indirect table a descriptor points to (else OP_BUFFER)
OP_BUFFER = 2  # rewrite bytes of a descriptor's buffer (blk header type / sector / status)
OP_AVAIL_IDX = 3  # move avail idx (+1, keep the ring full, jump too far, random, back)
OP_AVAIL_RING = 4  # rewrite an avail ring entry (in range, out of range, random)
OP_EVENT = 5  # avail flags, used_event, used idx, avail_event, a used element
OP_RESTORE = 6  # write back the descriptor table and avail ring as first seen (flip-flops)
OP_PAUSE = 7  # release the GIL for b * 10 us
OP_RAW = 8  # random bytes at file offset (a << 8 | b) of a guest memfd
NUM_OPS = 9
DESC_MODES = 8


class WatchdogTimeout(BaseException):
    """A chunk of a fuzz input ran past the watchdog's deadline (a hang)."""


class Program(NamedTuple):
    interval: float
    yields: int
    jitter: float
    steps: int
    seed: int
    ops: tuple[tuple[int, int, int], ...]

    @classmethod
    def parse(cls, data: bytes) -> Program:
        head = bytes(data[: PROGRAM_HEADER.size]).ljust(PROGRAM_HEADER.size, b"\0")
        rate, steps, seed = PROGRAM_HEADER.unpack(head)
        body = data[PROGRAM_HEADER.size :]
        ops = tuple(
            (body[i], body[i + 1], body[i + 2]) for i in range(0, len(body) - 2, 3)
        )[:MAX_OPS]
        return cls(
            interval=SWITCH_INTERVALS[rate & 7],
            yields=1 + (rate >> 3 & 3),
            jitter=JITTERS[rate >> 5],
            steps=min(steps, MAX_STEPS) or DEFAULT_STEPS,
            seed=seed,
            ops=ops,
        )

    @staticmethod
    def encode(rate: int, steps: int, seed: int, ops: list[tuple[int, int, int]]) -> bytes:
        return PROGRAM_HEADER.pack(rate, steps, seed) + b"".join(bytes(op) for op in ops)


class Layout(NamedTuple):
    """What the mutator may write, as the main thread last saw it (replaced whole, never
    changed in place). ``regions``: (gpa, gpa_end, our mapping, file offset of gpa);
    ``queues``: (index, num, desc, avail, used GPAs); ``files``: every guest memfd mapping."""

    regions: tuple[tuple[int, int, mmap.mmap, int], ...] = ()
    queues: tuple[tuple[int, int, int, int, int], ...] = ()
    files: tuple[mmap.mmap, ...] = ()

    def locate(self, gpa: int, n: int) -> tuple[mmap.mmap, int] | None:
        """Our mapping and offset of guest bytes [gpa, gpa + n), if they are in one region."""
        for lo, hi, mm, foff in self.regions:
            if lo <= gpa and gpa + n <= hi:
                off = foff + gpa - lo
                if off + n <= len(mm):
                    return mm, off
        return None

    def read(self, st: struct.Struct, gpa: int) -> tuple[int, ...] | None:
        at = self.locate(gpa, st.size)
        return None if at is None else st.unpack_from(at[0], at[1])

    def write(self, st: struct.Struct, gpa: int, *values: int) -> None:
        at = self.locate(gpa, st.size)
        if at is not None:
            st.pack_into(at[0], at[1], *values)

    def write_bytes(self, gpa: int, data: bytes) -> None:
        at = self.locate(gpa, len(data))
        if at is not None:
            at[0][at[1] : at[1] + len(data)] = data


EMPTY = Layout()


class GuestFiles:
    """Our own handle on each guest memfd of one input: a dup of the fd (taken before the fd
    is handed to the session, which may close it) and, once the mutator runs, a mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fds: dict[int, int] = {}  # inode -> our dup
        self.maps: dict[int, mmap.mmap] = {}  # inode -> our mapping
        self.mapping = False
        self._cache: tuple[object, Layout] | None = None

    def add(self, fd: int) -> None:
        ino = os.fstat(fd).st_ino
        if ino not in self.fds:
            self.fds[ino] = os.dup(fd)
            if self.mapping:
                self._map(ino)

    def map_all(self) -> None:
        self.mapping = True
        for ino in self.fds:
            if ino not in self.maps:
                self._map(ino)

    def _map(self, ino: int) -> None:
        self.maps[ino] = mmap.mmap(self.fds[ino], self.size, flags=mmap.MAP_SHARED)

    def layout(self, session: object) -> Layout:
        """Where the session's regions and rings are in our mappings (GuestMemory and
        Virtqueue attributes, read on the main thread between messages)."""
        memory = session.memory  # type: ignore[attr-defined]
        queues = tuple(
            (vq.index, vq.num, *vq._addr)
            for vq in session.queues  # type: ignore[attr-defined]
            if vq.num and vq._addr is not None
        )
        key = (memory.generation, len(self.maps))
        if self._cache is None or self._cache[0] != key:
            regions = []
            inodes = _mapping_inodes() if memory.regions else {}
            for r in memory.regions:
                mm = self.maps.get(inodes.get(r.host_addr, -1))
                if mm is not None:
                    regions.append((r.guest_phys_addr, r.gpa_end, mm, r.mmap_offset))
            self._cache = (key, Layout(tuple(regions), (), tuple(self.maps.values())))
        return self._cache[1]._replace(queues=queues)

    def close(self) -> None:
        """Unmap and close everything (the mutator must be stopped: it holds no view)."""
        self._cache = None
        for mm in self.maps.values():
            mm.close()
        for fd in self.fds.values():
            os.close(fd)
        self.maps.clear()
        self.fds.clear()
        self.mapping = False


def _mapping_inodes() -> dict[int, int]:
    """Start address -> inode of every guest memfd mapping of this process."""
    out = {}
    with open("/proc/self/maps") as f:
        for line in f:
            if "fuzz-guest-ram" in line:
                fields = line.split()
                out[int(fields[0].split("-")[0], 16)] = int(fields[4])
    return out


class RingMutator:
    """The mutator thread (one per process, idle between programs)."""

    def __init__(self) -> None:
        self.layout = EMPTY
        self.errors: list[str] = []  # exceptions in the mutator itself: harness bugs
        self.steps_done = 0
        self.active = False
        self._program: Program | None = None
        self._stop = False
        self._go = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._busy = threading.Event()  # the backend is working
        self._awake = threading.Event()  # the mutator saw it (or its program is over)
        self._awake.set()
        threading.Thread(target=self._run, name="ring-mutator", daemon=True).start()

    def start(self, program: Program) -> None:
        self.stop()
        self._program = program
        self._stop = False
        self.active = True
        sys.setswitchinterval(program.interval)
        self._idle.clear()
        self._awake.clear()
        self._go.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the program and wait until the thread no longer touches guest memory."""
        if not self.active:
            return
        self._stop = True
        self._busy.set()
        stopped = self._idle.wait(timeout)
        self._busy.clear()
        sys.setswitchinterval(DEFAULT_SWITCH_INTERVAL)
        self.layout = EMPTY
        self.active = False
        if not stopped:
            raise AssertionError(f"ring mutator did not stop within {timeout} s")

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """The backend is working: the mutator steps only meanwhile."""
        if not self.active:
            yield
            return
        self._busy.set()
        # Wait until the mutator runs: waking a thread can take longer than a chunk's work.
        self._awake.wait(AWAKE_TIMEOUT)
        try:
            yield
        finally:
            self._busy.clear()

    def _run(self) -> None:
        # Wait for the GIL with a 1 ns timer slack (the default, 50 us, would stretch every
        # switch interval below it): switches then land at any bytecode of the backend, not
        # mostly where it releases the GIL for a system call.
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
        while True:
            self._go.wait()
            self._go.clear()
            try:
                assert self._program is not None
                self._mutate(self._program)
            except BaseException:
                self.errors.append(traceback.format_exc())
            finally:
                self._awake.set()  # nothing to wait for any more
                self._idle.set()

    def _mutate(self, program: Program) -> None:
        rng = random.Random(program.seed)
        timing = random.Random()  # when the writes land is not reproducible anyway
        saved: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        for step in range(program.steps):
            if not self._busy.is_set():
                self._awake.clear()
                self._busy.wait()
            self._awake.set()
            if program.jitter:
                time.sleep(timing.random() * program.jitter)
            for _ in range(program.yields):
                time.sleep(0)  # let the backend run until the next GIL hand-over
            if self._stop:
                return
            layout = self.layout
            if program.ops:
                kind, a, b = program.ops[step % len(program.ops)]
            else:
                kind, a, b = rng.randrange(NUM_OPS), rng.randrange(256), rng.randrange(256)
            for q in layout.queues:
                if (q[0], q[2]) not in saved:
                    saved[(q[0], q[2])] = _snapshot(layout, q)
            apply_op(layout, rng, kind % NUM_OPS, a, b, saved)
            self.steps_done += 1


def _snapshot(layout: Layout, q: tuple[int, int, int, int, int]) -> tuple[bytes, bytes]:
    _, num, desc, avail, _ = q
    out = []
    for gpa, n in ((desc, num * DESC_SIZE), (avail, RING_HEADER + 2 * num)):
        at = layout.locate(gpa, n)
        out.append(b"" if at is None else bytes(at[0][at[1] : at[1] + n]))
    return out[0], out[1]


def apply_op(
    layout: Layout,
    rng: random.Random,
    kind: int,
    a: int,
    b: int,
    saved: dict[tuple[int, int], tuple[bytes, bytes]],
) -> None:
    """One write of the hostile guest (see the OP_* constants)."""
    if kind == OP_PAUSE:
        if b:
            time.sleep(b * 1e-5)
        return
    if kind == OP_RAW:
        if layout.files:
            mm = layout.files[a % len(layout.files)]
            off = (a << 8 | b) % len(mm)
            data = rng.randbytes(rng.randint(1, 8))[: len(mm) - off]
            mm[off : off + len(data)] = data
        return
    if not layout.queues:
        return
    index, num, desc, avail, used = layout.queues[a % len(layout.queues)]
    mode = a >> 1
    d = b % num
    if kind == OP_DESC:
        mutate_desc(layout, rng, desc, num, d, mode, desc)
    elif kind in (OP_INDIRECT, OP_BUFFER):
        entry = layout.read(DESC, desc + d * DESC_SIZE)
        if entry is None:
            return
        addr, length, flags, _ = entry
        if kind == OP_INDIRECT and flags & VRING_DESC_F_INDIRECT and length >= DESC_SIZE:
            n = min(length // DESC_SIZE, 4096)
            mutate_desc(layout, rng, addr, n, rng.randrange(n), mode, desc)
        elif length:
            mutate_buffer(layout, rng, addr, length, mode)
    elif kind == OP_AVAIL_IDX:
        cur = layout.read(U16, avail + 2)
        used_idx = layout.read(U16, used + 2)
        if cur is None or used_idx is None:
            return
        new = (
            cur[0] + 1,  # one more request
            used_idx[0] + num,  # keep the ring full: the device never runs dry
            cur[0] + num + 1,  # too far ahead
            rng.randrange(1 << 16),
            cur[0] - 1,  # back
        )[mode % 5]
        layout.write(U16, avail + 2, new & 0xFFFF)
    elif kind == OP_AVAIL_RING:
        prev = layout.read(U16, avail + RING_HEADER + 2 * ((d - 1) % num))
        head = (
            rng.randrange(num),
            num + rng.randrange(4),  # out of range
            rng.randrange(1 << 16),
            prev[0] if prev else 0,  # the same head twice
        )[mode % 4]
        layout.write(U16, avail + RING_HEADER + 2 * d, head)
    elif kind == OP_EVENT:
        choice = mode % 5
        if choice == 0:
            flags = layout.read(U16, avail)
            if flags:
                layout.write(U16, avail, flags[0] ^ 1)  # VRING_AVAIL_F_NO_INTERRUPT
        elif choice == 1:
            layout.write(U16, avail + RING_HEADER + 2 * num, rng.randrange(1 << 16))  # used_event
        elif choice == 2:
            layout.write(U16, used + 2, rng.randrange(1 << 16))  # the device's used idx
        elif choice == 3:
            layout.write(U16, used + RING_HEADER + USED_ELEM * num, rng.randrange(1 << 16))
        else:
            layout.write(U64, used + RING_HEADER + USED_ELEM * d, rng.randrange(1 << 64))
    elif kind == OP_RESTORE:
        table, ring = saved.get((index, desc), (b"", b""))
        if table:
            layout.write_bytes(desc, table)
        if ring:
            layout.write_bytes(avail, ring)


def mutate_desc(
    layout: Layout, rng: random.Random, table: int, n: int, d: int, mode: int, ring: int
) -> None:
    """Rewrite descriptor ``d`` of the ``n``-entry table at ``table`` (``ring``: the queue's
    own descriptor table, a target for indirect pointers)."""
    gpa = table + d * DESC_SIZE
    entry = layout.read(DESC, gpa)
    if entry is None:
        return
    addr, length, flags, nxt = entry
    choice = mode % DESC_MODES
    if choice == 0:  # NEXT -> itself: a loop of one
        layout.write(FLAGS_NEXT, gpa + FLAGS_OFFSET, flags | VRING_DESC_F_NEXT, d)
    elif choice == 1:  # NEXT -> the following descriptor (a longer chain, or a loop)
        layout.write(FLAGS_NEXT, gpa + FLAGS_OFFSET, flags | VRING_DESC_F_NEXT, (d + 1) % n)
    elif choice == 2:  # NEXT -> out of range
        far = n + rng.randrange(4) if rng.randrange(2) else rng.randrange(1 << 16)
        layout.write(FLAGS_NEXT, gpa + FLAGS_OFFSET, flags | VRING_DESC_F_NEXT, far & 0xFFFF)
    elif choice == 3:  # the chain ends here
        layout.write(FLAGS_NEXT, gpa + FLAGS_OFFSET, flags & ~VRING_DESC_F_NEXT, nxt)
    elif choice == 4:  # flip NEXT / WRITE / INDIRECT
        layout.write(FLAGS_NEXT, gpa + FLAGS_OFFSET, flags ^ rng.randrange(1, 8), nxt)
    elif choice == 5:  # the buffer moves: outside memory, straddling a region end, huge
        end = layout.regions[0][1] if layout.regions else 1 << 20
        where = (
            (1 << 48) + rng.randrange(1 << 12),
            (1 << 64) - rng.randrange(1, 1 << 12),
            end - rng.randrange(1, 16),
            rng.randrange(1 << 64),
        )[rng.randrange(4)]
        layout.write(DESC, gpa, where, length, flags, nxt)
    elif choice == 6:  # the length changes
        new_len = (0, 1, 15, 16, 17, 512, 4096, 0xFFFFFFFF, n * DESC_SIZE)[rng.randrange(9)]
        layout.write(DESC, gpa, addr, new_len, flags, nxt)
    else:  # becomes an indirect descriptor: to the ring's own table, its buffer, nowhere
        target = (ring, addr, 1 << 40)[rng.randrange(3)]
        new_len = (n * DESC_SIZE, DESC_SIZE, 17, 0, (n + 1) * DESC_SIZE)[rng.randrange(5)]
        new_flags = VRING_DESC_F_INDIRECT | (VRING_DESC_F_NEXT if rng.randrange(4) == 0 else 0)
        layout.write(DESC, gpa, target, new_len, new_flags, nxt)


def mutate_buffer(layout: Layout, rng: random.Random, addr: int, length: int, mode: int) -> None:
    """Rewrite bytes of a request buffer: a blk header's type or sector, a status byte, or
    random bytes anywhere in it."""
    choice = mode % 4
    if choice == 0 and length >= 4:
        rtype = (0, 1, 4, 8, 11, 13, 0xFFFFFFFF)[rng.randrange(7)]
        layout.write(U32, addr, rtype)
    elif choice == 1 and length >= 16:
        sector = (0, 1, 1 << 11, (1 << 64) - 1, rng.randrange(1 << 64))[rng.randrange(5)]
        layout.write(U64, addr + 8, sector)
    elif choice == 2:
        layout.write_bytes(addr + length - 1, bytes([rng.randrange(256)]))
    else:
        off = rng.randrange(min(length, 1 << 16))
        n = min(rng.randint(1, 16), length - off)
        layout.write_bytes(addr + off, rng.randbytes(n))


class Watchdog:
    """Deadline per chunk, checked by a daemon thread (see the module docstring)."""

    TICK = 0.2
    BACKSTOP = 30.0

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline: float | None = None
        self.fired = False
        self.what = ""
        self._main = threading.get_ident()
        # A real-time signal: libFuzzer keeps SIGALRM, SIGUSR1 and SIGUSR2 for itself.
        self._signum = signal.SIGRTMIN + 5
        signal.signal(self._signum, self._on_signal)
        faulthandler.dump_traceback_later(self.BACKSTOP, exit=True)  # re-armed every tick
        threading.Thread(target=self._run, name="fuzz-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        self.what = what
        self.deadline = time.monotonic() + self.seconds

    def disarm(self) -> None:
        self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            faulthandler.dump_traceback_later(self.BACKSTOP, exit=True)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline and not self.fired:
                self.fired = True
                sys.stderr.write(
                    f"\n=== watchdog: {self.what} still running after {self.seconds} s; "
                    "stacks of every thread: ===\n"
                )
                faulthandler.dump_traceback(all_threads=True)
                signal.pthread_kill(self._main, self._signum)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.fired:
            raise WatchdogTimeout(f"{self.what} ran longer than {self.seconds} s (a hang)")
