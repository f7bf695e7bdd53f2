"""The main process's side of the data-plane workers of one device (vhostmem/worker.py).

A :class:`WorkerPool` of ``count`` worker processes serves one device: ring ``i`` runs in worker
``i % count``. A worker is spawned (``python -m vhostmem.worker``: a fresh interpreter, never a
fork of this asyncio process) the first time one of its rings starts, and is then brought up to
date by the session (device, guest state, memory table, dirty log) before the ring's START. The
pool keeps a duplicate of every guest-memory region fd (the session's own mapping closes its
fds) so that a worker spawned later, or one replacing a dead one, maps the same table.

Every request carries a sequence number and is answered by the worker in order;
``owes_after(mark)`` says whether an answer to something sent after ``mark`` is outstanding:
while a ring runs in a worker the session answers the frontend only then (a Deferred reply),
so a memory-table change or a ring stop reaches every worker before it is acknowledged.
The event loop never waits: the control sockets are non-blocking and read from
``KickWatcher.watch_channel`` callbacks, at most ``MAX_MESSAGES_PER_TURN`` messages per turn.

A worker that dies (EOF on its socket), stops taking messages (its socket is full) or fails a
request is logged with its pid and exit status, reaped (SIGKILL, then a bounded wait), each of
its started rings is reported broken (the session logs it and signals the ring's err eventfd),
and every answer it owed is completed as ``None``: nothing waits on a dead worker. The next
ring start on that slot spawns a new worker.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vhostmem.session_base import KickWatcher
from vhostmem.worker_log import WorkerLog
from vhostmem.worker_proto import (
    MAX_FDS,
    WORKER_IGNORED_SIGNALS,
    Msg,
    WorkerMessage,
    WorkerProtocolError,
    decode,
    encode,
)

log = logging.getLogger("vhostmem.workers")

RECV_BYTES = 65536
FD_SIZE = array.array("i").itemsize
ANCILLARY_BYTES = socket.CMSG_SPACE(8 * FD_SIZE)
MAX_MESSAGES_PER_TURN = 64
# A worker answers each request after at most one turn of its rings (a few ms; a slow disk's
# fdatasync longer). One that owes an answer this long is killed and handled as lost; well
# below the 30 s after which a Deferred reply disconnects the frontend
# (connection.DRAIN_TIMEOUT_SECONDS).
ANSWER_TIMEOUT_S = float(os.environ.get("VHOSTMEM_WORKER_ANSWER_TIMEOUT", "10"))
# A new worker's first answer also waits for a fresh interpreter to start and import (a few
# tenths of a second, seconds on a loaded host): it gets at least this long.
START_TIMEOUT_S = max(ANSWER_TIMEOUT_S, 20.0)
# After SIGKILL a process is gone at once; this only bounds a kernel-held exit (D state).
REAP_TIMEOUT_S = 2.0
# A worker asked to leave (the device closes) gets this long to exit on EOF before SIGKILL.
EXIT_TIMEOUT_S = 2.0
# Control sockets get this much buffer: a 253-region table part is ~20 KB of JSON.
SOCKET_BUFFER = 1 << 20

Reply = Callable[[WorkerMessage | None], None]
RegionKey = tuple[int, int, int]  # gpa, size, userspace address


class PoolEvents(Protocol):
    """What the pool tells the session."""

    def worker_ready(self, pool: WorkerPool, slot: int) -> None:
        """A worker was spawned in ``slot``: send it the device and its state."""

    def worker_broken(self, index: int, reason: str) -> None:
        """Ring ``index`` cannot be served any more (its worker broke it or died)."""

    def worker_stats(self, index: int, counts: list[int], latency: list[int]) -> None:
        """Counters of ring ``index`` since its worker's last report."""


@dataclass
class WorkerLink:
    slot: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    stderr: WorkerLog
    rings: set[int] = field(default_factory=set)  # started in this worker
    pending: dict[int, Reply | None] = field(default_factory=dict)  # seq -> on_reply
    waiting_since: float = 0.0  # monotonic time its oldest unanswered request was sent
    answered: bool = False  # it has answered once: it runs (START_TIMEOUT_S until then)

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerPool:
    """``count`` worker processes for one device; see the module docstring."""

    def __init__(self, count: int, name: str, watcher: KickWatcher, events: PoolEvents) -> None:
        if count < 1:
            raise ValueError(f"workers {count}: at least one")
        self.count = count
        self.name = name
        self.watcher = watcher
        self.events = events
        self.links: list[WorkerLink | None] = [None] * count
        self.regions: dict[RegionKey, tuple[int, int]] = {}  # key -> (mmap_offset, fd dup)
        self._seq = 0
        self.spawned = 0  # workers started so far (tests, logs)
        self.losses = 0  # workers lost so far (a request answered meanwhile failed)

    # ------------------------------------------------------------ workers

    def slot_of(self, index: int) -> int:
        return index % self.count

    def link_of(self, index: int) -> WorkerLink | None:
        """The live worker ring ``index`` runs in, if it was started in one."""
        link = self.links[self.slot_of(index)]
        return link if link is not None and index in link.rings else None

    def ensure(self, index: int) -> WorkerLink:
        """The worker for ring ``index``, spawned and brought up to date if needed."""
        slot = self.slot_of(index)
        link = self.links[slot]
        if link is None:
            link = self._spawn(slot)
            self.events.worker_ready(self, slot)
            self.send_table(link)
        return link

    def _spawn(self, slot: int) -> WorkerLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            argv = [sys.executable, "-m", "vhostmem.worker", "--fd", str(theirs.fileno()),
                    "--parent", str(os.getpid()),
                    "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
            # Blocked across the exec (the mask is inherited): a SIGTERM to the whole group
            # while the worker still imports stays pending, and is dropped once it ignores it.
            log_read, log_write = os.pipe()  # its stderr: relayed into our logging
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED_SIGNALS)
            try:
                proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()],
                                        stdin=subprocess.DEVNULL, stderr=log_write)
            except BaseException:
                os.close(log_read)
                raise
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                os.close(log_write)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        link = WorkerLink(slot, proc, ours, WorkerLog(log_read, proc.pid, self.watcher))
        self.links[slot] = link
        self.spawned += 1
        self.watcher.watch_channel(ours.fileno(), lambda: self._on_readable(link))
        log.info("%s: data-plane worker %d started (pid %d)", self.name, slot, proc.pid)
        return link

    def live(self) -> list[WorkerLink]:
        return [link for link in self.links if link is not None]

    # ------------------------------------------------------------ requests

    def send(self, link: WorkerLink, msg_type: Msg, fds: list[int] | None = None,
             on_reply: Reply | None = None, /, **fields: Any) -> None:
        """Send one request (the fds are copied into the worker; ours stay ours); its answer
        is awaited through :meth:`busy` and handed to ``on_reply``."""
        self._seq += 1
        seq = self._seq
        data = encode(msg_type, seq=seq, **fields)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        if not link.pending:
            link.waiting_since = time.monotonic()
        link.pending[seq] = on_reply
        try:
            link.sock.sendmsg([data], ancillary)
        except OSError as exc:  # full (not reading) or gone: either way it cannot serve
            self._died(link, f"control channel: {exc}")

    def broadcast(self, msg_type: Msg, fds: list[int] | None = None, /,
                  **fields: Any) -> None:
        for link in self.live():
            self.send(link, msg_type, fds, None, **fields)

    def busy(self) -> bool:
        """Whether a worker still owes an answer. A worker that owes one for longer than
        ``ANSWER_TIMEOUT_S`` (stopped, stuck in the kernel, looping) is given up: killed and
        handled as lost, so whatever waits for it completes."""
        now = time.monotonic()
        for link in self.live():
            limit = ANSWER_TIMEOUT_S if link.answered else START_TIMEOUT_S
            if link.pending and now - link.waiting_since > limit:
                self._died(link, f"no answer for {limit:.0f} s")
        return any(link.pending for link in self.live())

    @property
    def last_seq(self) -> int:
        """The sequence number of the last request sent (a mark for :meth:`owes_after`)."""
        return self._seq

    def owes_after(self, mark: int) -> bool:
        """Whether a request sent after ``mark`` is still unanswered (requests sent earlier,
        e.g. a new worker's setup, do not hold a reply that needs none of them)."""
        self.busy()  # gives up on a stuck worker
        return any(seq > mark for link in self.live() for seq in link.pending)

    # ------------------------------------------------------- guest memory

    def set_table(self, regions: list[tuple[int, int, int, int, int]]) -> None:
        """The session's new table (gpa, size, uaddr, offset, fd): the fds are the pool's
        from here on (duplicates the session made); every live worker maps it."""
        self._close_regions()
        for gpa, size, uaddr, offset, fd in regions:
            self.regions[(gpa, size, uaddr)] = (offset, fd)
        for link in self.live():
            self.send_table(link)

    def send_table(self, link: WorkerLink) -> None:
        items = [([*key, offset], fd) for key, (offset, fd) in self.regions.items()]
        parts = [items[n:n + MAX_FDS] for n in range(0, len(items), MAX_FDS)] or [[]]
        for n, part in enumerate(parts):
            self.send(link, Msg.MEM_TABLE, [fd for _, fd in part], None,
                      regions=[r for r, _ in part], more=n < len(parts) - 1)

    def add_region(self, gpa: int, size: int, uaddr: int, offset: int, fd: int) -> None:
        self.regions[(gpa, size, uaddr)] = (offset, fd)
        self.broadcast(Msg.MEM_ADD, [fd], regions=[[gpa, size, uaddr, offset]])

    def remove_region(self, gpa: int, size: int, uaddr: int) -> None:
        entry = self.regions.pop((gpa, size, uaddr), None)
        if entry is not None:
            _close(entry[1])
        self.broadcast(Msg.MEM_REM, regions=[[gpa, size, uaddr, 0]])

    def _close_regions(self) -> None:
        for _, fd in self.regions.values():
            _close(fd)
        self.regions.clear()

    # ------------------------------------------------------------ answers

    def _on_readable(self, link: WorkerLink) -> None:
        for _ in range(MAX_MESSAGES_PER_TURN):
            if self.links[link.slot] is not link:
                return
            try:
                data, ancdata, _, _ = link.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                self._died(link, f"control channel: {exc}")
                return
            _close_ancillary(ancdata)  # a worker sends no fds
            if not data:
                self._died(link, "control channel closed")
                return
            try:
                self._dispatch(link, decode(data))
            except (WorkerProtocolError, KeyError, TypeError) as exc:
                self._died(link, f"bad message: {exc}")
                return

    def _dispatch(self, link: WorkerLink, msg: WorkerMessage) -> None:
        if msg.type is Msg.BROKEN:
            self.events.worker_broken(msg["index"], f"worker pid {link.pid}: {msg['reason']}")
        elif msg.type is Msg.STATS:
            self.events.worker_stats(msg["index"], msg["counts"], msg["latency"])
        elif msg.type in (Msg.ACK, Msg.STOPPED):
            on_reply = link.pending.pop(msg["seq"])
            link.waiting_since = time.monotonic()  # the next answer is awaited from now
            link.answered = True
            if on_reply is not None:
                on_reply(msg)
        elif msg.type is Msg.FAILED:
            # A worker that refused a change no longer matches the session's state.
            self._died(link, f"request failed: {msg['reason']}")
        else:
            raise WorkerProtocolError(f"unexpected {msg.type.name} from a worker")

    def _died(self, link: WorkerLink, why: str) -> None:
        """Reap ``link``'s worker; its rings are broken and its answers complete as None."""
        if self.links[link.slot] is not link:
            return
        self.links[link.slot] = None
        self.losses += 1
        self.watcher.unwatch(link.sock.fileno())
        link.sock.close()
        status = _reap(link.proc)
        link.stderr.close()  # what it said before it went, before the loss is logged
        rings = sorted(link.rings)
        log.error("%s: data-plane worker %d (pid %d) lost: %s; %s; rings %s broken", self.name,
                  link.slot, link.pid, why, status, rings)
        pending, link.pending = link.pending, {}
        for on_reply in pending.values():
            if on_reply is not None:
                on_reply(None)
        for index in rings:
            self.events.worker_broken(index, f"data-plane worker pid {link.pid} lost ({status})")

    def close(self) -> None:
        """Let every worker go (the device closes): EOF, a bounded wait, then SIGKILL."""
        for link in self.live():
            self.links[link.slot] = None
            self.watcher.unwatch(link.sock.fileno())
            link.sock.close()
            link.stderr.relay_until_exit(EXIT_TIMEOUT_S)  # EOF: it has exited
            try:
                link.proc.wait(timeout=REAP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _reap(link.proc)
            link.stderr.close()
        self._close_regions()


def _reap(proc: subprocess.Popen[bytes]) -> str:
    """Make sure ``proc`` is gone and say how it ended."""
    code = proc.poll()
    if code is None:
        with contextlib.suppress(OSError):
            proc.kill()
        try:
            code = proc.wait(timeout=REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "did not exit after SIGKILL"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _close_ancillary(ancdata: list[tuple[int, int, bytes]]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for fd in array.array("i", data[: len(data) - len(data) % FD_SIZE]):
                _close(fd)


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
