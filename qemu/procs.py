"""Process-tree lookups through procfs, for the harness, the benchmarks and the tests."""

from __future__ import annotations


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a backend's data-plane workers, qsd's helpers); empty
    when the process is gone. Read from /proc/PID/task/PID/children: the main thread's
    children, which is where a backend forks or spawns them."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
