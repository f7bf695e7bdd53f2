"""The process's cyclic garbage collections: the startup heap kept out of them, each one timed.

Why (bench/RESULTS.md, "Latency tails"): a request served while the collector runs waits for
it, since a collection holds the GIL. CPython 3.11 collects the oldest generation over every
tracked object, and after the imports alone there are ~23000 (modules, functions, classes,
construct's parser tables). Under a load that allocates per request (``io_mode="thread"``: a
future and a work item per request; the NBD backend: an operation record per request) the
oldest generation is collected every ~0.2-0.4 s at QD128, and each of those walked the whole
startup heap: 10-15 ms of CPU, the longest pause in the process (frozen: 0.15 ms). The inline
hot path allocates no object that survives a turn, so it triggers no collection at all.

So the serving process calls :func:`freeze_startup_heap` once everything it needs at startup
exists (modules imported, the devices on the command line set up, the sockets listening): what
survives a full collection then is moved to the permanent generation (``gc.freeze``), which no
collection visits; collections see only what was created since. Frozen objects are still freed
by reference counting; what the freeze costs is that a reference cycle among them, if one
became garbage later, would not be reclaimed. Startup objects (modules, and the devices of the
command line, which normally live as long as the process) rarely become garbage: a command-line
device deleted with ``device_del`` leaves the few objects of its own cycles allocated (its fds
and mappings are closed explicitly, as for any device, not by the collector). Devices added
later over the management socket are not frozen, so their cycles stay collectable.

:class:`GcStats` times every collection through ``gc.callbacks`` (one call at the start and one
at the end of each collection, nothing per allocation) and keeps per generation the count, the
objects collected and the total and longest pause; ``process_stats`` on the management socket
reports them (docs/rpc.md).
"""

from __future__ import annotations

import gc
from time import perf_counter_ns
from typing import Any

GENERATIONS = 3
NS_PER_US = 1000
_START = "start"


class GcStats:
    """Counters of the collections since the last reset, per generation.

    No lock: the callbacks run with the GIL held, in whichever thread triggered the collection,
    and a lock taken here could deadlock (an allocation made while a reader holds it can start
    a collection in that same thread). A reader copies the counters; a reset replaces them."""

    def __init__(self) -> None:
        self._started_ns = 0
        self.installed = False
        self.reset()

    def reset(self) -> None:
        self.collections = [0] * GENERATIONS
        self.collected = [0] * GENERATIONS
        self.uncollectable = [0] * GENERATIONS
        self.pause_ns_total = [0] * GENERATIONS
        self.pause_ns_max = [0] * GENERATIONS

    def install(self) -> None:
        """Start timing collections (once per process: a second call does nothing)."""
        if not self.installed:
            gc.callbacks.append(self._on_gc)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._on_gc)
            self.installed = False

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = perf_counter_ns()
        if phase == _START:
            self._started_ns = now
            return
        gen = info["generation"]
        pause = now - self._started_ns
        self.collections[gen] += 1
        self.collected[gen] += info["collected"]
        self.uncollectable[gen] += info["uncollectable"]
        self.pause_ns_total[gen] += pause
        if pause > self.pause_ns_max[gen]:
            self.pause_ns_max[gen] = pause

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        """The counters (``generations``: one entry per generation, youngest first), the
        collector's thresholds and how many objects are frozen; with ``reset`` the counters
        restart from zero."""
        counts = (self.collections, self.collected, self.uncollectable, self.pause_ns_total,
                  self.pause_ns_max)
        if reset:
            self.reset()
        coll, done, unc, total, longest = counts
        return {
            "timed": self.installed,
            "frozen": gc.get_freeze_count(),
            "thresholds": list(gc.get_threshold()),
            "generations": [
                {"generation": g, "collections": coll[g], "collected": done[g],
                 "uncollectable": unc[g], "pause_us_total": total[g] // NS_PER_US,
                 "pause_us_max": longest[g] // NS_PER_US}
                for g in range(GENERATIONS)
            ],
        }


# The serving process's counters (one source of truth: cli installs them, process_stats reads).
GC_STATS = GcStats()


def freeze_startup_heap() -> int:
    """Collect once, then move every surviving object to the permanent generation so that no
    later collection walks it (module docstring); returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
