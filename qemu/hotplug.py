"""Memory hot-plug driven over QMP while the guest waits at its sync points.

On ``plug`` a shared memfd backend and a pc-dimm are added; QEMU then tells the vhost-user
backend about the new region (ADD_MEM_REG, or a new SET_MEM_TABLE). On ``unplug`` the dimm is
removed (the guest offlines it through ACPI, QEMU emits DEVICE_DELETED) and the backend is told
to drop the region (REM_MEM_REG). Generic host checks verify, through /proc/PID/maps, that the
backend process mapped the DIMM after the plug and unmapped it after the unplug; the backend's
own ``on_hotplug`` hook adds whatever it can assert about its registrations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from qemu.backends import PLUGGED, UNPLUGGED, Backend, HotplugEvent
from qemu.guestlog import Check
from qemu.qmp import QMPClient, QMPError

MIB = 1 << 20
DIMM_SIZE = 256 * MIB  # differs from the boot RAM size, so its mapping is recognisable
MEM_ID, DIMM_ID = "hotmem0", "dimm0"
UNPLUG_TIMEOUT = 30.0
MAPPING_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
MEMFD_PREFIX = "/memfd:"
PLUG_TAG, UNPLUG_TAG = "plug", "unplug"


def memfd_mapping_sizes(pid: int) -> list[int]:
    """Sizes of the process's mappings of memfd files (guest RAM shared by QEMU)."""
    sizes = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(MEMFD_PREFIX):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            sizes.append(end - start)
    return sizes


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


class HotplugDriver:
    """Answers the guest's ``plug`` / ``unplug`` sync points; ``handle`` returns host checks."""

    def __init__(self, qmp_socket: Path, backend: Backend, backend_pid: int, backend_log: Path):
        self._qmp_socket = qmp_socket
        self._backend = backend
        self._pid = backend_pid
        self._log = backend_log
        self._qmp: QMPClient | None = None
        self._baseline = 0

    def _client(self) -> QMPClient:
        if self._qmp is None:
            self._qmp = QMPClient(self._qmp_socket)
        return self._qmp

    def _dimm_mappings(self) -> int:
        return memfd_mapping_sizes(self._pid).count(DIMM_SIZE)

    def handle(self, tag: str) -> list[Check]:
        try:
            if tag == PLUG_TAG:
                return self._plug()
            if tag == UNPLUG_TAG:
                return self._unplug()
        except (QMPError, OSError) as exc:
            return [Check(f"host.{tag}", False, str(exc))]
        return [Check("host.sync", False, f"unknown sync tag {tag!r}")]

    def _plug(self) -> list[Check]:
        qmp = self._client()
        self._baseline = self._dimm_mappings()
        qmp.execute("object-add", **{"qom-type": "memory-backend-memfd", "id": MEM_ID,
                                     "size": DIMM_SIZE, "share": True})
        qmp.execute("device_add", driver="pc-dimm", id=DIMM_ID, memdev=MEM_ID)
        devices = qmp.execute("query-memory-devices")
        plugged = any(d.get("data", {}).get("id") == DIMM_ID for d in devices)
        mapped = _wait_until(lambda: self._dimm_mappings() > self._baseline, MAPPING_TIMEOUT)
        checks = [
            Check("host.hotplug-device", plugged, f"{DIMM_ID} in query-memory-devices"),
            Check("host.hotplug-backend-maps-dimm", mapped,
                  f"memfd mappings of {DIMM_SIZE} bytes: {self._dimm_mappings()}"
                  f" (before plug: {self._baseline})"),
        ]
        return checks + self._backend.on_hotplug(self._event(PLUGGED))

    def _unplug(self) -> list[Check]:
        qmp = self._client()
        qmp.execute("device_del", id=DIMM_ID)
        qmp.wait_event("DEVICE_DELETED", UNPLUG_TIMEOUT, device=DIMM_ID)
        qmp.execute("object-del", id=MEM_ID)
        unmapped = _wait_until(lambda: self._dimm_mappings() <= self._baseline, MAPPING_TIMEOUT)
        checks = [
            Check("host.hotunplug-device", True, f"DEVICE_DELETED for {DIMM_ID}"),
            Check("host.hotunplug-backend-unmaps-dimm", unmapped,
                  f"memfd mappings of {DIMM_SIZE} bytes: {self._dimm_mappings()}"),
        ]
        return checks + self._backend.on_hotplug(self._event(UNPLUGGED))

    def _event(self, phase: str) -> HotplugEvent:
        return HotplugEvent(phase, self._pid, DIMM_SIZE, self._log)

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None


EXPECTED_HOST_CHECKS = (
    "host.hotplug-device",
    "host.hotplug-backend-maps-dimm",
    "host.hotunplug-device",
    "host.hotunplug-backend-unmaps-dimm",
)
