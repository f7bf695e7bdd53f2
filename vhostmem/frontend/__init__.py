"""A vhost-user frontend ("fake guest") that plays QEMU's role against any vhost-user backend.

It never imports the vhostmem server: only `protocol` and the standard library.
"""

from vhostmem.frontend.blk import (
    INDIRECT,
    MERGED,
    STANDARD,
    BlkStatus,
    BlkType,
    Layout,
    LayoutError,
    blk_header,
    chain_pieces,
    discard_segment,
    parse_blk_config,
)
from vhostmem.frontend.client import Listener, VhostUserClient, VhostUserError
from vhostmem.frontend.device import VhostUserBlk
from vhostmem.frontend.dirty import DirtyBitmap, log_size_for, pages_of
from vhostmem.frontend.memory import GuestRam, GuestRamError, GuestRegion
from vhostmem.frontend.queue import BlkError, BlkQueue, LostKickError, QueueFullError, Request
from vhostmem.frontend.ring import EventFd, RingAddresses, RingError, SplitRing, vring_need_event

__all__ = [
    "INDIRECT",
    "MERGED",
    "STANDARD",
    "BlkError",
    "BlkQueue",
    "BlkStatus",
    "BlkType",
    "DirtyBitmap",
    "EventFd",
    "GuestRam",
    "GuestRamError",
    "GuestRegion",
    "Layout",
    "LayoutError",
    "Listener",
    "LostKickError",
    "QueueFullError",
    "Request",
    "RingAddresses",
    "RingError",
    "SplitRing",
    "VhostUserBlk",
    "VhostUserClient",
    "VhostUserError",
    "blk_header",
    "chain_pieces",
    "discard_segment",
    "log_size_for",
    "pages_of",
    "parse_blk_config",
    "vring_need_event",
]
