"""The client side of the NBD transmission phase, sans-IO ("Transmission phase", "Simple reply
message", "Structured reply chunk message" in the NBD protocol document).

:meth:`Transmission.request` registers a request and returns its 28-byte header (a WRITE's
payload goes on the wire right after it, from the caller's own buffers). Replies are read with
:meth:`Transmission.buffers` and :meth:`Transmission.advance`: ``buffers()`` says where the next
bytes from the socket must go (``recv_into``/``readv`` them there), ``advance(n)`` says
``n`` bytes arrived and returns the requests completed. A READ's data goes straight into the
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
from bisect import bisect_left
from dataclasses import dataclass, field

from nbd.constants import (
    COMMAND_NAMES,
    ERROR_CHUNK,
    HOLE_CHUNK,
    MAX_PAYLOAD,
    MAX_STRING,
    NBD_CMD_READ,
    NBD_EIO,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_REPLY_TYPE_ERROR_OFFSET,
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

COOKIE_MASK = (1 << 64) - 1
# Longest error chunk payload accepted: error, message length, a message of at most
# MAX_STRING bytes ("NBD_REPLY_TYPE_ERROR"), and the offset of NBD_REPLY_TYPE_ERROR_OFFSET.
MAX_ERROR_CHUNK = ERROR_CHUNK.size + MAX_STRING + OFFSET_FIELD.size
STAGE_BYTES = STRUCTURED_REPLY.size + MAX_ERROR_CHUNK
# Read-ahead while a READ may be answered next: a structured reply header and the 8 bytes after
# it, which are never data (an OFFSET_DATA's offset, a hole or error chunk's fixed part, or the
# next reply: a simple reply carries no data once structured replies are agreed); a simple
# reply header alone otherwise. With no READ in flight nothing can be data: read all that fits.
AHEAD_STRUCTURED = STRUCTURED_REPLY.size + OFFSET_FIELD.size
AHEAD_SIMPLE = SIMPLE_REPLY.size
# A structured reply header followed by an OFFSET_DATA chunk's offset: AHEAD_STRUCTURED bytes.
DATA_CHUNK_HEAD = struct.Struct(STRUCTURED_REPLY.format + OFFSET_FIELD.format.lstrip(">"))
# Reader states.
_HEADER, _STRUCT_HEADER, _CHUNK, _DATA = range(4)


@dataclass(slots=True)
class Completed:
    """A request got its final reply: ``error`` 0 for success, else the NBD error value."""

    cookie: int
    command: int
    error: int
    message: str = ""


@dataclass(slots=True)
class _Pending:
    command: int
    offset: int
    length: int
    into: list[memoryview] | None
    # (start, end) of the data/hole chunks received: sorted, disjoint, adjacent ones merged
    received: list[tuple[int, int]] = field(default_factory=list)
    error: int = 0
    message: str = ""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, str(self.command))


def encode_request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)


class Transmission:
    """Requests in flight on one connection and the reply reader."""

    def __init__(self, structured: bool, max_payload: int = MAX_PAYLOAD) -> None:
        self.structured = structured
        self.max_payload = max_payload
        self.broken: NbdProtocolError | None = None
        self._pending: dict[int, _Pending] = {}
        self._reads = 0  # READs in flight: while there are none, no reply byte can be data
        self._next = 1
        self._stage = bytearray(STAGE_BYTES)
        self._sview = memoryview(self._stage)
        self._state = _HEADER
        self._have = 0
        self._need = SIMPLE_REPLY.size
        self._data: list[memoryview] = []
        self._data_left = 0
        self._req: _Pending | None = None
        self._cookie = 0
        self._chunk = (0, 0, 0)  # flags, type, length of the structured chunk being read
        self._chunk_start = 0  # a data chunk's offset relative to its request

    # ----------------------------------------------------------------- requests

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def cookies(self) -> list[int]:
        return list(self._pending)

    def request(self, command: int, offset: int, length: int, *, flags: int = 0,
                into: list[memoryview] | None = None) -> tuple[int, bytes]:
        """Register a request; (its cookie, its header). A READ names the buffers its data goes
        into (``length`` bytes in all)."""
        if command == NBD_CMD_READ:
            if into is None or sum(map(len, into)) != length:
                raise ValueError("a READ needs buffers of exactly its length")
            if length > self.max_payload:
                raise ValueError(f"READ of {length} bytes exceeds {self.max_payload}")
        cookie = self._next
        while cookie in self._pending:
            cookie = (cookie + 1) & COOKIE_MASK or 1
        self._next = (cookie + 1) & COOKIE_MASK or 1
        self._pending[cookie] = _Pending(command, offset, length, into)
        if command == NBD_CMD_READ:
            self._reads += 1
        return cookie, encode_request(command, cookie, offset, length, flags)

    def forget_all(self) -> list[int]:
        """The connection is gone: drop every request (their buffers are never written again);
        returns their cookies."""
        cookies = list(self._pending)
        self._pending.clear()
        self._reads = 0
        self._data = []
        self._req = None
        self._state, self._have, self._need = _HEADER, 0, SIMPLE_REPLY.size
        return cookies

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

    def advance(self, n: int) -> list[Completed]:
        """``n`` bytes were read into :meth:`buffers`; the requests this completed."""
        if self.broken is not None:
            raise self.broken
        done: list[Completed] = []
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

    def feed(self, data: bytes) -> list[Completed]:
        """Copy ``data`` through :meth:`buffers`, as ``readv`` would (tests,
        captured sessions)."""
        done: list[Completed] = []
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

    def _parse(self, done: list[Completed]) -> None:
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
                self._start_data(req, cookie, 0, req.length, done)
                return
            self._finish(cookie, req, error, "", done)
            return
        if self._state == _STRUCT_HEADER:
            _, flags, ctype, cookie, length = STRUCTURED_REPLY.unpack_from(stage)
            req = self._lookup(cookie, "structured reply chunk")
            self._take(STRUCTURED_REPLY.size)
            self._req, self._cookie, self._chunk = req, cookie, (flags, ctype, length)
            self._check_chunk(req, cookie, flags, ctype, length)
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
            self._claim_range(req, offset, size, "OFFSET_DATA")
            self._start_data(req, self._cookie, offset - req.offset, size, done)
            return
        if ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            offset, size = HOLE_CHUNK.unpack_from(stage)
            self._take(HOLE_CHUNK.size)
            if not size:
                raise NbdProtocolError(f"OFFSET_HOLE of 0 bytes for cookie {self._cookie}")
            self._claim_range(req, offset, size, "OFFSET_HOLE")
            assert req.into is not None
            for view in slice_views(req.into, offset - req.offset, size):
                view[:] = bytes(len(view))
            self._chunk_done(done)
            return
        self._error_chunk(req, ctype, length)
        self._take(length)
        self._chunk_done(done)

    def _read_data_chunk(self, done: list[Completed]) -> bool:
        """The steady state of reads: a structured reply header and an OFFSET_DATA chunk's
        offset, all in the stage. Parsed in one step, with the same checks as the general path
        (which it leaves to anything else: false, nothing consumed)."""
        magic, flags, ctype, cookie, length, offset = DATA_CHUNK_HEAD.unpack_from(self._stage)
        if magic != NBD_STRUCTURED_REPLY_MAGIC or ctype != NBD_REPLY_TYPE_OFFSET_DATA:
            return False
        req = self._pending.get(cookie)
        if req is None or not self.structured:
            return False  # the general path names the error
        self._check_chunk(req, cookie, flags, ctype, length)
        self._req, self._cookie, self._chunk = req, cookie, (flags, ctype, length)
        self._take(AHEAD_STRUCTURED)
        size = length - OFFSET_FIELD.size
        self._claim_range(req, offset, size, "OFFSET_DATA")
        self._start_data(req, cookie, offset - req.offset, size, done)
        return True

    def _lookup(self, cookie: int, what: str) -> _Pending:
        req = self._pending.get(cookie)
        if req is None:
            raise NbdProtocolError(f"{what} for unknown cookie {cookie:#x}")
        return req

    def _check_chunk(self, req: _Pending, cookie: int, flags: int, ctype: int,
                     length: int) -> None:
        if (ctype == NBD_REPLY_TYPE_OFFSET_DATA and not flags & ~NBD_REPLY_FLAG_DONE
                and req.command == NBD_CMD_READ
                and OFFSET_FIELD.size < length <= OFFSET_FIELD.size + req.length):
            return  # the usual chunk, valid: no message built (a cost per READ reply)
        where = f"chunk type {ctype} for {req.name} cookie {cookie}"
        if flags & ~NBD_REPLY_FLAG_DONE:
            raise NbdProtocolError(f"{where}: unknown flags {flags:#x}")
        if ctype == NBD_REPLY_TYPE_NONE:
            if length or not flags & NBD_REPLY_FLAG_DONE:
                raise NbdProtocolError(f"{where}: NONE must be empty and carry DONE")
        elif ctype == NBD_REPLY_TYPE_OFFSET_DATA:
            if req.command != NBD_CMD_READ:
                raise NbdProtocolError(f"{where}: OFFSET_DATA to a request other than READ")
            if not OFFSET_FIELD.size < length <= OFFSET_FIELD.size + req.length:
                raise NbdProtocolError(f"{where}: OFFSET_DATA length {length} outside "
                                       f"{OFFSET_FIELD.size + 1}..{OFFSET_FIELD.size + req.length}")
        elif ctype == NBD_REPLY_TYPE_OFFSET_HOLE:
            if req.command != NBD_CMD_READ:
                raise NbdProtocolError(f"{where}: OFFSET_HOLE to a request other than READ")
            if length != HOLE_CHUNK.size:
                raise NbdProtocolError(f"{where}: OFFSET_HOLE length {length}, not "
                                       f"{HOLE_CHUNK.size}")
        elif ctype & NBD_REPLY_TYPE_ERROR_BIT:
            if not ERROR_CHUNK.size <= length <= MAX_ERROR_CHUNK:
                raise NbdProtocolError(f"{where}: error chunk length {length} outside "
                                       f"{ERROR_CHUNK.size}..{MAX_ERROR_CHUNK}")
        else:
            raise NbdProtocolError(f"{where}: a chunk type this client did not ask for")

    def _claim_range(self, req: _Pending, offset: int, size: int, what: str) -> None:
        """[offset, offset + size) must lie in the request and overlap nothing received."""
        end = offset + size
        if offset < req.offset or end > req.offset + req.length:
            raise NbdProtocolError(
                f"{what} [{offset}, {end}) outside READ cookie {self._cookie}'s range "
                f"[{req.offset}, {req.offset + req.length})")
        received = req.received
        if not received:  # the first chunk (for most READs the only one): nothing to overlap
            if offset != end:
                received.append((offset, end))
            return
        # ``received`` is sorted and disjoint, adjacent ranges merged: only the neighbours
        # of [offset, end) can overlap it (O(log K) per chunk, not O(K)).
        i = bisect_left(received, offset, key=_range_start)
        for start, stop in received[max(i - 1, 0) : i + 1]:
            if offset < stop and start < end:
                raise NbdProtocolError(
                    f"{what} [{offset}, {end}) overlaps [{start}, {stop}) already received "
                    f"for READ cookie {self._cookie}")
        if offset == end:
            return
        if i and received[i - 1][1] == offset:  # merge with the range before
            i -= 1
            offset = received[i][0]
            del received[i]
        if i < len(received) and received[i][0] == end:  # and with the one after
            end = received[i][1]
            del received[i]
        received.insert(i, (offset, end))

    def _error_chunk(self, req: _Pending, ctype: int, length: int) -> None:
        error, msg_len = ERROR_CHUNK.unpack_from(self._stage)
        tail = OFFSET_FIELD.size if ctype == NBD_REPLY_TYPE_ERROR_OFFSET else 0
        if ERROR_CHUNK.size + msg_len + tail != length:
            raise NbdProtocolError(f"error chunk for cookie {self._cookie}: message length "
                                   f"{msg_len} does not fit the chunk length {length}")
        if not error:
            raise NbdProtocolError(f"error chunk for cookie {self._cookie} with error 0")
        start = ERROR_CHUNK.size
        message = bytes(self._stage[start : start + msg_len]).decode(errors="replace")
        if tail:
            (offset,) = OFFSET_FIELD.unpack_from(self._stage, start + msg_len)
            if not req.offset <= offset < req.offset + req.length:
                raise NbdProtocolError(f"ERROR_OFFSET {offset} outside cookie "
                                       f"{self._cookie}'s range")
        if not req.error:
            req.error, req.message = error, message

    def _start_data(self, req: _Pending, cookie: int, start: int, size: int,
                    done: list[Completed]) -> None:
        assert req.into is not None
        self._req, self._cookie = req, cookie
        self._data = (list(req.into) if not start and size == req.length
                      else slice_views(req.into, start, size))
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

    def _consume_data(self, n: int, done: list[Completed]) -> None:
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
            self._finish(self._cookie, req, 0, "", done)

    def _chunk_done(self, done: list[Completed]) -> None:
        req = self._req
        assert req is not None
        if self._chunk[0] & NBD_REPLY_FLAG_DONE:
            error, message = req.error, req.message
            # ``received`` is disjoint, merged and inside the request: it covers the
            # request exactly when it is the one range of the request's length.
            received = req.received
            if (not error and req.command == NBD_CMD_READ
                    and not (len(received) == 1
                             and received[0][1] - received[0][0] == req.length)):
                covered = sum(stop - start for start, stop in received)
                if covered != req.length:
                    raise NbdProtocolError(f"READ cookie {self._cookie} ended with {covered} "
                                           f"of its {req.length} bytes")
            self._finish(self._cookie, req, error, message, done)
        else:
            self._expect(SIMPLE_REPLY.size, _HEADER)

    def _finish(self, cookie: int, req: _Pending, error: int, message: str,
                done: list[Completed]) -> None:
        del self._pending[cookie]
        if req.command == NBD_CMD_READ:
            self._reads -= 1
        done.append(Completed(cookie, req.command, error, message))
        self._req = None
        self._data = []
        self._expect(SIMPLE_REPLY.size, _HEADER)


def slice_views(views: list[memoryview], start: int, size: int) -> list[memoryview]:
    """The views covering bytes [start, start + size) of ``views``."""
    out: list[memoryview] = []
    for view in views:
        n = len(view)
        if start >= n:
            start -= n
            continue
        take = min(n - start, size)
        out.append(view[start : start + take])
        size -= take
        start = 0
        if not size:
            break
    return out


__all__ = ["NBD_EIO", "Completed", "Transmission", "encode_request"]


def _range_start(r: tuple[int, int]) -> int:
    return r[0]
