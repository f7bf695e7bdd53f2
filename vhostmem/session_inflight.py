"""The inflight requests of a session (INFLIGHT_SHMFD): GET_INFLIGHT_FD, SET_INFLIGHT_FD, and
the device's guest state kept in the inflight region across backend restarts.

A mixin of :class:`vhostmem.session.Session`. The region is how a restarted backend finds the
requests a dead one had in flight (vhostmem/inflight.py, docs/inflight.md); its device-state
trailer carries what the guest chose (blk: write-through) to the next backend, since QEMU never
replays SET_CONFIG on reconnect.
"""

from __future__ import annotations

import logging

from protocol import Message
from vhostmem.device import DeviceConfigError, VhostUserDevice
from vhostmem.inflight import InflightError, InflightState, QueueLayout
from vhostmem.inflight_packed import layout_for
from vhostmem.session_base import FdReply, SessionError, SessionState, take_fds
from vhostmem.virtqueue import Virtqueue

log = logging.getLogger("vhostmem.session")


class InflightRequests:
    """Handlers of the inflight requests (the session provides the state)."""

    name: str
    device: VhostUserDevice
    queues: list[Virtqueue]
    state: SessionState
    inflight: InflightState

    def _layout(self) -> QueueLayout:
        """The region layout of the negotiated ring layout (QEMU sends SET_FEATURES before
        GET_INFLIGHT_FD and SET_INFLIGHT_FD: vhost_dev_prepare_inflight)."""
        return layout_for(self.state.features)

    def _get_inflight_fd(self, msg: Message) -> FdReply:
        p = msg.payload
        try:
            payload, fd = self.inflight.offer(p.num_queues, p.queue_size, len(self.queues),
                                              self._layout())
        except (InflightError, OSError) as exc:
            # The reply's error form: mmap_size 0 and no fd (the frontend runs without it).
            log.error("%s: GET_INFLIGHT_FD: %s (empty region)", self.name, exc)
            return FdReply({"mmap_size": 0, "mmap_offset": 0, "num_queues": p.num_queues,
                            "queue_size": p.queue_size}, [])
        return FdReply(payload, [fd])

    def _set_inflight_fd(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise SessionError("SET_INFLIGHT_FD: expected exactly one fd")
        started = [vq.index for vq in self.queues if vq.started]
        if started:
            raise SessionError(f"SET_INFLIGHT_FD: rings {started} are started")
        self.inflight.attach(take_fds(msg)[0], msg.payload, self.queues, self._layout())
        self._restore_guest_state()

    def _save_guest_state(self) -> None:
        """Keep the device's guest state in the inflight region, which the frontend hands to
        a restarted backend (vhostmem/inflight.py, "device state")."""
        region = self.inflight.region
        if region is not None:
            region.save_device_state(self.device.guest_state())

    def _restore_guest_state(self) -> None:
        """SET_INFLIGHT_FD: a region that holds a device state comes from an earlier backend
        serving this guest: take the guest's choices back from it; else store ours in it."""
        region = self.inflight.region
        assert region is not None
        saved = region.device_state()
        if saved is not None:
            try:
                self.device.restore_guest_state(saved)
            except DeviceConfigError as exc:
                log.warning("%s: inflight region: %s; not restored", self.name, exc)
            else:
                log.info("%s: device state restored from the inflight region", self.name)
        self._save_guest_state()
