"""An in-process vhostmem server on its own event loop thread, for fake-guest tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from vhostmem.devices.blk import BlkDevice
from vhostmem.memmap import MemRegistry
from vhostmem.server import Endpoint, EndpointConfig, Server

T = TypeVar("T")
DISK_SIZE = 4 << 20
SETTLE_TIMEOUT = 5.0


def fd_snapshot() -> set[str]:
    """What each open fd of this process points at (fd number + target)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd is gone
            out.add(f"{name}->{os.readlink(f'/proc/self/fd/{name}')}")
    return out


def memfd_mappings() -> list[str]:
    """memfd mappings of this process (guest RAM the server or the frontend mapped)."""
    with open("/proc/self/maps") as f:
        return [line for line in f if "/memfd:" in line]


class ServerThread:
    """A `Server` whose loop runs in a thread; `call` runs a function on the loop."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.loop = loop_factory()
        self.registry = MemRegistry()
        self.server = Server(self.loop, self.registry)
        self.dir = Path(tempfile.mkdtemp(prefix="vhm-srv-"))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the test thread
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(SETTLE_TIMEOUT)

    def add_blk(self, name: str = "blk", *, client: bool = False, num_queues: int = 1,
                size: int = DISK_SIZE, device_options: dict[str, Any] | None = None,
                **config: Any) -> Endpoint:
        device = BlkDevice.from_ram(size, num_queues=num_queues, **(device_options or {}))
        path = str(self.dir / f"{name}.sock")
        cfg = EndpointConfig(path=path, client=client, **config)
        return self.call(self.server.add, device, cfg)

    def wait_until(self, what: Callable[[], bool], timeout: float = SETTLE_TIMEOUT) -> None:
        """Poll `what` on the loop thread until it is true."""
        deadline = time.monotonic() + timeout
        while not self.call(what):
            assert time.monotonic() < deadline, "server did not reach the expected state"
            time.sleep(0.01)

    def close(self) -> None:
        devices = [ep.device for ep in self.server.endpoints]
        self.call(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SETTLE_TIMEOUT)
        self.loop.close()
        for device in devices:
            device.close()  # type: ignore[attr-defined]
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


@contextmanager
def running_server(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Iterator[ServerThread]:
    srv = ServerThread(loop_factory)
    try:
        yield srv
    finally:
        srv.close()
