"""Backends the harness can put behind the guest's vhost-user-blk device.

A backend is any command line that serves a vhost-user-blk socket for a disk image. Adding one
to the QEMU test suite is one entry in ``tests/qemu/conftest.py``'s backend list, e.g.::

    BACKENDS = [qsd_backend(), vhostmem_backend()]

Backend-specific checks after memory hot-plug go into an ``on_hotplug`` hook (see
``HotplugHook``); the harness already checks generically that the backend process maps the new
DIMM after the plug and unmaps it after the unplug.

Storage: a request is file-backed (``storage="file"``: an image file on a disk file system) or
RAM-backed (``storage="ram"``). For a RAM-backed disk a backend with ``ram_disk=True`` (vhostmem:
``serve --ram-size``) serves its own RAM disk and gets ``disk=None``; any other backend gets an
image file on a RAM file system (``/dev/shm``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qemu.guestlog import Check

ROOT = Path(__file__).resolve().parent.parent
VHOSTMEM_BIN = ROOT / ".venv" / "bin" / "vhostmem"
PLUGGED, UNPLUGGED = "plugged", "unplugged"
FILE, RAM = "file", "ram"
STORAGES = (FILE, RAM)


@dataclass(frozen=True)
class BackendRequest:
    """What the harness asks a backend to serve."""

    socket: Path
    disk: Path | None  # None: serve a RAM disk of ``size`` bytes of your own (Backend.ram_disk)
    readonly: bool
    num_queues: int
    size: int = 0  # the disk's size in bytes
    storage: str = FILE  # FILE or RAM (see the module docstring)

    def image(self) -> Path:
        """The image path, for backends that always serve an image file."""
        if self.disk is None:
            raise ValueError(f"this backend needs an image file (storage={self.storage!r})")
        return self.disk


@dataclass(frozen=True)
class HotplugEvent:
    """Handed to a backend's hook after a DIMM was plugged or unplugged."""

    phase: str  # PLUGGED or UNPLUGGED
    backend_pid: int
    dimm_size: int
    backend_log: Path


HotplugHook = Callable[[HotplugEvent], list[Check]]


def no_hotplug_checks(event: HotplugEvent) -> list[Check]:
    """The default hook: the generic mapping checks are all a backend gets."""
    del event
    return []


@dataclass(frozen=True)
class Backend:
    """A pluggable vhost-user-blk backend: a name, a command line, and what it promises."""

    name: str
    command: Callable[[BackendRequest], list[str]]
    # The guest reads zeroes back after a discard (true for a file with hole punching).
    discard_zeroes: bool = True
    block_size: int = 512
    on_hotplug: HotplugHook = no_hotplug_checks
    # Serves storage="ram" from its own memory (request.disk is None); if false the harness
    # puts the image on a RAM file system instead.
    ram_disk: bool = False

    def argv(self, request: BackendRequest) -> list[str]:
        return self.command(request)


def _qsd_command(req: BackendRequest) -> list[str]:
    # discard=unmap on both nodes: guest discards punch holes in the image, which then reads 0.
    return [
        shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,node-name=file0,filename={req.image()},discard=unmap,"
        f"read-only={_onoff(req.readonly)}",
        "--blockdev",
        f"driver=raw,node-name=disk0,file=file0,discard=unmap,read-only={_onoff(req.readonly)}",
        "--export",
        "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,"
        f"addr.path={req.socket},writable={_onoff(not req.readonly)},num-queues={req.num_queues}",
    ]


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def qsd_backend() -> Backend:
    """qemu-storage-daemon exporting the image as vhost-user-blk (a RAM-backed disk is an
    image on /dev/shm)."""
    return Backend(name="qsd", command=_qsd_command)


def vhostmem_backend(
    executable: Path = VHOSTMEM_BIN, on_hotplug: HotplugHook = no_hotplug_checks,
    extra: tuple[str, ...] = (), workers: int = 0,
) -> Backend:
    """``vhostmem serve`` on the image, or on its own RAM disk (``--ram-size``) for
    storage="ram"; pass ``on_hotplug`` for registration assertions, ``extra`` for more
    arguments (e.g. ``("--io-mode", "thread")``); ``workers``: the rings run in that many
    data-plane worker processes (``--workers``)."""

    def command(req: BackendRequest) -> list[str]:
        argv = [str(executable), "serve", "--socket", str(req.socket)]
        if req.disk is None:
            argv += ["--ram-size", str(req.size)]
        else:
            argv += ["--disk", str(req.disk)]
        if req.readonly:
            argv.append("--readonly")
        if workers:
            argv += ["--workers", str(workers)]
        return [*argv, "--num-queues", str(req.num_queues), *extra]

    return Backend(name="vhostmem", command=command, on_hotplug=on_hotplug, ram_disk=True)


def command_backend(name: str, template: str, *, discard_zeroes: bool = True) -> Backend:
    """Any command line; ``{socket}``, ``{disk}``, ``{size}`` (bytes), ``{num_queues}`` and
    ``{readonly}`` ("on"/"off") are substituted, e.g. ``"mybackend --sock {socket} --img {disk}"``.
    """

    def command(req: BackendRequest) -> list[str]:
        values = {
            "socket": str(req.socket),
            "disk": str(req.image()),
            "size": str(req.size),
            "num_queues": str(req.num_queues),
            "readonly": _onoff(req.readonly),
        }
        return [word.format(**values) for word in template.split()]

    return Backend(name=name, command=command, discard_zeroes=discard_zeroes)


BACKEND_FACTORIES: dict[str, Callable[[], Backend]] = {
    "qsd": qsd_backend,
    "vhostmem": vhostmem_backend,
}
