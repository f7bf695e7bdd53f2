"""The client side of the NBD transmission phase, sans-IO ("Transmission phase", "Simple reply
message", "Structured reply chunk message" in the NBD protocol document).

:meth:`Transmission.submit` registers a :class:`nbd.requests.Request` and writes its 28-byte
header into the caller's buffer (a WRITE's payload goes on the wire right after it, from the
caller's own buffers); :meth:`Transmission.request` does the same for a new request and returns
the header. Replies are read with
:meth:`Transmission.buffers` and :meth:`Transmission.advance`: ``buffers()`` says where the next
bytes from the socket must go (``recv_into``/``readv`` them there), ``advance(n)`` says
``n`` bytes arrived and returns the requests completed (the same objects, their ``error`` and
``message`` set). A READ's data goes straight into the
memoryviews the request was registered with, at the offset the reply names, and only once that
offset and length were checked against the request: nothing a server sends can make it write
outside them. A bad reply raises :class:`NbdProtocolError` naming what was wrong, and the
connection is unusable from then on (:attr:`Transmission.broken`).

Reply headers are read into a small buffer of the parser's own, with read-ahead only as far as
no data can be (``AHEAD_STRUCTURED``), so that one ``readv`` takes a READ's data and the
next reply's header: one system call per reply in the steady state. Should bytes of payload
ever be in that buffer anyway, they are copied to where they belong, checked like the rest.
"""

from __future__ import annotations

import struct

from nbd.chunks import MAX_ERROR_CHUNK, check_chunk, claim_range, error_chunk
from nbd.constants import (
    COMMAND_NAMES,
    HOLE_CHUNK,
    MAX_PAYLOAD,
    NBD_CMD_READ,
    NBD_EIO,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    OFFSET_FIELD,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
)
from nbd.errors import NbdProtocolError
from nbd.requests import REQUEST_SIZE, Request, encode_request, slice_views

COOKIE_MASK = (1 << 64) - 1
STAGE_BYTES = STRUCTURED_REPLY.size + MAX_ERROR_CHUNK
# Read-ahead while a READ may be answered next: a structured reply header and the 8 bytes after
# it, which are never data (an OFFSET_DATA's offset, a hole or error chunk's fixed part, or the
# next reply: a simple reply carries no data once structured replies are agreed); a simple
# reply header alone otherwise. With no READ in flight nothing can be data: read all that fits.
AHEAD_STRUCTURED = STRUCTURED_REPLY.size + OFFSET_FIELD.size
AHEAD_SIMPLE = SIMPLE_REPLY.size
# A structured reply header followed by an OFFSET_DATA chunk's offset: AHEAD_STRUCTURED bytes.
DATA_CHUNK_HEAD = struct.Struct(STRUCTURED_REPLY.format + OFFSET_FIELD.format.lstrip(">"))
_pack_header = REQUEST.pack_into
# Reader states.
_HEADER, _STRUCT_HEADER, _CHUNK, _DATA = range(4)


class Transmission:
    """Requests in flight on one connection and the reply reader."""

    def __init__(self, structured: bool, max_payload: int = MAX_PAYLOAD) -> None:
        self.structured = structured
        self.max_payload = max_payload
        self.broken: NbdProtocolError | None = None
        self._pending: dict[int, Request] = {}  # by cookie, oldest first
        self._reads = 0  # READs in flight: while there are none, no reply byte can be data
        self._next = 1
        self._stage = bytearray(STAGE_BYTES)
        self._sview = memoryview(self._stage)
        self._state = _HEADER
        self._have = 0
        self._need = SIMPLE_REPLY.size
        self._data: list[memoryview] = []
        self._data_left = 0
        self._req: Request | None = None
        self._chunk = (0, 0, 0)  # flags, type, length of the structured chunk being read

    # ----------------------------------------------------------------- requests

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def cookies(self) -> list[int]:
        return list(self._pending)

    def requests(self) -> list[Request]:
        """The requests in flight, oldest first."""
        return list(self._pending.values())

    def oldest(self) -> Request | None:
        """The request in flight the longest (None: none is)."""
        for req in self._pending.values():
            return req
        return None

    def submit(self, req: Request, header: bytearray, at: int = 0) -> int:
        """Register ``req`` (a READ's ``views`` are where its data goes, ``length`` bytes in
        all) and write its REQUEST_SIZE-byte header into ``header`` at ``at``: a caller
        gathers a batch's headers in one buffer of its own, with no object per header. Its
        cookie (also ``req.cookie``); what earlier replies brought it is forgotten."""
        command, length = req.command, req.length
        if command == NBD_CMD_READ:
            views = req.views
            if views is None or sum(map(len, views)) != length:
                raise ValueError("a READ needs buffers of exactly its length")
            if length > self.max_payload:
                raise ValueError(f"READ of {length} bytes exceeds {self.max_payload}")
            self._reads += 1
        cookie = self._next
        pending = self._pending
        while cookie in pending:
            cookie = (cookie + 1) & COOKIE_MASK or 1
        self._next = (cookie + 1) & COOKIE_MASK or 1
        pending[cookie] = req
        req.cookie = cookie
        if req.received:
            req.received = []
        req.error = 0
        req.message = ""
        _pack_header(header, at, NBD_REQUEST_MAGIC, req.flags, command, cookie, req.offset,
                     length)
        return cookie

    def request(self, command: int, offset: int, length: int, *, flags: int = 0,
                into: list[memoryview] | None = None) -> tuple[int, bytes]:
        """:meth:`submit` a new :class:`Request`; (its cookie, its header)."""
        header = bytearray(REQUEST_SIZE)
        cookie = self.submit(Request(command, offset, length, flags, into), header)
        return cookie, bytes(header)

    def forget_all(self) -> list[Request]:
        """The connection is gone: drop every request (their buffers are never written again);
        returns them, oldest first."""
        dropped = list(self._pending.values())
        self._pending.clear()
        self._reads = 0
        self._data = []
        self._req = None
        self._state, self._have, self._need = _HEADER, 0, SIMPLE_REPLY.size
        return dropped

    # ------------------------------------------------------------------ replies

    def buffers(self) -> list[memoryview]:
        """Where the next bytes read from the server must go, in order."""
        if self._state == _DATA:
            return [*self._data, self._sview[: self._data_ahead()]]
        return [self._sview[self._have : self._stage_limit()]]

    def _stage_limit(self) -> int:
        if not self._reads:
            return len(self._stage)
        if self._state == _CHUNK:
            return self._need
        return max(self._need, AHEAD_STRUCTURED if self.structured else AHEAD_SIMPLE)

    def _data_ahead(self) -> int:
        last = not self.structured or self._chunk[0] & NBD_REPLY_FLAG_DONE
        if last and self._reads == 1:
            return len(self._stage)
        return AHEAD_STRUCTURED if self.structured else AHEAD_SIMPLE

    def advance(self, n: int) -> list[Request]:
        """``n`` bytes were read into :meth:`buffers`; the requests this completed."""
        if self.broken is not None:
            raise self.broken
        done: list[Request] = []
        try:
            if self._state == _DATA:
                data = min(n, self._data_left)
                if n - data > self._data_ahead():
                    raise ValueError(f"advance({n}) beyond the bytes asked for")
                self._have = n - data  # read-ahead past the data (the stage was empty)
                self._consume_data(data, done)
            else:
                if self._have + n > self._stage_limit():
                    raise ValueError(f"advance({n}) beyond the bytes asked for")
                self._have += n
            while self._state != _DATA and self._have >= self._need:
                self._parse(done)
        except NbdProtocolError as exc:
            self.broken = exc
            raise
        return done

    def feed(self, data: bytes) -> list[Request]:
        """Copy ``data`` through :meth:`buffers`, as ``readv`` would (tests,
        captured sessions)."""
        done: list[Request] = []
        view = memoryview(data)
        while view:
            n = 0
            for target in self.buffers():
                k = min(len(target), len(view) - n)
                target[:k] = view[n : n + k]
                n += k
                if n == len(view):
                    break
            view = view[n:]
            done += self.advance(n)
        return done

    def _expect(self, need: int, state: int) -> None:
        self._state, self._need = state, need

    def _take(self, k: int) -> None:
        """The first ``k`` stage bytes were parsed: move the rest to the front."""
        rest = self._have - k
        if rest:
            self._stage[:rest] = self._stage[k : self._have]
        self._have = rest

    def _parse(self, done: list[Request]) -> None:
        stage = self._stage
        if self._state == _HEADER:
            if self._have >= AHEAD_STRUCTURED and self._read_data_chunk(done):
                return
            magic = int.from_bytes(stage[:4], "big")
            if magic == NBD_STRUCTURED_REPLY_MAGIC:
                if not self.structured:
                    raise NbdProtocolError("structured reply chunk, but structured replies "
                                           "were not negotiated")
                self._need = STRUCTURED_REPLY.size
                self._state = _STRUCT_HEADER
                if self._have < STRUCTURED_REPLY.size:
                    return
                self._parse(done)  # the whole header is here (the usual case)
                return
            if magic != NBD_SIMPLE_REPLY_MAGIC:
                raise NbdProtocolError(f"reply magic {magic:#010x} is neither the simple "
                                       f"({NBD_SIMPLE_REPLY_MAGIC:#x}) nor the structured "
                                       f"({NBD_STRUCTURED_REPLY_MAGIC:#x}) one")
            _, error, cookie = SIMPLE_REPLY.unpack_from(stage)
            req = self._lookup(cookie, "simple reply")
            self._take(SIMPLE_REPLY.size)
            if req.command == NBD_CMD_READ and not error:
                if self.structured:
                    raise NbdProtocolError(f"simple reply with data to READ cookie {cookie} "
                                           "although structured replies were negotiated")
                self._start_data(req, 0, req.length, done)
                return
            req.error = error
            self._finish(req, done)
            return
        if self._state == _STRUCT_HEADER:
            _, flags, ctype, cookie, length = STRUCTURED_REPLY.unpack_from(stage)
            req = self._lookup(cookie, "structured reply chunk")
            self._take(STRUCTURED_REPLY.size)
            self._req, self._chunk = req, (flags, ctype, length)
            check_chunk(req, flags, ctype, length)
            if ctype == NBD_REPLY_TYPE_NONE:
                self._chunk_done(done)
                return
            need = OFFSET_FIELD.size if ctype == NBD_REPLY_TYPE_OFFSET_DATA else length
            self._expect(need, _CHUNK)
            if self._have >= need:
                self._parse(done)  # read ahead with the header (the usual case)
            return
        # _CHUNK: the chunk's fixed part (or all of it) is in the stage.
        req = self._req
        assert req is not None
        flags, ctype, length = self._chunk
        if ctype == NBD_REPLY_TYPE_OFFSET_DATA:
            (offset,) = OFFSET_FIELD.unpack_from(stage)
            self._take(OFFSET_FIELD.size)
            size = length - OFFSET_FIELD.size
            claim_range(req, offset, size, "OFFSET_DATA")
            self._start_data(req, offset - req.offset, size, done)
            return
        if ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            offset, size = HOLE_CHUNK.unpack_from(stage)
            self._take(HOLE_CHUNK.size)
            if not size:
                raise NbdProtocolError(f"OFFSET_HOLE of 0 bytes for cookie {req.cookie}")
            claim_range(req, offset, size, "OFFSET_HOLE")
            assert req.views is not None
            for view in slice_views(req.views, offset - req.offset, size):
                view[:] = bytes(len(view))
            self._chunk_done(done)
            return
        error_chunk(req, self._stage, ctype, length)
        self._take(length)
        self._chunk_done(done)

    def _read_data_chunk(self, done: list[Request]) -> bool:
        """The steady state of reads: a structured reply header and an OFFSET_DATA chunk's
        offset, all in the stage. Parsed in one step, with the same checks as the general path
        (which it leaves to anything else: false, nothing consumed)."""
        magic, flags, ctype, cookie, length, offset = DATA_CHUNK_HEAD.unpack_from(self._stage)
        if magic != NBD_STRUCTURED_REPLY_MAGIC or ctype != NBD_REPLY_TYPE_OFFSET_DATA:
            return False
        req = self._pending.get(cookie)
        if req is None or not self.structured:
            return False  # the general path names the error
        check_chunk(req, flags, ctype, length)
        self._req, self._chunk = req, (flags, ctype, length)
        self._take(AHEAD_STRUCTURED)
        size = length - OFFSET_FIELD.size
        claim_range(req, offset, size, "OFFSET_DATA")
        self._start_data(req, offset - req.offset, size, done)
        return True

    def _lookup(self, cookie: int, what: str) -> Request:
        req = self._pending.get(cookie)
        if req is None:
            raise NbdProtocolError(f"{what} for unknown cookie {cookie:#x}")
        return req

    def _start_data(self, req: Request, start: int, size: int, done: list[Request]) -> None:
        views = req.views
        assert views is not None
        self._req = req
        self._data = (list(views) if not start and size == req.length
                      else slice_views(views, start, size))
        self._data_left = size
        self._state = _DATA
        if self._have or not size:  # payload in the stage (the read-ahead never takes
            # any, but be sure), or nothing to read at all
            k = min(self._have, size)
            at = 0
            for view in self._data:
                m = min(len(view), k - at)
                view[:m] = self._sview[at : at + m]
                at += m
                if at == k:
                    break
            self._take(k)
            self._consume_data(k, done)

    def _consume_data(self, n: int, done: list[Request]) -> None:
        self._data_left -= n
        data = self._data
        while n:
            first = data[0]
            if n < len(first):
                data[0] = first[n:]
                break
            n -= len(first)
            data.pop(0)
        if self._data_left:
            return
        req = self._req
        assert req is not None
        if self.structured:
            self._chunk_done(done)
        else:
            self._finish(req, done)

    def _chunk_done(self, done: list[Request]) -> None:
        req = self._req
        assert req is not None
        if self._chunk[0] & NBD_REPLY_FLAG_DONE:
            error = req.error
            # ``received`` is disjoint, merged and inside the request: it covers the
            # request exactly when it is the one range of the request's length.
            received = req.received
            if (not error and req.command == NBD_CMD_READ
                    and not (len(received) == 1
                             and received[0][1] - received[0][0] == req.length)):
                covered = sum(stop - start for start, stop in received)
                if covered != req.length:
                    raise NbdProtocolError(f"READ cookie {req.cookie} ended with {covered} "
                                           f"of its {req.length} bytes")
            self._finish(req, done)
        else:
            self._expect(SIMPLE_REPLY.size, _HEADER)

    def _finish(self, req: Request, done: list[Request]) -> None:
        """``req`` got its final reply (``req.error`` says how it went)."""
        del self._pending[req.cookie]
        if req.command == NBD_CMD_READ:
            self._reads -= 1
        done.append(req)
        self._req = None
        self._data = []
        self._expect(SIMPLE_REPLY.size, _HEADER)


__all__ = ["COMMAND_NAMES", "HOLE_CHUNK", "NBD_EIO", "REQUEST_SIZE", "Request", "Transmission",
           "encode_request", "slice_views"]
