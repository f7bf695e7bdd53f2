"""What a session knows and shares: constants, state records, errors and fd helpers.

Split from :mod:`vhostmem.session` so that the handlers of each request group (memory in
:mod:`vhostmem.session_memory`, everything else in the session) share one vocabulary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from protocol import FrontendRequest, Message, ProtocolFeature, VirtioFeature
from vhostmem.guest_memory import GuestMemoryError

# Memory slots offered with CONFIGURE_MEM_SLOTS: the limit QEMU itself enforces for vhost-user.
MAX_MEM_SLOTS = 509
# Largest split ring the virtio spec allows.
MAX_QUEUE_SIZE = 32768
# REPLY_ACK payloads: zero is success, anything else a failure.
ACK_OK = 0
ACK_FAILED = 1

PROTOCOL_FEATURES_BIT = 1 << VirtioFeature.VHOST_USER_F_PROTOCOL_FEATURES

# Protocol features the server implements for every device; a device may add more (e.g. CONFIG).
BASE_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ)
    | (1 << ProtocolFeature.REPLY_ACK)
    | (1 << ProtocolFeature.BACKEND_REQ)
    | (1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    | (1 << ProtocolFeature.RESET_DEVICE)
    | (1 << ProtocolFeature.STATUS)
    | (1 << ProtocolFeature.INFLIGHT_SHMFD)
    | (1 << ProtocolFeature.LOG_SHMFD)
)


# Requests answered by a reply of their own (never by a REPLY_ACK u64).
OWN_REPLY_REQUESTS = frozenset({
    FrontendRequest.GET_FEATURES,
    FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.GET_QUEUE_NUM,
    FrontendRequest.GET_MAX_MEM_SLOTS,
    FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_CONFIG,
    FrontendRequest.GET_STATUS,
    FrontendRequest.GET_INFLIGHT_FD,
    FrontendRequest.SET_LOG_BASE,  # its u64 reply says the log is mapped
})


class SessionError(Exception):
    """A request the session refuses; the message names the request and the reason."""


EXPECTED_ERRORS = (SessionError, GuestMemoryError, OSError, ValueError)


class KickWatcher(TypingProtocol):
    """How the session asks the server to watch (or stop watching) a ring's kick eventfd."""

    def watch(self, fd: int, callback: Callable[[], None]) -> None: ...

    def unwatch(self, fd: int) -> None: ...

    def defer(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on this thread soon, after the I/O already waiting is served."""

    def watch_channel(self, fd: int, callback: Callable[[], None]) -> None:
        """Like :meth:`watch` for a data-plane worker's control socket, which outlives the
        frontend connection (``unwatch_all`` on a disconnect leaves it; ``unwatch`` ends it)."""


Reply = tuple[bytes, list[int]]


@dataclass
class FdReply:
    """A handler's explicit reply that carries fds (GET_INFLIGHT_FD)."""

    payload: object
    fds: list[int]


@dataclass
class SessionState:
    features: int = 0
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    backend_req_fd: int = -1


@dataclass
class Deferred:
    """A reply that can only be given once ``ready()`` (requests in flight on I/O threads have
    completed). The server stops reading from that frontend, polls ``ready`` without blocking
    the event loop, sends ``finish()``, and fails the request loudly (disconnect) after a
    timeout; other frontends are served meanwhile."""

    what: str
    ready: Callable[[], bool]
    finish: Callable[[], list[Reply]]


def request_name(request: object) -> str:
    """A request's name for messages (unknown numbers print as numbers)."""
    return str(getattr(request, "name", request))


def take_fds(msg: Message) -> list[int]:
    """Move the message's fds to the caller, so the error path cannot close them twice."""
    fds = list(msg.fds)
    msg.fds.clear()
    return fds


def close_fd(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        close_fd(fd)
