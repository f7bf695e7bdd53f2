"""A ring's turns on the event loop: a kick, one bounded turn of the device, the next turn.

Busy polling (``--poll-us``, off by default, like QEMU's ``poll-max-ns``): after a turn that
took requests (served them, or handed them to an asynchronous backend) the ring is looked at
again on every pass of the event loop, without waiting for a kick, until ``poll_s`` seconds
pass with nothing new; each request found starts the window again. A driver answering within
the window (a QD1 guest, a load generator reaping and resubmitting) then skips the kick's
wake-up; other rings and devices still get their turns in between (each poll is one ordinary bounded
turn scheduled behind everything else ready), and the window ends on its own when the ring goes
quiet. The price is CPU spent looking.

A mixin of :class:`vhostmem.session.Session` (rings served in this process; a ring started in
a data-plane worker is served there, vhostmem/worker.py, and never here).
"""

from __future__ import annotations

import logging
from time import monotonic

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
    poll_s: float  # busy-poll window after a turn that served requests (0: off)
    _poll_until: dict[int, float]  # rings being polled: end of their window
    _poll_seen: dict[int, int]  # per ring: its completed requests at the end of its last turn

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
        served, held = vq.stat_requests, vq.inflight
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
        elif self.poll_s and self._active(i, vq, served, held):
            self._poll(i)

    def _active(self, i: int, vq: Virtqueue, served: int, held: int) -> bool:
        """Whether ring ``i``'s turn took requests (served them, or handed them to an
        asynchronous backend), or requests completed since its last turn. An asynchronous
        backend (NBD) completes requests later, outside any turn, and the driver's next
        request follows a completion: counting only the turn's own completions would never
        poll such a ring, and counting only what it took would close the window before the
        next request (it comes a server round trip later)."""
        done = vq.stat_requests
        before = self._poll_seen.get(i, served)
        self._poll_seen[i] = done
        return done != before or vq.inflight > held

    def _poll(self, i: int) -> None:
        """Open (or extend) ring ``i``'s poll window; the first opening schedules the poll."""
        polling = i in self._poll_until
        self._poll_until[i] = monotonic() + self.poll_s
        if not polling:
            self.watcher.defer(lambda: self._poll_turn(i))

    def _poll_turn(self, i: int) -> None:
        """One pass of the poll: a turn of ring ``i`` (which extends the window if it served
        something), then the next pass, until the window ends or the ring stops."""
        vq = self.queues[i]
        if not (vq.started and vq.enabled) or monotonic() > self._poll_until[i]:
            del self._poll_until[i]
            return
        self.process_queue(i)
        self.watcher.defer(lambda: self._poll_turn(i))

    def _next_turn(self, i: int) -> None:
        self._turn_pending.discard(i)
        vq = self.queues[i]
        if vq.started and vq.enabled:
            self.process_queue(i)
