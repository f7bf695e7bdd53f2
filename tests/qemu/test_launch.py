"""A real QEMU guest on vhostmem-blk started the way systemd starts a socket-activated
service: the socket exists before the backend (fd 3, LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES), and
the backend is the vhost-user.rst "Backend program conventions" program (--blk-file)."""

from __future__ import annotations

import sys

import pytest

from qemu.assets import GuestAssets
from qemu.backends import ROOT, Backend, BackendRequest
from qemu.launch import GuestConfig, run_guest

pytestmark = pytest.mark.qemu
ACTIVATION = ROOT / "tests" / "vhostmem" / "activation.py"
VHOSTMEM_BLK = ROOT / ".venv" / "bin" / "vhostmem-blk"


def activated_blk(req: BackendRequest) -> list[str]:
    argv = [sys.executable, str(ACTIVATION), "--listen", str(req.socket), "--name", "disk0",
            "--", str(VHOSTMEM_BLK), f"--blk-file={req.image()}",
            f"--num-queues={req.num_queues}"]
    return [*argv, "--read-only"] if req.readonly else argv


def test_guest_on_a_socket_activated_vhostmem_blk(guest_assets: GuestAssets) -> None:
    backend = Backend(name="vhostmem-blk-activated", command=activated_blk)
    result = run_guest(backend, GuestConfig(num_queues=2, smp=2), assets=guest_assets)
    assert result.passed, result.report()
    assert "image matches" in next(c.detail for c in result.checks if c.name == "host.image")
    log = result.backend_log
    assert "listening on" in log and "(inherited fd 3)" in log, log
    # The harness stops the backend with SIGTERM: it drains, flushes and says so.
    assert "SIGTERM: shutting down" in log and "stopped: images flushed" in log, log
