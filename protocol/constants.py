"""Numbers of the vhost-user protocol (QEMU docs/interop/vhost-user.rst) and of virtio.

Every feature enum holds **bit numbers**, not masks: ``1 << ProtocolFeature.REPLY_ACK`` is the
mask. Where the spec renamed something (SLAVE -> BACKEND) the old name is kept as an alias, so
``FrontendRequest.SET_SLAVE_REQ_FD is FrontendRequest.SET_BACKEND_REQ_FD``.
"""

from __future__ import annotations

from enum import IntEnum

# --- header -------------------------------------------------------------------------------
HEADER_SIZE = 12  # u32 request, u32 flags, u32 size
VERSION = 0x1  # the only protocol version there is
VERSION_MASK = 0x3  # flags bits 0-1
REPLY_FLAG = 0x4  # flags bit 2: set on every reply
NEED_REPLY_FLAG = 0x8  # flags bit 3: REPLY_ACK requested
KNOWN_FLAGS = VERSION_MASK | REPLY_FLAG | NEED_REPLY_FLAG
REQUEST_FLAGS = VERSION  # what a request without NEED_REPLY carries
REPLY_FLAGS = VERSION | REPLY_FLAG  # what every reply carries (QEMU accepts nothing else)

# --- payload limits ------------------------------------------------------------------------
# Largest payload accepted. QEMU's biggest message (GET_SHMEM_CONFIG reply) is 2056 bytes.
MAX_PAYLOAD_SIZE = 4096
MAX_MESSAGE_SIZE = HEADER_SIZE + MAX_PAYLOAD_SIZE
MAX_MEM_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE
MAX_FDS = 8  # most fds one message may carry (one per memory region)
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE
CONFIG_HEADER_SIZE = 12  # u32 offset, u32 size, u32 flags before the config bytes
MAX_VRING_INDEX = 255  # ring indices travel in 8 bits of the vring-file u64
SHMEM_MAX_REGIONS = 256  # entries in the VIRTIO Shared Memory Region configuration
UUID_SIZE = 16

# --- u64 payload bit fields ----------------------------------------------------------------
VRING_INDEX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR u64, bits 0-7: ring index
VRING_NOFD_MASK = 0x100  # bit 8: no fd in the ancillary data (poll instead)
VRING_FILE_KNOWN_BITS = VRING_INDEX_MASK | VRING_NOFD_MASK
DEVICE_STATE_ERROR_MASK = 0xFF  # SET_DEVICE_STATE_FD reply bits 0-7: 0 on success
DEVICE_STATE_NOFD_MASK = 0x100  # bit 8: the back-end returned no fd

# Packed-ring SET/GET_VRING_BASE num: two 15-bit indices, each with a wrap counter above it.
PACKED_AVAIL_IDX_MASK = 0x7FFF  # bits 0-14
PACKED_AVAIL_WRAP_SHIFT = 15
PACKED_USED_IDX_SHIFT = 16  # bits 16-30
PACKED_USED_WRAP_SHIFT = 31
SPLIT_AVAIL_IDX_MASK = 0xFFFF  # split ring: only the low 16 bits are used

# Vring address flags (SET_VRING_ADDR).
VRING_F_LOG = 0  # bit number: log writes to the used ring

# Config space access flags (GET/SET_CONFIG).
CONFIG_FLAG_WRITABLE = 0
CONFIG_FLAG_LIVE_MIGRATION = 1


class FrontendRequest(IntEnum):
    """Requests the front-end (QEMU) sends to the back-end, ``VHOST_USER_`` prefix dropped."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45
    # previous name
    SET_SLAVE_REQ_FD = 21


class BackendRequest(IntEnum):
    """Requests the back-end sends on the back-end channel (``VHOST_USER_BACKEND_*``).

    The canonical names keep the spec's ``BACKEND_`` prefix; the short names are aliases.
    """

    BACKEND_IOTLB_MSG = 1
    BACKEND_CONFIG_CHANGE_MSG = 2
    BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    BACKEND_VRING_CALL = 4
    BACKEND_VRING_ERR = 5
    BACKEND_SHARED_OBJECT_ADD = 6
    BACKEND_SHARED_OBJECT_REMOVE = 7
    BACKEND_SHARED_OBJECT_LOOKUP = 8
    BACKEND_SHMEM_MAP = 9
    BACKEND_SHMEM_UNMAP = 10
    # short aliases
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


class ProtocolFeature(IntEnum):
    """``VHOST_USER_PROTOCOL_F_*`` bit numbers (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22
    GET_VRING_BASE_SKIP_DRAIN = 23
    # previous names
    SLAVE_REQ = 5
    SLAVE_SEND_FD = 10


class VirtioFeature(IntEnum):
    """Device-independent virtio feature bits, plus the vhost ones sharing the same u64."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    LOG_ALL = 26  # VHOST_F_LOG_ALL
    INDIRECT_DESC = 28  # VIRTIO_RING_F_INDIRECT_DESC
    EVENT_IDX = 29  # VIRTIO_RING_F_EVENT_IDX
    VHOST_USER_F_PROTOCOL_FEATURES = 30
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40
    # alternative names
    IOMMU_PLATFORM = 33
    PROTOCOL_FEATURES = 30


class BlkFeature(IntEnum):
    """``VIRTIO_BLK_F_*`` bit numbers (virtio 1.2 section 5.2.3)."""

    BARRIER = 0  # legacy
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    SCSI = 7  # legacy
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17
    # legacy name of FLUSH
    WCE = 9


def feature_mask(*bits: int) -> int:
    """The u64 mask with the given feature bit numbers set."""
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def feature_names(value: int, enum: type[IntEnum]) -> list[str]:
    """Names of the bits of ``enum`` set in ``value`` (canonical names only), low bit first."""
    return [m.name for m in enum if value >> m.value & 1]
