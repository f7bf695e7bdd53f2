"""construct definitions of the vhost-user header and of every payload shape.

All numbers are little-endian (the spec says "machine native"; vhostmem only runs on
little-endian hosts, as QEMU's x86/arm64 builds do). Padding is kept as named fields with a
zero default, so that decoding and re-encoding any message gives back the exact bytes.
"""

from __future__ import annotations

from typing import Any

from construct import (
    Adapter,
    Array,
    Bytes,
    Container,
    Default,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    ListContainer,
    Rebuild,
    Struct,
    len_,
    this,
)

from protocol.constants import (
    MAX_VRING_INDEX,
    SHMEM_MAX_REGIONS,
    UUID_SIZE,
    VRING_FILE_KNOWN_BITS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
)

Header = Struct(
    "request" / Int32ul,
    "flags" / Int32ul,
    "size" / Int32ul,
)


class OwnedBytes(Adapter):  # type: ignore[misc]
    """Bytes that own their memory: the codec parses from a memoryview of the receive buffer,
    and a payload must not keep that buffer exported (or alive) after decoding."""

    def _decode(self, obj: Any, context: Any, path: str) -> bytes:
        return bytes(obj)

    def _encode(self, obj: Any, context: Any, path: str) -> Any:
        return obj


class VringFileAdapter(Adapter):  # type: ignore[misc]
    """The u64 of SET_VRING_KICK/CALL/ERR (and of a vring area): bits 0-7 ring index, bit 8 NOFD.

    Decodes to ``Container(index, nofd)``; encodes such a mapping or a raw int. Other bits are
    reserved: rejected both ways so that a decoded message re-encodes to the same bytes.
    """

    def _decode(self, obj: int, context: Any, path: str) -> Container:
        if obj & ~VRING_FILE_KNOWN_BITS:
            raise ValueError(f"reserved bits set in vring index u64 {obj:#x}")
        return Container(index=obj & VRING_INDEX_MASK, nofd=bool(obj & VRING_NOFD_MASK))

    def _encode(self, obj: Any, context: Any, path: str) -> int:
        if isinstance(obj, int):
            self._decode(obj, context, path)  # same reserved-bit check
            return obj
        index = int(obj["index"])
        if not 0 <= index <= MAX_VRING_INDEX:
            raise ValueError(f"vring index {index} out of range 0..{MAX_VRING_INDEX}")
        return index | (VRING_NOFD_MASK if obj["nofd"] else 0)


U64 = Int64ul

VringState = Struct(
    "index" / Int32ul,
    "num" / Int32ul,
)

VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    # the spec orders used before avail; so does struct vhost_vring_addr
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)

VringFile = VringFileAdapter(Int64ul)

MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)
MEMORY_REGION_SIZE = MemoryRegion.sizeof()

# SET_MEM_TABLE: QEMU sends only the nregions regions it uses, not all 8.
MemoryTable = Struct(
    "nregions" / Rebuild(Int32ul, len_(this.regions)),
    "padding" / Default(Int32ul, 0),
    "regions" / Array(this.nregions, MemoryRegion),
)
MEMORY_TABLE_HEADER_SIZE = 8

# ADD_MEM_REG / REM_MEM_REG
SingleMemoryRegion = Struct(
    "padding" / Default(Int64ul, 0),
    "region" / MemoryRegion,
)

Log = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
)

# struct vhost_iotlb_msg: 26 bytes of fields, padded to 32 by the C compiler.
Iotlb = Struct(
    "iova" / Int64ul,
    "size" / Int64ul,
    "uaddr" / Int64ul,
    "perm" / Int8ul,
    "type" / Int8ul,
    "padding" / Default(OwnedBytes(Bytes(6)), bytes(6)),
)

Config = Struct(
    "offset" / Int32ul,
    "size" / Rebuild(Int32ul, len_(this.payload)),
    "flags" / Default(Int32ul, 0),
    "payload" / OwnedBytes(Bytes(this.size)),
)

VringArea = Struct(
    "vring" / VringFile,
    "size" / Int64ul,
    "offset" / Int64ul,
)

# VhostUserInflight is not packed: 20 bytes of fields, 24 with the trailing padding.
Inflight = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    "padding" / Default(Int32ul, 0),
)

SharedObject = Struct(
    "uuid" / OwnedBytes(Bytes(UUID_SIZE)),
)

DeviceState = Struct(
    "direction" / Int32ul,  # 0 save (back-end -> front-end), 1 load
    "phase" / Int32ul,  # 0 stopped
)

ShmemMap = Struct(
    "shmid" / Int8ul,
    "padding" / Default(OwnedBytes(Bytes(7)), bytes(7)),
    "fd_offset" / Int64ul,
    "shm_offset" / Int64ul,
    "len" / Int64ul,
    "flags" / Int64ul,  # 0 read-only, 1 read-write
)

ShmemConfig = Struct(
    "nregions" / Int32ul,
    "padding" / Default(Int32ul, 0),
    "memory_sizes" / Array(SHMEM_MAX_REGIONS, Int64ul),
)

# VhostUserCryptoSession differs between QEMU versions; vhostmem passes it on opaquely.
CryptoSession = Struct(
    "data" / OwnedBytes(GreedyBytes),
)


def strip_io(obj: Any) -> Any:
    """Drop the ``_io`` keys construct leaves in parsed Containers (they pin the input)."""
    if isinstance(obj, Container):
        obj.pop("_io", None)
        for value in obj.values():
            strip_io(value)
    elif isinstance(obj, ListContainer):
        for value in obj:
            strip_io(value)
    return obj
