"""The control channel between the main process and a data-plane worker, without sockets.

One message is one SOCK_SEQPACKET record (the socket keeps record boundaries, so there is no
framing state) with its fds attached by SCM_RIGHTS. A record is a 2-byte type number and a
JSON object of plain integers, booleans, strings and lists of integers: nothing is unpickled,
and nothing in it comes from guest memory (ring addresses and sizes come from frontend
messages the session already checked). :func:`decode` refuses an unknown type, a body that is
not a JSON object, or a field of the wrong kind, naming what was wrong.

Every request of the main process carries ``seq``; the worker answers each one, in order, with
``ACK`` (``STOPPED`` for ``STOP``) or ``FAILED``. ``BROKEN`` and ``STATS`` are the worker's own.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from vhostmem.signals import PROCESS_SIGNALS


class Msg(IntEnum):
    # main -> worker
    DEVICE = 1  # the device to serve: kind, settings; fds: its disk
    MEM_TABLE = 2  # replace the table (in parts of at most MAX_FDS regions: "more")
    MEM_ADD = 3  # one region; fd: its memory
    MEM_REM = 4  # one region by gpa, size, userspace address
    START = 5  # start a ring; fds: kick, then call (if "call"), then inflight (if "inflight")
    STOP = 6  # stop a ring: answered by STOPPED with its base
    CALL = 7  # a new call eventfd (fd) or none
    ENABLE = 8  # SET_VRING_ENABLE
    ADDR = 9  # new ring addresses for a started ring
    LOG = 10  # dirty logging on (fd: the log) or off
    GUEST_STATE = 11  # the device's guest state and acked features changed
    # worker -> main
    ACK = 20
    FAILED = 21  # a request failed: "reason"
    STOPPED = 22  # "index", "base", then the ring is forgotten
    BROKEN = 23  # a ring the worker serves broke: "index", "reason"
    STATS = 24  # counters since the last STATS of that ring: "index", "counts", "latency"


# The counters of a STATS message, in order (vhostmem/queue_stats.py's attributes).
STATS_COUNTERS = ("stat_requests", "stat_read_bytes", "stat_write_bytes", "stat_errors",
                  "stat_kicks", "stat_interrupts")
# Signals a worker leaves to the main process (it stops the rings, then closes the control
# socket): blocked from before the worker's exec until it ignores them (vhostmem/worker.py).
WORKER_IGNORED_SIGNALS = PROCESS_SIGNALS
# A worker's log records on its stderr, which the main process relays into its own logging
# (vhostmem/worker_log.py): "LEVEL logger: message".
WORKER_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# SCM_RIGHTS carries at most this many fds per message (Linux SCM_MAX_FD).
MAX_FDS = 253
_TYPE = struct.Struct("<H")
# What each field may hold; a field not listed here is refused.
_INT_FIELDS = frozenset({
    "seq", "index", "num", "features", "base", "mmap_size", "mmap_offset", "num_queues",
    "queue_size", "gpa", "size", "uaddr", "offset", "max_queue_size", "blk_size", "seg_max",
    "disk_size", "indirect_floor", "seg_size"})
_BOOL_FIELDS = frozenset({"more", "on", "enabled", "resume", "call", "inflight", "readonly"})
_STR_FIELDS = frozenset({"reason", "kind", "serial", "name", "state", "failure_status"})
_LIST_FIELDS = frozenset({"regions", "addr", "frontend_addr", "counts", "latency"})


class WorkerProtocolError(ValueError):
    """A record that is not a valid control message (names what is wrong)."""


@dataclass
class WorkerMessage:
    type: Msg
    fields: dict[str, Any]
    fds: list[int] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(msg_type: Msg, /, **fields: Any) -> bytes:
    _check_fields(fields)
    return _TYPE.pack(msg_type) + json.dumps(fields, separators=(",", ":")).encode()


def decode(record: bytes, fds: list[int] | None = None) -> WorkerMessage:
    if len(record) < _TYPE.size:
        raise WorkerProtocolError(f"record of {len(record)} bytes has no type")
    (number,) = _TYPE.unpack_from(record)
    try:
        kind = Msg(number)
    except ValueError:
        raise WorkerProtocolError(f"unknown message type {number}") from None
    try:
        body = json.loads(record[_TYPE.size:])
    except (ValueError, RecursionError) as exc:
        raise WorkerProtocolError(f"{kind.name}: body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise WorkerProtocolError(f"{kind.name}: body is not an object")
    _check_fields(body, kind.name)
    return WorkerMessage(kind, body, list(fds or []))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(fields: dict[str, Any], what: str = "message") -> None:
    for key, value in fields.items():
        if key in _INT_FIELDS:
            ok = _is_int(value) or (value is None and key == "index")
        elif key in _BOOL_FIELDS:
            ok = isinstance(value, bool)
        elif key in _STR_FIELDS:
            ok = isinstance(value, str)
        elif key in _LIST_FIELDS:
            ok = isinstance(value, list) and all(
                _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))
                for v in value)
        else:
            raise WorkerProtocolError(f"{what}: unknown field {key!r}")
        if not ok:
            raise WorkerProtocolError(f"{what}: field {key!r} has the wrong kind of value")
