"""A scripted NBD server for tests: an honest handshake, then each READ answered the way the
scenario says (a wrong magic, an unknown cookie, a reply cut short, an oversized chunk, a chunk
outside the request), or honestly (``honest``; ``silent-flush``: honest, but a FLUSH is
never answered). Everything else it answers honestly; it counts
connections and records every request (command, flags, offset, length). It offers only
NBD_FLAG_SEND_FLUSH (and NBD_FLAG_CAN_MULTI_CONN with ``multi_conn``): no FUA, TRIM or
WRITE_ZEROES. The connections numbered in ``silent`` (1 the first) take requests and never
answer any."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

from nbd.constants import (
    IHAVEOPT,
    INFO_EXPORT,
    NBD_CMD_DISC,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_WRITE,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_FLUSH,
    NBD_OPT_GO,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_REP_ACK,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST,
)

SCENARIOS = ("wrong-magic", "unknown-cookie", "short-then-close", "oversized-chunk",
             "chunk-outside")
HONEST = "honest"
SILENT_FLUSH = "silent-flush"  # honest, except that no FLUSH is ever answered


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise ConnectionError("client went away")
        data += more
    return data


def _chunk(cookie: int, ctype: int, payload: bytes, flags: int = NBD_REPLY_FLAG_DONE,
           length: int | None = None) -> bytes:
    return struct.pack(">IHHQI", NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, cookie,
                       len(payload) if length is None else length) + payload


class HostileServer:
    def __init__(self, path: Path, scenario: str, size: int = 1 << 20,
                 multi_conn: bool = False, silent: frozenset[int] = frozenset(),
                 bad_limit: int | None = None) -> None:
        """``bad_limit``: this many bad replies at most, honest ones after them."""
        assert scenario in (*SCENARIOS, HONEST, SILENT_FLUSH)
        self.path, self.scenario, self.size = path, scenario, size
        self.bad_limit = bad_limit
        self.flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
        if multi_conn:
            self.flags |= NBD_FLAG_CAN_MULTI_CONN
        self.silent = silent
        self.unanswered = 0  # requests a silent connection took
        self.disk = bytearray(size)
        self.connections = 0
        self.bad_replies = 0
        self.hangups = 0  # connections the client closed
        self.requests: list[tuple[int, int, int, int]] = []  # command, flags, offset, length
        self.commands: list[tuple[int, int]] = []  # connection number, command
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        silent = number in self.silent
        try:
            self._handshake(conn)
            while True:
                _, flags, cmd, cookie, offset, length = REQUEST.unpack(
                    _recv_exact(conn, REQUEST.size))
                self.requests.append((cmd, flags, offset, length))
                self.commands.append((number, cmd))
                if cmd == NBD_CMD_DISC:
                    return
                if cmd == NBD_CMD_WRITE:
                    data = _recv_exact(conn, length)
                    if not silent:
                        self.disk[offset : offset + length] = data
                if silent:
                    self.unanswered += 1
                    continue
                if cmd == NBD_CMD_FLUSH and self.scenario == SILENT_FLUSH:
                    continue
                if cmd != NBD_CMD_READ:
                    conn.sendall(struct.pack(">IIQ", NBD_SIMPLE_REPLY_MAGIC, 0, cookie))
                    continue
                bad = self.scenario not in (HONEST, SILENT_FLUSH) and (
                    self.bad_limit is None or self.bad_replies < self.bad_limit)
                self.bad_replies += bad
                if self._bad_read(conn, cookie, offset, length,
                                  self.scenario if bad else HONEST):
                    return
        except ConnectionError:
            self.hangups += 1
            return
        except OSError:
            return
        finally:
            conn.close()

    def _handshake(self, conn: socket.socket) -> None:
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))
        _recv_exact(conn, 4)
        while True:
            _, option, length = struct.unpack(">QII", _recv_exact(conn, 16))
            _recv_exact(conn, length)
            if option == NBD_OPT_STRUCTURED_REPLY:
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, NBD_REP_ACK, 0))
            elif option == NBD_OPT_GO:
                info = INFO_EXPORT.pack(0, self.size, self.flags)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, NBD_REP_INFO,
                                         len(info)) + info)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, NBD_REP_ACK, 0))
                return
            else:
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, NBD_REP_ERR_UNSUP,
                                         0))

    def _bad_read(self, conn: socket.socket, cookie: int, offset: int, length: int,
                  kind: str) -> bool:
        """Send scenario ``kind``'s reply; whether the connection is to be closed."""
        data = bytes(self.disk[offset : offset + length])
        at = struct.pack(">Q", offset)
        if kind in (HONEST, SILENT_FLUSH):
            conn.sendall(_chunk(cookie, NBD_REPLY_TYPE_OFFSET_DATA, at + data))
        elif kind == "wrong-magic":
            conn.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, cookie) + data)
        elif kind == "unknown-cookie":
            conn.sendall(_chunk(cookie ^ 0x5A5A, NBD_REPLY_TYPE_OFFSET_DATA, at + data))
        elif kind == "short-then-close":
            conn.sendall(_chunk(cookie, NBD_REPLY_TYPE_OFFSET_DATA, at + data[: length // 2],
                                length=8 + length))
            return True
        elif kind == "oversized-chunk":
            conn.sendall(_chunk(cookie, NBD_REPLY_TYPE_OFFSET_DATA,
                                at + data + b"\xcc" * 65536))
        else:  # chunk-outside: the data of the blocks after the request's
            conn.sendall(_chunk(cookie, NBD_REPLY_TYPE_OFFSET_DATA,
                                struct.pack(">Q", offset + length) + b"\xcc" * length))
        return False
