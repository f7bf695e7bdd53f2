"""A real guest on vhostmem over NBD: qemu-nbd serves a qcow2 image, vhostmem serves it to
QEMU 7.2 as vhost-user-blk (qemu/nbd_stack.py), 2 queues on 2 NBD connections (multi-conn);
and a writing guest while qemu-nbd is killed and started again."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qemu.assets import GuestAssets
from qemu.backends import Backend, BackendRequest
from qemu.launch import GuestConfig, run_guest
from qemu.reconnect import NBD_SERVER, CrashConfig, run_crash_test

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="no qemu-nbd")]
SEED = 4242


def stack(name: str, keep: Path | None, *extra: str) -> Backend:
    def command(req: BackendRequest) -> list[str]:
        argv = [sys.executable, "-m", "qemu.nbd_stack", "--socket", str(req.socket),
                "--image", str(req.image()), "--num-queues", str(req.num_queues), *extra]
        if keep is not None:
            argv += ["--keep", str(keep)]
        return [*argv, "--readonly"] if req.readonly else argv
    # qcow2 discards whole clusters only: a discarded range need not read back as zeroes.
    return Backend(name=name, command=command, discard_zeroes=False)


def test_guest_on_a_qcow2_image_over_nbd(guest_assets: GuestAssets, tmp_path: Path) -> None:
    qcow2, raw = tmp_path / "final.qcow2", tmp_path / "final.raw"
    config = GuestConfig(num_queues=2, smp=2, seed=SEED)
    result = run_guest(stack("vhostmem-nbd", qcow2), config, assets=guest_assets)
    assert result.passed, result.report()
    image = [c for c in result.checks if c.name == "host.image"]
    assert image and image[0].passed, result.report()  # the qcow2's data is the guest's
    # qemu-nbd --shared=2 offers multi-conn: a connection per queue.
    assert "vhostmem used 2 NBD connection(s) for 2 queue(s)" in result.backend_log, \
        result.report()
    # The same guest on vhostmem with a raw file: the same disk, byte for byte.
    result = run_guest(stack("vhostmem-raw", raw, "--plain"), config, assets=guest_assets)
    assert result.passed, result.report()
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow2),
                          str(raw)], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


OUTAGES = 3
SERVER_KILLED = "nbd_stack: qemu-nbd killed (SIGKILL)"
RESENT_RE = re.compile(r"reconnected; sending (\d+) waiting request")


def test_guest_writes_through_nbd_server_outages(guest_assets: GuestAssets) -> None:
    """qemu-nbd SIGKILLed under a writing guest (vmtest --writer, qemu/reconnect.py) and
    started again 0.5-2 s later, 3 times: shorter than vhostmem's nbd-timeout (10 s), so the
    guest sees no I/O error, and every acknowledged write is on the disk (the guest reads its
    blocks back; the qcow2, converted back to raw, holds only whole writer blocks). The qcow2's
    metadata is preallocated (qemu/nbd_stack.py --preallocate): qemu-nbd's own unflushed
    allocations die with it, which is not what this test is about."""
    config = CrashConfig(kills=OUTAGES, fault=NBD_SERVER, down_min=0.5, down_max=2.0,
                         timeout=60.0)
    backend = stack("vhostmem-nbd", None, "--preallocate")
    result = run_crash_test(backend, config, assets=guest_assets)
    print(result.report(with_logs=False))
    assert result.passed, result.report()
    assert result.kills == OUTAGES and result.resumed == OUTAGES
    log = result.backend_log
    assert log.count(SERVER_KILLED) == OUTAGES, log[-3000:]
    # vhostmem saw each outage and sent what waited (requests lost with the connection and
    # those the guest submitted meanwhile) on the new connection.
    assert log.count("connection lost") == OUTAGES, log[-3000:]
    resent = [int(n) for n in RESENT_RE.findall(log)]
    assert len(resent) == OUTAGES and sum(resent) > 0, log[-3000:]
    assert "I/O error" not in result.serial_log
