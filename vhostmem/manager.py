"""The devices of a running ``vhostmem serve``: added from the command line or the management
socket, listed, and removed while the process keeps serving the others.

A device is a :class:`~vhostmem.devspec.BlkSpec`, the :class:`BlkDevice` made from it and the
server :class:`Endpoint` that serves it, under a unique name. Removing one stops taking
frontends, disconnects the one connected (``hard``), waits until its requests in flight have
completed, then closes the session, the socket (its file removed) and the device (the disk is
made durable and closed once no other device shares it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from nbd import ExportInfo
from vhostmem.devices.blk import BlkDevice
from vhostmem.devices.blk_backend import BlkBackend
from vhostmem.devspec import BlkSpec, UsageError, make_device, share_key
from vhostmem.server import DRAIN_POLL_SECONDS, Endpoint, EndpointConfig, Server
from vhostmem.sockets import adopt_listening_socket, peer_credentials

log = logging.getLogger(__name__)


class DeviceError(Exception):
    """A management request that cannot be done now (the message says why)."""

    code = "failed"


class DeviceBusyError(DeviceError):
    code = "busy"


class NoSuchDeviceError(DeviceError):
    code = "no-such-device"


class DeviceExistsError(DeviceError):
    code = "exists"


@dataclass
class ManagedDevice:
    name: str
    spec: BlkSpec
    device: BlkDevice
    endpoint: Endpoint
    deleting: bool = False


class DeviceManager:
    """Every device of one server, by name."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: Server, *,
                 socket_mode: int, socket_group: str | None = None,
                 require_sealed_memory: bool = False, poll_us: int = 0) -> None:
        self.loop = loop
        self.server = server
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.require_sealed_memory = require_sealed_memory
        self.poll_us = poll_us
        self.devices: dict[str, ManagedDevice] = {}
        # Disks served by more than one device (share= or the same file), see devspec.make_device.
        self.shared: dict[str, tuple[BlkSpec, BlkBackend]] = {}
        # Listening sockets the process must never be handed as a device's fd (the RPC socket).
        self.reserved_fds: set[int] = set()

    # ------------------------------------------------------------------ add

    def add(self, spec: BlkSpec,
            nbd_connection: tuple[socket.socket, ExportInfo] | None = None) -> ManagedDevice:
        """Open the disk, listen (or connect) and serve; on any error nothing is left open.
        ``nbd_connection``: ``spec.nbd``'s export, already connected (taken over, also when
        this fails)."""
        try:
            return self._add(spec, nbd_connection)
        except BaseException:
            if nbd_connection is not None:
                nbd_connection[0].close()  # a no-op if the backend took and closed it
            raise

    def _add(self, spec: BlkSpec,
             nbd_connection: tuple[socket.socket, ExportInfo] | None) -> ManagedDevice:
        name = spec.name or spec.default_name
        if name in self.devices:
            raise DeviceExistsError(f"a device named {name!r} exists; give another name")
        paths = {md.spec.path for md in self.devices.values() if md.spec.fd is None}
        if spec.fd is None and spec.path in paths:
            raise DeviceExistsError(f"{spec.path} is already served by this process")
        listener = (self._inherited_listener(spec.fd, spec.fd_option) if spec.fd is not None
                    else None)
        key = share_key(spec)
        new_share = key is not None and key not in self.shared
        try:
            device = make_device(spec, self.shared, nbd_connection)
        except BaseException:
            _detach(listener)
            raise
        try:
            config = EndpointConfig(
                path=spec.path,  # an inherited socket's path is never unlinked (not ours)
                client=spec.client is not None,
                socket_mode=self.socket_mode,
                socket_group=self.socket_group,
                require_sealed_memory=self.require_sealed_memory,
                workers=spec.workers,
                poll_us=self.poll_us,
            )
            endpoint = self.server.add(device, config, name=name, listener=listener)
        except BaseException:
            _detach(listener)  # an inherited fd stays as it was handed to us
            device.close()
            if new_share and key is not None:
                self.shared.pop(key, None)
            raise
        managed = ManagedDevice(name, spec, device, endpoint)
        self.devices[name] = managed
        return managed

    def _inherited_listener(self, fd: int, what: str) -> socket.socket:
        """A listening Unix stream socket this process inherited as ``fd`` (checked as
        :func:`vhostmem.sockets.check_listening_fd` does); refused when it is anything else
        or already in use (another device's or the management socket)."""
        if fd < 3:
            raise UsageError(f"{what}: stdin, stdout and stderr cannot be a device's socket")
        in_use = set(self.reserved_fds)
        for md in self.devices.values():
            if md.endpoint.listener is not None:
                in_use.add(md.endpoint.listener.fileno())
        if fd in in_use:
            raise UsageError(f"{what}: fd {fd} is already in use by this process")
        try:
            return adopt_listening_socket(fd, what)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    # ------------------------------------------------------------------ remove

    async def remove(self, name: str, hard: bool) -> None:
        md = self.get(name)
        if md.deleting:
            raise DeviceBusyError(f"device {name!r} is already being deleted")
        endpoint = md.endpoint
        if not hard and (endpoint.connection is not None or endpoint.draining):
            raise DeviceBusyError(f"device {name!r} is in use: {self._frontend_text(md)}; "
                                  "disconnect it first or use mode=hard")
        md.deleting = True
        # No new frontend from here on; the connected one (hard) is disconnected: its rings
        # stop, and the endpoint is released once its requests in flight have completed.
        endpoint.stop_accepting()
        if endpoint.connection is not None:
            log.info("%s: disconnecting the frontend (%s) to delete the device", name,
                     self._frontend_text(md))
            endpoint.connection.close()
        while endpoint.connection is not None or endpoint.draining:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        self.server.remove(endpoint)
        del self.devices[name]
        md.device.close()  # the disk is made durable and closed once no device shares it
        key = share_key(md.spec)
        if key is not None and key in self.shared and self.shared[key][1].fd < 0:
            del self.shared[key]
        log.info("%s: deleted", name)

    # ------------------------------------------------------------------ queries

    def get(self, name: str) -> ManagedDevice:
        md = self.devices.get(name)
        if md is None:
            known = ", ".join(sorted(self.devices)) or "none"
            raise NoSuchDeviceError(f"no device named {name!r} (devices: {known})")
        return md

    def describe(self, md: ManagedDevice) -> dict[str, Any]:
        endpoint, spec, device = md.endpoint, md.spec, md.device
        session = endpoint.session
        connected = endpoint.connection is not None and not endpoint.connection.closed
        return {
            "name": md.name,
            "socket": spec.path if spec.fd is None and spec.client is None else None,
            "client": spec.client,
            "fd": spec.fd,
            "disk": spec.disk,
            "ram": device.disk_bytes if spec.disk is None and spec.nbd is None else None,
            "nbd": spec.nbd,
            "nbd_connections": self._nbd_connections(device),
            "share": spec.share,
            "size": device.disk_bytes,
            "readonly": device.readonly,
            "num_queues": device.num_queues,
            "serial": spec.serial,
            "io_mode": device.io_mode,
            "workers": spec.workers,
            "frontend": self._frontend(md) if connected else None,
            "draining": endpoint.draining,
            "deleting": md.deleting,
            "connections_served": endpoint.connections_served,
            "features": session.state.features,
            "protocol_features": session.state.protocol_features,
            "memory_regions": [
                {"guest_phys_addr": r.guest_phys_addr, "size": r.memory_size}
                for r in session.memory.regions
            ],
        }

    def stats(self, name: str, reset: bool) -> dict[str, Any]:
        md = self.get(name)
        queues = []
        for vq in md.endpoint.session.queues:
            snap = vq.stats(reset=reset)
            queues.append({"index": vq.index, **snap})
        return {"name": md.name, "queues": queues}

    @staticmethod
    def _nbd_connections(device: Any) -> list[dict[str, Any]] | None:
        """Each NBD connection's state (NbdBackend.connection_states); None if not NBD."""
        states = getattr(device.backend, "connection_states", None)
        return states() if states is not None else None

    def _frontend(self, md: ManagedDevice) -> dict[str, int] | None:
        conn = md.endpoint.connection
        if conn is None:
            return None
        try:
            pid, uid, gid = peer_credentials(conn.sock)
        except OSError:
            return None
        return {"pid": pid, "uid": uid, "gid": gid}

    def _frontend_text(self, md: ManagedDevice) -> str:
        if md.endpoint.connection is None:
            return "the last frontend's requests are still in flight"
        cred = self._frontend(md)
        if cred is None:
            return "a frontend is connected"
        return f"frontend pid {cred['pid']} (uid {cred['uid']}) is connected"

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Close every endpoint, then every device (joins I/O threads, makes the disks durable
        and closes them)."""
        self.server.close()
        for md in self.devices.values():
            md.device.close()
        self.devices.clear()
        self.shared.clear()


def _detach(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.detach()
