"""Framing: a byte stream plus fds, as ``recvmsg`` returns them, in; whole messages out.

Rules the framer relies on (vhost-user.rst, "Communication"): the fds of a message are sent with
the ``sendmsg`` that carries its first byte, so they arrive with the first bytes of that message.
The fds of one ``feed`` therefore belong to the first message that *starts* in that chunk; a
chunk that brings fds but starts no message is a protocol error.

Copies: complete messages are decoded straight from the chunk given to ``feed`` (no copy). Only
an incomplete tail is copied, once, into a bytearray, and decoded from a memoryview of it when
it completes.

Errors: on a :class:`ProtocolError` from :meth:`Framer.feed` the framer closes every fd it holds
(those of the bad message, those of messages decoded earlier in the same feed, which are
discarded with it, and those of a buffered partial message) and becomes unusable: the byte stream
is no longer synchronised, and the caller must disconnect the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.codec import HEADER, SENDERS, close_fds, decode
from protocol.constants import HEADER_SIZE, MAX_PAYLOAD_SIZE
from protocol.messages import Message, ProtocolError

# Compact the buffer (move the partial tail to the front) once this much of it is consumed.
COMPACT_THRESHOLD = 1 << 16


class Framer:
    """Turns what one ``recvmsg`` returned into complete, validated messages.

    ``sender`` is who sends the bytes being fed ("frontend" or "backend"). Fds handed to
    :meth:`feed` are owned by the framer until returned inside a Message; :meth:`close` closes
    those of a partial message still buffered (call it when the connection ends).
    """

    def __init__(self, sender: str = "frontend") -> None:
        if sender not in SENDERS:
            raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
        self.sender = sender
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._partial_fds: list[int] = []  # fds of the message starting at _pos
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back (0 at a message boundary)."""
        return len(self._buf) - self._pos

    @property
    def pending_fds(self) -> list[int]:
        """Fds received with the incomplete message still buffered."""
        return list(self._partial_fds)

    def close(self) -> None:
        """Forget any partial message and close its fds; the framer accepts no more input."""
        close_fds(self._partial_fds)
        self._partial_fds = []
        self._buf = bytearray()
        self._pos = 0
        if self._broken is None:
            self._broken = ProtocolError(None, "framer closed")

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add one chunk (and the fds that came with it); return the messages it completes."""
        new_fds = list(fds)
        if self._broken is not None:
            close_fds(new_fds)
            raise ProtocolError(None, f"stream unsynchronised after earlier error ({self._broken})")
        out: list[Message] = []
        try:
            if self._pos == len(self._buf):
                self._feed_fresh(data, new_fds, out)
            else:
                self._feed_continued(data, new_fds, out)
        except ProtocolError as exc:
            self._fail(exc, out, new_fds)
            raise
        return out

    # --- internals ------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError, out: list[Message], new_fds: list[int]) -> None:
        for msg in out:
            close_fds(msg.fds)
        # fds handed to a message were moved out of new_fds / _partial_fds: each is closed once
        close_fds(new_fds)
        self.close()
        self._broken = exc

    def _feed_fresh(self, data: Any, new_fds: list[int], out: list[Message]) -> None:
        """Buffer empty: decode whole messages in place, keep only an incomplete tail."""
        with memoryview(data) as view:
            used = self._drain(view, new_fds, out, chunk_start=0)
            if used < len(view):
                self._buf = bytearray(view[used:])
                self._pos = 0
            else:
                self._reset_buffer()

    def _feed_continued(self, data: Any, new_fds: list[int], out: list[Message]) -> None:
        """A partial message is buffered: append the chunk, then decode what is complete."""
        chunk_start = len(self._buf) - self._pos
        try:
            self._buf += data
        except BufferError:
            # a view of the old buffer is still alive somewhere (e.g. in a traceback):
            # start a new buffer rather than resize the exported one
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        with memoryview(self._buf) as whole:
            view = whole[self._pos :]
            used = self._drain(view, new_fds, out, chunk_start)
            view.release()
        self._pos += used
        if self._pos == len(self._buf):
            self._reset_buffer()
        elif self._pos >= COMPACT_THRESHOLD:
            self._buf = self._buf[self._pos :]
            self._pos = 0

    def _reset_buffer(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def _drain(
        self, view: memoryview, new_fds: list[int], out: list[Message], chunk_start: int
    ) -> int:
        """Decode every complete message in ``view``; return how many bytes they used.

        Messages starting before ``chunk_start`` began in an earlier feed and own
        ``_partial_fds``; the first one starting at or after it gets ``new_fds``.
        """
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            number, flags, size = HEADER.unpack_from(view, pos)
            if size > MAX_PAYLOAD_SIZE:
                raise ProtocolError(self._name(number, flags), f"size {size} > {MAX_PAYLOAD_SIZE}")
            if end - pos < HEADER_SIZE + size:
                break
            fds = self._take_fds(pos, chunk_start, new_fds)
            body = view[pos + HEADER_SIZE : pos + HEADER_SIZE + size]
            try:
                request, payload = decode(number, flags, body, len(fds), self.sender)
            except ProtocolError:
                close_fds(fds)
                raise
            finally:
                body.release()
            out.append(Message(request, flags, payload, fds))
            pos += HEADER_SIZE + size
        if pos < end:
            self._check_partial(view, pos, chunk_start, new_fds)
        elif new_fds:  # no message started in this chunk to take them
            raise ProtocolError(None, f"{len(new_fds)} fds arrived with no message start")
        return pos

    def _take_fds(self, pos: int, chunk_start: int, new_fds: list[int]) -> list[int]:
        if pos < chunk_start:  # began in an earlier feed
            fds, self._partial_fds = self._partial_fds, []
            return fds
        if new_fds:
            fds = list(new_fds)
            new_fds.clear()
            return fds
        return []

    def _check_partial(
        self, view: memoryview, pos: int, chunk_start: int, new_fds: list[int]
    ) -> None:
        """An incomplete message starts at ``pos``: check what can be, and keep its fds."""
        if len(view) - pos >= HEADER_SIZE:
            number, flags, _size = HEADER.unpack_from(view, pos)
            # fail early on garbage rather than buffering up to 4 KiB of it
            decode_header_only(number, flags, self.sender)
        if pos >= chunk_start:
            self._partial_fds = list(new_fds)
            new_fds.clear()
        elif new_fds:
            raise ProtocolError(None, f"{len(new_fds)} fds arrived with no message start")

    def _name(self, number: int, flags: int) -> Any:
        from protocol.codec import _name_or_number

        return _name_or_number(number, flags, self.sender)


def decode_header_only(number: int, flags: int, sender: str) -> None:
    """Validate request code and flags of a header whose payload has not arrived yet."""
    from protocol.codec import lookup_request

    lookup_request(number, flags, sender)
