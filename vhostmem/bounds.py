"""Bounds-check mode: proof that no view handed out lies outside guest memory.

For tests of hostile guests and for fuzzing. When enabled, every view that reaches a device or a
ring is checked against the regions of its :class:`GuestMemory` before it is used:

* ``GuestMemory.translate`` / ``GuestMemory.view``: each view must be exactly the host bytes of
  the guest range asked for, inside one region's guest bytes (not the slack a mapping has below
  ``mmap_offset``), and the views together cover the request;
* ``Virtqueue._walk`` and ``PackedRing._walk_packed``: every buffer of a chain, including
  those its fast path slices straight from a cached region view, must lie
  inside one region's guest bytes. The production fast path runs unchanged in this mode; only
  its result is checked.

A violation is recorded in :data:`violations`, logged as critical and raised as AssertionError.
``VHOSTMEM_DEBUG_BOUNDS=1`` in the environment enables the mode when ``vhostmem.virtqueue`` is
first imported; :func:`enable` / :func:`disable` switch it at run time. Off, the classes keep
their plain methods: the mode costs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vhostmem.guest_memory import GuestMemory, Region
    from vhostmem.virtqueue import DescChain, Virtqueue

log = logging.getLogger(__name__)

ENV = "VHOSTMEM_DEBUG_BOUNDS"
ENV_ON = os.environ.get(ENV) == "1"
enabled = False
# Every violation seen (also raised as AssertionError where it happened).
violations: list[str] = []


def view_address(view: memoryview) -> int:
    """Host address of a view's first byte (the temporary ctypes export is dropped at once)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def guest_bytes(region: Region) -> tuple[int, int]:
    """Host address range [lo, hi) of a region's guest memory inside its mapping."""
    lo = region.host_addr + (region.guest_phys_addr - region.view_gpa)
    return lo, lo + region.memory_size


def check_views(mem: GuestMemory, gpa: int, length: int, views: list[memoryview]) -> None:
    """Each view must be the host bytes of guest [cur, cur + len) inside one region's guest
    bytes, and together they cover [gpa, gpa + length)."""
    cur = gpa
    for v in views:
        n = len(v)
        region = next((r for r in mem.regions if r.guest_phys_addr <= cur < r.gpa_end), None)
        where = f"view gpa={cur:#x} len={n:#x} of request gpa={gpa:#x} len={length:#x}"
        if region is None or cur + n > region.gpa_end:
            violation(f"{where}: not inside one region ({region!r})")
        elif n:
            lo, hi = guest_bytes(region)
            addr = view_address(v)
            if addr != lo + (cur - region.guest_phys_addr) or addr + n > hi:
                violation(f"{where}: host bytes {addr:#x}+{n:#x} outside {region!r} at {lo:#x}")
        cur += n
    if cur != gpa + length:
        violation(f"views of gpa={gpa:#x} cover {cur - gpa:#x} bytes, not {length:#x}")


def check_inside(mem: GuestMemory, view: memoryview, where: str) -> None:
    """A view (of unknown guest address) must lie inside one region's guest bytes."""
    n = len(view)
    if not n:
        return
    addr = view_address(view)
    for region in mem.regions:
        if region.view is None:
            continue
        lo, hi = guest_bytes(region)
        if lo <= addr and addr + n <= hi:
            return
    violation(f"{where}: host bytes {addr:#x}+{n:#x} are in no region's guest memory")


def check_chain(vq: Virtqueue, chain: DescChain) -> None:
    for i, view in enumerate(chain.readable + chain.writable):
        check_inside(vq.mem, view, f"queue {vq.index} chain {chain.head} buffer {i}")


def violation(message: str) -> None:
    violations.append(message)
    log.critical("guest memory bounds violation: %s", message)
    raise AssertionError(message)


def _checked_views(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: GuestMemory, gpa: int, length: int) -> Any:
        result = method(self, gpa, length)
        check_views(self, gpa, length, result if isinstance(result, list) else [result])
        return result

    checked.__wrapped__ = method  # type: ignore[attr-defined]
    return checked


def _checked_walk(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Virtqueue, head: int) -> DescChain:
        chain = method(self, head)
        check_chain(self, chain)
        return chain

    checked.__wrapped__ = method  # type: ignore[attr-defined]
    return checked


def _checked_packed_walk(method: Callable[..., Any]) -> Callable[..., Any]:
    def checked(self: Virtqueue, pos: int, copy: bytes | None = None) -> tuple[Any, ...]:
        # copy: a resubmitted chain's descriptors; the result: (chain, descriptors it took,
        # dirty ranges)
        result = method(self, pos, copy)
        check_chain(self, result[0])
        return result

    checked.__wrapped__ = method  # type: ignore[attr-defined]
    return checked


def _targets() -> list[tuple[type, str, Callable[..., Any]]]:
    from vhostmem.guest_memory import GuestMemory
    from vhostmem.packed_ring import PackedRing
    from vhostmem.virtqueue import Virtqueue

    return [
        (GuestMemory, "translate", _checked_views),
        (GuestMemory, "view", _checked_views),
        (Virtqueue, "_walk", _checked_walk),
        (PackedRing, "_walk_packed", _checked_packed_walk),
    ]


def enable() -> None:
    """Install the checked methods (idempotent)."""
    global enabled
    for cls, name, wrap in _targets():
        method = getattr(cls, name)
        if not hasattr(method, "__wrapped__"):
            setattr(cls, name, wrap(method))
    enabled = True


def disable() -> None:
    """Back to the plain methods."""
    global enabled
    for cls, name, _ in _targets():
        method = getattr(cls, name)
        setattr(cls, name, getattr(method, "__wrapped__", method))
    enabled = False
