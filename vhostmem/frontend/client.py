"""The vhost-user control channel, frontend side: a blocking Unix socket with a timeout on every
wait, `protocol` for every byte sent and parsed, REPLY_ACK when negotiated.

The frontend is normally the client (backends listen); `Listener` covers backends started in
client mode, which connect to us.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from protocol import (
    Framer,
    FrontendRequest,
    Message,
    ProtocolError,
    ProtocolFeature,
    encode_request,
)

DEFAULT_TIMEOUT = 5.0
RECV_BUFFER = 4096 + 12  # largest payload plus header
MAX_RECV_FDS = 8
CONNECT_POLL_INTERVAL = 0.02

# Requests whose answer is a reply message of their own (not a REPLY_ACK).
REPLYING_REQUESTS = frozenset({
    FrontendRequest.GET_FEATURES,
    FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_QUEUE_NUM,
    FrontendRequest.GET_CONFIG,
    FrontendRequest.GET_INFLIGHT_FD,
    FrontendRequest.GET_MAX_MEM_SLOTS,
    FrontendRequest.GET_STATUS,
    FrontendRequest.POSTCOPY_ADVISE,
    FrontendRequest.SET_LOG_BASE,  # a u64 with LOG_SHMFD (QEMU waits for it, ignores its value)
})
# Requests sent before REPLY_ACK can be negotiated, or that never take one.
NO_ACK_REQUESTS = REPLYING_REQUESTS | {
    FrontendRequest.SET_PROTOCOL_FEATURES,
    FrontendRequest.SET_OWNER,
}


class VhostUserError(Exception):
    """The backend answered wrongly, refused a request, or went away."""


class VhostUserClient:
    """One vhost-user connection. Every method that waits honours `timeout`."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock, self.timeout = sock, timeout
        self.sock.settimeout(timeout)
        self._framer = Framer(sender="backend")
        self._pending: deque[Message] = deque()
        self.features = 0  # acked virtio features (SET_FEATURES)
        self.protocol_features = 0  # acked protocol features (SET_PROTOCOL_FEATURES)

    # -- connection --------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> VhostUserClient:
        """Connect to a listening backend, retrying until `timeout` while the socket appears."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                sock.connect(path)
                return cls(sock, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise VhostUserError(f"no vhost-user backend listening on {path}: "
                                         f"{exc}") from exc
                time.sleep(CONNECT_POLL_INTERVAL)
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        for msg in self._pending:
            _close_fds(msg.fds)
        self._pending.clear()

    def __enter__(self) -> VhostUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    # -- messages ----------------------------------------------------------------------------
    def send(self, request: int, payload: Any = None, fds: Sequence[int] = (), *,
             need_reply: bool = False) -> None:
        data = encode_request(FrontendRequest(request), payload, need_reply=need_reply,
                              fds_count=len(fds))
        self.send_raw(data, fds)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send arbitrary bytes (hostile tests); fds ride with the first byte."""
        try:
            sent = socket.send_fds(self.sock, [data], list(fds)) if fds else \
                self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        except OSError as exc:
            raise VhostUserError(f"sending to the backend failed: {exc}") from exc

    def recv(self, timeout: float | None = None) -> Message:
        """The next message from the backend; VhostUserError on EOF, TimeoutError on silence."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the backend in time")
            self.sock.settimeout(remaining)
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, RECV_BUFFER, MAX_RECV_FDS)
            except TimeoutError:
                raise TimeoutError("no message from the backend in time") from None
            except OSError as exc:
                raise VhostUserError(f"receiving from the backend failed: {exc}") from exc
            if not data:
                _close_fds(fds)
                raise VhostUserError("the backend closed the connection")
            try:
                self._pending.extend(self._framer.feed(data, fds))
            except ProtocolError as exc:
                raise VhostUserError(f"malformed message from the backend: {exc}") from exc
        return self._pending.popleft()

    def call(self, request: int, payload: Any = None, fds: Sequence[int] = (), *,
             ack: bool | None = None) -> Message | None:
        """Send a request and collect its answer: the reply of a GET-style request, or a
        REPLY_ACK (by default whenever REPLY_ACK is negotiated). Returns the reply or None."""
        request = FrontendRequest(request)
        if ack is None:
            ack = self.has_protocol(ProtocolFeature.REPLY_ACK) and request not in NO_ACK_REQUESTS
        self.send(request, payload, fds, need_reply=ack)
        if request not in REPLYING_REQUESTS and not ack:
            return None
        reply = self.recv()
        if reply.request != request or not reply.is_reply:
            _close_fds(reply.fds)
            raise VhostUserError(f"expected a reply to {request.name}, got "
                                 f"{reply.request!r} flags {reply.flags:#x}")
        if request not in REPLYING_REQUESTS and reply.payload != 0:
            raise VhostUserError(f"backend refused {request.name}: REPLY_ACK {reply.payload}")
        return reply

    def _u64(self, request: int) -> int:
        reply = self.call(request)
        assert reply is not None
        return int(reply.payload)

    # -- negotiation -------------------------------------------------------------------------
    def set_owner(self) -> None:
        self.call(FrontendRequest.SET_OWNER)

    def get_features(self) -> int:
        return self._u64(FrontendRequest.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(FrontendRequest.SET_FEATURES, features)
        self.features = features

    def get_protocol_features(self) -> int:
        return self._u64(FrontendRequest.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.call(FrontendRequest.SET_PROTOCOL_FEATURES, features)
        self.protocol_features = features

    def get_queue_num(self) -> int:
        return self._u64(FrontendRequest.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(FrontendRequest.GET_MAX_MEM_SLOTS)

    def reset_device(self) -> None:
        self.call(FrontendRequest.RESET_DEVICE)

    def set_status(self, status: int) -> None:
        self.call(FrontendRequest.SET_STATUS, status)

    def get_status(self) -> int:
        return self._u64(FrontendRequest.GET_STATUS)

    # -- memory ------------------------------------------------------------------------------
    def set_mem_table(self, regions: Sequence[dict[str, int]], fds: Sequence[int]) -> None:
        table = {"nregions": len(regions), "padding": 0, "regions": list(regions)}
        self.call(FrontendRequest.SET_MEM_TABLE, table, fds)

    def add_mem_reg(self, region: dict[str, int], fd: int) -> None:
        self.call(FrontendRequest.ADD_MEM_REG, {"padding": 0, "region": region}, [fd])

    def rem_mem_reg(self, region: dict[str, int], fd: int | None = None) -> None:
        # The spec says no fd SHOULD come with it (backends MAY accept one); default none.
        self.call(FrontendRequest.REM_MEM_REG, {"padding": 0, "region": region},
                  [] if fd is None else [fd])

    def set_log_base(self, mmap_size: int, mmap_offset: int, fd: int) -> int:
        """SET_LOG_BASE with the log's fd (LOG_SHMFD); returns the backend's u64 reply."""
        reply = self.call(FrontendRequest.SET_LOG_BASE,
                          {"mmap_size": mmap_size, "mmap_offset": mmap_offset}, [fd])
        assert reply is not None
        return int(reply.payload)

    # -- inflight region ---------------------------------------------------------------------
    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[dict[str, int], int]:
        """GET_INFLIGHT_FD: the backend's region (payload, fd; the caller owns the fd). The
        error form (mmap_size 0, no fd) raises VhostUserError."""
        reply = self.call(FrontendRequest.GET_INFLIGHT_FD, {
            "mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues,
            "queue_size": queue_size})
        assert reply is not None
        p = reply.payload
        payload = {"mmap_size": p.mmap_size, "mmap_offset": p.mmap_offset,
                   "num_queues": p.num_queues, "queue_size": p.queue_size}
        if len(reply.fds) != 1 or not p.mmap_size:
            _close_fds(reply.fds)
            raise VhostUserError(f"GET_INFLIGHT_FD: no region ({payload})")
        return payload, reply.fds[0]

    def set_inflight_fd(self, payload: dict[str, int], fd: int) -> None:
        """SET_INFLIGHT_FD with the region the frontend keeps (the fd stays ours)."""
        self.call(FrontendRequest.SET_INFLIGHT_FD, payload, [fd])

    # -- vrings ------------------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        self.call(FrontendRequest.SET_VRING_NUM, {"index": index, "num": num})

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(FrontendRequest.SET_VRING_BASE, {"index": index, "num": base})

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, *, flags: int = 0,
                       log: int = 0) -> None:
        """Ring addresses are backend-translatable userspace addresses (not gpas); `log` (the
        used ring's guest-physical address) is where used-ring writes are logged when `flags`
        has VHOST_VRING_F_LOG."""
        self.call(FrontendRequest.SET_VRING_ADDR, {
            "index": index, "flags": flags, "desc_user_addr": desc, "used_user_addr": used,
            "avail_user_addr": avail, "log_guest_addr": log})

    def _vring_file(self, request: FrontendRequest, index: int, fd: int | None) -> None:
        self.call(request, {"index": index, "nofd": fd is None}, [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_file(FrontendRequest.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_file(FrontendRequest.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_file(FrontendRequest.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.call(FrontendRequest.SET_VRING_ENABLE, {"index": index, "num": int(enable)})

    def get_vring_base(self, index: int) -> int:
        reply = self.call(FrontendRequest.GET_VRING_BASE, {"index": index, "num": 0})
        assert reply is not None
        return int(reply.payload.num)

    # -- config ------------------------------------------------------------------------------
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        reply = self.call(FrontendRequest.GET_CONFIG, {
            "offset": offset, "size": size, "flags": flags, "payload": bytes(size)})
        assert reply is not None
        return bytes(reply.payload.payload)

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(FrontendRequest.SET_CONFIG, {
            "offset": offset, "size": len(data), "flags": flags, "payload": data})


class Listener:
    """A listening socket for backends in client mode: they connect, we `accept` them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(path)
            self.sock.listen(1)
        except OSError:
            self.sock.close()
            raise

    def accept(self, *, timeout: float = DEFAULT_TIMEOUT) -> VhostUserClient:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            raise TimeoutError(f"no backend connected to {self.path} in {timeout}s") from None
        return VhostUserClient(conn, timeout=timeout)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
