"""A guest's write-through choice survives a backend kill -9 (issue 10, item 3).

QEMU 7.2 does not replay SET_CONFIG to a restarted vhost-user-blk backend, so a guest that set
its disk to write-through keeps writing without flushes after vhostmem is killed with SIGKILL and
restarted: the restarted vhostmem must still fdatasync every write before acknowledging it
(strace counts the calls; see qemu/durability.py). One boot, one kill, shared by both tests.
"""

from __future__ import annotations

import pytest

from qemu.assets import GuestAssets
from qemu.durability import (
    AFTER_RESTART,
    BEFORE_KILL,
    BOOT_DEFAULT,
    PHASES,
    WRITEBACK,
    DurabilityConfig,
    DurabilityResult,
    run_durability_test,
)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

WRITES = 64


@pytest.fixture(scope="module")
def durability(guest_assets: GuestAssets) -> DurabilityResult:
    result = run_durability_test(config=DurabilityConfig(writes=WRITES), assets=guest_assets)
    print(result.report(with_logs=False))
    return result


def test_write_through_survives_backend_kill(durability: DurabilityResult) -> None:
    result = durability
    report = result.report()
    assert result.error is None and result.verdict == "PASS", report
    assert result.acknowledged == dict.fromkeys(PHASES, WRITES), report
    # The guest chose write-through and still sees it after the restart (QEMU's cached config).
    checks = {c.name: c for c in result.checks}
    for name in ("durability.cache-type-write-through", "durability.cache-type-after-restart"):
        assert name in checks and checks[name].passed, report
    # The defect: after the SIGKILL and restart, every acknowledged write is still fdatasync'ed.
    assert result.fdatasyncs.get(AFTER_RESTART, 0) >= WRITES, report
    # Controls: write-through flushed every write before the kill too, and write-back (set by
    # the guest through SET_CONFIG, like write-through) did not, so the counts above come from
    # the guest's choice.
    assert result.fdatasyncs[BEFORE_KILL] >= WRITES, report
    assert result.fdatasyncs[WRITEBACK] < WRITES, report
    others = [c for c in result.checks if c.name != f"host.no-fdatasync-per-write-{BOOT_DEFAULT}"]
    assert all(c.passed for c in others), report


def test_booted_write_back_does_not_flush_every_write(durability: DurabilityResult) -> None:
    """SeaBIOS negotiates no FLUSH and no CONFIG_WCE (write-through while it runs); Linux then
    negotiates both on the same connection and is shown write back (QEMU's cached config):
    it must be served write-back, not left write-through for the whole boot."""
    assert durability.acknowledged.get(BOOT_DEFAULT) == WRITES, durability.report()
    assert durability.fdatasyncs[BOOT_DEFAULT] < WRITES, durability.report()
