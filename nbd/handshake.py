"""The client side of the NBD fixed newstyle handshake, sans-IO: feed it the bytes the server
sent (:meth:`ClientHandshake.receive`), send what :meth:`ClientHandshake.data_to_send` returns,
until :attr:`ClientHandshake.export` is set ("Newstyle negotiation", "Option haggling",
"NBD_OPT_GO" in the NBD protocol document).

The options sent, in order: NBD_OPT_STRUCTURED_REPLY (when asked for; an error reply just means
simple replies), then NBD_OPT_GO for the export asking for NBD_INFO_BLOCK_SIZE (so the server
may state its block size constraints) besides the NBD_INFO_EXPORT it always sends.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nbd.constants import (
    CLIENT_FLAGS,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_REPLY,
    MAX_PAYLOAD,
    MAX_STRING,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_FLAG_ERROR,
    NBD_REP_INFO,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    OPTION_ERROR_NAMES,
    OPTION_HEADER,
    OPTION_REPLY,
)
from nbd.errors import NbdOptionError, NbdProtocolError

OPTION_NAMES = {NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY", NBD_OPT_GO: "NBD_OPT_GO"}
# "NBD_INFO_BLOCK_SIZE": the minimum is a power of two of at most 64 KiB.
MAX_MIN_BLOCK = 64 << 10
INFO_TYPE = struct.Struct(">H")
# Handshake phases.
_GREETING, _OPTION_REPLY, _DONE = range(3)


@dataclass
class ExportInfo:
    """What the handshake learnt about the export."""

    name: str
    size: int
    flags: int  # transmission flags
    structured: bool  # structured replies negotiated
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_payload: int = MAX_PAYLOAD

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def go_data(export: str, infos: tuple[int, ...] = (NBD_INFO_BLOCK_SIZE,)) -> bytes:
    """NBD_OPT_GO's data: the export name and the information requests."""
    name = export.encode()
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(INFO_TYPE.pack(i) for i in infos))


class ClientHandshake:
    """One client handshake for ``export``."""

    def __init__(self, export: str, *, structured: bool = True) -> None:
        if len(export.encode()) > MAX_STRING:
            raise ValueError(f"export name is longer than {MAX_STRING} bytes")
        self.export_name = export
        self.want_structured = structured
        self.export: ExportInfo | None = None
        self._structured = False
        self._phase = _GREETING
        self._option = 0
        self._buf = bytearray()
        self._out = bytearray()
        self._size: int | None = None
        self._flags = 0
        self._blocks = (DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, MAX_PAYLOAD)

    @property
    def done(self) -> bool:
        return self._phase == _DONE

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def bytes_wanted(self) -> int:
        """How many more bytes the handshake needs before it can move on (at least 1)."""
        if self._phase == _GREETING:
            return max(1, GREETING.size - len(self._buf))
        if len(self._buf) < OPTION_REPLY.size:
            return OPTION_REPLY.size - len(self._buf)
        length = OPTION_REPLY.unpack_from(self._buf)[3]
        return max(1, OPTION_REPLY.size + length - len(self._buf))

    def receive(self, data: bytes) -> None:
        """Consume server bytes; raises :class:`NbdProtocolError` or :class:`NbdOptionError`."""
        if self._phase == _DONE:
            if data:
                raise NbdProtocolError(f"{len(data)} bytes after the handshake ended")
            return
        self._buf += data
        while self._phase != _DONE and self._step():
            pass

    def _step(self) -> bool:
        if self._phase == _GREETING:
            if len(self._buf) < GREETING.size:
                return False
            magic, opt_magic, hflags = GREETING.unpack_from(self._buf)
            del self._buf[: GREETING.size]
            if magic != NBDMAGIC:
                raise NbdProtocolError(f"greeting magic {magic:#018x} is not NBDMAGIC")
            if opt_magic != IHAVEOPT:
                raise NbdProtocolError(
                    f"greeting magic {opt_magic:#018x} is not IHAVEOPT (an oldstyle server?)")
            if not hflags & NBD_FLAG_FIXED_NEWSTYLE:
                raise NbdProtocolError("server does not offer NBD_FLAG_FIXED_NEWSTYLE")
            cflags = NBD_FLAG_C_FIXED_NEWSTYLE
            if hflags & NBD_FLAG_NO_ZEROES:
                cflags |= NBD_FLAG_C_NO_ZEROES
            self._out += CLIENT_FLAGS.pack(cflags)
            if self.want_structured:
                self._send_option(NBD_OPT_STRUCTURED_REPLY)
            else:
                self._send_go()
            self._phase = _OPTION_REPLY
            return True
        if len(self._buf) < OPTION_REPLY.size:
            return False
        magic, option, rtype, length = OPTION_REPLY.unpack_from(self._buf)
        name = OPTION_NAMES.get(self._option, str(self._option))
        if magic != OPT_REPLY_MAGIC:
            raise NbdProtocolError(f"option reply magic {magic:#018x} is wrong")
        if option != self._option:
            raise NbdProtocolError(f"reply to option {option} while {name} was asked")
        if length > MAX_OPTION_REPLY:
            raise NbdProtocolError(f"{name} reply of {length} bytes is too long")
        if len(self._buf) < OPTION_REPLY.size + length:
            return False
        payload = bytes(self._buf[OPTION_REPLY.size : OPTION_REPLY.size + length])
        del self._buf[: OPTION_REPLY.size + length]
        self._option_reply(name, rtype, payload)
        return True

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._out += encode_option(option, data)

    def _send_go(self) -> None:
        self._send_option(NBD_OPT_GO, go_data(self.export_name))

    def _option_reply(self, name: str, rtype: int, payload: bytes) -> None:
        if rtype & NBD_REP_FLAG_ERROR:
            message = payload.decode(errors="replace")
            if self._option == NBD_OPT_STRUCTURED_REPLY:
                self._send_go()  # the server only does simple replies
                return
            raise NbdOptionError(name, rtype, OPTION_ERROR_NAMES.get(rtype, f"error {rtype:#x}"),
                                 message)
        if self._option == NBD_OPT_STRUCTURED_REPLY:
            if rtype != NBD_REP_ACK or payload:
                raise NbdProtocolError(f"{name} answered with reply type {rtype}, not ACK")
            self._structured = True
            self._send_go()
            return
        if rtype == NBD_REP_INFO:
            self._info(payload)
        elif rtype == NBD_REP_ACK:
            if payload:
                raise NbdProtocolError(f"{name} ACK carries {len(payload)} bytes")
            if self._size is None:
                raise NbdProtocolError(f"{name} ended without NBD_INFO_EXPORT")
            lo, pref, hi = self._blocks
            self.export = ExportInfo(self.export_name, self._size, self._flags,
                                     self._structured, lo, pref, min(hi, MAX_PAYLOAD))
            self._phase = _DONE
        else:
            raise NbdProtocolError(f"{name} answered with unexpected reply type {rtype}")

    def _info(self, payload: bytes) -> None:
        if len(payload) < INFO_TYPE.size:
            raise NbdProtocolError("NBD_REP_INFO without an information type")
        (itype,) = INFO_TYPE.unpack_from(payload)
        if itype == NBD_INFO_EXPORT:
            if len(payload) != INFO_EXPORT.size:
                raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes, not "
                                       f"{INFO_EXPORT.size}")
            _, size, flags = INFO_EXPORT.unpack(payload)
            if not flags & NBD_FLAG_HAS_FLAGS:
                raise NbdProtocolError("NBD_INFO_EXPORT without NBD_FLAG_HAS_FLAGS")
            self._size, self._flags = size, flags
        elif itype == NBD_INFO_BLOCK_SIZE:
            if len(payload) != INFO_BLOCK_SIZE.size:
                raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, not "
                                       f"{INFO_BLOCK_SIZE.size}")
            _, lo, pref, hi = INFO_BLOCK_SIZE.unpack(payload)
            if not _pow2(lo) or lo > MAX_MIN_BLOCK:
                raise NbdProtocolError(f"minimum block size {lo} is not a power of two "
                                       f"up to {MAX_MIN_BLOCK}")
            if not _pow2(pref) or pref < lo:
                raise NbdProtocolError(f"preferred block size {pref} is not a power of two "
                                       f">= the minimum {lo}")
            if hi < lo or hi % lo:
                raise NbdProtocolError(f"maximum block size {hi} is not a multiple of the "
                                       f"minimum {lo}")
            self._blocks = (lo, pref, hi)
        # Other information (name, description) is not needed and ignored, as the spec allows.


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
