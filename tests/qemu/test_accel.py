"""KVM only where a probe boot succeeds: the probe is real (no mocked QEMU), its verdict must
match what a full KVM boot of the test guest does on this machine, and boots use it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu.accel import PROBE_TIMEOUT, SOURCE_DISK, SOURCE_PROCESS, kvm_verdict, probe_kvm
from qemu.assets import GuestAssets
from qemu.backends import qsd_backend
from qemu.launch import GuestConfig, qemu_command, run_guest

pytestmark = pytest.mark.qemu
ROOT = Path(__file__).resolve().parents[2]
# A full KVM boot of the checking guest takes 2-3 s where KVM works; this bounds the attempt
# where it does not (the kernel spins under KVM and never prints).
KVM_BOOT_TIMEOUT = 10.0
# QEMU start-up and teardown beyond the probe's own timeout, generous for a loaded machine: this
# bounds a probe that would hang, it is not a speed target.
PROBE_SLACK = 6.0


def test_kvm_probe_matches_a_kvm_boot(guest_assets: GuestAssets) -> None:
    started = time.monotonic()
    probe = probe_kvm(guest_assets)  # always boots: no cache read or written
    elapsed = time.monotonic() - started
    assert elapsed < PROBE_TIMEOUT + PROBE_SLACK, probe.describe()
    kvm_boot = run_guest(qsd_backend(), GuestConfig(accel="kvm", timeout=KVM_BOOT_TIMEOUT),
                         assets=guest_assets)
    assert kvm_boot.accel == "kvm"
    assert probe.works == kvm_boot.passed, (
        f"probe: {probe.describe()}\nKVM boot:\n{kvm_boot.report(with_logs=False)}")


def test_auto_accel_uses_the_cached_probe_verdict(guest_assets: GuestAssets,
                                                  tmp_path: Path) -> None:
    verdict = kvm_verdict(guest_assets)
    again = kvm_verdict(guest_assets)
    assert again.source == SOURCE_PROCESS and again.works == verdict.works
    # A new process finds the verdict on disk instead of probing again.
    code = ("import json; from qemu.assets import prepare; from qemu.accel import kvm_verdict; "
            "v = kvm_verdict(prepare()); print(json.dumps([v.source, v.works]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert json.loads(out) == [SOURCE_DISK, verdict.works]  # read, not probed again
    # "auto" (the default) becomes the verdict on QEMU's command line.
    argv = qemu_command(guest_assets, GuestConfig(), tmp_path / "blk.sock", "console=ttyS0")
    assert argv[argv.index("-accel") + 1] == verdict.accel
    tcg = qemu_command(guest_assets, GuestConfig(accel="tcg"), tmp_path / "blk.sock", "")
    assert tcg[tcg.index("-accel") + 1] == "tcg"
