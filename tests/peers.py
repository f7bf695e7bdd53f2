"""Real vhost-user peers for tests: qemu-storage-daemon exporting a raw image as vhost-user-blk.

`start_qsd(image_path, socket_path, num_queues=1, readonly=False) -> QsdHandle`; `handle.stop()`
ends the daemon (SIGTERM, then SIGKILL) and removes the socket.  Other suites use it through the
`qsd` fixture factory in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

QSD_BINARY = "qemu-storage-daemon"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02
QSD_SERIAL = b"vhost_user_blk"  # what qemu-storage-daemon's vhost-user-blk answers to GET_ID


class PeerError(RuntimeError):
    """A peer process failed to start."""


@dataclass
class QsdHandle:
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
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(qsd_command(image_path, socket_path, num_queues, readonly),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    handle = QsdHandle(proc, image_path, socket_path, num_queues, readonly, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not os.path.exists(socket_path):
        if not handle.alive() or time.monotonic() > deadline:
            handle.stop()
            raise PeerError(f"qemu-storage-daemon did not open {socket_path}: {handle.log()}")
        time.sleep(POLL_INTERVAL)
    return handle


def make_image(path: str, size: int, pattern: bool = True) -> bytes:
    """Create a raw image of `size` bytes; with `pattern`, fill it with non-repeating bytes so
    every offset is recognisable. Returns the contents."""
    data = os.urandom(size) if pattern else bytes(size)
    with open(path, "wb") as f:
        f.write(data)
    return data
