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
an incomplete message is copied, into a bytearray that holds nothing else: the next chunk adds
just the bytes that complete it, it is decoded from a memoryview of that bytearray, and the rest
of the chunk is read in place again. So every byte is copied at most once, and there is nothing
to compact.

Framed but invalid: a message whose header names a known request with valid flags and a size
within the limit is framed whatever its payload holds, so the stream stays in step even when
the payload fails validation (wrong size for its request, a field out of range, the wrong
number of fds). With ``keep_invalid=True`` such a message is returned with ``invalid`` set to
the reason, ``payload`` None and its fds closed, and the framer goes on: a server answers it as
a failed request (REPLY_ACK where negotiated). Without it, it is a ProtocolError as below.

Errors: on a :class:`ProtocolError` from :meth:`Framer.feed` the framer closes every fd it holds
(those of the bad message, those of messages decoded earlier in the same feed, which are
discarded with it, and those of partial messages) and refuses further input: the byte stream is
no longer synchronised, and the caller must disconnect the peer. Any other exception while
decoding is a bug; it is handled the same way and raised as a ProtocolError (its cause
attached). Data that is not a bytes-like object, or fds that are not ints, raise TypeError with
the fds closed, and the framer stays usable (nothing was consumed).
"""

from __future__ import annotations

from collections.abc import Sequence

from protocol.codec import (
    HEADER,
    SENDERS,
    close_fds,
    decode_known,
    lookup_request,
    name_or_number,
)
from protocol.constants import HEADER_SIZE, MAX_PAYLOAD_SIZE
from protocol.messages import Message, ProtocolError


class Framer:
    """Turns what one ``recvmsg`` returned into complete, validated messages.

    ``sender`` is who sends the bytes being fed ("frontend" or "backend"). Fds handed to
    :meth:`feed` are owned by the framer until returned inside a Message; :meth:`close` closes
    those of partial messages still buffered (call it when the connection ends).
    """

    def __init__(self, sender: str = "frontend", *, keep_invalid: bool = False) -> None:
        if sender not in SENDERS:
            raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
        self.sender = sender
        self.keep_invalid = keep_invalid
        self._buf = bytearray()  # the bytes of one incomplete message, nothing else
        self._partial_fds: list[int] = []  # the fds of that message
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back (0 at a message boundary)."""
        return len(self._buf)

    @property
    def pending_fds(self) -> list[int]:
        """Fds received for messages that are not complete yet."""
        return list(self._partial_fds)

    def close(self) -> None:
        """Forget any partial message and close its fds; the framer accepts no more input."""
        close_fds(self._partial_fds)
        self._partial_fds = []
        self._buf = bytearray()
        if self._broken is None:
            self._broken = ProtocolError(None, "framer closed")

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Add one chunk (and the fds that came with it); return the messages it completes."""
        new_fds = list(fds)
        if self._broken is not None:
            close_fds(new_fds)
            raise ProtocolError(None, f"stream unsynchronised after earlier error ({self._broken})")
        try:
            if new_fds:
                _check_fd_types(new_fds)
            view = memoryview(data)
            if view.itemsize != 1 or view.ndim != 1:
                view = _byte_view(view)
        except TypeError:
            close_fds(new_fds)
            raise
        out: list[Message] = []
        try:
            with view:
                self._feed(view, new_fds, out)
        except ProtocolError as exc:
            self._fail(exc, out, new_fds)
            raise
        except Exception as exc:  # a bug, not the peer's fault: still drop the peer cleanly
            error = ProtocolError(None, f"cannot decode the stream: {type(exc).__name__}: {exc}")
            self._fail(error, out, new_fds)
            raise error from exc
        except BaseException as exc:  # KeyboardInterrupt and the like: clean up, re-raise
            self._fail(ProtocolError(None, f"interrupted by {type(exc).__name__}"), out, new_fds)
            raise
        return out

    # --- internals ------------------------------------------------------------------------

    def _fail(self, exc: ProtocolError, out: list[Message], new_fds: list[int]) -> None:
        for msg in out:
            close_fds(msg.fds)
        # fds are moved (never copied) from new_fds to a partial message or to a Message: each
        # list is closed once
        close_fds(new_fds)
        self.close()
        self._broken = exc

    def _feed(self, view: memoryview, new_fds: list[int], out: list[Message]) -> None:
        used = self._complete_partial(view, new_fds, out) if self._buf else 0
        if used == len(view):
            if new_fds:
                raise ProtocolError(None, f"{len(new_fds)} fds arrived with no message start")
            return
        rest = view[used:] if used else view
        try:
            owner = self._last_start(rest) if new_fds else None
            used = self._drain(rest, out, owner, new_fds)
            if used < len(rest):
                self._buf = bytearray(rest[used:])  # the one copy of an incomplete message
                if owner == used:
                    self._partial_fds = new_fds[:]
                    new_fds.clear()
        finally:
            if rest is not view:
                rest.release()

    def _complete_partial(self, view: memoryview, new_fds: list[int], out: list[Message]) -> int:
        """Append to the buffered message the bytes of ``view`` it lacks; decode it once it is
        whole. Return how many bytes of ``view`` were taken."""
        buf = self._buf
        have = len(buf)
        if have >= HEADER_SIZE:
            number, flags, size = HEADER.unpack_from(buf, 0)
        elif have + len(view) >= HEADER_SIZE:  # peek at the header without buffering past it
            number, flags, size = HEADER.unpack(buf + view[: HEADER_SIZE - have])
        else:
            buf += view
            return len(view)
        self._check_size(number, flags, size)
        total = HEADER_SIZE + size
        used = total - have
        if used >= len(view):
            buf += view
            used = len(view)
            if used < total - have:
                lookup_request(number, flags, self.sender)  # fail early on garbage
                return used
        else:
            buf += view[:used]
        if new_fds and used == len(view):
            # checked before decoding, as for a chunk read in place
            raise ProtocolError(None, f"{len(new_fds)} fds arrived with no message start")
        fds, self._partial_fds = self._partial_fds, []
        self._buf = bytearray()  # buf is never resized again: its views need no care
        with memoryview(buf)[HEADER_SIZE:] as body:
            out.append(self._message(number, flags, body, fds))
        return used

    def _message(self, number: int, flags: int, body: memoryview, fds: list[int]) -> Message:
        """Decode one whole message; ``fds`` are closed on any error (or kept by the Message)."""
        try:
            request, spec = lookup_request(number, flags, self.sender)
            try:
                payload = decode_known(request, spec, flags, body, len(fds))
            except ProtocolError as exc:
                if not self.keep_invalid:
                    raise
                close_fds(fds)
                return Message(request, flags, None, [], invalid=exc.reason)
        except BaseException:
            close_fds(fds)
            raise
        return Message(request, flags, payload, fds)

    def _last_start(self, view: memoryview) -> int:
        """Where the last message starting in ``view`` starts (the owner of the chunk's fds)."""
        pos = 0
        last = 0
        end = len(view)
        while pos < end:
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

    def _drain(self, view: memoryview, out: list[Message], owner: int | None,
               new_fds: list[int]) -> int:
        """Decode every complete message in ``view``; return how many bytes they used. The
        message starting at ``owner`` gets ``new_fds``."""
        pos = 0
        end = len(view)
        while end - pos >= HEADER_SIZE:
            number, flags, size = HEADER.unpack_from(view, pos)
            self._check_size(number, flags, size)
            if end - pos < HEADER_SIZE + size:
                # fail early on garbage rather than buffer up to 4 KiB of it
                lookup_request(number, flags, self.sender)
                break
            if pos == owner:
                fds = new_fds[:]
                new_fds.clear()
            else:
                fds = []
            body = view[pos + HEADER_SIZE : pos + HEADER_SIZE + size]
            try:
                out.append(self._message(number, flags, body, fds))
            finally:
                body.release()
            pos += HEADER_SIZE + size
        return pos


def _byte_view(raw: memoryview) -> memoryview:
    """A flat view of the bytes of a view of another format (TypeError if not contiguous)."""
    with raw:
        return raw.cast("B")


def _check_fd_types(fds: list[int]) -> None:
    for fd in fds:
        if not isinstance(fd, int):
            raise TypeError(f"fds must be ints, not {type(fd).__name__}")
