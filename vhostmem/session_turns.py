"""A ring's turns on the event loop: a kick, one bounded turn of the device, the next turn.

A mixin of :class:`vhostmem.session.Session` (rings served in this process; a ring started in
a data-plane worker is served there, vhostmem/worker.py, and never here).
"""

from __future__ import annotations

import logging

from vhostmem.device import VhostUserDevice
from vhostmem.session_base import KickWatcher
from vhostmem.virtqueue import Virtqueue

log = logging.getLogger("vhostmem.session")


class RingTurns:
    """Kicks and turns of the rings this process serves (the session provides the state)."""

    name: str
    device: VhostUserDevice
    queues: list[Virtqueue]
    watcher: KickWatcher
    _turn_pending: set[int]
    _remote: set[int]

    def on_kick(self, i: int) -> None:
        """The ring's kick eventfd is readable: drain it and process the ring."""
        vq = self.queues[i]
        vq.stat_kicks += 1
        try:
            vq.drain_kick()  # the kick is consumed; what its counter said does not matter
        except OSError as exc:
            self.watcher.unwatch(vq.kick_fd)
            vq.mark_broken(f"kick eventfd unreadable: {exc}")
            return
        if vq.enabled:
            self.process_queue(i)

    def process_queue(self, i: int) -> None:
        """One turn of ring ``i``: the device serves what the turn's budget allows; if work is
        left, the next turn is scheduled after the loop has served everything else ready."""
        vq = self.queues[i]
        if vq.broken or vq.paused or i in self._remote:
            return
        vq.new_turn()
        try:
            self.device.handle_queue(vq)
        except Exception as exc:  # a device bug stops its queue, not the connection
            log.exception("%s: device failed serving ring %d", self.name, i)
            vq.mark_broken(f"device error: {exc!r}")
            return
        if vq.yielded and i not in self._turn_pending:
            self._turn_pending.add(i)
            self.watcher.defer(lambda: self._next_turn(i))

    def _next_turn(self, i: int) -> None:
        self._turn_pending.discard(i)
        vq = self.queues[i]
        if vq.started and vq.enabled:
            self.process_queue(i)
