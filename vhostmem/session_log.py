"""The live-migration requests of a session: SET_LOG_BASE, SET_LOG_FD and VHOST_F_LOG_ALL.

A mixin of :class:`vhostmem.session.Session`. QEMU starts a migration by sending SET_LOG_BASE
(the shared dirty bitmap, vhostmem/dirty_log.py), then SET_FEATURES with VHOST_F_LOG_ALL (with
NEED_REPLY: it waits until the backend logs) and SET_VRING_ADDR with VHOST_VRING_F_LOG on every
ring; it ends it with SET_FEATURES without LOG_ALL (cancelled) or by stopping the rings
(GET_VRING_BASE) before its last sync of the log (completed).

Switching logging on while requests are in flight on I/O threads: those were walked without
recording their writable ranges, so their writes could not be logged. The rings take no new
chain (``paused``) until they completed, and LOG_ALL is acknowledged then (a Deferred reply),
so every chain completed while logging is on was walked with logging on.
"""

from __future__ import annotations

import logging
import os

from protocol import Message, encode_reply
from vhostmem.device import VhostUserDevice
from vhostmem.dirty_log import DirtyLog, DirtyLogError
from vhostmem.guest_memory import GuestMemory
from vhostmem.session_base import (
    ACK_OK,
    Deferred,
    Reply,
    SessionError,
    SessionState,
    close_fd,
    take_fds,
)
from vhostmem.virtqueue import Virtqueue
from vhostmem.worker_pool import WorkerPool
from vhostmem.worker_proto import Msg

log = logging.getLogger("vhostmem.session")

# For the migration tests' negative control only: acknowledge LOG_ALL but mark nothing, so that
# a test can show its in-guest check catches pages a backend wrote without logging them.
DEBUG_NO_MARKING = os.environ.get("VHOSTMEM_DEBUG_NO_DIRTY_LOG") == "1"

# VHOST_F_LOG_ALL (vhost-user.rst; Linux vhost.h): the backend logs every write to guest memory.
VHOST_F_LOG_ALL = 26
LOG_ALL_BIT = 1 << VHOST_F_LOG_ALL


class LogRequests:
    """Dirty logging state and handlers (the session provides queues and memory)."""

    name: str
    memory: GuestMemory
    queues: list[Virtqueue]
    device: VhostUserDevice
    dirty_log: DirtyLog | None
    logging: bool
    log_fd: int
    log_catch_up: bool
    state: SessionState
    pool: WorkerPool | None

    def process_queue(self, i: int) -> None:
        raise NotImplementedError

    def idle(self) -> bool:
        raise NotImplementedError

    @staticmethod
    def _acks(msg: Message) -> bool:
        raise NotImplementedError

    def _threads_idle(self) -> bool:
        """No request of a ring served here is in flight on an I/O thread. (Rings in
        data-plane workers switch between two turns; the LOG message they acknowledge holds
        the reply: session_workers.py.)"""
        return all(vq.idle() for vq in self.queues)

    def _gpa_end(self) -> int:
        return max((r.gpa_end for r in self.memory.regions), default=0)

    def _set_log_base(self, msg: Message) -> int:
        if len(msg.fds) != 1:
            raise SessionError("SET_LOG_BASE: expected the log fd (LOG_SHMFD)")
        p = msg.payload
        try:
            new = DirtyLog.attach(take_fds(msg)[0], p.mmap_size, p.mmap_offset, self._gpa_end())
        except DirtyLogError as exc:
            raise SessionError(f"SET_LOG_BASE: {exc}") from None
        # Workers mark it too: whole-byte stores in every process (dirty_log.py).
        if self.pool is not None:
            new.share()
        old, self.dirty_log = self.dirty_log, new
        if self.logging:
            for vq in self.queues:
                vq.set_dirty_log(new)
            self._send_log()
        if old is not None:
            old.close()
        log.info("%s: dirty log of %d bytes attached", self.name, new.size)
        if self.logging:
            self._catch_up()
        return 0  # the u64 reply QEMU waits for before it relies on the log

    def _set_log_fd(self, msg: Message) -> None:
        # The eventfd a backend may signal after updating the log outside a ring; vhostmem
        # marks the log only while serving rings, whose completions QEMU syncs itself.
        if len(msg.fds) != 1:
            raise SessionError("SET_LOG_FD: expected exactly one fd")
        close_fd(self.log_fd)
        self.log_fd = take_fds(msg)[0]

    def _check_log_covers(self, gpa_end: int, what: str) -> None:
        """While logging, memory the log does not cover cannot be served (its writes could
        not be marked): QEMU resizes the log (SET_LOG_BASE) before it adds memory."""
        if self.logging and self.dirty_log is not None and not self.dirty_log.covers(gpa_end):
            raise SessionError(
                f"{what}: guest memory up to {gpa_end:#x} is beyond the dirty log "
                f"({self.dirty_log.size} bytes)")

    def _switch_logging(self, msg: Message, acked: int) -> Deferred | None:
        """SET_FEATURES toggled VHOST_F_LOG_ALL: start or stop marking."""
        want = bool(acked & LOG_ALL_BIT)
        if want and not self.state.features:
            self.log_catch_up = True
        if want == self.logging:
            return None
        if not want:
            self._apply_logging(False)
            return None
        if self.dirty_log is None:
            # Nothing to mark into yet; marking starts with SET_LOG_BASE (QEMU sends that
            # first, a frontend acking every offered bit at start does not).
            log.warning("%s: VHOST_F_LOG_ALL acked before SET_LOG_BASE", self.name)
        elif not self.dirty_log.covers(self._gpa_end()):
            raise SessionError("SET_FEATURES: the dirty log does not cover guest memory")
        if self._threads_idle():
            self._apply_logging(True)
            return None
        for vq in self.queues:
            vq.paused = True
        ack = self._acks(msg)

        def finish() -> list[Reply]:
            self._apply_logging(True)
            return [(encode_reply(msg.request, ACK_OK), [])] if ack else []

        return Deferred("SET_FEATURES (VHOST_F_LOG_ALL on)", self._threads_idle, finish)

    def _apply_logging(self, on: bool) -> None:
        self.logging = on
        target = self.dirty_log if on else None
        if on and DEBUG_NO_MARKING:
            log.critical("%s: VHOSTMEM_DEBUG_NO_DIRTY_LOG=1: LOG_ALL acked, nothing marked "
                         "(a migration will corrupt the guest)", self.name)
            target = None
        for vq in self.queues:
            vq.set_dirty_log(target)
        self._send_log()
        log.info("%s: dirty logging %s", self.name, "on" if on else "off")
        if on:
            self._catch_up()
        for i, vq in enumerate(self.queues):
            if vq.paused:
                vq.paused = False
                if vq.started and vq.enabled:
                    self.process_queue(i)

    def _log_target(self) -> DirtyLog | None:
        """The log the rings mark into now (None: logging off)."""
        if not self.logging or DEBUG_NO_MARKING:
            return None
        return self.dirty_log

    def _send_log(self) -> None:
        """Tell the workers which log to mark (they map it themselves)."""
        if self.pool is None:
            return
        target = self._log_target()
        if target is None:
            self.pool.broadcast(Msg.LOG, on=False)
        else:
            self.pool.broadcast(Msg.LOG, [target.fd], on=True, mmap_size=target.size,
                                mmap_offset=target.mmap_offset)

    def _catch_up(self) -> None:
        """A session whose first SET_FEATURES has LOG_ALL is QEMU reconnecting during a
        migration, to a backend that replaced one that died. The dead one's marks since QEMU's
        last sync may never be collected (QEMU 7.2 stops the vhost device before its final sync
        of a disconnected one: docs/migration.md), so its writes could reach the destination
        stale. Marking every page once makes QEMU send all guest memory again: one more pass,
        and nothing the dead backend wrote is missed."""
        if not self.log_catch_up or self.dirty_log is None or DEBUG_NO_MARKING:
            return
        self.log_catch_up = False
        self.dirty_log.mark_all()
        log.warning("%s: joined a migration with logging on: every page marked dirty (the "
                    "previous backend's unsynced marks may be lost)", self.name)

    def drop_log(self) -> None:
        """Reset / disconnect: logging off, log unmapped, log fd closed."""
        self.logging = False
        self.log_catch_up = False
        for vq in self.queues:
            vq.set_dirty_log(None)
        self._send_log()
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        close_fd(self.log_fd)
        self.log_fd = -1


__all__ = ["LOG_ALL_BIT", "VHOST_F_LOG_ALL", "LogRequests"]
