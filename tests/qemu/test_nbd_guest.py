"""A real guest on vhostmem over NBD: qemu-nbd serves a qcow2 image, vhostmem serves it to
QEMU 7.2 as vhost-user-blk (qemu/nbd_stack.py), 2 queues on 2 NBD connections (multi-conn)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qemu.assets import GuestAssets
from qemu.backends import Backend, BackendRequest
from qemu.launch import GuestConfig, run_guest

pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="no qemu-nbd")]
SEED = 4242


def stack(name: str, keep: Path, *extra: str) -> Backend:
    def command(req: BackendRequest) -> list[str]:
        argv = [sys.executable, "-m", "qemu.nbd_stack", "--socket", str(req.socket),
                "--image", str(req.image()), "--num-queues", str(req.num_queues),
                "--keep", str(keep), *extra]
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
