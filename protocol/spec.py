"""The request table: payload shape, fds, and reply of every vhost-user request.

Used by the codec to decode and validate, and by the server/frontend to know what to answer:

* ``spec.payload`` / ``spec.fds``: the request's payload shape and how many fds come with it.
* ``spec.replies``: the explicit reply shapes (with their fd rules). Empty when the request has no
  reply of its own; then a NEED_REPLY flag asks for a u64 REPLY_ACK status (0 = success).
* ``spec.reply_required``: the sender waits for a reply even without NEED_REPLY (only when
  ``spec.reply_condition`` is negotiated, if that is set).

Every request accepts NEED_REPLY (spec, "REPLY_ACK"); for a request that has an explicit reply
the flag changes nothing, the explicit reply is the acknowledgement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from protocol import messages as m
from protocol.constants import (
    DEVICE_STATE_NOFD_MASK,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
)
from protocol.messages import Message, Shape

FR = FrontendRequest
BR = BackendRequest


@dataclass(frozen=True)
class FdRule:
    """How many fds a payload may come with: ``allowed(payload)`` lists the valid counts."""

    description: str
    allowed: Callable[[Any], tuple[int, ...]]


FDS_NONE = FdRule("no fds", lambda payload: (0,))
FDS_ONE = FdRule("exactly 1 fd", lambda payload: (1,))
# REM_MEM_REG: "No file descriptors SHOULD be passed ... the back-end MAY accept one" (QEMU 7.2
# sends one); SET_LOG_BASE carries one only with LOG_SHMFD; replies that may carry one.
FDS_OPTIONAL = FdRule("0 or 1 fd", lambda payload: (0, 1))
FDS_NREGIONS = FdRule("one fd per region", lambda payload: (payload["nregions"],))
FDS_VRING_FILE = FdRule(
    "1 fd unless the NOFD bit is set", lambda payload: (0,) if payload["nofd"] else (1,)
)
FDS_VRING_AREA = FdRule(
    "1 fd unless the NOFD bit is set", lambda payload: (0,) if payload["vring"]["nofd"] else (1,)
)
FDS_INFLIGHT_REPLY = FdRule(
    "1 fd unless mmap_size is 0", lambda payload: (0,) if payload["mmap_size"] == 0 else (1,)
)
FDS_DEVICE_STATE_REPLY = FdRule(
    "1 fd unless bit 8 (invalid FD) is set",
    lambda payload: (0,) if payload & DEVICE_STATE_NOFD_MASK else (1,),
)

Reply = tuple[Shape, FdRule]
ACK: tuple[Reply, ...] = ((m.U64, FDS_NONE),)


@dataclass(frozen=True)
class RequestSpec:
    request: IntEnum
    payload: Shape
    fds: FdRule = FDS_NONE
    replies: tuple[Reply, ...] = ()
    reply_required: bool = False
    reply_condition: ProtocolFeature | None = None

    @property
    def has_explicit_reply(self) -> bool:
        return bool(self.replies)

    def reply_shapes(self) -> tuple[Reply, ...]:
        """Shapes a reply to this request may take (the u64 ack when there is no other)."""
        return self.replies or ACK


def _spec(
    request: IntEnum,
    payload: Shape = m.NONE,
    fds: FdRule = FDS_NONE,
    replies: tuple[Reply, ...] = (),
    required: bool = False,
    condition: ProtocolFeature | None = None,
) -> RequestSpec:
    return RequestSpec(request, payload, fds, replies, required, condition)


U64_REPLY: tuple[Reply, ...] = ((m.U64, FDS_NONE),)
VRING_STATE_REPLY: tuple[Reply, ...] = ((m.VRING_STATE, FDS_NONE),)
# postcopy: the back-end answers SET_MEM_TABLE / ADD_MEM_REG with its own mapping; otherwise
# a NEED_REPLY ack (a u64 comes first: a table of 0 regions would also be 8 bytes)
MEM_TABLE_REPLY: tuple[Reply, ...] = ((m.U64, FDS_NONE), (m.MEMORY_TABLE, FDS_NONE))
MEM_REG_REPLY: tuple[Reply, ...] = ((m.U64, FDS_NONE), (m.MEM_REG, FDS_NONE))
# an empty reply is how a back-end reports a GET_CONFIG failure
CONFIG_REPLY: tuple[Reply, ...] = ((m.CONFIG, FDS_NONE), (m.NONE, FDS_NONE))
CRYPTO_REPLY: tuple[Reply, ...] = ((m.CRYPTO_SESSION, FDS_NONE),)
UFFD_REPLY: tuple[Reply, ...] = ((m.NONE, FDS_OPTIONAL),)
INFLIGHT_REPLY: tuple[Reply, ...] = ((m.INFLIGHT, FDS_INFLIGHT_REPLY),)
U64_MAYBE_FD_REPLY: tuple[Reply, ...] = ((m.U64, FDS_OPTIONAL),)
DEVICE_STATE_REPLY: tuple[Reply, ...] = ((m.U64, FDS_DEVICE_STATE_REPLY),)
SHMEM_CONFIG_REPLY: tuple[Reply, ...] = ((m.SHMEM_CONFIG, FDS_NONE),)

FRONTEND_SPECS: dict[int, RequestSpec] = {
    s.request: s
    for s in (
        _spec(FR.GET_FEATURES, replies=U64_REPLY, required=True),
        _spec(FR.SET_FEATURES, m.U64),
        _spec(FR.SET_OWNER),
        _spec(FR.RESET_OWNER),
        _spec(FR.SET_MEM_TABLE, m.MEMORY_TABLE, FDS_NREGIONS, MEM_TABLE_REPLY),
        _spec(FR.SET_LOG_BASE, m.LOG, FDS_OPTIONAL, U64_REPLY, True, ProtocolFeature.LOG_SHMFD),
        _spec(FR.SET_LOG_FD, fds=FDS_ONE),
        _spec(FR.SET_VRING_NUM, m.VRING_STATE),
        _spec(FR.SET_VRING_ADDR, m.VRING_ADDR),
        _spec(FR.SET_VRING_BASE, m.VRING_STATE),
        _spec(FR.GET_VRING_BASE, m.VRING_STATE, replies=VRING_STATE_REPLY, required=True),
        _spec(FR.SET_VRING_KICK, m.VRING_FILE, FDS_VRING_FILE),
        _spec(FR.SET_VRING_CALL, m.VRING_FILE, FDS_VRING_FILE),
        _spec(FR.SET_VRING_ERR, m.VRING_FILE, FDS_VRING_FILE),
        _spec(FR.GET_PROTOCOL_FEATURES, replies=U64_REPLY, required=True),
        _spec(FR.SET_PROTOCOL_FEATURES, m.U64),
        _spec(FR.GET_QUEUE_NUM, replies=U64_REPLY, required=True),
        _spec(FR.SET_VRING_ENABLE, m.VRING_STATE),
        _spec(FR.SEND_RARP, m.U64),
        _spec(FR.NET_SET_MTU, m.U64),
        _spec(FR.SET_BACKEND_REQ_FD, fds=FDS_ONE),
        _spec(FR.IOTLB_MSG, m.IOTLB, replies=U64_REPLY, required=True),
        _spec(FR.SET_VRING_ENDIAN, m.VRING_STATE),
        _spec(FR.GET_CONFIG, m.CONFIG, replies=CONFIG_REPLY, required=True),
        _spec(FR.SET_CONFIG, m.CONFIG),
        _spec(FR.CREATE_CRYPTO_SESSION, m.CRYPTO_SESSION, replies=CRYPTO_REPLY, required=True),
        _spec(FR.CLOSE_CRYPTO_SESSION, m.U64),
        _spec(FR.POSTCOPY_ADVISE, replies=UFFD_REPLY, required=True),
        _spec(FR.POSTCOPY_LISTEN),
        _spec(FR.POSTCOPY_END, replies=U64_REPLY, required=True),
        _spec(FR.GET_INFLIGHT_FD, m.INFLIGHT, replies=INFLIGHT_REPLY, required=True),
        _spec(FR.SET_INFLIGHT_FD, m.INFLIGHT, FDS_ONE),
        _spec(FR.GPU_SET_SOCKET, fds=FDS_ONE),
        _spec(FR.RESET_DEVICE),
        _spec(FR.VRING_KICK, m.VRING_STATE),
        _spec(FR.GET_MAX_MEM_SLOTS, replies=U64_REPLY, required=True),
        _spec(FR.ADD_MEM_REG, m.MEM_REG, FDS_ONE, MEM_REG_REPLY),
        _spec(FR.REM_MEM_REG, m.MEM_REG, FDS_OPTIONAL, MEM_REG_REPLY),
        _spec(FR.SET_STATUS, m.U64),
        _spec(FR.GET_STATUS, replies=U64_REPLY, required=True),
        _spec(FR.GET_SHARED_OBJECT, m.SHARED_OBJECT, replies=U64_MAYBE_FD_REPLY, required=True),
        _spec(FR.SET_DEVICE_STATE_FD, m.DEVICE_STATE, FDS_ONE, DEVICE_STATE_REPLY, True),
        _spec(FR.CHECK_DEVICE_STATE, replies=U64_REPLY, required=True),
        _spec(FR.GET_SHMEM_CONFIG, replies=SHMEM_CONFIG_REPLY, required=True),
        _spec(
            FR.GET_VRING_BASE_SKIP_DRAIN, m.VRING_STATE, replies=VRING_STATE_REPLY, required=True
        ),
    )
}

BACKEND_SPECS: dict[int, RequestSpec] = {
    s.request: s
    for s in (
        _spec(BR.BACKEND_IOTLB_MSG, m.IOTLB),
        _spec(BR.BACKEND_CONFIG_CHANGE_MSG),
        _spec(BR.BACKEND_VRING_HOST_NOTIFIER_MSG, m.VRING_AREA, FDS_VRING_AREA),
        _spec(BR.BACKEND_VRING_CALL, m.VRING_STATE),
        _spec(BR.BACKEND_VRING_ERR, m.VRING_STATE),
        _spec(BR.BACKEND_SHARED_OBJECT_ADD, m.SHARED_OBJECT),
        _spec(BR.BACKEND_SHARED_OBJECT_REMOVE, m.SHARED_OBJECT),
        _spec(
            BR.BACKEND_SHARED_OBJECT_LOOKUP,
            m.SHARED_OBJECT,
            replies=U64_MAYBE_FD_REPLY,
            required=True,
        ),
        _spec(BR.BACKEND_SHMEM_MAP, m.SHMEM_MAP, FDS_ONE),
        _spec(BR.BACKEND_SHMEM_UNMAP, m.SHMEM_MAP),
    )
}


def spec_for(request: IntEnum) -> RequestSpec:
    """The table entry of a FrontendRequest or BackendRequest member."""
    table = BACKEND_SPECS if isinstance(request, BackendRequest) else FRONTEND_SPECS
    return table[request]


def expects_reply(message: Message, protocol_features: int = 0) -> bool:
    """Whether the receiver of ``message`` (a request) must send a reply to it.

    True for requests with an explicit, required reply (when their condition feature, if any,
    is in ``protocol_features``), and for any request carrying NEED_REPLY.
    """
    if message.is_reply:
        return False
    spec = spec_for(message.request)
    if spec.reply_required and (
        spec.reply_condition is None or protocol_features >> spec.reply_condition & 1
    ):
        return True
    return message.need_reply


def needs_ack(message: Message) -> bool:
    """Whether the reply to ``message`` is a REPLY_ACK u64 rather than an explicit reply.

    True for a NEED_REPLY request that has no required reply of its own (SET_MEM_TABLE's
    table reply exists only in postcopy; otherwise it is acknowledged like any other).
    """
    return (
        message.need_reply and not message.is_reply and not spec_for(message.request).reply_required
    )
