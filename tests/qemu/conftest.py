"""Fixtures for the QEMU suite: cached guest assets and the list of backends under test.

Every boot test runs once per backend in BACKENDS: qemu-storage-daemon and vhostmem.
``on_hotplug`` is the backend-specific hook called after the DIMM is plugged and after it is
unplugged; it receives a ``qemu.backends.HotplugEvent`` (phase, backend pid, DIMM size, backend
log path) and returns ``Check``s. vhostmem's hook reads its log: the session logs
``ADD_MEM_REG registered region gpa=... size=...`` for a region added at run time (a table
logs ``SET_MEM_TABLE registered region ...`` instead, so a DIMM announced by a new table would
not pass) and ``REM_MEM_REG unregistered region gpa=... size=...`` for REM_MEM_REG.
"""

from __future__ import annotations

import re
import time

import pytest

from qemu.assets import GuestAssets, prepare
from qemu.backends import PLUGGED, Backend, HotplugEvent, qsd_backend, vhostmem_backend
from qemu.guestlog import Check
from tests.peers import TEST_WORKERS

REGISTERED = re.compile(r"ADD_MEM_REG registered region gpa=(0x[0-9a-f]+) size=(0x[0-9a-f]+)")
UNREGISTERED = re.compile(
    r"REM_MEM_REG unregistered region gpa=(0x[0-9a-f]+) size=(0x[0-9a-f]+)"
)
LOG_TIMEOUT = 5.0  # the log line is written before the reply, but give the file a moment
LOG_POLL = 0.05


def _regions(pattern: re.Pattern[str], text: str, size: int) -> list[tuple[int, int]]:
    """(log offset, gpa) of every match whose size is `size`."""
    return [(m.start(), int(m.group(1), 16)) for m in pattern.finditer(text)
            if int(m.group(2), 16) == size]


def _dimm_lines(event: HotplugEvent) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    text = event.backend_log.read_text(errors="replace")
    return (_regions(REGISTERED, text, event.dimm_size),
            _regions(UNREGISTERED, text, event.dimm_size))


def _wait_for(event: HotplugEvent, done) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        lines = _dimm_lines(event)
        if done(*lines) or time.monotonic() > deadline:
            return lines
        time.sleep(LOG_POLL)


def vhostmem_hotplug_checks(event: HotplugEvent) -> list[Check]:
    """After the plug, vhostmem registered exactly one region of the DIMM's size (and has not
    unregistered it); after the unplug, it unregistered that same region (same gpa)."""
    size = f"{event.dimm_size:#x}"
    if event.phase == PLUGGED:
        added, removed = _wait_for(event, lambda a, r: bool(a))
        ok = len(added) == 1 and not removed
        detail = f"registered gpa={[hex(g) for _, g in added]} size={size}, unregistered " \
                 f"{[hex(g) for _, g in removed]}"
        return [Check("host.vhostmem-registers-dimm", ok, detail)]
    added, removed = _wait_for(event, lambda a, r: bool(r))
    ok = (len(added) == 1 and len(removed) == 1 and added[0][1] == removed[0][1]
          and added[0][0] < removed[0][0])
    detail = f"registered {[hex(g) for _, g in added]}, unregistered " \
             f"{[hex(g) for _, g in removed]} size={size}"
    return [Check("host.vhostmem-unregisters-dimm", ok, detail)]


# VHOSTMEM_TEST_WORKERS=N: vhostmem serves the guests' rings in N worker processes.
BACKENDS: list[Backend] = [qsd_backend(), vhostmem_backend(on_hotplug=vhostmem_hotplug_checks,
                                                           workers=TEST_WORKERS)]


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """Kernel and initramfs, fetched/built once (cached in qemu/cache across runs)."""
    return prepare()


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param
