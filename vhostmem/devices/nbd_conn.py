"""Opening an NBD connection: connect to the address of an NBD URI and run the sans-IO
handshake (:class:`nbd.ClientHandshake`) over it, blocking (at startup, so a server that is
unreachable or refuses the export stops vhostmem from starting) or on the event loop
(reconnects)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from nbd import ClientHandshake, ExportInfo, NbdAddress, NbdError, parse_nbd_uri


def seconds_from_env(name: str, default: float) -> float:
    """A timeout the tests shorten through the environment (docs/nbd.md, "Timeouts for tests"):
    they wait these out on purpose, and need not wait the full default."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= default:
        raise SystemExit(f"{name}={value!r}: want seconds in (0, {default:g}]")
    return seconds


CONNECT_TIMEOUT = seconds_from_env("VHOSTMEM_NBD_CONNECT_TIMEOUT", 5.0)
# Socket buffers: room for a few large requests in flight without waiting for the reader.
SOCKET_BUFFER = 4 << 20


class NbdConnectError(ConnectionError):
    """The NBD server could not be reached, or refused the export; the message says which."""


def _new_socket(address: NbdAddress) -> tuple[socket.socket, object]:
    if address.socket is not None:
        return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), address.socket
    assert address.host is not None
    infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    family, kind, proto, _, sockaddr = infos[0]
    return socket.socket(family, kind, proto), sockaddr


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):  # the default buffers work, only less well
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_blocking(address: NbdAddress, timeout: float = CONNECT_TIMEOUT
                     ) -> tuple[socket.socket, ExportInfo]:
    """A connected socket in the transmission phase (non-blocking on return) and the export."""
    try:
        sock, sockaddr = _new_socket(address)
    except OSError as exc:
        raise NbdConnectError(f"NBD server {address}: {exc}") from None
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            raise NbdConnectError(f"cannot connect to the NBD server {address}: "
                                  f"{exc.strerror or exc}") from None
        _tune(sock)
        hs = ClientHandshake(address.export)
        while not hs.done:
            try:
                data = sock.recv(hs.bytes_wanted())
            except OSError as exc:
                raise NbdConnectError(f"NBD handshake with {address}: {exc}") from None
            if not data:
                raise NbdConnectError(f"NBD server {address} closed the connection during "
                                      "the handshake")
            try:
                hs.receive(data)
            except NbdError as exc:
                raise NbdConnectError(f"NBD handshake with {address}: {exc}") from None
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
        sock.setblocking(False)
        assert hs.export is not None
        return sock, hs.export
    except BaseException:
        sock.close()
        raise


async def connect_uri(uri: str, timeout: float = CONNECT_TIMEOUT
                      ) -> tuple[socket.socket, ExportInfo]:
    """:func:`connect_async` to an NBD URI, every failure an :class:`NbdConnectError` naming
    the server (as :func:`connect_blocking`'s)."""
    address = parse_nbd_uri(uri)
    try:
        return await connect_async(address, timeout)
    except TimeoutError:
        raise NbdConnectError(f"NBD server {address}: no handshake within {timeout:g} s") \
            from None
    except NbdConnectError:
        raise
    except (OSError, NbdError) as exc:
        raise NbdConnectError(f"cannot connect to the NBD server {address}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None


async def connect_async(address: NbdAddress, timeout: float = CONNECT_TIMEOUT
                        ) -> tuple[socket.socket, ExportInfo]:
    """:func:`connect_blocking` on the running event loop."""
    return await asyncio.wait_for(_connect_async(address), timeout)


async def _connect_async(address: NbdAddress) -> tuple[socket.socket, ExportInfo]:
    loop = asyncio.get_running_loop()
    sock, sockaddr = _new_socket(address)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, sockaddr)
        _tune(sock)
        hs = ClientHandshake(address.export)
        while not hs.done:
            data = await loop.sock_recv(sock, hs.bytes_wanted())
            if not data:
                raise NbdConnectError(f"NBD server {address} closed the connection during "
                                      "the handshake")
            hs.receive(data)
            out = hs.data_to_send()
            if out:
                await loop.sock_sendall(sock, out)
        assert hs.export is not None
        return sock, hs.export
    except BaseException:
        sock.close()
        raise
