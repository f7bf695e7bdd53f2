"""The vhost-user wire format, sans-IO: bytes + fds in, typed messages out, and back.

No sockets, no asyncio, no mmap here. See docs/protocol.md.
"""

from protocol.codec import (
    build_message,
    close_fds,
    encode_reply,
    encode_request,
    parse_message,
)
from protocol.constants import (
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    MAX_VRING_INDEX,
    NEED_REPLY_FLAG,
    REPLY_FLAG,
    REPLY_FLAGS,
    REQUEST_FLAGS,
    VERSION,
    VRING_NOFD_MASK,
    BackendRequest,
    BlkFeature,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    feature_mask,
    feature_names,
)
from protocol.framing import Framer
from protocol.messages import Message, ProtocolError
from protocol.spec import (
    BACKEND_SPECS,
    FRONTEND_SPECS,
    RequestSpec,
    expects_reply,
    needs_ack,
    spec_for,
)
from protocol.vring import join_packed_base, split_packed_base

__all__ = [
    "BACKEND_SPECS",
    "FRONTEND_SPECS",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_FDS",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "MAX_VRING_INDEX",
    "NEED_REPLY_FLAG",
    "REPLY_FLAG",
    "REPLY_FLAGS",
    "REQUEST_FLAGS",
    "VERSION",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "BlkFeature",
    "Framer",
    "FrontendRequest",
    "Message",
    "ProtocolError",
    "ProtocolFeature",
    "RequestSpec",
    "VirtioFeature",
    "build_message",
    "close_fds",
    "encode_reply",
    "encode_request",
    "expects_reply",
    "feature_mask",
    "feature_names",
    "join_packed_base",
    "needs_ack",
    "parse_message",
    "spec_for",
    "split_packed_base",
]
