"""asyncio Unix-socket server: moves bytes and fds between sockets, ``protocol`` and a Session.

Each :class:`Endpoint` serves one device on one socket path, either listening (the usual way QEMU
connects) or connecting to a frontend that listens (QEMU ``-chardev socket,server=on``). One
frontend at a time per endpoint; when it goes away the session is reset and the endpoint serves
the next one. A bad message disconnects only its own frontend: other endpoints keep serving.

uvloop transports cannot carry SCM_RIGHTS, so sockets are read with ``recvmsg`` from
``loop.add_reader`` callbacks and written with ``sendmsg``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from vhostmem.connection import (
    DRAIN_POLL_SECONDS,
    DRAIN_TIMEOUT_SECONDS,
    Connection,
)
from vhostmem.device import VhostUserDevice
from vhostmem.memmap import MemRegistry
from vhostmem.session import Session
from vhostmem.sockets import bind_unix_socket, peer_credentials

log = logging.getLogger(__name__)

DEFAULT_SOCKET_MODE = 0o600
CLIENT_RETRY_SECONDS = 0.2
def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else the stdlib loop (with a log line saying so)."""
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed; using the stdlib asyncio event loop")
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@dataclass
class EndpointConfig:
    path: str
    client: bool = False
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None
    # Refuse guest memory fds not sealed against shrinking (a truncation would SIGBUS us).
    require_sealed_memory: bool = False
    # Started rings run in this many data-plane worker processes (0: on the event loop).
    workers: int = 0
    # Busy-poll a ring this long after a turn that served requests (0: off; session_turns.py).
    poll_us: int = 0


class LoopKickWatcher:
    """KickWatcher on an event loop. The session turns device and kick errors into a broken
    ring; anything that still escapes a callback stops that fd being watched, never the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.fds: set[int] = set()  # kick eventfds
        self.channels: set[int] = set()  # data-plane workers' control sockets

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, self._guarded, fd, callback)
        self.fds.add(fd)

    def watch_channel(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, self._guarded, fd, callback)
        self.channels.add(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self.fds or fd in self.channels:
            self.loop.remove_reader(fd)
            self.fds.discard(fd)
            self.channels.discard(fd)

    def defer(self, callback: Callable[[], None]) -> None:
        self.loop.call_soon(self._guarded, -1, callback)

    def unwatch_all(self) -> None:
        for fd in list(self.fds):
            self.unwatch(fd)

    def _guarded(self, fd: int, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("%s: queue processing failed; ring stops being watched", self.name)
            self.unwatch(fd)


class Endpoint:
    """One device on one socket path, serving one frontend at a time."""

    def __init__(
        self,
        device: VhostUserDevice,
        config: EndpointConfig,
        registry: MemRegistry,
        loop: asyncio.AbstractEventLoop,
        name: str | None = None,
    ) -> None:
        self.device = device
        self.config = config
        self.loop = loop
        self.name = name or os.path.basename(config.path)
        self.watcher = LoopKickWatcher(loop, self.name)
        self.session = Session(
            device,
            registry,
            self.watcher,
            name=self.name,
            require_sealed_memory=config.require_sealed_memory,
            workers=config.workers,
            poll_us=config.poll_us,
        )
        self.listener: socket.socket | None = None
        self.connection: Connection | None = None
        self.connections_served = 0
        self._client_task: asyncio.Task[None] | None = None
        self._closing = False
        self._owns_path = False  # we created the socket file, so we unlink it
        self.draining = False  # a frontend left with requests in flight; not serving yet
        self._next_sock: socket.socket | None = None  # accepted while draining

    # ---------------------------------------------------------------- listen mode

    def start(self) -> None:
        if self.config.client:
            self._client_task = self.loop.create_task(self._client_loop())
            return
        self.listener = bind_unix_socket(
            self.config.path, self.config.socket_mode, self.config.socket_group
        )
        self._owns_path = True
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._on_accept)
        log.info("%s: listening on %s", self.name, self.config.path)

    def adopt(self, listener: socket.socket) -> None:
        """Serve frontends connecting to ``listener``, a socket already listening (``--fd``,
        systemd socket activation, device_add's fd): its file, if any, belongs to whoever
        created it and is never unlinked."""
        listener.setblocking(False)
        self.listener = listener
        self.loop.add_reader(listener.fileno(), self._on_accept)
        log.info("%s: listening on %s (inherited fd %d)", self.name,
                 self.config.path or "an unbound socket", listener.fileno())

    def _on_accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.connection is not None and self.connection.peer_gone():
            # Its EOF is not read yet (e.g. a connect-and-close probe): serve the newcomer.
            self.connection.close()
            if self.draining:
                # Its rings are still stopping (requests on I/O threads, data-plane workers
                # answering STOP): the newcomer is served once that is done.
                self._next_sock = sock
                return
        if self.connection is not None:
            log.warning("%s: refusing a second frontend while one is connected", self.name)
            sock.close()
            return
        self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        pid, uid, gid = peer_credentials(sock)
        log.info("%s: frontend connected (pid=%d uid=%d gid=%d)", self.name, pid, uid, gid)
        self.connection = Connection(sock, self.session, self.loop, self._on_connection_closed)
        self.connections_served += 1

    def _on_connection_closed(self, conn: Connection) -> None:
        """The frontend is gone: stop its rings, and reset the session (its memory, fds and
        registrations) once no request of it is in flight on an I/O thread. Until then no new
        frontend is taken: it would share the rings and disk with requests still running."""
        if self.connection is not conn:
            return
        try:
            idle = self.session.stop_rings()
        except Exception:
            log.exception("%s: error while stopping the rings", self.name)
            idle = True
        if idle:
            self._release()
            return
        self.draining = True
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
        log.info("%s: waiting for requests in flight before serving the next frontend", self.name)
        self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_drain, self.loop.time(), False)

    def _poll_drain(self, since: float, warned: bool) -> None:
        if self._closing:
            return
        if not self.session.idle():
            if not warned and self.loop.time() - since > DRAIN_TIMEOUT_SECONDS:
                log.error("%s: requests of the last frontend still in flight after %.0f s; "
                          "the next frontend waits for them", self.name, DRAIN_TIMEOUT_SECONDS)
                warned = True
            self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_drain, since, warned)
            return
        self.draining = False
        self._release()
        if self.listener is not None:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)
        sock, self._next_sock = self._next_sock, None
        if sock is not None:
            self._attach(sock)

    def _release(self) -> None:
        try:
            self.session.reset()
        except Exception:  # the endpoint must still be freed for the next frontend
            log.exception("%s: error while releasing the session", self.name)
        self.connection = None

    # ---------------------------------------------------------------- client mode

    async def _client_loop(self) -> None:
        while not self._closing:
            if self.connection is None and not self.draining:
                sock = await self._connect()
                if sock is None:
                    return
                self._attach(sock)
            await asyncio.sleep(CLIENT_RETRY_SECONDS)

    async def _connect(self) -> socket.socket | None:
        announced = False
        while not self._closing:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)  # a frontend with a full backlog must not stall the loop
            try:
                await self.loop.sock_connect(sock, self.config.path)
                return sock
            except OSError as exc:
                sock.close()
                if not announced:
                    log.info("%s: waiting for %s (%s)", self.name, self.config.path, exc)
                    announced = True
            except BaseException:  # cancelled at close: do not leak the socket
                sock.close()
                raise
            await asyncio.sleep(CLIENT_RETRY_SECONDS)
        return None

    # ------------------------------------------------------------------ teardown

    def stop_accepting(self) -> None:
        """Take no new frontend (shutdown): the listening socket is closed and its file
        removed if we created it (an inherited one stays: its owner, e.g. systemd, keeps
        listening on it); a client endpoint stops (re)connecting."""
        if self._client_task is not None:
            self._client_task.cancel()
            self._client_task = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if self._owns_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.path)

    def quiesce(self) -> None:
        """Stop popping requests (shutdown); those already on I/O threads still complete into
        the used ring and are signalled. :meth:`idle` says when none is left."""
        try:
            self.session.stop_rings()
        except Exception:
            log.exception("%s: error while stopping the rings", self.name)

    def idle(self) -> bool:
        return self.session.idle()

    def close(self) -> None:
        self._closing = True
        self.stop_accepting()
        if self._next_sock is not None:
            self._next_sock.close()
            self._next_sock = None
        if self.connection is not None:
            self.connection.close()
        self.session.close()


class Server:
    """Several endpoints in one process, one device each."""

    def __init__(self, loop: asyncio.AbstractEventLoop, registry: MemRegistry) -> None:
        self.loop = loop
        self.registry = registry
        self.endpoints: list[Endpoint] = []

    def add(self, device: VhostUserDevice, config: EndpointConfig, *, name: str | None = None,
            listener: socket.socket | None = None) -> Endpoint:
        """Serve ``device``; on ``listener`` (a listening socket handed over, e.g. an inherited
        fd) when given, else as ``config`` says."""
        endpoint = Endpoint(device, config, self.registry, self.loop, name)
        try:
            if listener is not None:
                endpoint.adopt(listener)
            else:
                endpoint.start()
        except BaseException:
            endpoint.session.close()  # its guest-memory map is registered in the registry
            raise
        self.endpoints.append(endpoint)
        return endpoint

    def stop_accepting(self) -> None:
        for endpoint in self.endpoints:
            endpoint.stop_accepting()

    def quiesce(self) -> None:
        for endpoint in self.endpoints:
            endpoint.quiesce()

    def idle(self) -> bool:
        """Whether no request of any endpoint is in flight on an I/O thread."""
        return all(endpoint.idle() for endpoint in self.endpoints)

    def remove(self, endpoint: Endpoint) -> None:
        """Close one endpoint (the caller waited for its requests in flight: ``draining``)."""
        endpoint.close()
        self.endpoints.remove(endpoint)

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()
        self.endpoints.clear()
