"""A vhost-user-blk disk on an NBD server: an asynchronous :class:`BlkBackend` on the event
loop (docs/nbd.md).

The backend turns virtio-blk operations into NBD requests (splitting what exceeds the server's
maximum payload, a FLUSH after a write-through write on a server without FUA, writes of zeroes
where a reconnect lost WRITE_ZEROES) and hands them to one of its connections
(:class:`NbdLink`, nbd_link.py: sending, receiving, reconnects, timeouts).

Several connections (multi-conn): only when the export has NBD_FLAG_CAN_MULTI_CONN (NBD
protocol, "Transmission flags", bit 8: the server's cache is shared by all connections, so a
FLUSH on any connection covers the writes completed on all of them). Queue ``q`` of a device
uses connection ``q % connections``; while that one is down, the first connected one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from nbd import ExportInfo, parse_nbd_uri
from nbd.constants import (
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
)
from nbd.transmission import slice_views
from vhostmem.devices.blk_backend import BlkBackend
from vhostmem.devices.nbd_conn import CONNECT_TIMEOUT, NbdConnectError, connect_blocking
from vhostmem.devices.nbd_link import Done, NbdLink

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
ZERO_CHUNK = 1 << 20  # writes of zeroes when the server has no WRITE_ZEROES
_ZEROES = memoryview(bytes(ZERO_CHUNK))
ZERO_IN_FLIGHT = 4  # writes of zeroes one write-zeroes has in flight at most
MIN_REQUEST = 512  # a virtio-blk sector: the smallest request a guest makes
_CLOSING: set[asyncio.Task[None]] = set()  # final FLUSH + DISC tasks of deleted devices


class NbdBackend(BlkBackend):
    """The export of ``uri`` (an NBD URI); opened (connected, handshake done) at once.
    ``connections``: how many to use if the export allows multi-conn (the first is opened
    here, the others once the backend is on the event loop)."""

    asynchronous = True

    def __init__(self, uri: str, *, readonly: bool = False, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, connections: int = 1,
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
        self.info = info  # the export at open: the disk the guest knows
        self._zeroes_at_open = info.has(NBD_FLAG_SEND_WRITE_ZEROES)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.min_block = info.min_block
        count = connections if info.has(NBD_FLAG_CAN_MULTI_CONN) else 1
        self.links = [NbdLink(self, 0, sock, info)]
        self.links += [NbdLink(self, i, None, info) for i in range(1, count)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._corked = 0
        self._dirty: list[NbdLink] = []  # links with requests to send when the batch ends
        self._after: list[Callable[[], None]] = []  # to call when the batch ends
        self.closed = False
        log.info("%s: export of %d bytes, flags %#x, %s replies, block sizes %d/%d/%d, "
                 "%d connection(s)%s", uri, info.size, info.flags,
                 "structured" if info.structured else "simple", info.min_block,
                 info.preferred_block, info.max_payload, count,
                 "" if count == connections else
                 f" (not {connections}: the server does not offer multi-conn)")

    def __repr__(self) -> str:
        return f"NbdBackend({self.name!r}, size={self.size}, readonly={self.readonly})"

    @property
    def connected(self) -> bool:
        return any(link.connected for link in self.links)

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self.links)

    def connection_states(self) -> list[dict[str, Any]]:
        """For device_list: per connection, whether it is up ("given up": an extra one the
        server did not take), how many times it reconnected, its requests sent or waiting."""
        return [{"connected": link.connected,
                 "given_up": link.closed and not link.ever_connected and not self.closed,
                 "reconnects": link.reconnects, "requests": link.busy}
                for link in self.links]

    # ------------------------------------------------------- operations (device side)

    def submit_read(self, views: list[memoryview], offset: int, length: int,
                    done: Done, queue: int = 0) -> None:
        link = self._link(queue)
        if 0 < length <= self.info.max_payload:  # one NBD request (the usual case)
            link.issue(NBD_CMD_READ, offset, length, 0, views, done)
            return
        self._split(link, NBD_CMD_READ, views, offset, length, 0, done)

    def submit_write(self, views: list[memoryview], offset: int, length: int, fua: bool,
                     done: Done, queue: int = 0) -> None:
        link = self._link(queue)
        if fua and not link.info.has(NBD_FLAG_SEND_FUA):
            # No FUA: a FLUSH after the write has the same effect.
            done = self._then_flush(done, queue)
            fua = False
        self._split(link, NBD_CMD_WRITE, views, offset, length,
                    NBD_CMD_FLAG_FUA if fua else 0, done)

    def submit_flush(self, done: Done, queue: int = 0) -> None:
        # On multi-conn this connection's FLUSH covers the writes completed on all of them
        # (NBD_FLAG_CAN_MULTI_CONN): every write the guest saw complete was answered.
        link = self._link(queue)
        if not link.info.has(NBD_FLAG_SEND_FLUSH):
            done(True)  # the server does not cache writes ("NBD_FLAG_SEND_FLUSH")
            return
        link.issue(NBD_CMD_FLUSH, 0, 0, 0, None, done)

    def submit_trim(self, offset: int, length: int, fua: bool, done: Done,
                    queue: int = 0) -> None:
        link = self._link(queue)
        if not link.info.has(NBD_FLAG_SEND_TRIM):
            done(True)  # discard is a hint
            return
        link.issue(NBD_CMD_TRIM, offset, length, _fua(link, fua), None, done)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool, fua: bool,
                            done: Done, queue: int = 0) -> None:
        link = self._link(queue)
        if link.info.has(NBD_FLAG_SEND_WRITE_ZEROES):
            flags = _fua(link, fua) | (0 if may_unmap else NBD_CMD_FLAG_NO_HOLE)
            link.issue(NBD_CMD_WRITE_ZEROES, offset, length, flags, None, done)
            return
        # Only after a reconnect to a server that lost WRITE_ZEROES (the guest was offered it):
        # writes of zeroes, one piece after another, at most ZERO_IN_FLIGHT at a time.
        def write(views: list[memoryview], pos: int, size: int, piece_done: Done) -> None:
            self.submit_write(views, pos, size, fua, piece_done, queue)
        zero_fill(write, offset, length, done)

    @property
    def offers_write_zeroes(self) -> bool:
        """Read by the device (blk.py) for VIRTIO_BLK_F_WRITE_ZEROES: without the server's
        WRITE_ZEROES a zeroing would be many writes of zeroes, so the guest is not offered it."""
        return self._zeroes_at_open

    def _then_flush(self, done: Done, queue: int) -> Done:
        def written(ok: bool) -> None:
            if ok:
                self.submit_flush(done, queue)
            else:
                done(False)
        return written

    def _split(self, link: NbdLink, command: int, views: list[memoryview], offset: int,
               length: int, flags: int, done: Done) -> None:
        """One NBD request per ``max_payload`` bytes at most ("Block size constraints")."""
        if not length:
            done(True)  # nothing to move: no zero-length request goes on the wire
            return
        limit = self.info.max_payload
        if length <= limit:
            link.issue(command, offset, length, flags, views, done)
            return
        limit -= limit % max(self.min_block, 512)
        starts = range(0, length, limit)
        join = _joiner(len(starts), done)
        for start in starts:
            size = min(limit, length - start)
            link.issue(command, offset + start, size, flags, slice_views(views, start, size),
                       join)

    # --------------------------------------------------------- connections

    def _link(self, queue: int) -> NbdLink:
        """The connection for ``queue``'s next request: its own, or while that one is down
        the first connected one (the others keep serving its queues). With none up, its own
        if that was ever open (it is reconnecting), else the first (an extra connection
        still opening may be given up: nothing may wait on it)."""
        if self._loop is None:
            self._attach(asyncio.get_running_loop())
        links = self.links
        own = links[queue % len(links)]
        if own.connected:
            return own
        for link in links:
            if link.connected:
                return link
        return own if own.ever_connected and not own.closed else links[0]

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for link in self.links:
            link.attach(loop)

    def export_changed(self, info: ExportInfo) -> str | None:
        """Why a connection's export is not the one the guest knows (None: it is). The size,
        writability and block sizes its requests were made and split for must not change
        under it, nor may multi-conn go away while several connections are in use."""
        if info.size != self.size:
            return f"size {info.size}, not {self.size}"
        if info.has(NBD_FLAG_READ_ONLY) and not self.readonly:
            return "read-only"
        if info.max_payload < self.info.max_payload or info.min_block > self.min_block:
            return f"block sizes {info.min_block}..{info.max_payload}"
        if len(self.links) > 1 and not info.has(NBD_FLAG_CAN_MULTI_CONN):
            return "no NBD_FLAG_CAN_MULTI_CONN"
        return None

    def cork(self) -> None:
        """Start a batch: requests are sent, and listeners told, when the last batch ends."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if self._corked:
            return
        while self._dirty:
            self._dirty.pop().flush_out()
        while self._after:
            self._after.pop()()

    @property
    def corked(self) -> bool:
        return self._corked > 0

    def after_batch(self, call: Callable[[], None]) -> bool:
        """Call ``call`` when the batch ends (e.g. publish the guest's completions), if one
        is on; whether it is."""
        if not self._corked:
            return False
        self._after.append(call)
        return True

    def corked_send(self, link: NbdLink) -> bool:
        """Whether ``link``'s send waits for the batch's end (then it is remembered)."""
        if not self._corked:
            return False
        self._dirty.append(link)
        return True

    # -------------------------------------------------------------- close

    def close(self) -> None:
        """Fail what still waits, flush the server's cache (best effort), disconnect."""
        if self.closed:
            return
        self.closed = True
        self.fd = -1
        # One final FLUSH: on multi-conn it covers the writes of every connection.
        want_flush = not self.readonly
        exchanges: list[Coroutine[Any, Any, bool]] = []
        for link in self.links:
            flush = want_flush and link.info.has(NBD_FLAG_SEND_FLUSH)
            exchange = link.close(flush)
            if exchange is not None:
                exchanges.append(exchange)
                want_flush = want_flush and not flush
        if not exchanges:
            return
        # The final exchanges (at most CLOSE_TIMEOUT), by a task that then owns the sockets:
        # on the serving loop (device_del) it runs beside the other devices, so a server that
        # never answers stalls none of them; after the loop stopped (process shutdown) on a
        # loop of its own, to the end.
        running = _running_loop()
        if running is None:
            _run_alone(_all(exchanges))
            return
        task = running.create_task(_all(exchanges))
        _CLOSING.add(task)  # the loop keeps tasks weakly: kept until done
        task.add_done_callback(_CLOSING.discard)


async def _all(exchanges: list[Coroutine[Any, Any, bool]]) -> None:
    await asyncio.gather(*exchanges)


def _fua(link: NbdLink, fua: bool) -> int:
    return NBD_CMD_FLAG_FUA if fua and link.info.has(NBD_FLAG_SEND_FUA) else 0


def zero_fill(write: Callable[[list[memoryview], int, int, Done], None], offset: int,
              length: int, done: Done) -> None:
    """Zero ``length`` bytes at ``offset`` with ``write``s of ZERO_CHUNK at most, no more
    than ZERO_IN_FLIGHT at a time (not a whole disk's worth built in one turn); ``done``
    once all completed, or once those out completed after one failed."""
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
            while state["ok"] and state["pos"] < end and state["busy"] < ZERO_IN_FLIGHT:
                pos = state["pos"]
                size = min(ZERO_CHUNK, end - pos)
                state["pos"] = pos + size
                state["busy"] += 1
                write([_ZEROES[:size]], pos, size, piece_done)
        finally:
            state["pumping"] = False
        finish_if_over()

    pump()


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


def _joiner(parts: int, done: Done) -> Done:
    """A ``done`` for each of ``parts`` operations: ``done`` once all are, ok if all were."""
    state = [parts, True]

    def one(ok: bool) -> None:
        state[0] -= 1
        state[1] = state[1] and ok
        if state[0] == 0:
            done(bool(state[1]))
    return one
