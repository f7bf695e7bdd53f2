"""The interface a vhost-user device implements (features, config space, queue handler).

The server (session) owns the connection, the guest memory and the virtqueues; a device only
says what it offers and serves kicked queues:

* :meth:`VhostUserDevice.features` is offered in GET_FEATURES (the server adds
  VHOST_USER_F_PROTOCOL_FEATURES); the acked set comes back through :meth:`set_features`, and the
  server also passes it to every :class:`Virtqueue` (EVENT_IDX, INDIRECT_DESC).
* :meth:`protocol_features` are vhost-user protocol bits the device needs on top of the server's
  own (e.g. CONFIG for GET_CONFIG / SET_CONFIG).
* :meth:`handle_queue` is called when a started, enabled queue was kicked: pop every available
  chain, complete each with ``push_used``, then call ``notify`` once for the batch. An exception
  escaping it marks that queue broken (the reason is logged and the err eventfd signalled).
* :meth:`guest_state` / :meth:`restore_guest_state`: what the guest chose that the frontend
  will not replay to a restarted backend (blk: the writeback byte). The session keeps it in the
  inflight region, which outlives a backend crash, and restores it on reconnect.
* :meth:`reset` is a device reset (RESET_DEVICE / RESET_OWNER): negotiated features go, the guest
  state stays (QEMU keeps showing the guest the config it cached); :meth:`forget_guest` is called
  when the frontend goes away, and returns the device to its power-on state.
* :attr:`failed_request_status` is what the virtqueue writes at the end of a request it fails
  itself because a buffer lies outside guest memory (blk: the IOERR status byte); empty means
  such a request is completed with nothing written.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from vhostmem.virtqueue import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    Virtqueue,
)

# Generic virtio feature bits (virtio 1.2 section 6).
VIRTIO_F_VERSION_1 = 32
# vhost-user protocol feature bits a device may ask for.
VHOST_USER_PROTOCOL_F_MQ = 0
VHOST_USER_PROTOCOL_F_CONFIG = 9

# Every device built on this package's virtqueue supports these.
RING_FEATURES = (
    (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_RING_PACKED)  # packed layout (virtio 1.2 section 2.8, packed_ring.py)
)


class DeviceConfigError(ValueError):
    """A config-space access the device refuses (names offset, size and why)."""


class VhostUserDevice(ABC):
    """Base class of vhost-user devices."""

    num_queues: int = 1
    max_queue_size: int = 1024
    acked_features: int = 0
    failed_request_status: bytes = b""
    # Longest descriptor chain the device tells the driver to build (0: the ring size bounds
    # it); indirect tables up to this long are accepted even on a smaller ring.
    max_chain: int = 0

    @abstractmethod
    def features(self) -> int:
        """Virtio feature bits the device offers."""

    def protocol_features(self) -> int:
        """Extra vhost-user protocol feature bits the device needs."""
        return 0

    def set_features(self, acked: int) -> None:
        self.acked_features = acked

    def get_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space from ``offset`` (zeros past the device's layout)."""
        return bytes(size)

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise DeviceConfigError(f"config space is read-only (offset {offset}, {len(data)} bytes)")

    @abstractmethod
    def handle_queue(self, vq: Virtqueue) -> None:
        """Serve every available request of ``vq``; signal the driver once at the end."""

    def claim(self, who: str, busy: Callable[[], bool]) -> None:  # noqa: B027 - optional
        """The frontend on ``who`` starts a ring. A device whose storage other devices share
        refuses (ValueError naming the holder) while another frontend's rings run on it;
        ``busy()`` says whether ``who``'s rings still run."""

    def reset(self) -> None:
        """Forget negotiated features (device reset; :meth:`forget_guest` on disconnect)."""
        self.acked_features = 0

    def forget_guest(self) -> None:
        """The frontend went away: back to the power-on state, guest state included."""
        self.reset()

    def guest_state(self) -> bytes:
        """State the guest set that the frontend does not replay (at most 56 bytes)."""
        return b""

    def restore_guest_state(self, data: bytes) -> None:
        """Take back :meth:`guest_state` of an earlier backend; DeviceConfigError if invalid."""
        if data:
            raise DeviceConfigError(f"unexpected saved device state ({len(data)} bytes)")

    def worker_settings(self) -> tuple[dict[str, Any], list[int]] | None:
        """How a data-plane worker process builds a copy of this device (vhostmem/worker.py):
        its settings and the fds it needs, or None when the device cannot run in one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the device's own resources (backing files); the server calls it at exit."""
