"""A vhost-user message tap: QEMU talks to it, it talks to the backend, and it records the rings'
lifecycle from the wire, the same way for every backend.

The tap listens on the socket QEMU's chardev dials and opens one connection to the backend's
socket for each QEMU connection. Every message is forwarded unchanged in both directions, with
the file descriptors it carries (SCM_RIGHTS), so the backend sees exactly what QEMU sent: guest
memory fds, kick/call eventfds, the inflight region and the backend-request socket all pass
through (the data path itself, shared memory and eventfds, never touches the tap).

What it records, per connection and in wire order: every front-end request (name, ring index
where the payload has one) and every back-end reply. ``ring_restart_check`` turns that into a
check that a ring was started (SET_VRING_KICK), stopped (GET_VRING_BASE, answered by the
backend with the ring's index) and started again, all on one connection: what happens when
SeaBIOS drives the disk and Linux then resets the device and drives it again.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from protocol.constants import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    REPLY_FLAG,
    VRING_INDEX_MASK,
    FrontendRequest,
)
from qemu.guestlog import Check

HEADER = struct.Struct("<III")  # request, flags, payload size
VRING_STATE = struct.Struct("<II")  # index, num (SET/GET_VRING_BASE, SET_VRING_ENABLE, ...)
U64 = struct.Struct("<Q")
FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
ACCEPT_POLL = 0.2
FRONT, BACK = "frontend", "backend"
# Requests whose payload starts with the ring index, and how to read it.
VRING_STATE_REQUESTS = {FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_BASE,
                        FrontendRequest.GET_VRING_BASE, FrontendRequest.SET_VRING_ENABLE,
                        FrontendRequest.SET_VRING_ADDR}
VRING_FILE_REQUESTS = {FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL,
                       FrontendRequest.SET_VRING_ERR}


@dataclass(frozen=True)
class TapMessage:
    """One message as it crossed the tap."""

    connection: int  # 1 for QEMU's first connection
    sender: str  # FRONT (a request) or BACK (a reply)
    request: int
    flags: int
    ring: int | None  # the ring index, for ring requests and GET_VRING_BASE replies
    num: int | None  # SET/GET_VRING_BASE and SET_VRING_ENABLE: the u32 after the index
    fds: int

    @property
    def name(self) -> str:
        try:
            return FrontendRequest(self.request).name
        except ValueError:
            return f"request-{self.request}"

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY_FLAG)

    def __str__(self) -> str:
        what = f"{self.name}{' reply' if self.is_reply else ''}"
        ring = "" if self.ring is None else f" ring={self.ring}"
        num = "" if self.num is None else f" num={self.num}"
        return f"c{self.connection} {self.sender}: {what}{ring}{num}"


def _ring_fields(request: int, payload: bytes) -> tuple[int | None, int | None]:
    if request in VRING_FILE_REQUESTS and len(payload) >= U64.size:
        return U64.unpack_from(payload)[0] & VRING_INDEX_MASK, None
    if request in VRING_STATE_REQUESTS and len(payload) >= VRING_STATE.size:
        index, num = VRING_STATE.unpack_from(payload)
        return index, None if request == FrontendRequest.SET_VRING_ADDR else num
    return None, None


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    """``size`` bytes, collecting any fds that arrive with them."""
    data = b""
    while len(data) < size:
        chunk, ancdata, _, _ = sock.recvmsg(size - len(data), FD_SPACE)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fd_array = array.array("i")
                fd_array.frombytes(cdata[: len(cdata) - len(cdata) % fd_array.itemsize])
                fds.extend(fd_array)
        if not chunk:
            raise _Closed
        data += chunk
    return data


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


@dataclass
class VhostUserTap:
    """Relays ``front`` (where QEMU connects) to ``back`` (the backend's socket)."""

    front: Path
    back: Path
    messages: list[TapMessage] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.front))
        self._listener.listen(4)
        self._listener.settimeout(ACCEPT_POLL)
        self._spawn(self._accept_loop)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                qemu, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            qemu.settimeout(None)
            backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                backend.connect(str(self.back))
            except OSError as exc:
                self._error(f"cannot reach the backend at {self.back}: {exc}")
                qemu.close()
                backend.close()
                continue
            with self._lock:
                self._connections += 1
                number = self._connections
                self._sockets += [qemu, backend]
            self._spawn(self._pump, number, FRONT, qemu, backend)
            self._spawn(self._pump, number, BACK, backend, qemu)

    def _inspect(self, number: int, sender: str, request: int, payload: bytes,
                 fds: list[int]) -> None:
        """Called with each message before it is forwarded (under the lock); a subclass may
        record it or replace its fds (``fds`` is what gets sent)."""

    def _error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    def _pump(self, number: int, sender: str, source: socket.socket,
              sink: socket.socket) -> None:
        try:
            while True:
                fds: list[int] = []
                try:
                    header = _recv_exact(source, HEADER_SIZE, fds)
                    request, flags, size = HEADER.unpack(header)
                    if size > MAX_PAYLOAD_SIZE:
                        self._error(f"c{number} {sender}: payload size {size} too large")
                        return
                    payload = _recv_exact(source, size, fds)
                    ring, num = _ring_fields(request, payload)
                    with self._lock:  # recorded before forwarding: replies come after requests
                        self._inspect(number, sender, request, payload, fds)
                        self.messages.append(
                            TapMessage(number, sender, request, flags, ring, num, len(fds)))
                    _send(sink, header + payload, fds)
                finally:
                    for fd in fds:
                        _close_quietly(fd)
        except _Closed:
            pass
        except OSError as exc:
            if not self._stop.is_set():
                self._error(f"c{number} {sender}: {exc}")
        finally:
            for sock in (source, sink):  # one side gone: the other must see it go too
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> list[TapMessage]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=2.0)
        for sock in sockets:
            sock.close()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def ring_lifecycle(messages: list[TapMessage], connection: int, ring: int) -> list[str]:
    """The ring's starts and answered stops on one connection, in order: "start", "stop"."""
    events = []
    for m in messages:
        if m.connection != connection or m.ring != ring:
            continue
        if m.sender == FRONT and m.request == FrontendRequest.SET_VRING_KICK:
            events.append("start")
        elif m.sender == BACK and m.is_reply and m.request == FrontendRequest.GET_VRING_BASE:
            events.append("stop")
    return events


def ring_restart_check(messages: list[TapMessage], ring: int = 0) -> Check:
    """Passes if, on one connection, ``ring`` was started, stopped by a GET_VRING_BASE the
    backend answered, and started again."""
    connections = sorted({m.connection for m in messages})
    seen = {}
    for c in connections:
        events = ring_lifecycle(messages, c, ring)
        seen[c] = events
        text = ",".join(events)
        if "start,stop,start" in text:
            bases = [m.num for m in messages if m.connection == c and m.ring == ring
                     and m.sender == BACK and m.request == FrontendRequest.GET_VRING_BASE]
            return Check("host.vhost-user-ring-restart", True,
                         f"connection {c} of {len(connections)}, ring {ring}: {text} "
                         f"(GET_VRING_BASE answered num={bases})")
    return Check("host.vhost-user-ring-restart", False,
                 f"ring {ring} per connection: {seen or 'no connection'}")
