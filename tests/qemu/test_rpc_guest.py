"""The management socket beside a real guest: a second disk is added with device_add while a
Linux guest does I/O on the first, and the guest's I/O never stops or fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from qemu.assets import GuestAssets
from qemu.backends import Backend, BackendRequest, vhostmem_backend
from qemu.launch import GuestConfig, run_guest
from tests.vhostmem.rpc.rpcenv import Rpc
from tests.vhostmem.rpc.test_rpc_devices import roundtrip

pytestmark = pytest.mark.qemu
WAIT = 120.0


class AddDuringIo(threading.Thread):
    """Waits until the guest's disk has served requests, adds a second device, does a fake-guest
    round trip on it, then waits until the first disk serves more requests."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rpc_path: Path | None = None
        self.first: str | None = None
        self.requests_at_add = 0
        self.requests_after = 0
        self.added: str | None = None
        self.listed: list[str] = []
        self.error: BaseException | None = None
        self.done = threading.Event()

    def command(self, base: Backend, req: BackendRequest) -> list[str]:
        self.rpc_path = req.socket.parent / "rpc.sock"
        self.first = req.socket.name
        return [*base.argv(req), "--rpc-socket", str(self.rpc_path)]

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def _requests(self, rpc: Rpc) -> int:
        stats = rpc.call("device_stats", name=self.first)
        return sum(q["requests"] for q in stats["queues"])

    def _run(self) -> None:
        deadline = time.monotonic() + WAIT
        while self.rpc_path is None or not self.rpc_path.exists():
            assert time.monotonic() < deadline, "the backend's management socket never appeared"
            time.sleep(0.05)
        with Rpc(self.rpc_path) as rpc:
            while (n := self._requests(rpc)) == 0:
                assert time.monotonic() < deadline, "the guest never used its disk"
                time.sleep(0.02)
            self.requests_at_add = n
            second = self.rpc_path.parent / "second.sock"
            self.added = rpc.call("device_add", socket=str(second), ram="16M",
                                  serial="second")["name"]
            roundtrip(second, 11, b"S")
            self.listed = [d["name"] for d in rpc.call("device_list")]
            while (n := self._requests(rpc)) <= self.requests_at_add:
                assert time.monotonic() < deadline, "the guest's disk stopped serving"
                time.sleep(0.02)
            self.requests_after = n


def test_device_add_while_a_guest_does_io(guest_assets: GuestAssets) -> None:
    base = vhostmem_backend()
    watcher = AddDuringIo()
    backend = Backend(name="vhostmem", command=lambda req: watcher.command(base, req),
                      ram_disk=True)
    watcher.start()
    result = run_guest(backend, GuestConfig(), assets=guest_assets)
    watcher.done.wait(10)
    assert result.passed, result.report()
    assert "I/O error" not in result.serial_log
    if watcher.error is not None:
        raise watcher.error
    assert watcher.added == "second.sock"
    assert watcher.listed == [watcher.first, "second.sock"]
    assert watcher.requests_after > watcher.requests_at_add > 0
