"""A real slow disk for the isolation tests: a FUSE file system (fusepy over libfuse2) holding
one raw image, ``disk.img``, whose reads inside the first ``--slow-bytes`` take ``--delay``
seconds each. Other reads are answered at once; every sector reads as its sector number
modulo 251 (`pattern`), writes are accepted and dropped. The file is opened with direct_io, so
no read is served from the page cache: every read of the slow zone is slow.

Run as ``python -m tests.hostile.slowfs MOUNTPOINT [--delay S] [--slow-bytes N]`` (root, with
/dev/fuse); it prints ``slow-read OFFSET SIZE`` on stdout when a slow read starts and
``slow-done OFFSET T`` just before it is answered (T: time.monotonic(), the clock all processes
share), so a test knows its requests are really in flight, and when their data came; and
``fsync D`` for each fsync (D: 1 for fdatasync) that reaches it.
`SlowDisk` starts it as a subprocess and unmounts it again.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

IMAGE = "disk.img"
IMAGE_SIZE = 16 << 20
SECTOR = 512
PATTERN_MOD = 251
MOUNT_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL = 0.01
MNT_DETACH = 2


def pattern(offset: int, size: int) -> bytes:
    """What ``size`` bytes at ``offset`` of the image hold."""
    first, last = offset // SECTOR, (offset + size + SECTOR - 1) // SECTOR
    data = b"".join(bytes([s % PATTERN_MOD]) * SECTOR for s in range(first, last))
    start = offset - first * SECTOR
    return data[start : start + size]


def serve(mountpoint: str, delay: float, slow_bytes: int) -> None:
    from fuse import FUSE, FuseOSError, Operations  # fusepy: the `test` extra

    out_lock = threading.Lock()

    def say(line: str) -> None:
        with out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    class SlowImage(Operations):  # type: ignore[misc]
        def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            if path == "/" + IMAGE:
                return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": IMAGE_SIZE}
            raise FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", IMAGE]

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            size = max(0, min(size, IMAGE_SIZE - offset))
            if offset < slow_bytes:
                say(f"slow-read {offset} {size}")
                time.sleep(delay)
                say(f"slow-done {offset} {time.monotonic()}")
            return pattern(offset, size)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            say(f"fsync {datasync}")
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

    FUSE(SlowImage(), mountpoint, foreground=True, nothreads=False, direct_io=True)


class SlowDisk:
    """The slow file system mounted at ``mountpoint`` by a child process; ``path`` is the
    image. ``slow_reads_started`` counts the slow reads the file system has begun."""

    def __init__(self, mountpoint: Path, delay: float, slow_bytes: int) -> None:
        self.mountpoint = mountpoint
        self.path = str(mountpoint / IMAGE)
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile.slowfs", str(mountpoint),
             "--delay", str(delay), "--slow-bytes", str(slow_bytes)],
            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self._cond = threading.Condition()
        self.started = 0
        self.done = 0
        self.done_at: list[float] = []  # CLOCK_MONOTONIC when each answer left the file system
        self.fsyncs = 0  # fsync/fdatasync calls on the image that reached the file system
        self._reader = threading.Thread(target=self._read_events, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not (os.path.ismount(mountpoint) and os.path.exists(self.path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the slow FUSE file system did not mount: {self.stderr()}")
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the slow FUSE file system did not mount in "
                                   f"{MOUNT_TIMEOUT}s: {self.stderr()}")
            time.sleep(POLL)

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                if line.startswith("slow-read "):
                    self.started += 1
                elif line.startswith("slow-done "):
                    self.done += 1
                    self.done_at.append(float(line.split()[2]))
                elif line.startswith("fsync "):
                    self.fsyncs += 1
                self._cond.notify_all()

    def wait_started(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` slow reads have begun; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.started >= n, timeout)

    def wait_done(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` slow reads have been answered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done >= n, timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def close(self) -> None:
        """Detach the mount (a process still holding the image gets ENOTCONN, never a hang)
        and stop the file system."""
        # Unconditionally: a mount whose daemon died is no longer reported by ismount.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(self.mountpoint).encode(), MNT_DETACH)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--delay", type=float, default=3.0, help="seconds per slow read")
    parser.add_argument("--slow-bytes", type=int, default=1 << 20,
                        help="reads starting below this offset are slow")
    args = parser.parse_args()
    serve(args.mountpoint, args.delay, args.slow_bytes)


if __name__ == "__main__":
    main()
