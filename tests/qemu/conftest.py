"""Fixtures for the QEMU suite: cached guest assets and the list of backends under test.

Adding a backend to every boot test is one line::

    BACKENDS.append(vhostmem_backend(on_hotplug=vhostmem_hotplug_checks))

``on_hotplug`` is the backend-specific hook called after the DIMM is plugged and after it is
unplugged; it receives a ``qemu.backends.HotplugEvent`` (phase, backend pid, DIMM size, backend
log path) and returns ``Check``s, e.g. that vhostmem registered and later unregistered the region.
"""

from __future__ import annotations

import pytest

from qemu.assets import GuestAssets, prepare
from qemu.backends import Backend, qsd_backend

BACKENDS: list[Backend] = [qsd_backend()]


@pytest.fixture(scope="session")
def guest_assets() -> GuestAssets:
    """Kernel and initramfs, fetched/built once (cached in qemu/cache across runs)."""
    return prepare()


@pytest.fixture(params=BACKENDS, ids=lambda b: b.name)
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.param
