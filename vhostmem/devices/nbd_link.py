"""One NBD connection of an :class:`NbdBackend` on the event loop (docs/nbd.md).

Requests are NBD commands, many in flight (one cookie each). A READ's data is received
straight into the guest's buffers (``recv_into``/``readv`` on the views
:class:`nbd.Transmission` hands out, after it checked the reply against the request), and a
WRITE goes out with ``sendmsg`` of its header and the guest's buffers: no payload is copied.
Each operation calls its ``done(ok)`` once the server answered it, never before.

Failure: a lost connection (closed, reset, a protocol error, or no reply within ``timeout``)
is closed at once, so nothing more can land in the buffers of its requests; those requests wait
for a reconnect (tried with backoff) and are sent again, and any request not answered within
``timeout`` seconds of its submission fails (``done(False)``: the guest sees IOERR). Each
connection of a multi-conn backend does this on its own: the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from time import monotonic
from typing import Any, Protocol

from nbd import (
    REQUEST_SIZE,
    ExportInfo,
    NbdAddress,
    NbdError,
    NbdProtocolError,
    Request,
    Transmission,
)
from nbd.constants import NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_WRITE
from nbd.transmission import COMMAND_NAMES, encode_request
from vhostmem.devices.nbd_conn import connect_async, seconds_from_env

log = logging.getLogger(__name__)

Done = Callable[[bool], None]
RECONNECT_FIRST = 0.1  # seconds before the first reconnect attempt, doubled up to the last
RECONNECT_MAX = 2.0
WATCH_INTERVAL_MAX = 1.0
RECVS_PER_WAKE = 64  # bounded work per readable event: other devices get their turn
IOV_MAX = 1024  # most buffers one sendmsg / readv takes (Linux UIO_MAXIOV)
CLOSE_TIMEOUT = seconds_from_env("VHOSTMEM_NBD_CLOSE_TIMEOUT", 5.0)
# Request headers of a batch are packed side by side into one buffer (no object per header)
# and go out as one iovec per run of headers; room for this many before another is taken.
HEADERS_PER_BUFFER = 256


class Op(Request):
    """An NBD request of this link: the transmission's record of it (``views``: READ, where
    the data goes; WRITE, the payload) with ``done``, called once the server answered, and
    the ``deadline`` (loop time) after which it fails. One object per request."""

    __slots__ = ("deadline", "done")

    def __init__(self, command: int, offset: int, length: int, flags: int,
                 views: list[memoryview] | None, done: Done, deadline: float) -> None:
        # Request.__init__'s fields set here: one call less per request on the hot path.
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.views = views
        self.cookie = 0
        self.received = []
        self.error = 0
        self.message = ""
        self.done = done
        self.deadline = deadline


class LinkOwner(Protocol):
    """What a link needs from its backend: settings, the export check, the send batching."""

    name: str
    address: NbdAddress
    timeout: float
    connect_timeout: float
    readonly: bool

    def export_changed(self, info: ExportInfo) -> str | None: ...
    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def corked_send(self, link: NbdLink) -> bool: ...


class NbdLink:
    """Connection ``index`` of ``owner``: ``sock`` is one through the handshake, or None (the
    link connects itself once attached to the loop)."""

    def __init__(self, owner: LinkOwner, index: int, sock: socket.socket | None,
                 info: ExportInfo) -> None:
        """``info``: the export ``sock`` opened, or (no socket yet) the one expected."""
        self.owner = owner
        self.index = index
        self.name = owner.name if index == 0 else f"{owner.name} (connection {index + 1})"
        # What requests were split for: kept across reconnects (export_changed checks it).
        self.max_payload = info.max_payload
        self._sock: socket.socket | None = sock
        self.info = info  # this connection's: its transmission flags decide FUA, FLUSH, ...
        self._tx = Transmission(info.structured, self.max_payload)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests sent are the transmission's (``_tx``, by cookie, oldest first): one record.
        self._waiting: deque[Op] = deque()  # to send once connected
        self._out: list[memoryview] = []  # bytes not sent yet, in order
        # Headers packed but not yet in ``_out``: [_run, _end) of ``_headers``. Bytes before
        # ``_run`` may still be referenced by ``_out``: never written again (a full buffer is
        # replaced, not reused, until ``_out`` drains).
        self._headers = bytearray(HEADERS_PER_BUFFER * REQUEST_SIZE)
        self._hview = memoryview(self._headers)
        self._run = self._end = 0
        self._writing = False
        self._send_soon = False
        self._watch: asyncio.TimerHandle | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self.connected = sock is not None
        self.ever_connected = self.connected
        self.closed = False
        self.reconnects = 0
        # Reconnect backoff, kept across losses until a connection answers a request: a
        # server that accepts and then breaks every connection (a protocol error each time)
        # is not redialled ten times a second.
        self._delay = RECONNECT_FIRST

    @property
    def busy(self) -> int:
        """Requests sent or waiting to be."""
        return self._tx.in_flight + len(self._waiting)

    # ------------------------------------------------------------- sending

    def issue(self, command: int, offset: int, length: int, flags: int,
              views: list[memoryview] | None, done: Done) -> None:
        # The loop's clock (asyncio's time() is monotonic()), without the method call.
        op = Op(command, offset, length, flags, views, done, monotonic() + self.owner.timeout)
        if self.connected and not self.closed:
            self._send(op)
        else:
            self.take(op)

    def take(self, op: Op) -> None:
        """Send ``op`` (or keep it until connected), with the deadline it has."""
        if self.closed:
            op.done(False)
        elif self.connected:
            self._send(op)
        else:
            self._waiting.append(op)

    def _send(self, op: Op) -> None:
        end = self._end
        if end == len(self._headers):
            self._new_header_buffer()
            end = 0
        self._tx.submit(op, self._headers, end)
        self._end = end + REQUEST_SIZE
        if op.command == NBD_CMD_WRITE and op.views:
            # The payload follows its header on the wire: the run of headers ends here.
            self._out.append(self._hview[self._run : self._end])
            self._run = self._end
            self._out += op.views
        if not self._send_soon and not self._writing:
            self._send_soon = True
            # Corked (the backend is taking a batch: a kick's requests, a wake's follow-ups):
            # sent when the batch ends, in one sendmsg, without a loop turn in between.
            if not self.owner.corked_send(self):
                assert self._loop is not None
                self._loop.call_soon(self.flush_out)

    def _close_run(self) -> None:
        """The headers packed since the last run go to ``_out`` as one view."""
        if self._end > self._run:
            self._out.append(self._hview[self._run : self._end])
            self._run = self._end

    def _new_header_buffer(self) -> None:
        """The header buffer is full: what is packed goes to ``_out``, and the next headers
        go to a new buffer (``_out`` may still hold views of this one)."""
        self._close_run()
        self._headers = bytearray(HEADERS_PER_BUFFER * REQUEST_SIZE)
        self._hview = memoryview(self._headers)
        self._run = self._end = 0

    def _reset_out(self) -> None:
        """Nothing is queued: the header buffer is free again."""
        self._out.clear()
        self._run = self._end = 0

    def flush_out(self) -> None:
        """Send what is queued (one sendmsg for a batch's requests); what the socket does not
        take waits for it to be writable, as views (no copy)."""
        self._send_soon = False
        sock, out = self._sock, self._out
        if sock is None or not self.connected:
            return
        self._close_run()
        while out:
            try:
                # One view (a kick's READ header at queue depth 1): send, without the list
                # slice and the iovec sendmsg builds.
                sent = sock.send(out[0]) if len(out) == 1 else sock.sendmsg(out[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            _consume(out, sent)
        if not out:
            self._run = self._end = 0  # the kernel has every header: the buffer is free
        assert self._loop is not None
        if out and not self._writing:
            self._loop.add_writer(sock.fileno(), self.flush_out)
            self._writing = True
        elif not out and self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False

    # ----------------------------------------------------------- receiving

    def _on_readable(self) -> None:
        # Follow-up requests (a FLUSH after a write-through write, the next writes of zeroes)
        # and the guest's completions go out once this wake is over, together.
        self.owner.cork()
        try:
            self._receive()
        finally:
            self.owner.uncork()

    def _receive(self) -> None:
        sock, tx = self._sock, self._tx
        if sock is None:
            return
        for _ in range(RECVS_PER_WAKE):
            bufs = tx.buffers()
            try:
                if len(bufs) == 1:
                    wanted = len(bufs[0])
                    n = sock.recv_into(bufs[0])
                else:
                    if len(bufs) > IOV_MAX:
                        bufs = bufs[:IOV_MAX]
                    wanted = sum(map(len, bufs))
                    # readv(2), not recvmsg_into: the same scatter receive on a stream
                    # socket without the ancillary-data and address results built per call
                    # (a few us per reply, the steady state at depth).
                    n = os.readv(sock.fileno(), bufs)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._lost(f"receive failed: {exc}")
                return
            if not n:
                self._lost("the server closed the connection")
                return
            try:
                completed = tx.advance(n)
            except NbdProtocolError as exc:
                self._lost(f"protocol error: {exc.reason}")
                return
            if completed:
                self._delay = RECONNECT_FIRST  # this connection works
            for op in completed:
                if op.error:
                    log.error("%s: %s of %d bytes at %d failed: NBD error %d%s", self.name,
                              op.name, op.length, op.offset, op.error,
                              f" ({op.message})" if op.message else "")
                op.done(not op.error)  # an Op: all this link submits
            if n < wanted or not tx.in_flight or self._sock is not sock:
                # Drained; or nothing is awaited, so nothing more is due (at queue depth 1
                # this saves a receive that would find nothing); or closed by a completion.
                return

    # ------------------------------------------------------------ failures

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._on_readable)
        else:
            self._reconnect = loop.create_task(self._reconnect_loop(first=True))
        self._watch = loop.call_later(self._watch_interval(), self._check_deadlines)

    def _watch_interval(self) -> float:
        return min(WATCH_INTERVAL_MAX, self.owner.timeout / 4)

    def _check_deadlines(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        oldest = self._tx.oldest()
        if oldest is not None:
            assert isinstance(oldest, Op)
            if oldest.deadline <= now:
                self._lost(f"no reply to {COMMAND_NAMES.get(oldest.command)} at "
                           f"{oldest.offset} within {self.owner.timeout:g} s")
        expired = [op for op in self._waiting if op.deadline <= now]
        if expired:
            self._waiting = deque(op for op in self._waiting if op.deadline > now)
            log.error("%s: %d request(s) failed: no reply from the NBD server within %g s",
                      self.name, len(expired), self.owner.timeout)
        for op in expired:
            op.done(False)
        if not self.closed:
            self._watch = self._loop.call_later(self._watch_interval(), self._check_deadlines)

    def _detach_socket(self, sock: socket.socket) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            if self._writing:
                self._loop.remove_writer(sock.fileno())
        self._writing = False

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            self._detach_socket(sock)
            sock.close()

    def _lost(self, reason: str) -> None:
        """Close the connection at once (no late reply can reach a request's buffers), keep
        its requests for a reconnect, and start reconnecting."""
        if not self.connected:
            return
        self.connected = False
        self._drop_socket()
        resend: list[Any] = self._tx.forget_all()  # this link's Ops, oldest first
        self._reset_out()  # guest views: never sent now, and not kept pinned
        self._waiting.extendleft(reversed(resend))
        log.error("%s: connection lost: %s; %d request(s) wait up to %g s for a reconnect",
                  self.name, reason, len(self._waiting), self.owner.timeout)
        if not self.closed and self._loop is not None:
            self._reconnect = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self, first: bool = False) -> None:
        """Connect again (``first``: this extra connection's opening, tried once: a server
        that takes fewer connections than it advertised leaves the backend with fewer)."""
        while not self.closed:
            if not first:
                await asyncio.sleep(self._delay)
                # Several attempts within the timeout, so that a short outage costs no request.
                self._delay = min(self._delay * 2, RECONNECT_MAX, self.owner.timeout / 4)
            try:
                sock, info = await connect_async(self.owner.address,
                                                 self.owner.connect_timeout)
            except (OSError, NbdError, TimeoutError) as exc:
                why = (f"no handshake within {self.owner.connect_timeout:g} s"
                       if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
                if first:
                    self._give_up(f"cannot open it: {why}")
                    return
                log.warning("%s: reconnect failed: %s", self.name, why)
                continue
            changed = self.owner.export_changed(info)
            if changed is not None or self.closed:
                sock.close()
                if self.closed:
                    return
                log.error("%s: the export changed (%s); not using it", self.name, changed)
                if first:
                    self._give_up("the export differs")
                    return
                continue
            self._resume(sock, info)
            return

    def _give_up(self, reason: str) -> None:
        log.warning("%s: %s; its queues use the other connections", self.name, reason)
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
        # Nothing waits here: a connection never opened gets no requests (NbdBackend._link).
        assert not self._waiting and not self._tx.in_flight

    def _resume(self, sock: socket.socket, info: ExportInfo) -> None:
        assert self._loop is not None
        self._sock = sock
        self.info = info
        self._tx = Transmission(info.structured, self.max_payload)
        self.connected = True
        if self.ever_connected:
            self.reconnects += 1
        self.ever_connected = True
        self._loop.add_reader(sock.fileno(), self._on_readable)
        waiting, self._waiting = self._waiting, deque()
        log.info("%s: %s; sending %d waiting request(s)", self.name,
                 "reconnected" if self.reconnects else "connected", len(waiting))
        self.owner.cork()
        try:
            for op in waiting:
                self._send(op)
        finally:
            self.owner.uncork()

    # -------------------------------------------------------------- close

    def close(self, flush: bool) -> Coroutine[Any, Any, bool] | None:
        """Fail what still waits and stop. The final exchange (NBD_CMD_FLUSH when ``flush``,
        then NBD_CMD_DISC), if the connection can take one: a coroutine that owns the socket
        from now on and closes it (true if it flushed)."""
        if self.closed:
            return None
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()
        task, loop = self._reconnect, self._loop
        if task is not None and not task.done():
            task.cancel()
            if loop is not None and not loop.is_running() and not loop.is_closed():
                # Closed after the loop stopped (shutdown): let the task see its cancellation.
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(task)
        # The requests sent stay in the transmission: a reply to one may still come.
        failed: list[Any] = [*self._tx.requests(), *self._waiting]
        for op in failed:
            op.done(False)
        self._waiting.clear()
        sock = self._sock
        if sock is None or not self.connected or self._tx.in_flight:
            self._drop_socket()  # a reply may still come: the socket cannot be reused
            self._tx.forget_all()
            self._reset_out()
            return None
        self._detach_socket(sock)
        self._sock = None
        self._close_run()
        pending = b"".join(bytes(v) for v in self._out)  # no guest view kept
        self._reset_out()
        return self._final_exchange_within(sock, pending, flush)

    async def _final_exchange_within(self, sock: socket.socket, pending: bytes,
                                     flush: bool) -> bool:
        try:
            await asyncio.wait_for(self._final_exchange(sock, pending, flush), CLOSE_TIMEOUT)
            return flush
        except Exception as exc:  # best effort: logged, and the socket closed
            log.warning("%s: no clean disconnect: %s", self.name,
                        "no reply to the final FLUSH within "
                        f"{CLOSE_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else exc)
            return False
        finally:
            sock.close()

    async def _final_exchange(self, sock: socket.socket, pending: bytes, flush: bool) -> None:
        loop = asyncio.get_running_loop()
        if pending:
            await loop.sock_sendall(sock, pending)
        tx = self._tx
        if flush:
            _, header = tx.request(NBD_CMD_FLUSH, 0, 0)
            await loop.sock_sendall(sock, header)
            while tx.in_flight:
                n = await loop.sock_recv_into(sock, tx.buffers()[0])
                if not n:
                    return
                for c in tx.advance(n):
                    if c.error:
                        log.error("%s: flush at close failed: NBD error %d", self.name,
                                  c.error)
        await loop.sock_sendall(sock, encode_request(NBD_CMD_DISC, 0, 0, 0))


def _consume(out: list[memoryview], sent: int) -> None:
    """Drop ``sent`` bytes from the front of ``out``, in place."""
    i = 0
    while sent and i < len(out):
        n = len(out[i])
        if sent >= n:
            sent -= n
            i += 1
        else:
            out[i] = out[i][sent:]
            sent = 0
    del out[:i]
