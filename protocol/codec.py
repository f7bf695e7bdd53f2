"""Decoding and encoding of whole messages (header + payload), with validation.

Decoding reads straight from a memoryview (no copy of the payload; only ``bytes`` fields such as
the config space are copied out, once). Every rejection raises :class:`ProtocolError` naming the
request and the reason, after closing the fds that came with the message.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, Literal

from construct import ConstructError

from protocol.constants import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_FDS,
    MAX_PAYLOAD_SIZE,
    NEED_REPLY_FLAG,
    REPLY_FLAG,
    REPLY_FLAGS,
    REQUEST_FLAGS,
    VERSION,
    VERSION_MASK,
    BackendRequest,
    FrontendRequest,
)
from protocol.messages import Message, ProtocolError, Shape
from protocol.payloads import strip_io
from protocol.spec import FdRule, RequestSpec, spec_for

Sender = Literal["frontend", "backend"]
HEADER = struct.Struct("<III")  # request, flags, size: same layout as payloads.Header
SENDERS = ("frontend", "backend")


class ViewStream:
    """A read-only stream over a memoryview whose reads are zero-copy slices (for construct)."""

    __slots__ = ("_pos", "_view")

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int | None = -1) -> memoryview:
        start = self._pos
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._pos = end
        return self._view[start:end]

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd, ignoring ones already closed and entries that are not fds at all (used
    on every rejection path, including that of a caller passing garbage)."""
    for fd in fds:
        with contextlib.suppress(OSError, TypeError, OverflowError):
            os.close(fd)


def request_enum(sender: str, is_reply: bool) -> type[IntEnum]:
    """Which numbering a message uses: a reply answers a request of the other side."""
    if sender not in SENDERS:
        raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
    from_frontend = sender == "frontend"
    return FrontendRequest if from_frontend != is_reply else BackendRequest


def check_flags(request: Any, flags: int) -> None:
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(request, f"bad version {flags & VERSION_MASK} in flags {flags:#x}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(request, f"reserved flag bits set in flags {flags:#x}")
    if flags & REPLY_FLAG and flags & NEED_REPLY_FLAG:
        raise ProtocolError(request, f"a reply must not ask for a reply (flags {flags:#x})")


def lookup_request(number: int, flags: int, sender: str) -> tuple[IntEnum, RequestSpec]:
    """Header checks that need no payload: enum member, flags; raises ProtocolError."""
    enum = request_enum(sender, bool(flags & REPLY_FLAG))
    try:
        request = enum(number)
    except ValueError:
        side = "front-end" if enum is FrontendRequest else "back-end"
        raise ProtocolError(number, f"unknown {side} request code {number}") from None
    check_flags(request, flags)
    return request, spec_for(request)


def _pick_shape(request: IntEnum, spec: RequestSpec, flags: int, size: int) -> tuple[Shape, FdRule]:
    if not flags & REPLY_FLAG:
        if not spec.payload.accepts_size(size):
            raise ProtocolError(request, _size_reason(spec.payload, size))
        return spec.payload, spec.fds
    for shape, rule in spec.reply_shapes():
        if shape.accepts_size(size):
            return shape, rule
    names = " or ".join(s.name for s, _ in spec.reply_shapes())
    raise ProtocolError(request, f"reply size {size} fits no reply shape ({names})")


def _size_reason(shape: Shape, size: int) -> str:
    if shape.size is not None:
        return f"payload size {size}, expected {shape.size} ({shape.name})"
    return f"payload size {size} is shorter than a {shape.name} ({shape.min_size})"


def decode_payload(request: IntEnum, shape: Shape, view: memoryview) -> Any:
    """Decode a payload of a shape already chosen; ``len(view)`` is the header's size."""
    if shape.kind == "none":
        return None
    if shape.size_check is not None:
        reason = shape.size_check(view)
        if reason is not None:
            raise ProtocolError(request, reason)
    stream = ViewStream(view)
    try:
        payload = shape.con.parse_stream(stream)  # type: ignore[union-attr]
    except (ConstructError, ValueError) as exc:
        raise ProtocolError(request, f"bad {shape.name} payload: {_short(exc)}") from None
    if stream.tell() != len(view):
        raise ProtocolError(request, f"{len(view) - stream.tell()} trailing payload bytes")
    strip_io(payload)
    if shape.validate is not None:
        reason = shape.validate(payload)
        if reason is not None:
            raise ProtocolError(request, reason)
    return payload


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def check_fds(request: IntEnum, rule: FdRule, payload: Any, nfds: int) -> None:
    allowed = rule.allowed(payload)
    if nfds not in allowed:
        if allowed == (0,):
            reason = f"{nfds} fds on a message that takes none"
        else:
            reason = f"{nfds} fds, expected {rule.description}"
            if rule.description == "one fd per region":
                reason = f"nregions {allowed[0]} != {nfds} fds"
        raise ProtocolError(request, reason)


def decode(
    number: int, flags: int, view: memoryview, nfds: int, sender: str
) -> tuple[IntEnum, Any]:
    """Validate and decode one message whose header fields are known; ``view`` is its payload."""
    request, spec = lookup_request(number, flags, sender)
    return request, decode_known(request, spec, flags, view, nfds)


def decode_known(
    request: IntEnum, spec: RequestSpec, flags: int, view: memoryview, nfds: int
) -> Any:
    """The payload of a message whose header passed :func:`lookup_request`: the stream is in
    step here, so a ProtocolError from this is about this one message only."""
    shape, rule = _pick_shape(request, spec, flags, len(view))
    payload = decode_payload(request, shape, view)
    if nfds > MAX_FDS:
        raise ProtocolError(request, f"{nfds} fds, more than the {MAX_FDS} a message may carry")
    check_fds(request, rule, payload, nfds)
    return payload


def parse_message(
    data: bytes | bytearray | memoryview,
    nfds: int = 0,
    *,
    sender: Sender = "frontend",
    fds: Sequence[int] | None = None,
) -> Message:
    """Decode exactly one whole message (header + payload) sent by ``sender``.

    ``fds`` are the descriptors that came with it (then ``nfds`` defaults to their number); with
    only ``nfds``, the count is validated and ``Message.fds`` stays empty. On any error the
    given ``fds`` are closed: :class:`ProtocolError` for a bad message (or an ``nfds`` that
    contradicts ``fds``), TypeError / ValueError for an argument of the wrong type or sender.
    """
    fd_list = list(fds) if fds is not None else []
    try:
        if sender not in SENDERS:
            raise ValueError(f"sender must be 'frontend' or 'backend', not {sender!r}")
        with memoryview(data) as view:
            if fds is not None and nfds not in (0, len(fd_list)):
                raise ProtocolError(
                    _peek_request(view, sender), f"nfds={nfds} but {len(fd_list)} fds were given"
                )
            count = len(fd_list) if fds is not None else nfds
            request, flags, payload = _parse_view(view, count, sender)
    except BaseException:
        close_fds(fd_list)
        raise
    return Message(request, flags, payload, fd_list)


def _peek_request(view: memoryview, sender: str) -> IntEnum | int | None:
    """The request a header names, for an error raised before the message is decoded."""
    if len(view) < HEADER_SIZE:
        return None
    number, flags, _ = HEADER.unpack_from(view, 0)
    return name_or_number(number, flags, sender)


def _parse_view(view: memoryview, nfds: int, sender: str) -> tuple[IntEnum, int, Any]:
    if len(view) < HEADER_SIZE:
        raise ProtocolError(None, f"{len(view)} bytes, shorter than the {HEADER_SIZE}-byte header")
    number, flags, size = HEADER.unpack_from(view, 0)
    if size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(
            name_or_number(number, flags, sender), f"size {size} > {MAX_PAYLOAD_SIZE}"
        )
    if len(view) != HEADER_SIZE + size:
        raise ProtocolError(
            name_or_number(number, flags, sender),
            f"{len(view)} bytes but the header says {HEADER_SIZE} + {size}",
        )
    request, payload = decode(number, flags, view[HEADER_SIZE:], nfds, sender)
    return request, flags, payload


def name_or_number(number: int, flags: int, sender: str) -> IntEnum | int:
    """The request for an error message about a header that will not be decoded further."""
    try:
        return request_enum(sender, bool(flags & REPLY_FLAG))(number)
    except ValueError:
        return number


# --- encoding -----------------------------------------------------------------------------


def encode_payload(request: IntEnum, shape: Shape, payload: Any) -> bytes:
    if shape.kind == "none":
        if payload is not None:
            raise ProtocolError(request, f"takes no payload, got {type(payload).__name__}")
        return b""
    if shape.validate is not None and not isinstance(payload, int):
        reason = shape.validate(payload)
        if reason is not None:
            raise ProtocolError(request, reason)
    try:
        data: bytes = shape.con.build(payload)  # type: ignore[union-attr]
    except (ConstructError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(request, f"cannot encode {shape.name}: {_short(exc)}") from None
    if len(data) > MAX_PAYLOAD_SIZE:
        raise ProtocolError(request, f"size {len(data)} > {MAX_PAYLOAD_SIZE}")
    return data


def _reply_shape(request: IntEnum, spec: RequestSpec, payload: Any) -> tuple[Shape, FdRule]:
    for shape, rule in spec.reply_shapes():
        if shape.matches(payload):
            return shape, rule
    names = " or ".join(s.name for s, _ in spec.reply_shapes())
    raise ProtocolError(request, f"reply payload {type(payload).__name__} is not a {names}")


def _encode(request: IntEnum, flags: int, payload: Any, fds_count: int | None) -> bytes:
    check_flags(request, flags)
    spec = spec_for(request)
    if flags & REPLY_FLAG:
        shape, rule = _reply_shape(request, spec, payload)
    else:
        shape, rule = spec.payload, spec.fds
        if isinstance(payload, int) and shape.kind == "struct":
            raise ProtocolError(request, f"expects a {shape.name}, got an int")
    body = encode_payload(request, shape, payload)
    if fds_count is not None:
        # re-decode what was built so that the fd rule sees the same payload the peer will
        check_fds(request, rule, decode_payload(request, shape, memoryview(body)), fds_count)
    return HEADER.pack(int(request), flags, len(body)) + body


def build_message(message: Message) -> bytes:
    """The exact wire bytes of ``message`` (its fds travel separately, with the first byte)."""
    return _encode(message.request, message.flags, message.payload, len(message.fds))


def encode_request(
    request: IntEnum,
    payload: Any = None,
    *,
    need_reply: bool = False,
    fds_count: int = 0,
) -> bytes:
    """Wire bytes of a request (front-end or back-end); ``payload`` is an int, dict or Container.

    ``fds_count`` is how many fds will be sent with it; a count the request does not allow
    raises ProtocolError (e.g. SET_MEM_TABLE with 2 regions needs 2).
    """
    flags = REQUEST_FLAGS | (NEED_REPLY_FLAG if need_reply else 0)
    return _encode(request, flags, payload, fds_count)


def encode_reply(request: IntEnum, payload: Any = None) -> bytes:
    """Wire bytes of the reply to ``request``: its explicit reply, or the u64 REPLY_ACK status.

    The shape is chosen from the payload's type among the request's reply shapes (an int is a
    u64, a mapping the struct, None an empty payload). Fd counts are not checked here.
    """
    return _encode(request, REPLY_FLAGS, payload, None)
