"""Real boots: a Linux guest drives a vhost-user-blk disk served by each backend in BACKENDS."""

from __future__ import annotations

import pytest

from qemu.assets import GuestAssets
from qemu.backends import Backend
from qemu.launch import GuestConfig, GuestResult, run_guest

pytestmark = pytest.mark.qemu


def boot(backend: Backend, assets: GuestAssets, **settings: object) -> GuestResult:
    result = run_guest(backend, GuestConfig(**settings), assets=assets)  # type: ignore[arg-type]
    assert result.passed, result.report()
    return result


def check(result: GuestResult, name: str) -> str:
    matches = [c for c in result.checks if c.name == name]
    assert len(matches) == 1, f"{name}: {matches}\n{result.report()}"
    assert matches[0].passed
    return matches[0].detail


def test_one_queue_after_seabios(backend: Backend, guest_assets: GuestAssets) -> None:
    result = boot(backend, guest_assets)
    # SeaBIOS probes the disk through the backend before Linux does.
    assert "SeaBIOS" in result.serial_log
    assert check(result, "boot.queues") == "value=1"
    assert "image matches" in check(result, "host.image")
    check(result, "host.r1.md5")


def test_two_queues_two_cpus(backend: Backend, guest_assets: GuestAssets) -> None:
    result = boot(backend, guest_assets, num_queues=2, smp=2, rounds=2)
    assert check(result, "boot.queues") == "value=2"
    check(result, "r2.pattern-read")
    check(result, "host.r2.md5")


def test_readonly_disk_rejects_writes(backend: Backend, guest_assets: GuestAssets) -> None:
    result = boot(backend, guest_assets, readonly=True)
    assert check(result, "boot.sysfs-ro") == "value=1"
    assert "write=-1" in check(result, "r1.readonly-reject")
    assert "image matches" in check(result, "host.image")


def test_memory_hotplug_and_unplug(backend: Backend, guest_assets: GuestAssets) -> None:
    result = boot(backend, guest_assets, hotplug=True)
    check(result, "hotplug-online")
    check(result, "host.hotplug-backend-maps-dimm")
    # The post-plug round's I/O buffers lived in the DIMM: the backend had to translate them.
    assert "in-hotplugged-memory=0" not in check(result, "r2.hotplug-buffer")
    check(result, "hotunplug-offline")
    check(result, "host.hotunplug-backend-unmaps-dimm")
    for r in (1, 2, 3):
        check(result, f"r{r}.pattern-read")
        check(result, f"host.r{r}.md5")
