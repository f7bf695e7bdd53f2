"""Checks of structured reply chunks against the request they name, sans-IO ("Structured reply
chunk message" in the NBD protocol document). Each raises :class:`NbdProtocolError` naming
what was wrong, before a byte of the chunk's payload is placed anywhere."""

from __future__ import annotations

from bisect import bisect_left

from nbd.constants import (
    ERROR_CHUNK,
    HOLE_CHUNK,
    MAX_STRING,
    NBD_CMD_READ,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_REPLY_TYPE_ERROR_OFFSET,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    OFFSET_FIELD,
)
from nbd.errors import NbdProtocolError
from nbd.requests import Request

# Longest error chunk payload accepted: error, message length, a message of at most
# MAX_STRING bytes ("NBD_REPLY_TYPE_ERROR"), and the offset of NBD_REPLY_TYPE_ERROR_OFFSET.
MAX_ERROR_CHUNK = ERROR_CHUNK.size + MAX_STRING + OFFSET_FIELD.size


def check_chunk(req: Request, flags: int, ctype: int, length: int) -> None:
    """A chunk's flags, type and length fit its request."""
    if (ctype == NBD_REPLY_TYPE_OFFSET_DATA and not flags & ~NBD_REPLY_FLAG_DONE
            and req.command == NBD_CMD_READ
            and OFFSET_FIELD.size < length <= OFFSET_FIELD.size + req.length):
        return  # the usual chunk, valid: no message built (a cost per READ reply)
    where = f"chunk type {ctype} for {req.name} cookie {req.cookie}"
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


def claim_range(req: Request, offset: int, size: int, what: str) -> None:
    """[offset, offset + size) must lie in the request and overlap nothing received; then it
    is received."""
    end = offset + size
    if offset < req.offset or end > req.offset + req.length:
        raise NbdProtocolError(
            f"{what} [{offset}, {end}) outside READ cookie {req.cookie}'s range "
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
                f"for READ cookie {req.cookie}")
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


def error_chunk(req: Request, stage: bytearray, ctype: int, length: int) -> None:
    """An ERROR or ERROR_OFFSET chunk's payload (all of it at the front of ``stage``): its
    error and message are the request's, unless an earlier chunk set them."""
    error, msg_len = ERROR_CHUNK.unpack_from(stage)
    tail = OFFSET_FIELD.size if ctype == NBD_REPLY_TYPE_ERROR_OFFSET else 0
    if ERROR_CHUNK.size + msg_len + tail != length:
        raise NbdProtocolError(f"error chunk for cookie {req.cookie}: message length "
                               f"{msg_len} does not fit the chunk length {length}")
    if not error:
        raise NbdProtocolError(f"error chunk for cookie {req.cookie} with error 0")
    start = ERROR_CHUNK.size
    message = bytes(stage[start : start + msg_len]).decode(errors="replace")
    if tail:
        (offset,) = OFFSET_FIELD.unpack_from(stage, start + msg_len)
        if not req.offset <= offset < req.offset + req.length:
            raise NbdProtocolError(f"ERROR_OFFSET {offset} outside cookie "
                                   f"{req.cookie}'s range")
    if not req.error:
        req.error, req.message = error, message


def _range_start(r: tuple[int, int]) -> int:
    return r[0]
