"""One frontend connection's vhost-user state machine, without sockets.

The server feeds decoded ``protocol.Message`` objects into :class:`Session.handle` and sends back
what it returns. The session owns the guest memory, the virtqueues and every fd the frontend
handed over; :meth:`Session.close` releases all of them. Ring start/stop is reported to the
server through a :class:`KickWatcher` so that this module never touches the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from protocol import FrontendRequest, Message, encode_reply
from vhostmem.device import VhostUserDevice
from vhostmem.dirty_log import DirtyLog
from vhostmem.eventfd import check_eventfd
from vhostmem.guest_memory import GuestMemory
from vhostmem.inflight import InflightState
from vhostmem.memmap import MemRegistry
from vhostmem.session_base import (
    ACK_FAILED,
    ACK_OK,
    BASE_PROTOCOL_FEATURES,
    EXPECTED_ERRORS,
    MAX_MEM_SLOTS,
    MAX_QUEUE_SIZE,
    OWN_REPLY_REQUESTS,
    PROTOCOL_FEATURES_BIT,
    Deferred,
    FdReply,
    KickWatcher,
    Reply,
    SessionError,
    SessionState,
    close_fd,
    close_fds,
    request_name,
    take_fds,
)
from vhostmem.session_inflight import InflightRequests
from vhostmem.session_log import LOG_ALL_BIT, LogRequests
from vhostmem.session_memory import MemoryRequests
from vhostmem.session_turns import RingTurns
from vhostmem.session_workers import WorkerRings
from vhostmem.virtqueue import Virtqueue
from vhostmem.worker_proto import Msg

__all__ = [
    "BASE_PROTOCOL_FEATURES",
    "MAX_MEM_SLOTS",
    "KickWatcher",
    "Session",
    "SessionError",
]

log = logging.getLogger(__name__)

class Session(RingTurns, MemoryRequests, LogRequests, InflightRequests, WorkerRings):
    """The vhost-user message handler for one frontend connection to one device."""

    def __init__(
        self,
        device: VhostUserDevice,
        registry: MemRegistry,
        watcher: KickWatcher,
        name: str = "vhostmem",
        require_sealed_memory: bool = False,
        workers: int = 0,
        poll_us: int = 0,
    ) -> None:
        self.device = device
        self.name = name
        self.watcher = watcher
        self.memory = GuestMemory(registry, require_sealed=require_sealed_memory)
        self.queues = [
            Virtqueue(i, self.memory, failure_status=device.failed_request_status,
                      indirect_floor=device.max_chain)
            for i in range(device.num_queues)
        ]
        self.state = SessionState()
        self.inflight = InflightState()
        self._turn_pending: set[int] = set()  # rings whose next turn is scheduled
        self.poll_s = poll_us / 1e6  # busy-poll window (session_turns.py)
        self._poll_until: dict[int, float] = {}
        self._poll_seen: dict[int, int] = {}  # per ring: requests completed at its last turn
        self.dirty_log: DirtyLog | None = None  # SET_LOG_BASE (session_log.py)
        self.logging = False  # VHOST_F_LOG_ALL acked and applied to the rings
        self.log_fd = -1
        # Came up with LOG_ALL in its first SET_FEATURES: a backend restarted mid-migration,
        # which marks the whole log once (session_log.py, _catch_up).
        self.log_catch_up = False
        # workers > 0: started rings run in that many worker processes (session_workers.py).
        self._init_workers(workers)
        self._handlers: dict[FrontendRequest, Callable[[Message], object]] = {
            FrontendRequest.GET_FEATURES: self._get_features,
            FrontendRequest.SET_FEATURES: self._set_features,
            FrontendRequest.SET_OWNER: self._set_owner,
            FrontendRequest.RESET_OWNER: self._reset_owner,
            FrontendRequest.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendRequest.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendRequest.GET_QUEUE_NUM: self._get_queue_num,
            FrontendRequest.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendRequest.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendRequest.SET_MEM_TABLE: self._set_mem_table,
            FrontendRequest.ADD_MEM_REG: self._add_mem_reg,
            FrontendRequest.REM_MEM_REG: self._rem_mem_reg,
            FrontendRequest.SET_VRING_NUM: self._set_vring_num,
            FrontendRequest.SET_VRING_ADDR: self._set_vring_addr,
            FrontendRequest.SET_VRING_BASE: self._set_vring_base,
            FrontendRequest.GET_VRING_BASE: self._get_vring_base,
            FrontendRequest.SET_VRING_KICK: self._set_vring_kick,
            FrontendRequest.SET_VRING_CALL: self._set_vring_call,
            FrontendRequest.SET_VRING_ERR: self._set_vring_err,
            FrontendRequest.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendRequest.GET_CONFIG: self._get_config,
            FrontendRequest.SET_CONFIG: self._set_config,
            FrontendRequest.RESET_DEVICE: self._reset_device,
            FrontendRequest.GET_STATUS: self._get_status,
            FrontendRequest.SET_STATUS: self._set_status,
            FrontendRequest.GET_INFLIGHT_FD: self._get_inflight_fd,
            FrontendRequest.SET_LOG_BASE: self._set_log_base,
            FrontendRequest.SET_LOG_FD: self._set_log_fd,
            FrontendRequest.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    # ----------------------------------------------------------------- dispatch

    def offered_features(self) -> int:
        return self.device.features() | PROTOCOL_FEATURES_BIT | LOG_ALL_BIT

    def _ring_features(self) -> int:
        return self.state.features

    def offered_protocol_features(self) -> int:
        return BASE_PROTOCOL_FEATURES | self.device.protocol_features()

    @staticmethod
    def _acks(msg: Message) -> bool:
        """Whether ``msg`` gets a REPLY_ACK status (vhost-user.rst, "REPLY_ACK"): whenever it
        sets NEED_REPLY, negotiated or not. A frontend sets the flag only when it believes
        REPLY_ACK negotiated and then blocks reading the status; QEMU 7.2 believes so on a
        connection where it skipped negotiation (a destination reconnecting to a restarted
        backend during a migration sends SET_FEATURES, SET_INFLIGHT_FD, ADD_MEM_REG with
        NEED_REPLY first: docs/migration.md), and without an answer its main loop hangs.
        libvhost-user and DPDK answer every NEED_REPLY the same way."""
        return msg.need_reply

    def handle(self, msg: Message) -> list[Reply] | Deferred:
        """Apply one frontend message; return the replies to send, in order, or a
        :class:`Deferred` reply the caller sends once it is ready (without blocking).

        Raises SessionError when the request failed and the spec offers no way to tell the
        frontend (no REPLY_ACK, or a request whose own reply has no error form); the server then
        logs it and disconnects. The message's fds are owned by the session from here on: kept,
        or closed on every error path.
        """
        if msg.is_reply or not isinstance(msg.request, FrontendRequest):
            # Replies answer backend requests and travel on the backend channel
            # (SET_BACKEND_REQ_FD), never here; the number names a BackendRequest, and looking
            # it up among frontend handlers would run whichever request shares its value.
            close_fds(msg.fds)
            raise SessionError(f"{request_name(msg.request)}: a reply (flags {msg.flags:#x}) "
                               "on the frontend request channel")
        handler = self._handlers.get(msg.request)
        wants_ack = self._acks(msg)
        losses = self.pool.losses if self.pool is not None else 0
        mark = self.pool.last_seq if self.pool is not None else 0
        try:
            if msg.invalid is not None:  # framed, but its payload or fds failed validation
                raise SessionError(f"{request_name(msg.request)}: {msg.invalid}")
            if handler is None:
                raise SessionError(f"{request_name(msg.request)}: request not supported")
            result = handler(msg)
        except Exception as exc:  # every failure is answered
            close_fds(msg.fds)
            return self._failed(msg, exc, wants_ack)
        if isinstance(result, Deferred):
            return result
        replies: list[Reply] = []
        if isinstance(result, FdReply):
            replies = [(encode_reply(msg.request, result.payload), result.fds)]
        elif result is not None:
            replies = [(encode_reply(msg.request, result), [])]
        elif wants_ack:
            replies = [(encode_reply(msg.request, ACK_OK), [])]
        if self.pool is None:
            return replies
        # Workers acknowledge first; a request a worker failed (it is replaced, its rings are
        # broken) is answered as failed where REPLY_ACK can say so.
        failed = replies
        if wants_ack and msg.request not in OWN_REPLY_REQUESTS:  # a u64 ack is its reply
            failed = [(encode_reply(msg.request, ACK_FAILED), [])]
        return self.gate(request_name(msg.request), replies, failed, losses, mark)

    def _failed(self, msg: Message, exc: Exception, wants_ack: bool) -> list[Reply]:
        """The answer to a failed request, or SessionError when only a disconnect can tell."""
        if isinstance(exc, SessionError):
            error = exc
        else:
            if not isinstance(exc, EXPECTED_ERRORS):
                log.exception(
                    "%s: unexpected error handling %s", self.name, request_name(msg.request)
                )
            error = SessionError(f"{request_name(msg.request)}: {exc}")
        if msg.request == FrontendRequest.GET_CONFIG:
            # The spec's error form of a GET_CONFIG reply: a config reply with no payload.
            log.error("%s: %s (empty reply)", self.name, error)
            return [(encode_reply(msg.request, None), [])]
        if msg.request in OWN_REPLY_REQUESTS:
            raise error from exc  # a u64 ack would be a malformed reply to this request
        if wants_ack:
            log.error("%s: %s (failure acked)", self.name, error)
            return [(encode_reply(msg.request, ACK_FAILED), [])]
        raise error from exc

    # ------------------------------------------------------------- negotiation

    def _get_features(self, msg: Message) -> int:
        return self.offered_features()

    def _set_features(self, msg: Message) -> Deferred | None:
        acked = int(msg.payload)
        extra = acked & ~self.offered_features()
        if extra:
            raise SessionError(f"SET_FEATURES: bits {extra:#x} were not offered")
        # First: it may refuse (LOG_ALL without a log), and then nothing may have changed.
        deferred = self._switch_logging(msg, acked)
        self.state.features = acked
        self.device.set_features(acked)
        self._save_guest_state()
        for vq in self.queues:
            vq.set_features(acked)
        if not acked & PROTOCOL_FEATURES_BIT:
            # Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: rings are enabled.
            for i in range(len(self.queues)):
                self._enable_ring(i, True)
        return deferred

    def _set_owner(self, msg: Message) -> None:
        self.state.owner = True

    def _reset_owner(self, msg: Message) -> Deferred | None:
        # QEMU sends RESET_OWNER as its device reset when RESET_DEVICE is not negotiated and
        # goes on using the negotiated protocol features and memory table: reset the device
        # only, as for RESET_DEVICE. Dropping REPLY_ACK here would leave QEMU waiting for acks.
        return self._reset_device(msg)

    def _get_protocol_features(self, msg: Message) -> int:
        return self.offered_protocol_features()

    def _set_protocol_features(self, msg: Message) -> None:
        acked = int(msg.payload)
        extra = acked & ~self.offered_protocol_features()
        if extra:
            raise SessionError(f"SET_PROTOCOL_FEATURES: bits {extra:#x} were not offered")
        self.state.protocol_features = acked

    def _get_queue_num(self, msg: Message) -> int:
        return self.device.num_queues

    def _get_max_mem_slots(self, msg: Message) -> int:
        return MAX_MEM_SLOTS

    def _set_backend_req_fd(self, msg: Message) -> None:
        if len(msg.fds) != 1:
            raise SessionError("SET_BACKEND_REQ_FD: expected exactly one fd")
        close_fd(self.state.backend_req_fd)
        self.state.backend_req_fd = take_fds(msg)[0]

    def _get_status(self, msg: Message) -> int:
        return self.state.status

    def _set_status(self, msg: Message) -> None:
        self.state.status = int(msg.payload) & 0xFF

    def _get_config(self, msg: Message) -> dict[str, object]:
        cfg = msg.payload
        data = self.device.get_config(cfg.offset, cfg.size)
        return {"offset": cfg.offset, "size": len(data), "flags": cfg.flags, "payload": data}

    def _set_config(self, msg: Message) -> None:
        cfg = msg.payload
        self.device.set_config(cfg.offset, bytes(cfg.payload), cfg.flags)
        self._save_guest_state()

    def _reset_device(self, msg: Message) -> Deferred | None:
        if self.stop_rings():
            self._reset_now()
            return None
        # Requests are in flight on I/O threads: reset (and answer) once they completed, so
        # that none of them lands in guest memory or in a ring restarted after the reset.
        ack = self._acks(msg)

        def finish() -> list[Reply]:
            self._reset_now()
            return [(encode_reply(msg.request, ACK_OK), [])] if ack else []

        return Deferred(request_name(msg.request), self.idle, finish)

    def _reset_now(self) -> None:
        self.reset_rings()
        # Negotiated features go, LOG_ALL with them; the log base stays (QEMU sends it once
        # per migration and renegotiates LOG_ALL when it starts the device again).
        if self.logging:
            self._apply_logging(False)
        self.device.reset()
        self.state.features = 0
        self.state.status = 0

    # ------------------------------------------------------------------- rings

    def _ring_index(self, request: FrontendRequest, index: int) -> int:
        if not 0 <= index < len(self.queues):
            raise SessionError(
                f"{request.name}: vring index {index} out of range ({len(self.queues)} queues)"
            )
        return index

    def _set_vring_num(self, msg: Message) -> None:
        i = self._ring_index(msg.request, msg.payload.index)
        num = msg.payload.num
        limit = min(MAX_QUEUE_SIZE, self.device.max_queue_size)
        if num == 0 or num & (num - 1) or num > limit:
            raise SessionError(
                f"SET_VRING_NUM: size {num} is not a power of two in 1..{limit}"
            )
        if self.queues[i].started:
            raise SessionError(f"SET_VRING_NUM: ring {i} is started")
        self.queues[i].set_num(num)

    def _set_vring_addr(self, msg: Message) -> None:
        a = msg.payload
        i = self._ring_index(msg.request, a.index)
        addr = (a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr, a.log_guest_addr)
        self._resolve_ring(i, addr)  # all or nothing: a refused address changes nothing
        vq = self.queues[i]
        if vq._addr is not None:
            desc, avail, used = vq._addr
            self._remote_send(i, Msg.ADDR, addr=[desc, used, avail], frontend_addr=list(addr))
        if not vq.started and vq.broken:
            # New addresses on a stopped ring (a driver restarting it after an error or a
            # guest reset): the old ring's corruption no longer applies.
            log.info("%s: ring %d reconfigured; clearing its error state", self.name, i)
            vq.broken = False
            vq.broken_reason = ""

    def _resolve_ring(self, i: int, addr: tuple[int, int, int, int, int]) -> None:
        """Translate the frontend addresses of SET_VRING_ADDR through the current table and
        give them to the ring, which keeps them (the one copy of its configuration)."""
        _, desc, used, avail, _ = addr
        to_gpa = self.memory.uva_to_gpa
        self.queues[i].set_addr(to_gpa(desc), to_gpa(used), to_gpa(avail), addr)

    def _set_vring_base(self, msg: Message) -> None:
        i = self._ring_index(msg.request, msg.payload.index)
        if self.queues[i].started:
            raise SessionError(f"SET_VRING_BASE: ring {i} is started")
        # The ring reads its own bits: split the low 16, packed both halves (vhost-user.rst).
        log.info("%s: ring %d base %#x from the frontend", self.name, i, msg.payload.num)
        self.queues[i].set_base(msg.payload.num)

    def _get_vring_base(self, msg: Message) -> dict[str, int] | Deferred:
        i = self._ring_index(msg.request, msg.payload.index)
        if self._stop_ring(i):
            return self._vring_base(i)
        # Requests are in flight on I/O threads: the position is reported once they completed
        # (every used entry written), without blocking the event loop meanwhile.
        return Deferred(
            f"GET_VRING_BASE ring {i}",
            lambda: self.ring_idle(i),
            lambda: [(encode_reply(msg.request, self._vring_base(i)), [])],
        )

    def _vring_base(self, i: int) -> dict[str, int]:
        base = self.queues[i].get_base()
        log.info("%s: ring %d stopped by GET_VRING_BASE at avail index %d", self.name, i, base)
        return {"index": i, "num": base}

    def _vring_fd(self, msg: Message) -> tuple[int, int]:
        """Index and fd (-1 for NOFD) of a SET_VRING_KICK/CALL/ERR message."""
        i = self._ring_index(msg.request, msg.payload.index)
        if msg.payload.nofd:
            if msg.fds:
                raise SessionError(f"{msg.request.name}: NOFD set but an fd was sent")
            return i, -1
        if len(msg.fds) != 1:
            raise SessionError(f"{msg.request.name}: expected exactly one fd")
        check_eventfd(msg.fds[0], f"{msg.request.name} ring {i}")  # refused: handle() closes it
        return i, take_fds(msg)[0]

    def _set_vring_kick(self, msg: Message) -> None:
        i = self._ring_index(msg.request, msg.payload.index)
        if msg.payload.nofd:
            raise SessionError("SET_VRING_KICK: polling mode (NOFD) is not supported")
        vq = self.queues[i]
        if not vq.ready_to_start():
            raise SessionError(f"SET_VRING_KICK: ring {i} has no size or addresses")
        _, fd = self._vring_fd(msg)
        self._stop_ring(i)
        vq.set_kick_fd(fd)
        addr = vq.frontend_addr
        if addr is not None:  # the table may have changed since SET_VRING_ADDR
            self._resolve_ring(i, addr)
        self._start_ring(i)

    def _set_vring_call(self, msg: Message) -> None:
        i, fd = self._vring_fd(msg)
        self.queues[i].set_call_fd(fd)  # never waits for I/O threads (see set_call_fd)
        self._remote_send(i, Msg.CALL, [fd] if fd >= 0 else [])

    def _set_vring_err(self, msg: Message) -> None:
        i, fd = self._vring_fd(msg)
        self.queues[i].set_err_fd(fd)

    def _set_vring_enable(self, msg: Message) -> None:
        i = self._ring_index(msg.request, msg.payload.index)
        if msg.payload.num > 1:
            raise SessionError(f"SET_VRING_ENABLE: state {msg.payload.num} is not 0 or 1")
        self._enable_ring(i, bool(msg.payload.num))

    def _enable_ring(self, i: int, enabled: bool) -> None:
        self.queues[i].enable(enabled)
        if i in self._remote:
            self._remote_send(i, Msg.ENABLE, on=enabled)
            return
        if enabled and self.queues[i].started:
            # Requests may have been queued while the ring was disabled.
            self.process_queue(i)

    def _start_ring(self, i: int) -> None:
        vq = self.queues[i]
        self.device.claim(self.name, self._rings_busy)  # a shared disk serves one frontend
        if self.pool is not None:
            self._start_remote(i)
            return
        vq.start()
        try:
            # partial, not a lambda: one Python frame less per kick.
            self.watcher.watch(vq.kick_fd, partial(self.on_kick, i))
        except Exception:
            vq.stop()
            raise
        log.info("%s: ring %d started (size %d, avail index %d)", self.name, i, vq.num,
                 vq.get_base())
        if vq.enabled:
            self.process_queue(i)

    def _stop_ring(self, i: int) -> bool:
        """Stop ring ``i``; whether it is idle (no request in flight on another thread)."""
        vq = self.queues[i]
        if i in self._remote:
            vq.stop()
            self._stop_remote(i)
            return self.ring_idle(i)
        if vq.started and vq.kick_fd >= 0:
            self.watcher.unwatch(vq.kick_fd)
        return vq.stop()

    # ---------------------------------------------------------------- teardown

    def stop_rings(self) -> bool:
        """Stop every ring (a frontend went away); whether all are idle, i.e. no request is
        in flight on an I/O thread. :meth:`reset` waits for that (see the server)."""
        idle = True
        for i in range(len(self.queues)):
            idle = self._stop_ring(i) and idle
        return idle

    def idle(self) -> bool:
        return all(vq.idle() for vq in self.queues) and self.workers_idle()

    def _rings_busy(self) -> bool:
        """Whether this frontend's rings still run on the device's storage."""
        return any(vq.started for vq in self.queues) or not self.idle()

    def reset_rings(self) -> None:
        for i, vq in enumerate(self.queues):
            self._stop_ring(i)
            vq.reset()
        self.inflight.drop(self.queues)

    def reset(self) -> None:
        """Back to the state of a fresh connection (RESET_OWNER, disconnect)."""
        self.reset_rings()
        self.drop_log()
        self.device.forget_guest()
        self.memory.clear()
        if self.pool is not None:
            self.pool.set_table([])
        close_fd(self.state.backend_req_fd)
        self.state = SessionState()

    def close(self) -> None:
        """Release everything: rings, eventfds, guest memory, the backend channel fd."""
        self.reset()
        for vq in self.queues:
            vq.close()
        self.memory.close()
        self._close_workers()
