"""The typed message, the protocol error, and the shapes payloads can take."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from construct import Construct

from protocol import payloads as p
from protocol.constants import (
    CONFIG_HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_MEM_REGIONS,
    MAX_VRING_INDEX,
    NEED_REPLY_FLAG,
    REPLY_FLAG,
    REQUEST_FLAGS,
    SHMEM_MAX_REGIONS,
    VERSION_MASK,
)

RequestLike = IntEnum | int | None


def request_name(request: RequestLike) -> str:
    if request is None:
        return "message"
    if isinstance(request, IntEnum):
        return request.name
    return f"request {request}"


class ProtocolError(Exception):
    """A message that breaks the vhost-user protocol.

    ``request`` is the enum member (or the raw number when unknown, or None when not even the
    header could be read); ``reason`` says what was wrong. Whoever raises it has already closed
    the fds that came with the bad message.
    """

    def __init__(self, request: RequestLike, reason: str) -> None:
        super().__init__(f"{request_name(request)}: {reason}")
        self.request = request
        self.reason = reason


@dataclass
class Message:
    """One vhost-user message: header fields, decoded payload and the fds that came with it.

    ``payload`` is None for an empty payload, an ``int`` for a u64 and a construct ``Container``
    for a struct. ``request`` is a :class:`FrontendRequest` or :class:`BackendRequest`; for a reply
    it is the request being answered. The receiver of a Message owns its ``fds``. ``invalid``
    names what was wrong with a framed message that failed validation (see Framer).
    """

    request: IntEnum
    flags: int = REQUEST_FLAGS
    payload: Any = None
    fds: list[int] = field(default_factory=list)
    # Set (and payload None, fds closed) for a message that was framed but failed validation,
    # when the framer keeps such messages (Framer(keep_invalid=True)): the receiver answers it
    # as a failed request (REPLY_ACK) instead of dropping the peer.
    invalid: str | None = None

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY_FLAG)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY_FLAG)

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK


# --- payload shapes -----------------------------------------------------------------------

SizeCheck = Callable[[memoryview], "str | None"]
Validator = Callable[[Any], "str | None"]
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Shape:
    """How one payload is laid out: its construct, which sizes it accepts, what it validates.

    ``size`` is the exact size of a fixed shape, or None for a variable one whose ``size_check``
    looks at the raw bytes before they are decoded. ``kind`` is "none", "u64" or "struct".
    """

    name: str
    con: Construct | None
    kind: str
    size: int | None
    size_check: SizeCheck | None = None
    validate: Validator | None = None
    min_size: int = 0

    def accepts_size(self, size: int) -> bool:
        if self.size is not None:
            return size == self.size
        return size >= self.min_size

    def matches(self, payload: Any) -> bool:
        """Whether a Python payload has this shape's type (to pick among reply shapes)."""
        if payload is None:
            return self.kind == "none"
        if isinstance(payload, int):
            return self.kind in ("u64", "vring file")
        return self.kind in ("struct", "vring file")


def _check_vring_index(payload: Any) -> str | None:
    index = payload["index"]
    if index > MAX_VRING_INDEX:
        return f"vring index {index} > {MAX_VRING_INDEX}"
    return None


def _check_memory_table_size(view: memoryview) -> str | None:
    if len(view) < p.MEMORY_TABLE_HEADER_SIZE:
        return f"size {len(view)} is shorter than the memory table header"
    (nregions,) = _U32.unpack_from(view, 0)
    if nregions > MAX_MEM_REGIONS:
        return f"nregions {nregions} > {MAX_MEM_REGIONS}"
    expected = p.MEMORY_TABLE_HEADER_SIZE + nregions * p.MEMORY_REGION_SIZE
    if len(view) != expected:
        return f"size {len(view)} does not match {nregions} regions ({expected} bytes)"
    return None


def _check_memory_table(payload: Any) -> str | None:
    nregions = payload.get("nregions", len(payload["regions"]))
    if nregions > MAX_MEM_REGIONS or len(payload["regions"]) > MAX_MEM_REGIONS:
        return f"nregions {max(nregions, len(payload['regions']))} > {MAX_MEM_REGIONS}"
    return None


def _check_config_size(view: memoryview) -> str | None:
    if len(view) < CONFIG_HEADER_SIZE:
        return f"size {len(view)} is shorter than the config header"
    (size,) = _U32.unpack_from(view, 4)
    if size > MAX_CONFIG_SIZE:
        return f"config size {size} > {MAX_CONFIG_SIZE}"
    if len(view) != CONFIG_HEADER_SIZE + size:
        return f"size {len(view)} does not match config size {size}"
    return None


def _check_config(payload: Any) -> str | None:
    size = len(payload["payload"])
    if size > MAX_CONFIG_SIZE:
        return f"config size {size} > {MAX_CONFIG_SIZE}"
    return None


def _check_shmem_config(payload: Any) -> str | None:
    # QEMU asserts nregions <= VIRTIO_MAX_SHMEM_REGIONS, the length of memory_sizes.
    nregions = payload["nregions"]
    if nregions > SHMEM_MAX_REGIONS:
        return f"shmem config nregions {nregions} > {SHMEM_MAX_REGIONS}"
    return None


def _fixed(name: str, con: Construct, validate: Validator | None = None) -> Shape:
    return Shape(name, con, "struct", con.sizeof(), validate=validate)


NONE = Shape("empty", None, "none", 0)
U64 = Shape("u64", p.U64, "u64", 8)
VRING_FILE = Shape("vring file", p.VringFile, "vring file", 8)
VRING_STATE = _fixed("vring state", p.VringState, _check_vring_index)
VRING_ADDR = _fixed("vring addr", p.VringAddr, _check_vring_index)
MEMORY_TABLE = Shape(
    "memory table",
    p.MemoryTable,
    "struct",
    None,
    _check_memory_table_size,
    _check_memory_table,
    min_size=p.MEMORY_TABLE_HEADER_SIZE,
)
MEM_REG = _fixed("single memory region", p.SingleMemoryRegion)
LOG = _fixed("log", p.Log)
IOTLB = _fixed("iotlb", p.Iotlb)
CONFIG = Shape(
    "config", p.Config, "struct", None, _check_config_size, _check_config, CONFIG_HEADER_SIZE
)
VRING_AREA = _fixed("vring area", p.VringArea)
INFLIGHT = _fixed("inflight", p.Inflight)
SHARED_OBJECT = _fixed("shared object", p.SharedObject)
DEVICE_STATE = _fixed("device state", p.DeviceState)
SHMEM_MAP = _fixed("shmem map", p.ShmemMap)
SHMEM_CONFIG = _fixed("shmem config", p.ShmemConfig, _check_shmem_config)
CRYPTO_SESSION = Shape("crypto session", p.CryptoSession, "struct", None)
