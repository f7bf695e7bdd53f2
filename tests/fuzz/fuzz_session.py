"""atheris fuzz target for the message handler: Framer + Session + virtqueues + blk, in-process.

    .venv/bin/python tests/fuzz/fuzz_session.py -runs=200000 [corpus_dir ...]
    FUZZ_SESSION_RING=packed .venv/bin/python tests/fuzz/fuzz_session.py -runs=200000

Input: ``u16 image length``, that many bytes of guest-memory image (copied to offset 0 of every
memfd sent), then chunks: ``control byte, length byte, data``. Control bits 0-1: fds sent with the
chunk (real memfds of MEMFD_SIZE bytes when bit 2 is set, else eventfds); bit 3: after the chunk
fire every watched kick (the rings then run over the fuzzed guest memory). After each chunk the
turns the rings deferred (their work budget was used up, ``KickWatcher.defer``) run, at most
DEFER_ROUNDS rounds of them.

Concurrent mode: a chunk whose control byte's high nibble is PROGRAM_MAGIC (0xA) is not a
message but a ring mutator program (tests/fuzz/ring_mutator.py, ``Program``): from that chunk on,
a second thread keeps rewriting the guest memory (descriptor and indirect tables, avail and used
rings, request buffers, through its own mapping of the memfds) while the backend handles the
messages and kicks, as a hostile guest's vCPU can. The writes are chosen by the program (ops,
PRNG seed, step budget, rate), so a crash input replays the same writes, but where they land
between the backend's reads depends on thread scheduling: a race reproduces with some
probability, not every time. Inputs without a program chunk run single threaded, as before.

A ProtocolError or SessionError is the server's "disconnect": framer closed, session reset. Any
other exception is a finding, as are: a Deferred reply (blk is served inline here, so nothing is
ever in flight on a thread); a traceback logged by the backend (an unexpected exception its
guards swallowed: ``log.exception``) or a critical record; a bounds violation
(VHOSTMEM_DEBUG_BOUNDS, always on here); a chunk still running after WATCHDOG_SECONDS (every
thread's stack is dumped and ``WatchdogTimeout`` raised in the main thread); and, checked after
every input, a registration left in the MemRegistry, an mmap still pending, a fd more than at
start, a guest memfd still mapped (every MAPS_EVERY runs).

Ring mode (``FUZZ_SESSION_RING=packed`` or ``split``): a fixed valid session on that layout
(``seed_session``'s messages, ring 0 enabled and kicked) runs before every input's chunks, so
every input reaches the ring: its image is the guest memory the ring runs over, and its chunks
(more messages, kicks, a mutator program) come after. The session target reaches a ring in few
inputs (most mutations break the session first); this one spends them all on the ring. Its
seeds (``ring_seeds``) are images with no chunks, or with a program and a kick.

Without corpus arguments a seed corpus is written to a temporary directory and used: a full
valid session doing one read (also on a packed ring, direct and indirect, and under a random
mutator program); the same with the ring full, under a random mutator program;
an indirect chain whose table entries the mutator rewrites every way it knows; and
"double-fetch": a request whose data buffer is outside guest memory, with a program that keeps
the ring full and links the chain's last descriptor to itself. A backend that walks the chain a
second time to find where the failure status goes (git 5fd9bdf,
``ChainWalker._last_descriptor``) can read a well-formed chain the first time and the loop the
second: it spins forever and the watchdog fires (tests/fuzz/check_double_fetch.py checks that).
"""

from __future__ import annotations

import inspect
import logging
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

FD_BITS = 0x3
MEMFD_BIT = 0x4
KICK_BIT = 0x8
PROGRAM_MASK = 0xF0
PROGRAM_MAGIC = 0xA0
MEMFD_SIZE = 64 << 10
IMAGE_LEN = struct.Struct("<H")
MAPS_EVERY = 1000
RAM_DISK = 1 << 20
NUM_QUEUES = 2
DEFER_ROUNDS = 8
WATCHDOG_SECONDS = 2.0
# FUZZ_SESSION_STATS=N: every N runs, print how many inputs ran the mutator and its writes.
STATS_EVERY = int(os.environ.get("FUZZ_SESSION_STATS", "0"))
RING_LAYOUTS = ("split", "packed")


class Watcher:
    """KickWatcher over a dict and a list: the fuzzer fires the callbacks itself."""

    def __init__(self, on_watch: Callable[[], None] = lambda: None) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.deferred: list[Callable[[], None]] = []
        self.on_watch = on_watch

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback
        self.on_watch()  # a ring starts: the mutator learns where it is before it runs

    def unwatch(self, fd: int) -> None:
        self.callbacks.pop(fd, None)

    def defer(self, callback: Callable[[], None]) -> None:
        self.deferred.append(callback)

    def run_deferred(self, rounds: int = DEFER_ROUNDS) -> None:
        """Run what was deferred, and what that defers, for at most ``rounds`` rounds (the
        rest waits for the next chunk, as an event loop serves other I/O in between)."""
        for _ in range(rounds):
            if not self.deferred:
                return
            pending, self.deferred = self.deferred, []
            for callback in pending:
                callback()


class TracebackLog(logging.Handler):
    """Records the backend logged with a traceback (an unexpected exception one of its guards
    caught: ``log.exception``) or as critical (a bounds violation): findings."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.CRITICAL:
            self.found.append(self.format(record))


def parse(data: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    if len(data) < IMAGE_LEN.size:
        return b"", []
    (n,) = IMAGE_LEN.unpack_from(data)
    image = data[2 : 2 + min(n, MEMFD_SIZE)]
    pos = 2 + len(image)
    chunks = []
    while pos + 2 <= len(data):
        control, length = data[pos], data[pos + 1]
        chunks.append((control, data[pos + 2 : pos + 2 + length]))
        pos += 2 + length
    return image, chunks


def is_program(control: int) -> bool:
    return control & PROGRAM_MASK == PROGRAM_MAGIC


def make_fds(control: int, image: bytes) -> list[int]:
    fds = []
    for _ in range(control & FD_BITS):
        if control & MEMFD_BIT:
            fd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(fd, MEMFD_SIZE)
            os.pwrite(fd, image, 0)
        else:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        fds.append(fd)
    return fds


def memfd_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("fuzz-guest-ram" in line for line in f)


# ------------------------------------------------------------------------------ seeds

U = 0x7000_0000_0000
NUM = 8
DESC_GPA, AVAIL_GPA, USED_GPA = 0x0, 0x80, 0x100
HEADER_GPA, DATA_GPA, STATUS_GPA = 0x200, 0x400, 0x600
INDIRECT_GPA = 0x300
OUTSIDE_GPA = 0x10_0000  # past the one 64 KiB region


def seed_image(data_gpa: int = DATA_GPA, requests: int = 1, indirect: bool = False) -> bytes:
    """One read chain (header, 512-byte data buffer at ``data_gpa``, status) at head 0, made
    available ``requests`` times; with ``indirect`` the chain is an indirect table."""
    img = bytearray(STATUS_GPA + 1)
    desc = struct.Struct("<QIHH")
    table = INDIRECT_GPA if indirect else DESC_GPA
    desc.pack_into(img, table, HEADER_GPA, 16, 1, 1)
    desc.pack_into(img, table + 16, data_gpa, 512, 3, 2)
    desc.pack_into(img, table + 32, STATUS_GPA, 1, 2, 0)
    if indirect:
        desc.pack_into(img, DESC_GPA, INDIRECT_GPA, 3 * 16, 4, 0)
    struct.pack_into("<HH", img, AVAIL_GPA, 0, requests)  # flags, idx; ring entries: head 0
    struct.pack_into("<IIQ", img, HEADER_GPA, 0, 0, 0)  # read sector 0
    img[STATUS_GPA] = 0xFF
    return bytes(img)


# Packed rings (virtio 1.2 section 2.8): the ring at DESC_GPA, the driver event area at
# AVAIL_GPA, the device's at USED_GPA; descriptors are addr, len, id, flags.
RING_PACKED = 34
DESC_F_AVAIL = 1 << 7
PACKED_FRESH_BASE = 0x8000_8000  # both wrap counters 1, positions 0


def seed_packed_image(indirect: bool = False) -> bytes:
    """One read chain (header, data, status), buffer id 0, available at ring position 0 (or an
    indirect table of those three)."""
    img = bytearray(STATUS_GPA + 1)
    desc = struct.Struct("<QIHH")
    if indirect:
        desc.pack_into(img, INDIRECT_GPA, HEADER_GPA, 16, 0, 0)
        desc.pack_into(img, INDIRECT_GPA + 16, DATA_GPA, 512, 0, 2)
        desc.pack_into(img, INDIRECT_GPA + 32, STATUS_GPA, 1, 0, 2)
        desc.pack_into(img, DESC_GPA, INDIRECT_GPA, 3 * 16, 0, 4 | DESC_F_AVAIL)
    else:
        desc.pack_into(img, DESC_GPA, HEADER_GPA, 16, 0, 1 | DESC_F_AVAIL)
        desc.pack_into(img, DESC_GPA + 16, DATA_GPA, 512, 0, 3 | DESC_F_AVAIL)
        desc.pack_into(img, DESC_GPA + 32, STATUS_GPA, 1, 0, 2 | DESC_F_AVAIL)
    struct.pack_into("<IIQ", img, HEADER_GPA, 0, 0, 0)  # read sector 0
    img[STATUS_GPA] = 0xFF
    return bytes(img)


def seed_session(image: bytes | None = None, program: bytes | None = None,
                 packed: bool = False) -> bytes:
    """A full session starting ring 0 over ``image``; ``program`` (a mutator program) comes
    just before the SET_VRING_ENABLE that runs the ring. ``packed``: VIRTIO_F_RING_PACKED and
    the fresh packed vring base."""
    from protocol import FrontendRequest as R
    from protocol import encode_request

    features = (1 << 32) | (1 << 30) | (1 << 28) | (1 << 29) | (packed << RING_PACKED)
    region = {"guest_phys_addr": 0, "memory_size": MEMFD_SIZE, "userspace_addr": U,
              "mmap_offset": 0}
    msgs: list[tuple[bytes, int, int]] = [  # bytes, fd count, control extra bits
        (encode_request(R.SET_OWNER), 0, 0),
        (encode_request(R.SET_FEATURES, features), 0, 0),
        (encode_request(R.SET_PROTOCOL_FEATURES, (1 << 3) | (1 << 15)), 0, 0),
        (encode_request(R.SET_MEM_TABLE, {"regions": [region]}, need_reply=True, fds_count=1),
         1, MEMFD_BIT),
        (encode_request(R.SET_VRING_NUM, {"index": 0, "num": NUM}, need_reply=True), 0, 0),
        (encode_request(R.SET_VRING_BASE, {"index": 0, "num": PACKED_FRESH_BASE if packed
                                           else 0}, need_reply=True), 0, 0),
        (encode_request(R.SET_VRING_ADDR, {"index": 0, "flags": 0, "desc_user_addr": U,
                                           "used_user_addr": U + USED_GPA,
                                           "avail_user_addr": U + AVAIL_GPA,
                                           "log_guest_addr": 0}, need_reply=True), 0, 0),
        (encode_request(R.SET_VRING_CALL, {"index": 0, "nofd": False}, fds_count=1), 1, 0),
        (encode_request(R.SET_VRING_KICK, {"index": 0, "nofd": False}, fds_count=1), 1, 0),
    ]
    if program is not None:
        msgs.append((program, 0, PROGRAM_MAGIC))
    msgs.append((encode_request(R.SET_VRING_ENABLE, {"index": 0, "num": 1}), 0, KICK_BIT))
    image = seed_image() if image is None else image
    out = bytearray(IMAGE_LEN.pack(len(image)) + image)
    for data, nfds, extra in msgs:
        out += bytes([nfds | extra, len(data)]) + data
    return bytes(out)


def seed_double_fetch() -> bytes:
    """The ring is kept full of a request whose data buffer is outside guest memory while the
    status descriptor (2) is linked to itself, again and again (see the module docstring)."""
    from ring_mutator import OP_AVAIL_IDX, OP_DESC, Program

    keep_full = (OP_AVAIL_IDX, 1 << 1, 0)  # mode 1: avail idx = used idx + num
    loop_status = (OP_DESC, 0 << 1, 2)  # mode 0 on descriptor 2: NEXT -> itself
    program = Program.encode(rate=0, steps=2000, seed=1, ops=[keep_full] * 7 + [loop_status])
    return seed_session(seed_image(OUTSIDE_GPA, NUM), program)


def ring_prefix(layout: str) -> list[tuple[int, bytes]]:
    """Ring mode: the chunks of a valid session starting ring 0 on ``layout`` (no image)."""
    if layout not in RING_LAYOUTS:
        raise ValueError(f"FUZZ_SESSION_RING={layout!r}: choose from {RING_LAYOUTS}")
    return parse(seed_session(b"", packed=layout == "packed"))[1]


def ring_seeds(layout: str) -> dict[str, bytes]:
    """Ring mode seeds: the layout's images (direct, indirect), alone or followed by a random
    mutator program and a kick."""
    from ring_mutator import Program

    if layout == "packed":
        images = {"direct": seed_packed_image(), "indirect": seed_packed_image(indirect=True)}
    else:
        images = {"direct": seed_image(), "indirect": seed_image(indirect=True)}
    program = Program.encode(rate=2, steps=512, seed=7, ops=[])
    then = bytes([PROGRAM_MAGIC, len(program)]) + program + bytes([KICK_BIT, 0])
    seeds = {}
    for name, image in images.items():
        seeds[f"{layout}-{name}"] = IMAGE_LEN.pack(len(image)) + image
        seeds[f"{layout}-{name}-concurrent"] = IMAGE_LEN.pack(len(image)) + image + then
    return seeds


def seed_corpus() -> str:
    from ring_mutator import OP_AVAIL_IDX, OP_INDIRECT, Program

    path = tempfile.mkdtemp(prefix="fuzz-session-seeds-")
    layout = os.environ.get("FUZZ_SESSION_RING", "")
    if layout:
        for name, data in ring_seeds(layout).items():
            Path(path, name).write_bytes(data)
        return path
    Path(path, "session").write_bytes(seed_session())
    random_program = Program.encode(rate=2, steps=512, seed=7, ops=[])
    Path(path, "concurrent").write_bytes(seed_session(seed_image(requests=NUM), random_program))
    # Every way of rewriting an entry of the indirect table, the ring kept full meanwhile.
    keep_full = (OP_AVAIL_IDX, 1 << 1, 0)
    ops = [op for mode in range(8) for op in (keep_full, (OP_INDIRECT, mode << 1, 0))]
    program = Program.encode(rate=1, steps=1024, seed=3, ops=ops)
    image = seed_image(requests=NUM, indirect=True)
    Path(path, "concurrent-indirect").write_bytes(seed_session(image, program))
    Path(path, "double-fetch").write_bytes(seed_double_fetch())
    Path(path, "packed").write_bytes(seed_session(seed_packed_image(), packed=True))
    Path(path, "packed-indirect").write_bytes(
        seed_session(seed_packed_image(indirect=True), packed=True))
    Path(path, "packed-concurrent").write_bytes(
        seed_session(seed_packed_image(), random_program, packed=True))
    return path


# ------------------------------------------------------------------------------- main


def build_target(instrument: Callable[[], AbstractContextManager[object]] = nullcontext,
                 ring: str = "") -> Callable[[bytes], None]:
    """Set up the backend (imported under ``instrument``: atheris.instrument_imports) and
    return the function that runs one input; ``ring``: ring mode on that layout. Call from
    the main thread (the watchdog's signal is delivered there)."""
    prefix = ring_prefix(ring) if ring else []
    from ring_mutator import GuestFiles, Program, RingMutator, Watchdog

    # Rejections are logged as errors and expected; a traceback or a critical record is not.
    logging.disable(logging.WARNING)
    traceback_log = TracebackLog()
    logging.getLogger().handlers = [traceback_log]
    logging.getLogger().setLevel(logging.ERROR)
    with instrument():
        from protocol import Framer, ProtocolError
        from vhostmem import bounds, session_base
        from vhostmem.devices.blk import BlkDevice
        from vhostmem.memmap import MemRegistry
        from vhostmem.session import Session, SessionError

    # As the server builds it (vhostmem/server.py). Trees from before keep_invalid and
    # Deferred (the double-fetch check runs this target on git 5fd9bdf) get the old framer.
    framer_args = {"keep_invalid": True} if "keep_invalid" in inspect.signature(
        Framer).parameters else {}
    deferred_reply = getattr(session_base, "Deferred", ())

    def new_framer() -> Framer:
        return Framer(sender="frontend", **framer_args)

    registry = MemRegistry()
    device = BlkDevice.from_ram(RAM_DISK, num_queues=NUM_QUEUES)
    mutator = RingMutator()
    guest = GuestFiles(MEMFD_SIZE)

    def refresh_layout() -> None:
        if mutator.active:
            mutator.layout = guest.layout(session)

    watcher = Watcher(on_watch=refresh_layout)
    session = Session(device, registry, watcher, name="fuzz")
    watchdog = Watchdog(WATCHDOG_SECONDS)
    baseline_fds = len(os.listdir("/proc/self/fd"))
    runs = 0
    stats = {"concurrent": 0}

    def disconnect(framer: Framer) -> None:
        framer.close()
        session.reset()
        watcher.callbacks.clear()
        watcher.run_deferred()  # turns of a reset session: they only clear its schedule
        refresh_layout()

    def run_chunk(framer: Framer, control: int, chunk: bytes, fds: list[int]) -> bool:
        """Feed one chunk; False when the session disconnected."""
        try:
            for msg in framer.feed(chunk, fds):
                result = session.handle(msg)
                if isinstance(result, deferred_reply):
                    raise AssertionError(f"{msg.request!r}: Deferred reply in inline mode")
                refresh_layout()
        except (ProtocolError, SessionError):
            return False
        if control & KICK_BIT:
            for callback in list(watcher.callbacks.values()):
                callback()
        watcher.run_deferred()
        return True

    def one_input(data: bytes) -> None:
        nonlocal runs
        image, chunks = parse(data)
        chunks = prefix + chunks
        concurrent = any(is_program(control) for control, _ in chunks)
        violations = len(bounds.violations)
        framer = new_framer()
        try:
            for n, (control, chunk) in enumerate(chunks):
                watchdog.arm(f"chunk {n} (control {control:#04x})")
                if is_program(control):
                    guest.map_all()
                    mutator.start(Program.parse(chunk))
                    refresh_layout()
                    continue
                fds = make_fds(control, image)
                if concurrent and control & MEMFD_BIT:
                    for fd in fds:
                        guest.add(fd)
                with mutator.busy():
                    if not run_chunk(framer, control, chunk, fds):
                        disconnect(framer)
                        framer = new_framer()
        finally:
            watchdog.arm("the end of the input")
            try:
                mutator.stop()
            finally:
                disconnect(framer)
                guest.close()
                watchdog.disarm()
        runs += 1
        if concurrent:
            stats["concurrent"] += 1
        if STATS_EVERY and runs % STATS_EVERY == 0:
            print(f"fuzz_session: {runs} runs, {stats['concurrent']} concurrent, "
                  f"{mutator.steps_done} mutator writes", file=sys.stderr)
        assert not mutator.errors, f"ring mutator failed: {mutator.errors}"
        assert not traceback_log.found, "backend logged:\n" + "\n".join(traceback_log.found)
        assert len(bounds.violations) == violations, f"bounds: {bounds.violations[violations:]}"
        assert registry.chunks() == [], f"registrations left: {registry.chunks()}"
        assert session.memory.pending_unmaps == 0, "guest mmaps still pinned after reset"
        now = len(os.listdir("/proc/self/fd"))
        assert now == baseline_fds, f"fd leak: {now - baseline_fds} fds"
        if runs % MAPS_EVERY == 0:
            assert memfd_mappings() == 0, "guest memfds still mapped"

    one_input.watchdog = watchdog  # type: ignore[attr-defined]
    one_input.mutator = mutator  # type: ignore[attr-defined]
    one_input.session = session  # type: ignore[attr-defined]
    return one_input


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ["VHOSTMEM_DEBUG_BOUNDS"] = "1"
    import atheris

    one_input = build_target(atheris.instrument_imports, os.environ.get("FUZZ_SESSION_RING", ""))
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(seed_corpus())
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
