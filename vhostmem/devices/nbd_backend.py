"""A vhost-user-blk disk on an NBD server: an asynchronous :class:`BlkBackend` on the event
loop (docs/nbd.md).

Requests are NBD commands on one connection, many in flight (one cookie each). A READ's data
is received straight into the guest's buffers (``recv_into``/``recvmsg_into`` on the views
:class:`nbd.Transmission` hands out, after it checked the reply against the request), and a
WRITE goes out with ``sendmsg`` of its header and the guest's buffers: no payload is copied.
Each operation calls its ``done(ok)`` once the server answered it, never before.

Failure: a lost connection (closed, reset, a protocol error, or no reply within ``timeout``)
is closed at once, so nothing more can land in the buffers of its requests; those requests wait
for a reconnect (tried with backoff) and are sent again, and any request not answered within
``timeout`` seconds of its submission fails (``done(False)``: the guest sees IOERR).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from nbd import ExportInfo, NbdError, NbdProtocolError, Transmission, parse_nbd_uri
from nbd.constants import (
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from nbd.transmission import COMMAND_NAMES, encode_request, slice_views
from vhostmem.devices.blk_backend import BlkBackend
from vhostmem.devices.nbd_conn import (
    CONNECT_TIMEOUT,
    NbdConnectError,
    connect_async,
    connect_blocking,
)

log = logging.getLogger(__name__)

Done = Callable[[bool], None]
DEFAULT_TIMEOUT = 10.0
RECONNECT_FIRST = 0.1  # seconds before the first reconnect attempt, doubled up to the last
RECONNECT_MAX = 2.0
WATCH_INTERVAL_MAX = 1.0
RECVS_PER_WAKE = 64  # bounded work per readable event: other devices get their turn
IOV_MAX = 1024  # most buffers one sendmsg / recvmsg_into takes (Linux UIO_MAXIOV)
ZERO_CHUNK = 1 << 20  # writes of zeroes when the server has no WRITE_ZEROES
_ZEROES = memoryview(bytes(ZERO_CHUNK))
ZERO_IN_FLIGHT = 4  # writes of zeroes one write-zeroes has in flight at most
CLOSE_TIMEOUT = 5.0
MIN_REQUEST = 512  # a virtio-blk sector: the smallest request a guest makes
_CLOSING: set[asyncio.Task[None]] = set()  # final FLUSH + DISC tasks of deleted devices


@dataclass(eq=False)
class _Op:
    command: int
    offset: int
    length: int
    flags: int
    views: list[memoryview] | None  # READ: where the data goes; WRITE: the payload
    done: Done
    deadline: float


class NbdBackend(BlkBackend):
    """The export of ``uri`` (an NBD URI); opened (connected, handshake done) at once."""

    asynchronous = True

    def __init__(self, uri: str, *, readonly: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 connection: tuple[socket.socket, ExportInfo] | None = None) -> None:
        """``connection``: a socket already through the handshake (``connect_async``, e.g.
        for device_add on a serving process, whose event loop must not wait on a server);
        taken over. Without it the handshake runs here, blocking (startup)."""
        self.address = parse_nbd_uri(uri)
        sock, info = (connection if connection is not None
                      else connect_blocking(self.address, connect_timeout))
        if info.max_payload < MIN_REQUEST:
            sock.close()
            raise NbdConnectError(f"NBD export {uri}: maximum block size {info.max_payload} "
                                  f"is below the {MIN_REQUEST} bytes of one sector")
        super().__init__(-1, info.size, readonly or info.has(NBD_FLAG_READ_ONLY), uri)
        self.info = info
        self._zeroes_at_open = info.has(NBD_FLAG_SEND_WRITE_ZEROES)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.min_block = info.min_block
        self._sock: socket.socket | None = sock
        self._tx = Transmission(info.structured, info.max_payload)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ops: dict[int, _Op] = {}  # sent, by cookie, oldest first
        self._waiting: deque[_Op] = deque()  # to send once connected
        self._out: list[memoryview] = []  # bytes not sent yet, in order
        self._writing = False
        self._send_soon = False
        self._watch: asyncio.TimerHandle | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None  # the final FLUSH + DISC (device_del)
        self.connected = True
        self.closed = False
        self.reconnects = 0
        # Reconnect backoff, kept across losses until a connection answers a request: a
        # server that accepts and then breaks every connection (a protocol error each time)
        # is not redialled ten times a second.
        self._delay = RECONNECT_FIRST
        log.info("%s: export of %d bytes, flags %#x, %s replies, block sizes %d/%d/%d",
                 uri, info.size, info.flags, "structured" if info.structured else "simple",
                 info.min_block, info.preferred_block, info.max_payload)

    def __repr__(self) -> str:
        return f"NbdBackend({self.name!r}, size={self.size}, readonly={self.readonly})"

    # ------------------------------------------------------- operations (device side)

    def submit_read(self, views: list[memoryview], offset: int, length: int,
                    done: Done) -> None:
        self._split(NBD_CMD_READ, views, offset, length, 0, done)

    def submit_write(self, views: list[memoryview], offset: int, length: int, fua: bool,
                     done: Done) -> None:
        if fua and not self.info.has(NBD_FLAG_SEND_FUA):
            done = self._then_flush(done)  # no FUA: a FLUSH after the write has the same effect
            fua = False
        self._split(NBD_CMD_WRITE, views, offset, length, NBD_CMD_FLAG_FUA if fua else 0, done)

    def submit_flush(self, done: Done) -> None:
        if not self.info.has(NBD_FLAG_SEND_FLUSH):
            done(True)  # the server does not cache writes ("NBD_FLAG_SEND_FLUSH")
            return
        self._issue(NBD_CMD_FLUSH, 0, 0, 0, None, done)

    def submit_trim(self, offset: int, length: int, fua: bool, done: Done) -> None:
        if not self.info.has(NBD_FLAG_SEND_TRIM):
            done(True)  # discard is a hint
            return
        self._issue(NBD_CMD_TRIM, offset, length, self._fua(fua), None, done)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                            done: Done) -> None:
        if self.info.has(NBD_FLAG_SEND_WRITE_ZEROES):
            flags = self._fua(fua) | (0 if may_unmap else NBD_CMD_FLAG_NO_HOLE)
            self._issue(NBD_CMD_WRITE_ZEROES, offset, length, flags, None, done)
            return
        # Only after a reconnect to a server that lost WRITE_ZEROES (the guest was offered it):
        # writes of zeroes, one piece after another, at most ZERO_IN_FLIGHT at a time.
        self._zero_fill(offset, length, fua, done)

    @property
    def offers_write_zeroes(self) -> bool:
        """Read by the device (blk.py) for VIRTIO_BLK_F_WRITE_ZEROES: without the server's
        WRITE_ZEROES a zeroing would be many writes of zeroes, so the guest is not offered it."""
        return self._zeroes_at_open

    def _zero_fill(self, offset: int, length: int, fua: bool, done: Done) -> None:
        end = offset + length
        state = {"pos": offset, "busy": 0, "ok": True, "pumping": False, "done": False}

        def finish_if_over() -> None:
            if not state["done"] and state["busy"] == 0 and (
                    state["pos"] >= end or not state["ok"]):
                state["done"] = True
                done(bool(state["ok"]))

        def piece_done(ok: bool) -> None:
            state["busy"] -= 1
            state["ok"] = state["ok"] and ok
            pump()

        def pump() -> None:
            if state["pumping"]:
                return  # a piece completed synchronously: the running pump goes on
            state["pumping"] = True
            try:
                while (state["ok"] and state["pos"] < end
                       and state["busy"] < ZERO_IN_FLIGHT):
                    pos = state["pos"]
                    size = min(ZERO_CHUNK, end - pos)
                    state["pos"] = pos + size
                    state["busy"] += 1
                    self.submit_write([_ZEROES[:size]], pos, size, fua, piece_done)
            finally:
                state["pumping"] = False
            finish_if_over()

        pump()

    def _fua(self, fua: bool) -> int:
        return NBD_CMD_FLAG_FUA if fua and self.info.has(NBD_FLAG_SEND_FUA) else 0

    def _then_flush(self, done: Done) -> Done:
        def written(ok: bool) -> None:
            if ok:
                self.submit_flush(done)
            else:
                done(False)
        return written

    def _split(self, command: int, views: list[memoryview], offset: int, length: int,
               flags: int, done: Done) -> None:
        """One NBD request per ``max_payload`` bytes at most ("Block size constraints")."""
        if not length:
            done(True)  # nothing to move: no zero-length request goes on the wire
            return
        limit = self.info.max_payload
        if length <= limit:
            self._issue(command, offset, length, flags, views, done)
            return
        limit -= limit % max(self.min_block, 512)
        starts = range(0, length, limit)
        join = _joiner(len(starts), done)
        for start in starts:
            size = min(limit, length - start)
            self._issue(command, offset + start, size, flags,
                        slice_views(views, start, size), join)

    # ------------------------------------------------------------- sending

    def _issue(self, command: int, offset: int, length: int, flags: int,
               views: list[memoryview] | None, done: Done) -> None:
        if self._loop is None:
            self._attach(asyncio.get_running_loop())
        assert self._loop is not None
        op = _Op(command, offset, length, flags, views, done, self._loop.time() + self.timeout)
        if self.closed:
            done(False)
        elif self.connected:
            self._send(op)
        else:
            self._waiting.append(op)

    def _send(self, op: _Op) -> None:
        into = op.views if op.command == NBD_CMD_READ else None
        cookie, header = self._tx.request(op.command, op.offset, op.length, flags=op.flags,
                                          into=into)
        self._ops[cookie] = op
        self._out.append(memoryview(header))
        if op.command == NBD_CMD_WRITE and op.views:
            self._out += op.views
        if not self._send_soon and not self._writing:
            self._send_soon = True
            assert self._loop is not None
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        """Send what is queued (one sendmsg for a turn's requests); what the socket does not
        take waits for it to be writable, as views (no copy)."""
        self._send_soon = False
        sock, out = self._sock, self._out
        if sock is None or not self.connected:
            return
        while out:
            try:
                sent = sock.sendmsg(out[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._lost(f"send failed: {exc}")
                return
            _consume(out, sent)
        assert self._loop is not None
        if out and not self._writing:
            self._loop.add_writer(sock.fileno(), self._flush_out)
            self._writing = True
        elif not out and self._writing:
            self._loop.remove_writer(sock.fileno())
            self._writing = False

    # ----------------------------------------------------------- receiving

    def _on_readable(self) -> None:
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
                    bufs = bufs[:IOV_MAX]
                    wanted = sum(len(b) for b in bufs)
                    n = sock.recvmsg_into(bufs)[0]
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
            for c in completed:
                op = self._ops.pop(c.cookie)
                if c.error:
                    log.error("%s: %s of %d bytes at %d failed: NBD error %d%s", self.name,
                              COMMAND_NAMES.get(c.command, c.command), op.length, op.offset,
                              c.error, f" ({c.message})" if c.message else "")
                op.done(not c.error)
            if n < wanted:
                return  # the socket is drained

    # ------------------------------------------------------------ failures

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self._sock is not None:
            loop.add_reader(self._sock.fileno(), self._on_readable)
        self._watch = loop.call_later(self._watch_interval(), self._check_deadlines)

    def _watch_interval(self) -> float:
        return min(WATCH_INTERVAL_MAX, self.timeout / 4)

    def _check_deadlines(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        if self._ops:
            oldest = next(iter(self._ops.values()))
            if oldest.deadline <= now:
                self._lost(f"no reply to {COMMAND_NAMES.get(oldest.command)} at "
                           f"{oldest.offset} within {self.timeout:g} s")
        expired = [op for op in self._waiting if op.deadline <= now]
        if expired:
            self._waiting = deque(op for op in self._waiting if op.deadline > now)
            log.error("%s: %d request(s) failed: no reply from the NBD server within %g s",
                      self.name, len(expired), self.timeout)
        for op in expired:
            op.done(False)
        if not self.closed:
            self._watch = self._loop.call_later(self._watch_interval(), self._check_deadlines)

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            if self._writing:
                self._loop.remove_writer(sock.fileno())
        self._writing = False
        sock.close()

    def _lost(self, reason: str) -> None:
        """Close the connection at once (no late reply can reach a request's buffers), keep
        its requests for a reconnect, and start reconnecting."""
        if not self.connected:
            return
        self.connected = False
        self._drop_socket()
        self._tx.forget_all()
        self._out.clear()  # guest views: never sent now, and not kept pinned
        resend = list(self._ops.values())
        self._ops.clear()
        self._waiting.extendleft(reversed(resend))
        log.error("%s: connection lost: %s; %d request(s) wait up to %g s for a reconnect",
                  self.name, reason, len(self._waiting), self.timeout)
        if not self.closed and self._loop is not None:
            self._reconnect = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        while not self.closed:
            await asyncio.sleep(self._delay)
            # Several attempts within the timeout, so that a short outage costs no request.
            self._delay = min(self._delay * 2, RECONNECT_MAX, self.timeout / 4)
            try:
                sock, info = await connect_async(self.address, self.connect_timeout)
            except (OSError, NbdError, TimeoutError) as exc:
                log.warning("%s: reconnect failed: %s", self.name, exc or type(exc).__name__)
                continue
            if (info.size != self.size or (info.has(NBD_FLAG_READ_ONLY) and not self.readonly)
                    or info.max_payload < self.info.max_payload
                    or info.min_block > self.min_block):
                # The disk the guest knows (size, writability, block sizes its requests were
                # made and split for) must not change under it.
                log.error("%s: the export changed (size %d, flags %#x, block sizes %d..%d); "
                          "not using it", self.name, info.size, info.flags, info.min_block,
                          info.max_payload)
                sock.close()
                continue
            if self.closed:
                sock.close()
                return
            self._resume(sock, info)
            return

    def _resume(self, sock: socket.socket, info: ExportInfo) -> None:
        assert self._loop is not None
        self._sock = sock
        self.info = ExportInfo(info.name, info.size, info.flags, info.structured,
                               self.min_block, info.preferred_block, self.info.max_payload)
        self._tx = Transmission(info.structured, self.info.max_payload)
        self.connected = True
        self.reconnects += 1
        self._loop.add_reader(sock.fileno(), self._on_readable)
        waiting, self._waiting = self._waiting, deque()
        log.info("%s: reconnected; sending %d waiting request(s) again", self.name,
                 len(waiting))
        for op in waiting:
            self._send(op)

    # -------------------------------------------------------------- close

    def close(self) -> None:
        """Fail what still waits, flush the server's cache (best effort), disconnect."""
        if self.closed:
            return
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
        for op in [*self._ops.values(), *self._waiting]:
            op.done(False)
        self._ops.clear()
        self._waiting.clear()
        sock = self._sock
        if sock is not None and self.connected and not self._tx.in_flight:
            # The final FLUSH and DISC (at most CLOSE_TIMEOUT), by the task that then owns the
            # socket: on the serving loop (device_del) it runs beside the other devices, so a
            # server that never answers stalls none of them; after the loop stopped (process
            # shutdown) on a loop of its own, to the end.
            self._detach_socket(sock)
            self._sock = None
            pending = b"".join(bytes(v) for v in self._out)  # no guest view kept
            self._out.clear()
            self.fd = -1
            running = _running_loop()
            if running is None:
                _run_alone(self._final_flush_async(sock, pending))
                return
            self._closing = running.create_task(self._final_flush_async(sock, pending))
            _CLOSING.add(self._closing)  # the loop keeps tasks weakly: kept until done
            self._closing.add_done_callback(_CLOSING.discard)
            return
        self._drop_socket()
        self.fd = -1

    def _detach_socket(self, sock: socket.socket) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
            if self._writing:
                self._loop.remove_writer(sock.fileno())
        self._writing = False

    async def _final_flush_async(self, sock: socket.socket, pending: bytes) -> None:
        try:
            await asyncio.wait_for(self._final_exchange(sock, pending), CLOSE_TIMEOUT)
        except Exception as exc:  # best effort: logged, and the socket closed
            log.warning("%s: no clean disconnect: %s", self.name,
                        "no reply to the final FLUSH within "
                        f"{CLOSE_TIMEOUT:g} s" if isinstance(exc, TimeoutError) else exc)
        finally:
            sock.close()

    async def _final_exchange(self, sock: socket.socket, pending: bytes) -> None:
        loop = asyncio.get_running_loop()
        if pending:
            await loop.sock_sendall(sock, pending)
        tx = self._tx
        if not self.readonly and self.info.has(NBD_FLAG_SEND_FLUSH):
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


def _run_alone(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to the end on a loop of its own (no loop is running)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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


def _joiner(parts: int, done: Done) -> Done:
    """A ``done`` for each of ``parts`` operations: ``done`` once all are, ok if all were."""
    state = [parts, True]

    def one(ok: bool) -> None:
        state[0] -= 1
        state[1] = state[1] and ok
        if state[0] == 0:
            done(bool(state[1]))
    return one
