"""The management socket on the server's event loop: accepts clients, moves lines between them
and ``protocol`` / ``methods``.

Bounded per client: a request line is at most ``MAX_LINE_BYTES`` (longer: an error, then the
connection is closed); requests of one client run one at a time, and its next bytes are read
only once the reply to the previous request has drained to the socket below the transport's
high-water mark, so a client that sends without reading replies is simply not read from (the
kernel's socket buffers then push back on it): memory per client stays bounded. At most
``MAX_CLIENTS`` clients at once; one more gets an error line and is closed. A client that sends
nothing, or does not read a reply, for ``idle_timeout`` seconds is closed, so silent clients
cannot hold every slot and lock the operator out. A client is never able to disturb a device:
requests reach devices only through ``Methods``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from vhostmem.rpc.methods import Methods
from vhostmem.rpc.protocol import (
    INTERNAL_ERROR,
    TOO_MANY_CLIENTS,
    LineBuffer,
    LineTooLong,
    RpcError,
    encode_error,
    encode_result,
    parse_request,
)
from vhostmem.sockets import bind_unix_socket

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
READ_BYTES = 65536
# Replies beyond this much unsent output stop the client being read (asyncio's drain()).
WRITE_HIGH_WATER = 256 * 1024
# A client silent (or not reading its replies) this long is closed; 0 or None: never.
DEFAULT_IDLE_TIMEOUT = 600.0
MAX_IDLE_TIMEOUT = 86400.0


class RpcServer:
    """JSON-RPC over a Unix socket at ``path`` (created with ``mode``, 0600 by default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, methods: Methods, path: str,
                 mode: int = 0o600, group: str | None = None,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT) -> None:
        self.loop = loop
        self.idle_timeout = idle_timeout or None
        self.methods = methods
        self.path = path
        self.mode = mode
        self.group = group
        self.sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self.mode, self.group)
        try:
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._on_client, sock=sock,
                                                           limit=READ_BYTES)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        self.sock = sock
        log.info("management socket on %s", self.path)

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS:
            log.warning("management socket: refusing a client: %d are connected", MAX_CLIENTS)
            with contextlib.suppress(OSError):
                writer.write(encode_error(None, TOO_MANY_CLIENTS,
                                          f"too many management clients (at most {MAX_CLIENTS})"))
            writer.close()
            return
        self._clients.add(task)
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            await self._serve_client(reader, writer)
        except (ConnectionError, BrokenPipeError):
            pass  # the client went away: nothing to tell it
        except TimeoutError:
            log.warning("management socket: closing a client idle for %g s", self.idle_timeout)
            writer.transport.abort()  # close() would first wait for its unread replies
        except asyncio.CancelledError:
            pass  # shutting down
        except Exception:  # a bug in one request must not take the loop down
            log.exception("management socket: client failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        lines = LineBuffer()
        while True:
            data = await asyncio.wait_for(reader.read(READ_BYTES), self.idle_timeout)
            if not data:
                return
            try:
                batch = lines.feed(data)
            except LineTooLong as exc:
                writer.write(encode_error(None, exc.code, exc.message))
                await writer.drain()
                log.warning("management socket: %s", exc.message)
                return
            for line in batch:
                if not line.strip():
                    continue
                reply = await self._handle(line)
                if reply is not None:
                    writer.write(reply)
                    # Waits while the client does not read its replies.
                    await asyncio.wait_for(writer.drain(), self.idle_timeout)
                # One request per turn: neither read() nor drain() yields while data is
                # buffered, so a client streaming requests (notifications get no reply to
                # wait on) would otherwise hold the loop for thousands of them.
                await asyncio.sleep(0)

    async def _handle(self, line: bytes) -> bytes | None:
        try:
            req = parse_request(line)
        except RpcError as exc:
            return encode_error(exc.request_id, exc.code, exc.message)
        try:
            result = await self.methods.call(req.method, req.params)
        except RpcError as exc:
            reply = encode_error(req.id, exc.code, exc.message)
        except Exception as exc:
            log.exception("management socket: %s failed", req.method)
            reply = encode_error(req.id, INTERNAL_ERROR, f"{req.method}: internal error: {exc!r}")
        else:
            reply = encode_result(req.id, result)
        return None if req.notification else reply

    async def close(self) -> None:
        """Stop accepting, end every client (a request being served is cancelled where it
        waits), remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
