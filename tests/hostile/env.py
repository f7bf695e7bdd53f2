"""An in-process vhostmem server (loop thread) with two image-backed blk devices, and the
checks every hostile case ends with: real I/O still works, nothing leaked, nothing outside."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from tests.hostile.guarded import GuardedRam
from tests.peers import TEST_WORKERS
from vhostmem import bounds
from vhostmem.devices.blk import BlkDevice
from vhostmem.frontend import VhostUserBlk
from vhostmem.memmap import MemRegistry
from vhostmem.server import Endpoint, EndpointConfig, Server, new_event_loop

T = TypeVar("T")
IMAGE_SIZE = 4 << 20
SECTOR = 512
IO_BYTES = 4096
SETTLE_TIMEOUT = 5.0
POLL_INTERVAL = 0.005
# Guest RAM: two regions with a hole between them (addresses in the hole are unmapped).
REGION0 = (0, 8 << 20)
REGION1 = (16 << 20, 4 << 20)
HOLE = REGION0[1]
QUEUE_SIZE = 64
QUEUE_DEPTH = 8
SLOT_DATA = 16 << 10


class Image:
    """A raw image with random contents and the model of what it must hold."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        data = random.Random(seed).randbytes(IMAGE_SIZE)
        path.write_bytes(data)
        self.expected = bytearray(data)

    def record_write(self, sector: int, data: bytes) -> None:
        off = sector * SECTOR
        self.expected[off : off + len(data)] = data

    def unchanged_elsewhere(self) -> bool:
        return self.path.read_bytes() == bytes(self.expected)


class TracebackRecorder(logging.Handler):
    """Keeps every record logged with exception info (log.exception: an unexpected error)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []  # text only: a record would pin the traceback's views

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


class ServerThread:
    """`Server` on its own loop thread: endpoint A (2 queues) and endpoint B (1 queue)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vhm-hostile-"))
        self.loop = new_event_loop()
        self.registry = MemRegistry()
        self.server = Server(self.loop, self.registry)
        # Anything that escaped to the loop, or was logged with a traceback, is a bug.
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.tracebacks = TracebackRecorder()
        logging.getLogger("vhostmem").addHandler(self.tracebacks)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.images = {name: Image(self.dir / f"{name}.raw", seed)
                       for seed, name in enumerate(("a", "b", "t"))}
        self.a = self.add("a", num_queues=2)
        self.b = self.add("b", num_queues=1)
        self.t = self.add("t", num_queues=2, io_mode="thread")  # requests served by a pool

    def add(self, name: str, num_queues: int, io_mode: str = "inline") -> Endpoint:
        device = BlkDevice.from_file(str(self.images[name].path), num_queues=num_queues,
                                     io_mode=io_mode)
        # VHOSTMEM_TEST_WORKERS=N: the inline devices serve their rings in worker processes.
        workers = TEST_WORKERS if io_mode == "inline" else 0
        config = EndpointConfig(str(self.dir / f"{name}.sock"), workers=workers)
        return self.call(self.server.add, device, config)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread and return its result."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # re-raised in the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(SETTLE_TIMEOUT)

    def path(self, endpoint: Endpoint) -> str:
        return endpoint.config.path

    def wait_disconnected(self, endpoint: Endpoint) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while self.call(lambda: endpoint.connection is not None):
            assert time.monotonic() < deadline, f"{endpoint.name}: frontend still attached"
            time.sleep(POLL_INTERVAL)

    def assert_no_crashes(self) -> None:
        assert not self.loop_errors, self.loop_errors
        assert not self.tracebacks.records, self.tracebacks.records

    def close(self) -> None:
        logging.getLogger("vhostmem").removeHandler(self.tracebacks)
        self.call(self.server.close)
        for ep in (self.a, self.b, self.t):
            ep.device.close()  # type: ignore[attr-defined]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SETTLE_TIMEOUT)
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def guarded_ram(sealed: bool = True) -> GuardedRam:
    ram = GuardedRam(sealed=sealed)
    ram.add_region(*REGION0)
    ram.add_region(*REGION1)
    return ram


def open_guest(path: str, ram: GuardedRam, queues: int = 1,
               packed: bool = False) -> VhostUserBlk:
    """A negotiated frontend on the socket at ``path`` with ``queues`` queues started (packed
    rings with ``packed``)."""
    dev = VhostUserBlk.open(path, ram=ram, mem="table", packed=packed)
    for i in range(queues):
        dev.start_queue(i, size=QUEUE_SIZE, depth=QUEUE_DEPTH, max_data=SLOT_DATA)
    return dev


def real_io(dev: VhostUserBlk, queue: int, image: Image, sector: int) -> None:
    """Write random data through ``queue``, read it back, and find it in the image file."""
    data = os.urandom(IO_BYTES)
    q = dev.queue(queue)
    q.write(sector, data)
    image.record_write(sector, data)
    assert q.read(sector, IO_BYTES) == data
    with open(image.path, "rb") as f:
        assert os.pread(f.fileno(), IO_BYTES, sector * SECTOR) == data


def memfd_mappings() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "memfd:" in line]


def open_fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return out


def assert_no_bounds_violations() -> None:
    assert bounds.enabled, "bounds checks are not enabled"
    assert not bounds.violations, bounds.violations
