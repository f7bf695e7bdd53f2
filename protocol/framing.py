"""Framing: a byte stream plus fds, as ``recvmsg`` returns them, in; whole messages out.

Which message do the fds of a chunk belong to? The spec ("Communication") has the sender attach
a message's fds to the ``sendmsg`` that carries the message's first byte. On the receiving side
Linux lets one ``recvmsg`` gather fd-less data queued *before* that segment, and stops right
after the segment that carries fds. So the fds of a chunk belong to the **last message that
starts in the chunk** (its payload may still be on its way: libvhost-user sends the header with
the fds and the payload in a second write). A chunk that brings fds but starts no message is a
protocol error. Senders must therefore not put a later message start in the same ``sendmsg`` as
a message with fds (QEMU, libvhost-user and vhostmem's own frontend send one message per call).

Copies: complete messages are decoded straight from the chunk given to ``feed`` (no copy). Only
an incomplete tail is copied, once, into a bytearray, and decoded from a memoryview of it when
it completes.

Errors: on a :class:`ProtocolError` from :meth:`Framer.feed` the framer closes every fd it holds
(those of the bad message, those of messages decoded earlier in the same feed, which are
discarded with it, and those of partial messages) and refuses further input: the byte stream is
no longer synchronised, and the caller must disconnect the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from protocol.codec import HEADER, SENDERS, close_fds, decode, lookup_request, name_or_number
from protocol.constants import HEADER_SIZE, MAX_PAYLOAD_SIZE
from protocol.messages import Message, ProtocolError

# Compact the buffer (move the partial tail to the front) once this much of it is consumed.
COMPACT_THRESHOLD = 1 << 16


class Framer:
    """Turns what one ``recvmsg`` returned into complete, validated messages.

    ``sender`` is who sends the bytes being fed ("frontend" or "backend"). Fds handed to
    :meth:`feed` are owned by the framer until returned inside a Message; :meth:`close` closes
    those of partial messages still buffered (call it when the connection ends).
    """

    def __init__(self, sender: str = "frontend") -> None:
        if sender not in SENDERS:
            raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
        self.sender = sender
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes in _buf
        self._offset = 0  # stream offset of _buf[_pos]
        self._fd_owners: dict[int, list[int]] = {}  # stream offset of a message -> its fds
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back (0 at a message boundary)."""
        return len(self._buf) - self._pos

    @property
    def pending_fds(self) -> list[int]:
        """Fds received for messages that are not complete yet."""
        return [fd for fds in self._fd_owners.values() for fd in fds]

    def close(self) -> None:
        """Forget any partial message and close its fds; the framer accepts no more input."""
        for fds in self._fd_owners.values():
            close_fds(fds)
        self._fd_owners.clear()
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
        # fds are moved (never copied) from new_fds to _fd_owners to a message: each closes once
        close_fds(new_fds)
        self.close()
        self._broken = exc

    def _feed_fresh(self, data: Any, new_fds: list[int], out: list[Message]) -> None:
        """Buffer empty: decode whole messages in place, keep only an incomplete tail."""
        with memoryview(data) as view:
            self._assign_fds(view, 0, new_fds)
            used = self._drain(view, out)
            if used < len(view):
                self._buf = bytearray(view[used:])
            else:
                self._buf = bytearray()
        self._pos = 0
        self._offset += used

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
            try:
                self._assign_fds(view, chunk_start, new_fds)
                used = self._drain(view, out)
            finally:
                view.release()
        self._pos += used
        self._offset += used
        if self._pos == len(self._buf):
            self._buf = bytearray()
            self._pos = 0
        elif self._pos >= COMPACT_THRESHOLD:
            self._buf = self._buf[self._pos :]
            self._pos = 0

    def _assign_fds(self, view: memoryview, chunk_start: int, new_fds: list[int]) -> None:
        """Give the chunk's fds to the last message starting in it (see the module doc)."""
        if not new_fds:
            return
        owner = self._last_start(view, chunk_start)
        if owner is None:
            raise ProtocolError(None, f"{len(new_fds)} fds arrived with no message start")
        self._fd_owners[self._offset + owner] = list(new_fds)
        new_fds.clear()

    def _last_start(self, view: memoryview, chunk_start: int) -> int | None:
        pos = 0
        last = None
        end = len(view)
        while pos < end:
            if pos >= chunk_start:
                last = pos
            if end - pos < HEADER_SIZE:
                break
            number, flags, size = HEADER.unpack_from(view, pos)
            self._check_size(number, flags, size)
            pos += HEADER_SIZE + size
        return last

    def _check_size(self, number: int, flags: int, size: int) -> None:
        if size > MAX_PAYLOAD_SIZE:
            raise ProtocolError(
                name_or_number(number, flags, self.sender), f"size {size} > {MAX_PAYLOAD_SIZE}"
            )

    def _drain(self, view: memoryview, out: list[Message]) -> int:
        """Decode every complete message in ``view``; return how many bytes they used."""
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            number, flags, size = HEADER.unpack_from(view, pos)
            self._check_size(number, flags, size)
            if end - pos < HEADER_SIZE + size:
                # fail early on garbage rather than buffer up to 4 KiB of it
                lookup_request(number, flags, self.sender)
                break
            fds = self._fd_owners.pop(self._offset + pos, [])
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
        return pos
