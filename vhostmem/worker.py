"""A data-plane worker process: ``python -m vhostmem.worker --fd N``.

The main process keeps the whole vhost-user control plane (vhostmem/session.py) and hands a
started ring's data path to a worker (vhostmem/worker_pool.py): this process maps the same
guest-memory fds, the disk, the inflight region and the dirty log, watches the ring's kick
eventfd, and runs the ordinary :class:`Virtqueue` and device code on it, which do not know they
are in a worker. Messages from the main process (vhostmem/worker_proto.py) arrive on fd N, a
SOCK_SEQPACKET socket; each is answered in order. The loop is epoll: a turn of a ring serves at
most the ring's turn budget (``TURN_BUDGET``) and a ring with work left is run again after the
other ready fds, so one ring cannot starve another or the control channel.

The worker exits when the control socket reaches EOF (the main process is gone or dropped it).
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
from time import monotonic

from vhostmem.device import VhostUserDevice
from vhostmem.devices.blk import BlkDevice
from vhostmem.devices.blk_backend import BlkBackend
from vhostmem.dirty_log import DirtyLog, DirtyLogError
from vhostmem.guest_memory import GuestMemory, GuestMemoryError
from vhostmem.inflight import InflightError, InflightRegion
from vhostmem.inflight_packed import layout_for
from vhostmem.split_ring import VirtqueueError
from vhostmem.virtqueue import Virtqueue
from vhostmem.worker_proto import (
    STATS_COUNTERS,
    WORKER_IGNORED_SIGNALS,
    WORKER_LOG_FORMAT,
    Msg,
    WorkerMessage,
    WorkerProtocolError,
    decode,
    encode,
)

log = logging.getLogger("vhostmem.worker")

RECV_BYTES = 1 << 20  # a whole memory table part fits (253 regions of JSON)
FD_SIZE = array.array("i").itemsize
ANCILLARY_BYTES = socket.CMSG_SPACE(256 * FD_SIZE)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# Statistics are pushed to the main process at most this often per ring (device_stats).
STATS_PERIOD_S = 0.25
# Failures a request may raise that are answered with FAILED (anything else is a bug: logged).
REQUEST_ERRORS = (GuestMemoryError, VirtqueueError, DirtyLogError, InflightError, OSError,
                  ValueError, KeyError)


def make_device(fields: WorkerMessage) -> VhostUserDevice:
    """The device a DEVICE message describes (only kinds that can run here are sent)."""
    if fields["kind"] != "blk":
        raise ValueError(f"device kind {fields['kind']!r} cannot run in a worker")
    fd = fields.fds[0]
    backend = BlkBackend(fd, fields["disk_size"], fields["readonly"], fields["name"])
    return BlkDevice(backend, num_queues=fields["num_queues"],
                     queue_size=fields["max_queue_size"], serial=fields["serial"],
                     blk_size=fields["blk_size"], seg_max=fields["seg_max"])


class Worker:
    """The rings of one device that the main process gave this process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mem = GuestMemory()
        self.device: VhostUserDevice | None = None
        self.queues: dict[int, Virtqueue] = {}
        self._regions: dict[int, InflightRegion] = {}  # each started ring's inflight mapping
        self.dirty: DirtyLog | None = None
        self._table: list[tuple[int, int, int, int, int]] = []  # MEM_TABLE parts so far
        self._kicks: dict[int, int] = {}  # kick fd -> ring index
        self._pending: list[int] = []  # rings with work left after their last turn
        self._reported: set[int] = set()  # broken rings the main process was told about
        self._stats_at = monotonic()
        self._last_base: dict[int, int] = {}  # each ring's base at its last STOP
        self.epoll = select.epoll()
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self._handlers = {
            Msg.DEVICE: self._device, Msg.MEM_TABLE: self._mem_table,
            Msg.MEM_ADD: self._mem_add, Msg.MEM_REM: self._mem_rem, Msg.START: self._start,
            Msg.STOP: self._stop, Msg.CALL: self._call, Msg.ENABLE: self._enable,
            Msg.ADDR: self._addr, Msg.LOG: self._log, Msg.GUEST_STATE: self._guest_state,
        }

    # ------------------------------------------------------------------- loop

    def run(self) -> None:
        while True:
            events = self.epoll.poll(self._timeout())
            for fd, _ in events:
                if fd == self.sock.fileno():
                    if not self._on_control():
                        return
                elif fd in self._kicks:
                    self._on_kick(self._kicks[fd])
            pending, self._pending = self._pending, []
            for i in pending:
                if i in self.queues:
                    self._turn(i)
            self._push_stats()

    def _timeout(self) -> float:
        """epoll's timeout: none while rings have work left; while counts wait to be
        reported, until they are due (device_stats sees them within STATS_PERIOD_S)."""
        if self._pending:
            return 0
        if any(vq.stat_requests or vq.stat_kicks for vq in self.queues.values()):
            return max(0.0, self._stats_at + STATS_PERIOD_S - monotonic())
        return -1

    def _on_control(self) -> bool:
        """One control message; False at EOF."""
        try:
            data, ancdata, _, _ = self.sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        except ConnectionError:
            return False  # the main process is gone
        fds = _fds(ancdata)
        if not data:
            return False
        try:
            msg = decode(data, fds)
        except WorkerProtocolError as exc:
            _close_all(fds)
            log.error("worker %d: %s", os.getpid(), exc)
            return False  # the channel is not ours any more: leave, the main process sees EOF
        seq = msg.get("seq")
        try:
            reply = self._handlers[msg.type](msg)
        except REQUEST_ERRORS as exc:
            _close_all(msg.fds)
            log.error("worker %d: %s failed: %s", os.getpid(), msg.type.name, exc)
            self._send(encode(Msg.FAILED, seq=seq, reason=f"{msg.type.name}: {exc}"))
            return True
        self._send(reply if reply is not None else encode(Msg.ACK, seq=seq))
        return True

    def _send(self, data: bytes) -> None:
        self.sock.sendmsg([data])

    def _on_kick(self, i: int) -> None:
        vq = self.queues[i]
        vq.stat_kicks += 1
        try:
            vq.drain_kick()
        except OSError as exc:
            self._unwatch(vq)
            vq.mark_broken(f"kick eventfd unreadable: {exc}")
            self._report_broken(i)
            return
        if vq.enabled:
            self._turn(i)

    def _turn(self, i: int) -> None:
        """One turn of ring ``i``: at most its budget; the rest after the other ready fds."""
        vq = self.queues[i]
        if vq.broken or not vq.enabled or self.device is None:
            return
        vq.new_turn()
        try:
            self.device.handle_queue(vq)
        except Exception as exc:  # a device bug stops its queue, not the worker
            log.exception("worker %d: device failed serving ring %d", os.getpid(), i)
            vq.mark_broken(f"device error: {exc!r}")
        if vq.broken:
            self._report_broken(i)
        elif vq.yielded and i not in self._pending:
            self._pending.append(i)

    def _report_broken(self, i: int) -> None:
        if i not in self._reported:
            self._reported.add(i)
            self._send(encode(Msg.BROKEN, index=i, reason=self.queues[i].broken_reason))

    def _push_stats(self, force_index: int | None = None) -> None:
        now = monotonic()
        if force_index is None and now - self._stats_at < STATS_PERIOD_S:
            return
        self._stats_at = now
        for i, vq in self.queues.items():
            if force_index is not None and i != force_index:
                continue
            counts = [getattr(vq, name) for name in STATS_COUNTERS]
            if any(counts):
                self._send(encode(Msg.STATS, index=i, counts=counts,
                                  latency=list(vq.stat_latency)))
                vq.stats_init()

    # -------------------------------------------------------------- requests

    def _device(self, msg: WorkerMessage) -> None:
        if self.device is not None:
            raise ValueError("the device is already set")
        self.device = make_device(msg)

    def _mem_table(self, msg: WorkerMessage) -> None:
        regions = msg["regions"]
        if len(regions) != len(msg.fds):
            raise ValueError(f"{len(regions)} regions but {len(msg.fds)} fds")
        self._table += [(*r, fd) for r, fd in zip(regions, msg.fds, strict=True)]  # type: ignore[misc]
        msg.fds.clear()
        if msg["more"]:
            return
        table, self._table = self._table, []
        self.mem.set_table(table)
        self._reresolve()

    def _mem_add(self, msg: WorkerMessage) -> None:
        gpa, size, uaddr, offset = msg["regions"][0]
        fd = msg.fds.pop()
        self.mem.add_region(gpa, size, uaddr, offset, fd)

    def _mem_rem(self, msg: WorkerMessage) -> None:
        gpa, size, uaddr, _ = msg["regions"][0]
        self.mem.remove_region(gpa, size, uaddr)
        self._reresolve()

    def _reresolve(self) -> None:
        """Point every started ring at the current mappings (the main process checked that
        the rings are inside the new table before sending it)."""
        for vq in self.queues.values():
            if vq.frontend_addr is not None and vq._addr is not None:
                desc, avail, used = vq._addr
                vq.set_addr(desc, used, avail, vq.frontend_addr)
        self.mem.reap()

    def _start(self, msg: WorkerMessage) -> None:
        i = msg["index"]
        fds = list(msg.fds)
        msg.fds.clear()
        if i in self.queues:
            _close_all(fds)
            raise ValueError(f"ring {i} is already started here")
        assert self.device is not None
        vq = Virtqueue(i, self.mem, failure_status=bytes.fromhex(msg["failure_status"]),
                       indirect_floor=msg["indirect_floor"])
        try:
            self._configure(vq, msg, fds)
        except BaseException:
            vq.close()
            raise
        self.queues[i] = vq
        self._reported.discard(i)
        self._kicks[vq.kick_fd] = i
        self.epoll.register(vq.kick_fd, select.EPOLLIN)
        if vq.enabled:
            self._turn(i)

    def _configure(self, vq: Virtqueue, msg: WorkerMessage, fds: list[int]) -> None:
        vq.set_kick_fd(fds.pop(0))
        vq.set_call_fd(fds.pop(0) if msg["call"] else -1)
        vq.set_features(msg["features"])
        vq.set_num(msg["num"])
        desc, used, avail = msg["addr"]
        vq.set_addr(desc, used, avail, tuple(msg["frontend_addr"]))  # type: ignore[arg-type]
        # A START right after a STOP of the same ring (SET_VRING_KICK on a started ring)
        # continues where the stop left it: the main process has not had that base yet.
        vq.set_base(self._last_base.get(vq.index, msg["base"]) if msg["resume"]
                    else msg["base"])
        if msg["inflight"]:
            region = InflightRegion.attach(fds.pop(0), msg["mmap_size"], msg["mmap_offset"],
                                           msg["num_queues"], msg["queue_size"],
                                           msg["num_queues"], layout_for(msg["features"]))
            self._regions[vq.index] = region
            vq.set_inflight(region.queue(vq.index))
        vq.set_dirty_log(self.dirty)
        vq.enable(msg["enabled"])
        vq.start()

    def _stop(self, msg: WorkerMessage) -> bytes:
        i = msg["index"]
        vq = self.queues.get(i)
        if vq is None:
            raise ValueError(f"ring {i} is not started here")
        self._push_stats(force_index=i)  # its last counts go before the ring does
        self._unwatch(vq)
        vq.stop()
        base = self._last_base[i] = vq.get_base()
        del self.queues[i]
        vq.close()
        region = self._regions.pop(i, None)
        if region is not None:
            region.close()
        self.mem.reap()
        return encode(Msg.STOPPED, seq=msg["seq"], index=i, base=base)

    def _unwatch(self, vq: Virtqueue) -> None:
        if self._kicks.pop(vq.kick_fd, None) is not None:
            self.epoll.unregister(vq.kick_fd)

    def _call(self, msg: WorkerMessage) -> None:
        vq = self.queues[msg["index"]]
        vq.set_call_fd(msg.fds.pop() if msg.fds else -1)

    def _enable(self, msg: WorkerMessage) -> None:
        vq = self.queues[msg["index"]]
        vq.enable(msg["on"])
        if msg["on"]:
            self._turn(vq.index)

    def _addr(self, msg: WorkerMessage) -> None:
        vq = self.queues[msg["index"]]
        desc, used, avail = msg["addr"]
        vq.set_addr(desc, used, avail, tuple(msg["frontend_addr"]))  # type: ignore[arg-type]

    def _log(self, msg: WorkerMessage) -> None:
        new = None
        if msg["on"]:
            new = DirtyLog.attach(msg.fds.pop(), msg["mmap_size"], msg["mmap_offset"], 0)
            new.share()  # other processes mark the same log (docs/migration.md)
        old, self.dirty = self.dirty, new
        for vq in self.queues.values():
            vq.set_dirty_log(new)
        if old is not None:
            old.close()

    def _guest_state(self, msg: WorkerMessage) -> None:
        assert self.device is not None
        self.device.set_features(msg["features"])
        self.device.restore_guest_state(bytes.fromhex(msg["state"]))


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[: len(data) - len(data) % FD_SIZE]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def die_with_parent(parent: int) -> None:
    """SIGKILL this worker the moment the main process dies (prctl PR_SET_PDEATHSIG). A
    main process killed with SIGKILL is restarted and its frontend reconnects: a worker left
    running until it notices EOF could pop from a ring the new process already serves."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("worker %d: prctl(PR_SET_PDEATHSIG): %s", os.getpid(),
                    os.strerror(ctypes.get_errno()))
    if parent and os.getppid() != parent:  # it died before the prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhostmem.worker")
    parser.add_argument("--fd", type=int, required=True, help="the control socket")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--parent", type=int, default=0, help="the main process's pid")
    args = parser.parse_args(argv)
    # stderr is a pipe to the main process, which relays each record into its own logging
    # (time, pid and --log-file there: vhostmem/worker_log.py).
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=WORKER_LOG_FORMAT)
    # The main process coordinates shutdown (it stops the rings here, then closes the control
    # socket, and this process leaves at EOF): a terminal's Ctrl-C or systemd's SIGTERM to the
    # whole control group must not end a worker in the middle of a drain.
    for signum in WORKER_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED_SIGNALS)  # blocked by the spawn
    die_with_parent(args.parent)
    sock = socket.socket(fileno=args.fd)
    Worker(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
