"""Real boots: a Linux guest drives a vhost-user-blk disk served by each backend in BACKENDS."""

from __future__ import annotations

import re

import pytest

from qemu.accel import kvm_verdict
from qemu.assets import GuestAssets
from qemu.backends import RAM, Backend, vhostmem_backend
from qemu.launch import GuestConfig, GuestResult, run_guest
from qemu.vhost_tap import ring_lifecycle
from tests.qemu.conftest import BACKENDS

pytestmark = pytest.mark.qemu
QUEUE_COUNT = re.compile(r"req\.(\d+)=\+(\d+)")


def boot(backend: Backend, assets: GuestAssets, **settings: object) -> GuestResult:
    result = run_guest(backend, GuestConfig(**settings), assets=assets)  # type: ignore[arg-type]
    assert result.passed, result.report()
    # Every boot runs on the accelerator the (cached) KVM probe chose.
    assert result.accel == kvm_verdict(assets).accel, result.report()
    return result


def check(result: GuestResult, name: str) -> str:
    matches = [c for c in result.checks if c.name == name]
    assert len(matches) == 1, f"{name}: {matches}\n{result.report()}"
    assert matches[0].passed
    return matches[0].detail


def queue_interrupts(result: GuestResult) -> dict[int, int]:
    """Completion interrupts per virtqueue during the pinned queue-coverage readers."""
    return {int(q): int(n) for q, n in QUEUE_COUNT.findall(check(result, "queues-used"))}


def test_one_queue_after_seabios(backend: Backend, guest_assets: GuestAssets) -> None:
    """SeaBIOS drives the disk first, then Linux resets the device and drives it again: the
    vhost-user tap between QEMU and the backend must see ring 0 started (SET_VRING_KICK),
    stopped (GET_VRING_BASE, answered by the backend) and started again on one connection."""
    result = boot(backend, guest_assets, trace_vhost_user=True)
    assert "SeaBIOS" in result.serial_log
    assert check(result, "boot.queues") == "value=1"
    assert "connection 1 of 1, ring 0" in check(result, "host.vhost-user-ring-restart")
    assert ring_lifecycle(result.vhost_user, 1, 0)[:3] == ["start", "stop", "start"]
    first_stop = next(m for m in result.vhost_user if m.name == "GET_VRING_BASE" and m.is_reply)
    assert first_stop.num and first_stop.num > 0, "SeaBIOS put no request on the ring"
    counts = queue_interrupts(result)
    assert list(counts) == [0] and counts[0] > 0, counts
    assert "storage=file" in check(result, "host.storage")
    assert "image matches" in check(result, "host.image")
    check(result, "host.r1.md5")


def test_two_queues_two_cpus(backend: Backend, guest_assets: GuestAssets) -> None:
    result = boot(backend, guest_assets, num_queues=2, smp=2, rounds=2)
    assert check(result, "boot.queues") == "value=2"
    # A reader pinned to each vCPU; both virtqueues then completed requests.
    assert check(result, "queues-used").startswith("value=2 ")
    counts = queue_interrupts(result)
    assert sorted(counts) == [0, 1] and all(n > 0 for n in counts.values()), counts
    check(result, "r2.pattern-read")
    check(result, "host.r2.md5")


def _ram_case_id(backend: Backend) -> str:
    return f"{backend.name}-{'own-ram-disk' if backend.ram_disk else 'image-on-dev-shm'}"


@pytest.mark.parametrize("ram_backend", BACKENDS, ids=_ram_case_id)
def test_ram_backed_disk(ram_backend: Backend, guest_assets: GuestAssets) -> None:
    """vhostmem serves its own RAM disk (serve --ram-size, no image file); qemu-storage-daemon
    serves an image on /dev/shm. The guest's checks and the digest comparison apply to both;
    the image comparison applies only where there is an image."""
    result = boot(ram_backend, guest_assets, storage=RAM)
    storage = check(result, "host.storage")
    check(result, "host.r1.md5")
    check(result, "r1.pattern-read")
    if ram_backend.ram_disk:
        assert "--ram-size" in result.backend_argv and "--disk" not in result.backend_argv
        assert "/memfd:" in storage and "want memory only" in storage
        assert "host.image" not in {c.name for c in result.checks}
        assert [name for name, _ in result.not_applicable] == ["host.image"]
        assert "N/A host.image" in result.report()
    else:
        assert any(word.startswith("filename=/dev/shm/") for word in
                   ",".join(result.backend_argv).split(","))
        assert "on tmpfs (/dev/shm)" in storage
        assert "image matches" in check(result, "host.image")
        assert not result.not_applicable


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


VHOSTMEM = next(b for b in BACKENDS if b.name == "vhostmem")


def test_two_queues_in_two_workers(guest_assets: GuestAssets) -> None:
    """vhostmem --workers 2: each of the guest's two queues is served by its own worker
    process (SeaBIOS's start/stop/start of ring 0 included) and the disk passes every check."""
    result = boot(vhostmem_backend(workers=2), guest_assets, num_queues=2, smp=2)
    assert check(result, "boot.queues") == "value=2"
    counts = queue_interrupts(result)
    assert sorted(counts) == [0, 1] and all(n > 0 for n in counts.values()), counts
    for ring, slot in ((0, 0), (1, 1)):
        assert f"ring {ring} started in data-plane worker {slot}" in result.backend_log
    assert "lost" not in result.backend_log
    assert "image matches" in check(result, "host.image")
    check(result, "host.r1.md5")


@pytest.mark.parametrize("queues", [1, 2], ids=["vhostmem-1-queue", "vhostmem-2-queues"])
def test_packed_rings(guest_assets: GuestAssets, queues: int) -> None:
    """vhost-user-blk-pci packed=on: the guest's virtio device negotiated VIRTIO_F_RING_PACKED
    (sysfs features bit 34) and its disk passes every check on packed rings. vhostmem only:
    qemu-storage-daemon's vhost-user library has no packed layout."""
    result = boot(VHOSTMEM, guest_assets, num_queues=queues, smp=queues, packed=True)
    assert check(result, "boot.ring-packed") == "value=1"
    assert check(result, "boot.queues") == f"value={queues}"
    counts = queue_interrupts(result)
    assert sorted(counts) == list(range(queues)) and all(n > 0 for n in counts.values()), counts
    assert "image matches" in check(result, "host.image")
    check(result, "host.r1.md5")
