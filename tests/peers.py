"""Real vhost-user peers for tests, each serving a raw image as vhost-user-blk.

`start_qsd(image_path, socket_path, num_queues=1, readonly=False) -> QsdHandle` runs
qemu-storage-daemon; `start_vhostmem(image_path, socket_path, num_queues=1, readonly=False,
serial=VHOSTMEM_SERIAL) -> VhostmemHandle` runs `vhostmem serve` (this tree's code, as a
subprocess); `start_vhostmem_nbd(...)` (same arguments) runs `vhostmem serve --blk ...,nbd=`
on nbdkit's file plugin serving the image.  The handles offer `.alive()`, `.log()` and
`.stop()` (SIGTERM, then SIGKILL; the socket is removed; an NBD server is stopped after
vhostmem).  Other suites use them through the `qsd` and `blk_peer` fixtures in
tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.nbd.servers import start_nbdkit, unix_uri
from tests.nbd.servers import stop as stop_server

QSD_BINARY = "qemu-storage-daemon"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so `-m vhostmem.cli` imports
QSD_SERIAL = b"vhost_user_blk"  # what qemu-storage-daemon's vhost-user-blk answers to GET_ID
VHOSTMEM_SERIAL = "vhostmem-conformance"  # 20 bytes: fills the whole GET_ID buffer


class PeerError(RuntimeError):
    """A peer process failed to start."""


@dataclass
class PeerHandle:
    """A running backend process serving `image_path` on `socket_path`."""

    proc: subprocess.Popen[bytes]
    image_path: str
    socket_path: str
    num_queues: int
    readonly: bool
    log_path: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


class QsdHandle(PeerHandle):
    """qemu-storage-daemon."""


class VhostmemHandle(PeerHandle):
    """`vhostmem serve`."""


class VhostmemNbdHandle(PeerHandle):
    """`vhostmem serve` on an NBD export of the image; `server` is the NBD server process."""

    server: subprocess.Popen[bytes]

    def stop(self) -> None:
        try:
            super().stop()  # vhostmem first: it flushes the export and disconnects
        finally:
            stop_server(self.server)


def _wait_for_socket(handle: PeerHandle, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not os.path.exists(handle.socket_path):
        if not handle.alive() or time.monotonic() > deadline:
            handle.stop()
            raise PeerError(f"{what} did not open {handle.socket_path}: {handle.log()}")
        time.sleep(POLL_INTERVAL)


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)


def qsd_available() -> bool:
    return shutil.which(QSD_BINARY) is not None


def qsd_command(image_path: str, socket_path: str, num_queues: int = 1,
                readonly: bool = False) -> list[str]:
    writable = "off" if readonly else "on"
    ro = ",read-only=on" if readonly else ""
    # discard=unmap: discards punch holes in the image, so tests can see them as zeroes.
    return [
        QSD_BINARY,
        "--blockdev", f"driver=file,node-name=f,filename={image_path},cache.direct=off,"
        f"discard=unmap{ro}",
        "--blockdev", f"driver=raw,node-name=d,file=f,discard=unmap{ro}",
        "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
        f"addr.path={socket_path},writable={writable},num-queues={num_queues}",
    ]


def start_qsd(image_path: str, socket_path: str, num_queues: int = 1,
              readonly: bool = False) -> QsdHandle:
    """Start qemu-storage-daemon and wait until its vhost-user socket exists."""
    log_path = socket_path + ".log"
    proc = _spawn(qsd_command(image_path, socket_path, num_queues, readonly), log_path)
    handle = QsdHandle(proc, image_path, socket_path, num_queues, readonly, log_path)
    _wait_for_socket(handle, "qemu-storage-daemon")
    return handle


# `VHOSTMEM_TEST_WORKERS=N`: every vhostmem peer serves its rings in N data-plane worker
# processes (the suites in both modes: docs/architecture.md, "Data plane").
TEST_WORKERS = int(os.environ.get("VHOSTMEM_TEST_WORKERS", "0"))


def vhostmem_command(image_path: str, socket_path: str, num_queues: int = 1,
                     readonly: bool = False, serial: str = VHOSTMEM_SERIAL,
                     workers: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", socket_path,
            "--disk", image_path, "--num-queues", str(num_queues), "--serial", serial]
    workers = TEST_WORKERS if workers is None else workers
    if workers:
        argv += ["--workers", str(workers)]
    return [*argv, "--readonly"] if readonly else argv


def start_vhostmem(image_path: str, socket_path: str, num_queues: int = 1,
                   readonly: bool = False, serial: str = VHOSTMEM_SERIAL,
                   workers: int | None = None) -> VhostmemHandle:
    """Start `vhostmem serve` on the image and wait until its vhost-user socket exists."""
    log_path = socket_path + ".log"
    argv = vhostmem_command(image_path, socket_path, num_queues, readonly, serial, workers)
    handle = VhostmemHandle(_spawn(argv, log_path), image_path, socket_path, num_queues,
                            readonly, log_path)
    _wait_for_socket(handle, "vhostmem serve")
    return handle


def make_image(path: str, size: int, pattern: bool = True) -> bytes:
    """Create a raw image of `size` bytes; with `pattern`, fill it with non-repeating bytes so
    every offset is recognisable. Returns the contents."""
    data = os.urandom(size) if pattern else bytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def vhostmem_nbd_spec(socket_path: str, uri: str, num_queues: int = 1,
                      readonly: bool = False, serial: str = VHOSTMEM_SERIAL) -> str:
    spec = f"socket={socket_path},nbd={uri},num-queues={num_queues},serial={serial}"
    return spec + ",readonly=on" if readonly else spec


def start_vhostmem_nbd(image_path: str, socket_path: str, num_queues: int = 1,
                       readonly: bool = False,
                       serial: str = VHOSTMEM_SERIAL) -> VhostmemNbdHandle:
    """nbdkit's file plugin serving the image (writable: `readonly` is vhostmem's own
    `readonly=on`, so a write it let through would show in the image), and `vhostmem serve`
    on that export. The file plugin punches holes for NBD_CMD_TRIM and zeroes ranges for
    NBD_CMD_WRITE_ZEROES, on the image file the tests read. Never with data-plane workers
    (`VHOSTMEM_TEST_WORKERS`): an NBD device runs on the event loop (workers= is refused)."""
    nbd_sock = Path(socket_path + ".nbd")
    server = start_nbdkit(nbd_sock, "file", image_path)
    spec = vhostmem_nbd_spec(socket_path, unix_uri(nbd_sock), num_queues, readonly, serial)
    log_path = socket_path + ".log"
    argv = [sys.executable, "-m", "vhostmem.cli", "serve", "--blk", spec]
    try:
        proc = _spawn(argv, log_path)
    except BaseException:
        stop_server(server)
        raise
    handle = VhostmemNbdHandle(proc, image_path, socket_path, num_queues, readonly, log_path)
    handle.server = server
    _wait_for_socket(handle, "vhostmem serve (NBD)")
    return handle
