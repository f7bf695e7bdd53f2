"""NBD requests on the client side, sans-IO ("Request message" in the NBD protocol document):
the one record a request in flight is, and its 28-byte header.

A :class:`Request` is what the caller submits (:meth:`nbd.Transmission.submit`) and what the
reply reader completes: one object per request from submission to completion. A caller that
needs more per request (a completion callback, a deadline) subclasses it rather than keeping a
second record beside it, so a request in flight costs one allocation, not two.
"""

from __future__ import annotations

from nbd.constants import COMMAND_NAMES, NBD_REQUEST_MAGIC, REQUEST

REQUEST_SIZE = REQUEST.size  # 28 bytes: magic, flags, type, cookie, offset, length


class Request:
    """One NBD request: what was asked (``command``, ``offset``, ``length``, ``flags``;
    ``views``: a READ's destination buffers, ``length`` bytes in all, or a WRITE's payload,
    which this package never reads), and once submitted its ``cookie`` and what its replies
    brought: ``received``, the (start, end) ranges of a READ's data and hole chunks (sorted,
    disjoint, adjacent ones merged), and ``error`` (0: success, else the NBD error value)
    with the server's ``message``. Submitting it again (after a reconnect) starts those
    afresh."""

    __slots__ = ("command", "cookie", "error", "flags", "length", "message", "offset",
                 "received", "views")

    def __init__(self, command: int, offset: int, length: int, flags: int = 0,
                 views: list[memoryview] | None = None) -> None:
        self.command = command
        self.offset = offset
        self.length = length
        self.flags = flags
        self.views = views
        self.cookie = 0
        self.received: list[tuple[int, int]] = []
        self.error = 0
        self.message = ""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, str(self.command))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name} cookie={self.cookie} offset={self.offset} "
                f"length={self.length} error={self.error})")


def encode_request(command: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, command, cookie, offset, length)


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
