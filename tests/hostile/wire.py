"""Raw vhost-user request bytes, built with struct so that anything can be said (wrong sizes,
counts, indexes), and a raw connection that sends them with real fds."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import Framer, FrontendRequest, ProtocolError

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<II4Q")
REGION = struct.Struct("<4Q")
TABLE_HEAD = struct.Struct("<II")
CONFIG_HEAD = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")  # mmap_size, mmap_offset, num_queues, queue_size
VERSION = 0x1
REPLY = 0x4
NEED_REPLY = 0x8
VRING_NOFD = 1 << 8
RECV_BYTES = 1 << 16
RECV_FDS = 16
REPLY_WAIT = 0.5
EMPTY_REPLY = -1  # a reply without payload (GET_CONFIG's error)

R = FrontendRequest


def message(request: int, payload: bytes = b"", flags: int = VERSION | NEED_REPLY) -> bytes:
    return HDR.pack(request, flags, len(payload)) + payload


def u64(request: int, value: int, flags: int = VERSION | NEED_REPLY) -> bytes:
    return message(request, U64.pack(value & (2**64 - 1)), flags)


def vring_state(request: int, index: int, num: int) -> bytes:
    return message(request, VRING_STATE.pack(index, num))


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0,
               log: int = 0) -> bytes:
    return message(R.SET_VRING_ADDR, VRING_ADDR.pack(index, flags, desc, used, avail, log))


def log_base(mmap_size: int, mmap_offset: int = 0) -> bytes:
    """SET_LOG_BASE (LOG_SHMFD): its own u64 reply, no REPLY_ACK, so no NEED_REPLY."""
    return message(R.SET_LOG_BASE, struct.pack("<QQ", mmap_size, mmap_offset), flags=VERSION)


def vring_file(request: int, index: int, nofd: bool = False) -> bytes:
    return u64(request, index | (VRING_NOFD if nofd else 0))


def region(gpa: int, size: int, uaddr: int, offset: int) -> bytes:
    return REGION.pack(gpa, size, uaddr, offset)


def mem_table(regions: Sequence[bytes], nregions: int | None = None) -> bytes:
    n = len(regions) if nregions is None else nregions
    return message(R.SET_MEM_TABLE, TABLE_HEAD.pack(n, 0) + b"".join(regions))


def single_region(request: int, reg: bytes) -> bytes:
    return message(request, U64.pack(0) + reg)


def config(request: int, offset: int, size: int, data: bytes = b"") -> bytes:
    return message(request, CONFIG_HEAD.pack(offset, size, 0) + data)


def inflight(request: int, mmap_size: int, num_queues: int, queue_size: int,
             mmap_offset: int = 0) -> bytes:
    return message(request, INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size))


def hugetlb_beyond_pool() -> int:
    """A hugetlb size one page larger than the free pages of the default pool."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return (int(info["HugePages_Free"]) + 1) * (int(info["Hugepagesize"].split()[0]) << 10)


@dataclass
class Fds:
    """Kinds of fds to attach: ``eventfd``, ``memfd`` and ``sealed-memfd`` (of ``memfd_size``
    bytes; sealed against resizing), ``hugetlb`` (a sealed MFD_HUGETLB memfd of
    ``memfd_size``), and fds of the wrong kind: ``pipe``, ``file`` (regular), ``socket``."""

    kinds: list[str] = field(default_factory=list)
    memfd_size: int = 2 << 20

    def create(self) -> list[int]:
        return [self._one(kind) for kind in self.kinds]

    def _one(self, kind: str) -> int:
        if kind in ("memfd", "sealed-memfd", "hugetlb"):
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            fd = os.memfd_create("hostile-msg", flags | (os.MFD_HUGETLB if kind == "hugetlb"
                                                         else 0))
            os.ftruncate(fd, self.memfd_size)
            if kind != "memfd":
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            return fd
        if kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            return r
        if kind == "file":
            with tempfile.TemporaryFile() as f:
                return os.dup(f.fileno())
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        return os.eventfd(0, os.EFD_CLOEXEC)


def _reply_value(payload: object) -> int:
    if payload is None:
        return EMPTY_REPLY
    return payload if isinstance(payload, int) else 0


class RawConnection:
    """A frontend socket that sends bytes as given and collects whatever comes back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(REPLY_WAIT)
        self.sock.connect(path)
        self.framer = Framer(sender="backend")
        self.closed_by_peer = False
        # Replies that arrived in the same read as an earlier one, handed out in order.
        self.pending: list[int] = []

    def send(self, data: bytes, fds: Fds | None = None) -> bool:
        """Send one message (fds ride with it); False once the server hung up."""
        made = fds.create() if fds else []
        try:
            if made:
                socket.send_fds(self.sock, [data], made)
            else:
                self.sock.sendall(data)
            return True
        except OSError:
            self.closed_by_peer = True
            return False
        finally:
            for fd in made:
                os.close(fd)

    def reply(self) -> int | None:
        """The next reply's u64 (an ACK status or a value), 0 for a struct, EMPTY_REPLY for an
        empty payload; None on hang-up or silence."""
        while not self.pending:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, RECV_BYTES, RECV_FDS)
            except (TimeoutError, OSError):
                return None
            for fd in fds:
                os.close(fd)
            if not data:
                self.closed_by_peer = True
                return None
            try:
                msgs = self.framer.feed(data)
            except ProtocolError:
                return None
            self.pending = [_reply_value(m.payload) for m in msgs]
        return self.pending.pop(0)

    def close(self) -> None:
        self.framer.close()
        with contextlib.suppress(OSError):
            self.sock.close()
