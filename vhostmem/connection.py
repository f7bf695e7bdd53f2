"""One connected frontend: reads its messages (bytes and SCM_RIGHTS fds, with ``recvmsg`` from a
``loop.add_reader`` callback: uvloop transports cannot carry fds), hands them to the
:class:`~vhostmem.session.Session` in order, sends the replies with ``sendmsg``, and waits for a
:class:`~vhostmem.session_base.Deferred` reply without blocking the event loop.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
from collections.abc import Callable

from protocol import Framer, Message, ProtocolError
from vhostmem.session import Session
from vhostmem.session_base import Deferred

log = logging.getLogger("vhostmem.server")

# One recvmsg reads at most this much; vhost-user messages are at most 12 + 4096 bytes.
RECV_BYTES = 65536
# Room for more fds than any message may carry, so an excess is seen and rejected, not cut.
RECV_MAX_FDS = 32
FD_SIZE = array.array("i").itemsize
ANCILLARY_BYTES = socket.CMSG_SPACE(RECV_MAX_FDS * FD_SIZE)
# How often a reply that waits for I/O threads (Deferred) or a draining session is polled, and
# how long before it is failed loudly: the request is answered by a disconnect, the drain logs
# an error (and keeps waiting: memory cannot be let go under a request still being served).
DRAIN_POLL_SECONDS = 0.001
DRAIN_TIMEOUT_SECONDS = 30.0


class Connection:
    """One connected frontend: reads messages, hands them to the session, sends replies."""

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[Connection], None],
    ) -> None:
        self.sock = sock
        self.session = session
        self.loop = loop
        self.on_close = on_close
        self.framer = Framer(sender="frontend", keep_invalid=True)
        self.closed = False
        self._backlog = bytearray()  # reply bytes the socket did not take yet
        # Messages decoded but not handled yet, because a Deferred reply is awaited first.
        self._queued: list[Message] = []
        self._deferred: Deferred | None = None
        self._deferred_since = 0.0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data, fds = self._recv()
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: receive failed: %s", self.session.name, exc)
            self.close()
            return
        if not data:
            _close_all(fds)
            log.info("%s: frontend disconnected", self.session.name)
            self.close()
            return
        try:
            messages = self.framer.feed(data, fds)
        except ProtocolError as exc:
            log.error("%s: %s; disconnecting", self.session.name, exc)
            self.close()
            return
        self._queued = messages
        self._handle_queued()

    def _handle_queued(self) -> None:
        """Handle the decoded messages in order; a Deferred reply pauses reading (the next
        message must not be handled before it) and is polled from the loop."""
        while self._queued and not self.closed:
            msg = self._queued.pop(0)
            try:
                result = self.session.handle(msg)
                if isinstance(result, Deferred):
                    self._wait_for(result)
                    return
                for reply, reply_fds in result:
                    self._send(reply, reply_fds)
            except Exception as exc:  # one bad frontend must not stop the loop
                log.error("%s: %s; disconnecting", self.session.name, exc)
                self.close()
                return

    def _wait_for(self, deferred: Deferred) -> None:
        self._deferred = deferred
        self._deferred_since = self.loop.time()
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_deferred)

    def _poll_deferred(self) -> None:
        deferred = self._deferred
        if deferred is None or self.closed:
            return
        if not deferred.ready():
            if self.loop.time() - self._deferred_since > DRAIN_TIMEOUT_SECONDS:
                log.error("%s: %s: requests still in flight after %.0f s; disconnecting",
                          self.session.name, deferred.what, DRAIN_TIMEOUT_SECONDS)
                self.close()
                return
            self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_deferred)
            return
        self._deferred = None
        try:
            for reply, reply_fds in deferred.finish():
                self._send(reply, reply_fds)
        except Exception as exc:
            log.error("%s: %s: %s; disconnecting", self.session.name, deferred.what, exc)
            self.close()
            return
        self._handle_queued()
        if not self.closed and self._deferred is None and not self._backlog:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _recv(self) -> tuple[bytes, list[int]]:
        data, ancdata, flags, _ = self.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        fds = _fds_from_ancillary(ancdata)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise OSError(errno.EMSGSIZE, f"more than {RECV_MAX_FDS} fds in one message")
        return data, fds

    def _send(self, data: bytes, fds: list[int]) -> None:
        """Send a reply without ever blocking the loop: what the socket does not take now is
        queued, and reading pauses until the frontend has drained it."""
        if self._backlog:
            self._backlog += data
            return
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            sent = self.sock.sendmsg([data], ancillary)
        except BlockingIOError:
            if fds:
                raise  # fds cannot be queued separately from their first byte
            sent = 0
        if sent < len(data):
            self._backlog += data[sent:]
            self.loop.remove_reader(self.sock.fileno())
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: send failed: %s; disconnecting", self.session.name, exc)
            self.close()
            return
        del self._backlog[:sent]
        if not self._backlog:
            self.loop.remove_writer(self.sock.fileno())
            if self._deferred is None:
                self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def peer_gone(self) -> bool:
        """Whether the frontend hung up (even if unread bytes remain queued)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        for rest in self._queued:  # decoded but never handled: their fds are ours to close
            _close_all(rest.fds)
        self._queued = []
        self._deferred = None
        try:
            self.framer_close()
            self.session.watcher.unwatch_all()  # type: ignore[attr-defined]
        except Exception:  # the endpoint must still be freed for the next frontend
            log.exception("%s: error while releasing the session", self.session.name)
        finally:
            self.sock.close()
            self.on_close(self)

    def framer_close(self) -> None:
        close = getattr(self.framer, "close", None)
        if close is not None:
            close()


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
