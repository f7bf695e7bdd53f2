"""Host-side checks of a guest boot: what the guest must report, and what the host verifies.

The guest (qemu/guest/vmtest.c) reports its own checks; these are the host's: the image file
byte for byte against a model of what the guest wrote, the md5 the guest read back against the
model, that every expected check was reported, and that the disk lives where the storage choice
promised (a disk file system, a RAM file system, or the backend's own memory).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from qemu.backends import RAM, Backend
from qemu.guestlog import Check, GuestLog
from qemu.hotplug import EXPECTED_HOST_CHECKS
from qemu.pattern import DiskLayout, expected_image, first_difference, md5_hex, pattern

if TYPE_CHECKING:
    from qemu.launch import GuestConfig

BOOT_CHECKS = ("boot.disk", "boot.sysfs-size", "boot.sysfs-lbs", "boot.sysfs-ro", "boot.queues")
RW_ROUND_CHECKS = ("ioctl-geometry", "pattern-write", "flush", "pattern-read", "last-sector",
                   "discard", "write-zeroes", "flush-final", "read-past-end", "write-past-end")
RO_ROUND_CHECKS = ("ioctl-geometry", "readonly-reject", "pattern-read", "read-past-end")
HOTPLUG_GUEST_CHECKS = ("hotplug-online", "r2.hotplug-buffer", "hotunplug-offline")
# The guest's virtio device has VIRTIO_F_RING_PACKED (bit 34 of sysfs features) when asked.
PACKED_CHECK = "boot.ring-packed"
FINAL_CHECKS = ("queues-used",)  # after the rounds: every hardware queue carried I/O
RAM_FSTYPES = ("tmpfs", "ramfs")


def expected_check_names(config: GuestConfig) -> list[str]:
    per_round = RO_ROUND_CHECKS if config.readonly else RW_ROUND_CHECKS
    names = list(BOOT_CHECKS)
    if config.packed:
        names.append(PACKED_CHECK)
    for r in range(1, config.round_count + 1):
        names += [f"r{r}.{name}" for name in per_round]
    if config.hotplug:
        names += [*HOTPLUG_GUEST_CHECKS, *EXPECTED_HOST_CHECKS]
    return names + list(FINAL_CHECKS)


def make_image(path: Path, config: GuestConfig, layout: DiskLayout) -> None:
    with path.open("wb") as f:
        if config.readonly:
            f.write(pattern(config.seed, layout.size))
        else:
            f.truncate(layout.size)


def image_model(config: GuestConfig, layout: DiskLayout, backend: Backend, round_number: int,
                 actual: bytes | None) -> bytes | None:
    """What the disk holds after the round; None if that is unknowable (a discarded range
    with unspecified contents and no image to read them from)."""
    if config.readonly:
        return pattern(config.seed, layout.size)
    seed = config.round_seed(round_number)
    model = expected_image(layout, seed, discard_zeroes=backend.discard_zeroes)
    if not backend.discard_zeroes:  # unspecified contents: take them from the real image
        if actual is None:
            return None
        r = layout.discard
        model[r.offset : r.offset + r.length] = actual[r.offset : r.offset + r.length]
    return bytes(model)


def host_checks(log: GuestLog, reported: list[Check], config: GuestConfig, layout: DiskLayout,
                 backend: Backend, image: Path | None,
                 not_applicable: list[tuple[str, str]]) -> list[Check]:
    """Image, digest and completeness checks; what cannot apply goes to ``not_applicable``."""
    actual = image.read_bytes() if image is not None else None
    final = config.round_count
    model = image_model(config, layout, backend, final, actual)
    checks = []
    if actual is None:
        not_applicable.append(("host.image", f"{backend.name} serves its own RAM disk: there is "
                               "no image file on the host to compare with the guest's writes"))
    else:
        assert model is not None
        diff = first_difference(actual, model)
        checks.append(Check("host.image", diff is None,
                            "image matches the guest's writes" if diff is None
                            else f"first difference at byte {diff}"))
    for r in range(1, final + 1):
        # Digests of earlier rounds are predictable only if discarded ranges read as zeroes.
        if r != final and not backend.discard_zeroes:
            continue
        want_image = model if r == final else image_model(config, layout, backend, r, actual)
        if want_image is None:
            not_applicable.append((f"host.r{r}.md5", "the discarded range's contents are "
                                   "unspecified and there is no image to read them from"))
            continue
        want = md5_hex(want_image)
        got = log.digests.get(f"r{r}")
        checks.append(Check(f"host.r{r}.md5", got == want, f"guest={got} host={want}"))
    seen = {c.name for c in reported}
    missing = [n for n in expected_check_names(config) if n not in seen]
    checks.append(Check("host.all-checks-reported", not missing, f"missing: {missing}"
                        if missing else f"{len(seen)} checks"))
    return checks


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) of the mount holding ``path``."""
    target, best = os.path.realpath(path), ("/", "?")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")  # \040 for a space, etc.
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def is_ram_backed(path: Path) -> bool:
    return mount_of(path)[1] in RAM_FSTYPES


def open_files_of_size(pid: int, size: int) -> list[tuple[str, str]]:
    """(target, file system type or "memfd") of each regular file of exactly ``size`` bytes
    that process ``pid`` holds open."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target, info = os.readlink(fd), fd.stat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            continue
        path = target.removesuffix(" (deleted)")
        fstype = "memfd" if path.startswith("/memfd:") else mount_of(Path(path))[1]
        found.append((target, fstype))
    return found


def own_ram_check(pid: int, size: int) -> Check:
    """A backend serving its own RAM disk holds the disk in memory, not in a disk file."""
    files = open_files_of_size(pid, size)
    in_ram = bool(files) and all(t in ("memfd", *RAM_FSTYPES) for _, t in files)
    listed = ", ".join(f"{target} ({fstype})" for target, fstype in files) or "none"
    return Check("host.storage", in_ram, f"storage=ram, the backend's own RAM disk: files of "
                 f"{size} bytes open in the backend: {listed}; want memory only")


def storage_check(image: Path, storage: str) -> Check:
    """The image lies on the kind of file system the storage choice promises."""
    point, fstype = mount_of(image)
    ram = fstype in RAM_FSTYPES
    want = "a RAM file system" if storage == RAM else "a disk file system"
    return Check("host.storage", ram == (storage == RAM),
                 f"storage={storage}: image {image} on {fstype} ({point}); want {want}")
