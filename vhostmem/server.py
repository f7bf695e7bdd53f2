"""asyncio Unix-socket server: moves bytes and fds between sockets, ``protocol`` and a Session.

Each :class:`Endpoint` serves one device on one socket path, either listening (the usual way QEMU
connects) or connecting to a frontend that listens (QEMU ``-chardev socket,server=on``). One
frontend at a time per endpoint; when it goes away the session is reset and the endpoint serves
the next one. A bad message disconnects only its own frontend: other endpoints keep serving.

uvloop transports cannot carry SCM_RIGHTS, so sockets are read with ``recvmsg`` from
``loop.add_reader`` callbacks and written with ``sendmsg``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass

from protocol import Framer, Message, ProtocolError
from vhostmem.device import VhostUserDevice
from vhostmem.memmap import MemRegistry
from vhostmem.session import Session
from vhostmem.session_base import Deferred
from vhostmem.sockets import bind_unix_socket, peer_credentials

log = logging.getLogger(__name__)

# One recvmsg reads at most this much; vhost-user messages are at most 12 + 4096 bytes.
RECV_BYTES = 65536
# Room for more fds than any message may carry, so an excess is seen and rejected, not cut.
RECV_MAX_FDS = 32
FD_SIZE = array.array("i").itemsize
ANCILLARY_BYTES = socket.CMSG_SPACE(RECV_MAX_FDS * FD_SIZE)
DEFAULT_SOCKET_MODE = 0o600
CLIENT_RETRY_SECONDS = 0.2
# How often a reply that waits for I/O threads (Deferred) or a draining session is polled, and
# how long before it is failed loudly: the request is answered by a disconnect, the drain logs
# an error (and keeps waiting: memory cannot be let go under a request still being served).
DRAIN_POLL_SECONDS = 0.001
DRAIN_TIMEOUT_SECONDS = 30.0


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


class LoopKickWatcher:
    """KickWatcher on an event loop. The session turns device and kick errors into a broken
    ring; anything that still escapes a callback stops that fd being watched, never the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.fds: set[int] = set()

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.add_reader(fd, self._guarded, fd, callback)
        self.fds.add(fd)

    def unwatch(self, fd: int) -> None:
        if fd in self.fds:
            self.loop.remove_reader(fd)
            self.fds.discard(fd)

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


class Connection:
    """One connected frontend: reads messages, hands them to the session, sends replies."""

    def __init__(
        self,
        sock: socket.socket,
        session: Session,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[Connection], None],
    ) -> None:
        self.sock = sock
        self.session = session
        self.loop = loop
        self.on_close = on_close
        self.framer = Framer(sender="frontend", keep_invalid=True)
        self.closed = False
        self._backlog = bytearray()  # reply bytes the socket did not take yet
        # Messages decoded but not handled yet, because a Deferred reply is awaited first.
        self._queued: list[Message] = []
        self._deferred: Deferred | None = None
        self._deferred_since = 0.0
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            data, fds = self._recv()
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: receive failed: %s", self.session.name, exc)
            self.close()
            return
        if not data:
            _close_all(fds)
            log.info("%s: frontend disconnected", self.session.name)
            self.close()
            return
        try:
            messages = self.framer.feed(data, fds)
        except ProtocolError as exc:
            log.error("%s: %s; disconnecting", self.session.name, exc)
            self.close()
            return
        self._queued = messages
        self._handle_queued()

    def _handle_queued(self) -> None:
        """Handle the decoded messages in order; a Deferred reply pauses reading (the next
        message must not be handled before it) and is polled from the loop."""
        while self._queued and not self.closed:
            msg = self._queued.pop(0)
            try:
                result = self.session.handle(msg)
                if isinstance(result, Deferred):
                    self._wait_for(result)
                    return
                for reply, reply_fds in result:
                    self._send(reply, reply_fds)
            except Exception as exc:  # one bad frontend must not stop the loop
                log.error("%s: %s; disconnecting", self.session.name, exc)
                self.close()
                return

    def _wait_for(self, deferred: Deferred) -> None:
        self._deferred = deferred
        self._deferred_since = self.loop.time()
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_deferred)

    def _poll_deferred(self) -> None:
        deferred = self._deferred
        if deferred is None or self.closed:
            return
        if not deferred.ready():
            if self.loop.time() - self._deferred_since > DRAIN_TIMEOUT_SECONDS:
                log.error("%s: %s: requests still in flight after %.0f s; disconnecting",
                          self.session.name, deferred.what, DRAIN_TIMEOUT_SECONDS)
                self.close()
                return
            self.loop.call_later(DRAIN_POLL_SECONDS, self._poll_deferred)
            return
        self._deferred = None
        try:
            for reply, reply_fds in deferred.finish():
                self._send(reply, reply_fds)
        except Exception as exc:
            log.error("%s: %s: %s; disconnecting", self.session.name, deferred.what, exc)
            self.close()
            return
        self._handle_queued()
        if not self.closed and self._deferred is None and not self._backlog:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _recv(self) -> tuple[bytes, list[int]]:
        data, ancdata, flags, _ = self.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        fds = _fds_from_ancillary(ancdata)
        if flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise OSError(errno.EMSGSIZE, f"more than {RECV_MAX_FDS} fds in one message")
        return data, fds

    def _send(self, data: bytes, fds: list[int]) -> None:
        """Send a reply without ever blocking the loop: what the socket does not take now is
        queued, and reading pauses until the frontend has drained it."""
        if self._backlog:
            self._backlog += data
            return
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        try:
            sent = self.sock.sendmsg([data], ancillary)
        except BlockingIOError:
            if fds:
                raise  # fds cannot be queued separately from their first byte
            sent = 0
        if sent < len(data):
            self._backlog += data[sent:]
            self.loop.remove_reader(self.sock.fileno())
            self.loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._backlog)
        except BlockingIOError:
            return
        except OSError as exc:
            log.error("%s: send failed: %s; disconnecting", self.session.name, exc)
            self.close()
            return
        del self._backlog[:sent]
        if not self._backlog:
            self.loop.remove_writer(self.sock.fileno())
            if self._deferred is None:
                self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def peer_gone(self) -> bool:
        """Whether the frontend hung up (even if unread bytes remain queued)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        for rest in self._queued:  # decoded but never handled: their fds are ours to close
            _close_all(rest.fds)
        self._queued = []
        self._deferred = None
        try:
            self.framer_close()
            self.session.watcher.unwatch_all()  # type: ignore[attr-defined]
        except Exception:  # the endpoint must still be freed for the next frontend
            log.exception("%s: error while releasing the session", self.session.name)
        finally:
            self.sock.close()
            self.on_close(self)

    def framer_close(self) -> None:
        close = getattr(self.framer, "close", None)
        if close is not None:
            close()


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
        )
        self.listener: socket.socket | None = None
        self.connection: Connection | None = None
        self.connections_served = 0
        self._client_task: asyncio.Task[None] | None = None
        self._closing = False
        self._owns_path = False  # we created the socket file, so we unlink it
        self.draining = False  # a frontend left with requests in flight; not serving yet

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
        if self.connection is not None:
            self.connection.close()
        self.session.close()


def _fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


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
