"""Storage behind vhost-user-blk: a raw image file or a RAM disk, both used through one fd.

The RAM disk is an anonymous memfd, so both backends share the same ``preadv``/``pwritev``/
``fallocate`` code path. I/O goes straight between the fd and guest-memory views (no copies).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Most iovecs one preadv/pwritev call takes (Linux UIO_MAXIOV).
IOV_MAX = 1024
# Zero buffer for writing zeroes where fallocate cannot.
ZERO_CHUNK = 1 << 20
_ZEROES = bytes(ZERO_CHUNK)
# fallocate errors meaning "this file system does not do that mode".
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


class DiskBusyError(ValueError):
    """A frontend starts rings on a disk another frontend's rings still run on."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with an explicit mode (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


class BlkBackend:
    """An open disk: ``fd`` (owned), ``size`` in bytes, ``readonly``. The device calls its
    ``readv``/``writev``/``flush``/``discard``/``write_zeroes`` and gets the result on return;
    an ``asynchronous`` backend (NbdBackend) instead takes ``submit_*`` operations that call
    ``done(ok)`` later, on the event loop (devices/blk_async.py)."""

    asynchronous = False

    def __init__(self, fd: int, size: int, readonly: bool, name: str) -> None:
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.name = name
        # Devices serving this disk (several sockets may share one, e.g. both ends of a live
        # migration on one host); the last one to close it closes the fd.
        self.users = 0
        # The frontend whose rings run on this disk, and how to ask whether they still do.
        self._owner: str | None = None
        self._owner_busy: Callable[[], bool] | None = None
        self._punch_ok = True
        self._zero_range_ok = True

    def __repr__(self) -> str:
        return f"BlkBackend({self.name!r}, size={self.size}, readonly={self.readonly})"

    # ---------------------------------------------------------------- data

    def readv(self, views: list[memoryview], offset: int, total: int) -> None:
        """Fill ``views`` (``total`` bytes) from ``offset``; loops over short reads."""
        done = os.preadv(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != total:
            self._loop(os.preadv, views, offset, total, done)

    def writev(self, views: list[memoryview], offset: int, total: int) -> None:
        """Write ``views`` (``total`` bytes) at ``offset``; loops over short writes."""
        done = os.pwritev(self.fd, views, offset) if len(views) <= IOV_MAX else 0
        if done != total:
            self._loop(os.pwritev, views, offset, total, done)

    def _loop(self, op, views: list[memoryview], offset: int, total: int, done: int) -> None:  # type: ignore[no-untyped-def]
        """Finish a transfer that the first call did not complete."""
        rest = _advance(views, done)
        while done < total:
            n = op(self.fd, rest[:IOV_MAX], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.name}: end of disk at offset {offset + done}")
            done += n
            rest = _advance(rest, n)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    # -------------------------------------------------------- deallocation

    def discard(self, offset: int, length: int) -> None:
        """Deallocate the range if the file system can; discard is a hint, so else nothing."""
        if self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._punch_ok = False

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        """Make the range read as zeroes; deallocate it only when ``may_unmap``."""
        if may_unmap and self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._punch_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._zero_range_ok = False  # e.g. tmpfs/memfd: write the zeroes instead
        zero = memoryview(_ZEROES)
        done = 0
        while done < length:
            n = os.pwrite(self.fd, zero[: min(ZERO_CHUNK, length - done)], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"{self.name}: short write at {offset + done}")
            done += n

    def claim(self, who: str, busy: Callable[[], bool]) -> None:
        """``who`` starts rings on this disk. Refused (DiskBusyError) while another frontend
        sharing it still has started rings or requests in flight: two guests writing one disk
        at once would tear each other's writes. ``busy`` tells whether ``who`` is still."""
        owner = self._owner
        if owner is not None and owner != who and self._owner_busy is not None \
                and self._owner_busy():
            raise DiskBusyError(
                f"disk {self.name} is in use by the frontend on {owner}; a second frontend "
                "may start its rings once the first has stopped them (GET_VRING_BASE)")
        self._owner, self._owner_busy = who, busy

    def close(self) -> None:
        """Make what was written durable (the guest may not have flushed), then close."""
        if self.fd >= 0:
            try:
                if not self.readonly:
                    self.flush()
            except OSError as exc:  # e.g. EIO from the disk: still close, but say so
                log.error("%s: flush at close failed: %s", self.name, exc)
            finally:
                os.close(self.fd)
                self.fd = -1


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after skipping ``n`` bytes."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out


def open_image(path: str, readonly: bool = False) -> BlkBackend:
    """A raw image file or block device (O_RDWR, or O_RDONLY when ``readonly``)."""
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)  # also right for block devices
    except OSError:
        os.close(fd)
        raise
    return BlkBackend(fd, size, readonly, path)


def ram_disk(size: int, readonly: bool = False) -> BlkBackend:
    """A zero-filled RAM disk of ``size`` bytes (an anonymous memfd)."""
    if size <= 0:
        raise ValueError(f"RAM disk size must be positive, not {size}")
    fd = os.memfd_create("vhostmem-blk-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        raise
    return BlkBackend(fd, size, readonly, f"ram:{size}")
