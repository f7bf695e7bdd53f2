"""Rings served by data-plane worker processes (``workers=N``): the session's side.

A mixin of :class:`vhostmem.session.Session`. The session keeps the whole control plane and
every ring's configuration (the one copy: size, addresses, base, fds); while a ring is started
its data path (kick -> pop -> device I/O -> used ring -> call) runs in a worker
(vhostmem/worker_pool.py, vhostmem/worker.py) and the session's own ring is only a record:
``started`` and the addresses, never popped here. What the worker needs is sent to it when it
changes: START and STOP, SET_VRING_CALL, SET_VRING_ENABLE, SET_VRING_ADDR of a started ring,
the memory table, the dirty log, the device's guest state. Whatever message changed a worker's
state is answered to the frontend only once every worker acknowledged it (:meth:`gate`).

GET_VRING_BASE (and every other stop: reset, disconnect) stops the ring in its worker, which
answers with the ring's base after the turn in progress; that base becomes the session's.
A ring whose worker died reports the used index the driver sees as its base: requests the
worker had taken and not completed are resubmitted from the inflight region when the frontend
attached one (INFLIGHT_SHMFD), otherwise they are lost to the guest.
"""

from __future__ import annotations

import logging

from vhostmem.device import VhostUserDevice
from vhostmem.dirty_log import DirtyLog
from vhostmem.guest_memory import GuestMemory, GuestMemoryError
from vhostmem.inflight import InflightState
from vhostmem.session_base import Deferred, KickWatcher, Reply, SessionError
from vhostmem.virtqueue import Virtqueue
from vhostmem.worker_pool import WorkerPool
from vhostmem.worker_proto import STATS_COUNTERS, Msg, WorkerMessage

log = logging.getLogger("vhostmem.session")

USED_IDX_OFFSET = 2  # the used ring's idx field follows its u16 flags (virtio 1.2, 2.7.8)


class WorkerRings:
    """Started rings handed to worker processes (the session provides the state)."""

    name: str
    device: VhostUserDevice
    memory: GuestMemory
    queues: list[Virtqueue]
    watcher: KickWatcher
    inflight: InflightState
    dirty_log: DirtyLog | None
    logging: bool
    pool: WorkerPool | None
    _remote: set[int]  # rings started in a worker
    _stopping: set[int]  # rings whose worker has not answered STOP yet
    _sent_state: tuple[int, bytes] | None

    def _init_workers(self, workers: int) -> None:
        self.pool = None
        self._remote = set()
        self._stopping = set()
        self._sent_state = None
        if not workers:
            return
        if self.device.worker_settings() is None:
            raise SessionError(f"{self.name}: this device cannot be served by workers "
                               "(an asynchronous backend or io-mode=thread)")
        self.pool = WorkerPool(workers, self.name, self.watcher, self)
        # Spawned with the device: the first SET_VRING_KICK then waits for no interpreter to
        # start (~0.4 s of imports), and the process's fds stay as they are across
        # connections. A worker that dies is replaced at its next ring start.
        for slot in range(workers):
            self.pool.ensure(slot)

    # ----------------------------------------------------------- pool events

    def worker_ready(self, pool: WorkerPool, slot: int) -> None:
        link = pool.links[slot]
        assert link is not None
        settings = self.device.worker_settings()
        assert settings is not None
        fields, fds = settings
        pool.send(link, Msg.DEVICE, fds, None, **fields)
        state = (self.device.acked_features, self.device.guest_state())
        pool.send(link, Msg.GUEST_STATE, None, None, features=state[0], state=state[1].hex())
        self._sent_state = state  # what every worker has (the others got it before)
        target = self._log_target()
        if target is not None:
            pool.send(link, Msg.LOG, [target.fd], None, on=True, mmap_size=target.size,
                      mmap_offset=target.mmap_offset)

    def worker_broken(self, index: int, reason: str) -> None:
        if 0 <= index < len(self.queues) and index in self._remote:
            self.queues[index].mark_broken(reason)  # logs it and signals the err eventfd

    def worker_stats(self, index: int, counts: list[int], latency: list[int]) -> None:
        if not 0 <= index < len(self.queues) or len(counts) != len(STATS_COUNTERS):
            return
        vq = self.queues[index]
        for name, count in zip(STATS_COUNTERS, counts, strict=True):
            setattr(vq, name, getattr(vq, name) + count)
        for n, count in enumerate(latency[: len(vq.stat_latency)]):
            vq.stat_latency[n] += count

    def _log_target(self) -> DirtyLog | None:
        raise NotImplementedError  # session_log.py

    # ------------------------------------------------------------ ring hooks

    def _start_remote(self, i: int) -> None:
        """Start ring ``i`` in its worker (SET_VRING_KICK)."""
        assert self.pool is not None
        vq = self.queues[i]
        link = self.pool.ensure(i)
        vq.start_elsewhere()
        fds = [vq.kick_fd] + ([vq.call_fd] if vq.call_fd >= 0 else [])
        region = self.inflight.region if vq.tracked() else None
        extra: dict[str, int] = {}
        if region is not None:
            fds.append(region.fd)
            extra = {"mmap_size": region.mmap_size, "mmap_offset": region.mmap_offset,
                     "num_queues": region.num_queues, "queue_size": region.queue_size}
        assert vq._addr is not None and vq.frontend_addr is not None
        desc, avail, used = vq._addr
        # Recorded first: a worker lost while this is sent breaks the ring (never a ring
        # that looks started with nobody serving it).
        link.rings.add(i)
        self._remote.add(i)
        self.pool.send(link, Msg.START, fds, None, index=i, num=vq.num,
                       features=self._ring_features(), addr=[desc, used, avail],
                       frontend_addr=list(vq.frontend_addr), base=vq.get_base(),
                       enabled=vq.enabled, call=vq.call_fd >= 0, resume=i in self._stopping,
                       inflight=region is not None,
                       failure_status=vq.failure_status.hex(),
                       indirect_floor=vq.indirect_floor, **extra)
        log.info("%s: ring %d started in data-plane worker %d (pid %d, size %d, avail index "
                 "%d)", self.name, i, link.slot, link.pid, vq.num, vq.get_base())

    def _ring_features(self) -> int:
        raise NotImplementedError  # the session: the acked virtio features

    def _stop_remote(self, i: int) -> None:
        """Stop ring ``i`` in its worker; the session's ring is idle once it answered."""
        assert self.pool is not None
        self._remote.discard(i)
        link = self.pool.link_of(i)
        if link is None:  # its worker died: nothing to wait for
            self._stopped(i, None)
            return
        link.rings.discard(i)
        self._stopping.add(i)
        self.pool.send(link, Msg.STOP, None, lambda msg: self._stopped(i, msg), index=i)

    def _stopped(self, i: int, msg: WorkerMessage | None) -> None:
        self._stopping.discard(i)
        vq = self.queues[i]
        if msg is not None:
            vq.set_base(msg["base"])
            return
        if vq.packed:
            # A packed ring's position is the worker's own (positions and wrap counters that
            # no ring field records): the base it started from is what is known.
            log.error("%s: ring %d: its worker is gone; the packed ring's base stays %#x (the "
                      "start position)", self.name, i, vq.get_base())
            return
        try:
            base = self._used_idx_now(vq)
        except GuestMemoryError as exc:
            log.error("%s: ring %d: its worker is gone and its used ring unreadable (%s); "
                      "base stays %d", self.name, i, exc, vq.get_base())
            return
        log.warning("%s: ring %d: its worker is gone; reporting the used index %d as its base",
                    self.name, i, base)
        vq.set_base(base)

    def _used_idx_now(self, vq: Virtqueue) -> int:
        """The used index the driver sees, read once from the ring (split layout)."""
        assert vq._addr is not None
        used_gpa = vq._addr[2]
        view = self.memory.view(used_gpa + USED_IDX_OFFSET, 2)
        try:
            return int.from_bytes(view, "little")
        finally:
            view.release()

    def ring_idle(self, i: int) -> bool:
        busy = self.pool is not None and self.pool.busy()  # gives up on a stuck worker
        return self.queues[i].idle() and i not in self._stopping and not busy

    def workers_idle(self) -> bool:
        busy = self.pool is not None and self.pool.busy()  # gives up on a stuck worker
        return not busy and not self._stopping

    def _remote_send(self, i: int, kind: Msg, fds: list[int] | None = None,
                     **fields: object) -> None:
        """Tell ring ``i``'s worker about a change, if the ring runs in one."""
        if self.pool is None or i not in self._remote:
            return
        link = self.pool.link_of(i)
        if link is not None:
            self.pool.send(link, kind, fds, None, index=i, **fields)

    def _sync_guest_state(self) -> None:
        """Send the device's acked features and guest state to the workers when they changed
        (SET_FEATURES, SET_CONFIG, a restored inflight state, a reset)."""
        if self.pool is None:
            return
        state = (self.device.acked_features, self.device.guest_state())
        if state != self._sent_state:
            self._sent_state = state
            self.pool.broadcast(Msg.GUEST_STATE, features=state[0], state=state[1].hex())

    def gate(self, what: str, replies: list[Reply], failed: list[Reply],
             losses: int, mark: int) -> list[Reply] | Deferred:
        """The replies of a request, held until every worker acknowledged what it changed
        (what was sent after ``mark``); ``failed`` instead if a worker was lost meanwhile
        (``losses`` counted before). Only while a ring runs in a worker: otherwise no worker
        touches guest memory, the log or the disk before its next START, which it reads after
        the change (one ordered socket), and a worker still starting holds no reply."""
        assert self.pool is not None
        pool = self.pool
        self._sync_guest_state()

        def answer() -> list[Reply]:
            return replies if pool.losses == losses else failed

        def acknowledged() -> bool:
            return not (self._remote and pool.owes_after(mark)) and not self._stopping

        if acknowledged():
            return answer()
        return Deferred(what, acknowledged, answer)

    def _close_workers(self) -> None:
        if self.pool is not None:
            self.pool.close()


__all__ = ["WorkerRings"]
