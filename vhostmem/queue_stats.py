"""Per-virtqueue statistics, kept as plain int attributes on the queue.

The hot path pays for them once per *turn* (one ``Session.process_queue`` call), not once per
request: a device counts a turn's requests and bytes in local variables and adds them here in one
:meth:`QueueStats.account_turn` call; the latency histogram takes two clock reads per turn and one
``int.bit_length``. Kicks are counted per kick (one per ``on_kick``) and interrupts per call
eventfd signalled, both already once-per-turn events.

Latency is the backend's share of a request's life: from the start of the turn that picked it up
to the end of that turn, where the driver is signalled. Inline, a request completes within its
turn, so every request of a turn is counted in the bucket of the turn's duration (an upper bound
for the ones served early in it). In thread mode each request is timed on its own, from the turn
that handed it to the pool to its completion. Time spent in the avail ring before the kick was
handled is not seen by the backend and not counted.

Buckets are log2 of microseconds, as SPDK's bdev histograms: bucket 0 is [0, 1) us, bucket
``i`` >= 1 is [2^(i-1), 2^i) us, the last one is open-ended.
"""

from __future__ import annotations

import threading
from time import monotonic_ns
from typing import Any

LATENCY_BUCKETS = 32
LAST_BUCKET = LATENCY_BUCKETS - 1
NS_PER_US = 1000

__all__ = ["LATENCY_BUCKETS", "QueueStats", "bucket_bounds_us", "monotonic_ns"]


def bucket_bounds_us(index: int) -> tuple[int, int | None]:
    """[from, to) in microseconds of bucket ``index`` (``to`` None: the open last bucket)."""
    low = 0 if index == 0 else 1 << (index - 1)
    return low, None if index == LAST_BUCKET else 1 << index


class QueueStats:
    """Mixed into :class:`~vhostmem.virtqueue.Virtqueue`. Counters live as long as the queue
    object (an endpoint's lifetime): they survive frontend disconnects and device resets, and
    are zeroed only by :meth:`stats_reset`."""

    _idle: threading.Condition
    inflight: int

    def stats_init(self) -> None:
        self.stat_requests = 0
        self.stat_read_bytes = 0  # data the device wrote into the guest's buffers (reads, ids)
        self.stat_write_bytes = 0  # data the device took from the guest's buffers (writes)
        self.stat_errors = 0  # requests completed with a failure status
        self.stat_kicks = 0
        self.stat_interrupts = 0  # call eventfd signals
        self.stat_latency = [0] * LATENCY_BUCKETS

    def account_turn(self, requests: int, read_bytes: int, write_bytes: int, errors: int,
                     started_ns: int) -> None:
        """Add one inline turn's counts; ``started_ns`` is the turn's ``monotonic_ns()``."""
        self.stat_requests += requests
        self.stat_read_bytes += read_bytes
        self.stat_write_bytes += write_bytes
        self.stat_errors += errors
        us = (monotonic_ns() - started_ns) // NS_PER_US  # once per turn: a division is fine
        bucket = us.bit_length()
        self.stat_latency[bucket if bucket < LAST_BUCKET else LAST_BUCKET] += requests

    def account_request(self, read_bytes: int, write_bytes: int, failed: bool,
                        started_ns: int) -> None:
        """One request served on an I/O thread (thread mode): under the completion lock, as
        several workers complete requests of the queue at once."""
        with self._idle:
            self.account_turn(1, read_bytes, write_bytes, int(failed), started_ns)

    def account_failed(self) -> None:
        """A request failed before the device saw it (its buffer is outside guest memory)."""
        self.stat_requests += 1
        self.stat_errors += 1

    def stats_reset(self) -> None:
        with self._idle:
            self.stats_init()

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """A snapshot (consistent with completions from I/O threads); with ``reset`` the
        counters restart from zero in the same step, so no request is counted twice or lost."""
        with self._idle:
            latency = list(self.stat_latency)
            snap: dict[str, Any] = {
                "requests": self.stat_requests,
                "read_bytes": self.stat_read_bytes,
                "write_bytes": self.stat_write_bytes,
                "errors": self.stat_errors,
                "kicks": self.stat_kicks,
                "interrupts": self.stat_interrupts,
                "in_flight": self.inflight,
            }
            if reset:
                self.stats_init()
        snap["latency_us"] = [
            {"from": low, "to": high, "count": count}
            for low, high, count in (
                (*bucket_bounds_us(i), n) for i, n in enumerate(latency)
            )
            if count
        ]
        return snap
