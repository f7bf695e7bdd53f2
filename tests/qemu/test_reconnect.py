"""Backend crashes under a writing guest: SIGKILL vhostmem 20 times, QEMU reconnects, the guest
sees no I/O error and every acknowledged write is on the disk (see qemu/reconnect.py)."""

from __future__ import annotations

import pytest

from qemu.assets import GuestAssets
from qemu.backends import vhostmem_backend
from qemu.reconnect import CrashConfig, check_writer_image, run_crash_test
from tests.peers import TEST_WORKERS

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

KILLS = 20


def test_guest_survives_backend_kills(guest_assets: GuestAssets) -> None:
    # VHOSTMEM_TEST_WORKERS=N: the killed backend's rings run in workers, which die with it.
    result = run_crash_test(vhostmem_backend(workers=TEST_WORKERS), CrashConfig(kills=KILLS),
                            assets=guest_assets)
    print(result.report(with_logs=False))
    assert result.passed, result.report()
    assert result.kills == KILLS and result.resumed == KILLS
    names = {c.name for c in result.checks}
    assert {f"writer.job{j}" for j in range(4)} <= names
    assert "I/O error" not in result.serial_log
    # Aimed kills caught requests in flight, and restarted backends resubmitted them.
    assert result.kills_with_inflight > 0
    assert result.resubmissions > 0, result.backend_log[-2000:]


def test_image_check_spots_a_damaged_block() -> None:
    """The host-side image check is not vacuous: one flipped byte in a valid block fails it."""
    import numpy as np

    from qemu.reconnect import FNV_OFFSET, FNV_PRIME, WBLOCK, WRITER_MAGIC, XORSHIFT_SEED

    block, seq = 3, 7
    words = np.zeros(WBLOCK // 8, dtype="<u8")
    words[0], words[1], words[2] = WRITER_MAGIC | (1 << 32), block, seq
    x = (block << 32) ^ seq ^ XORSHIFT_SEED
    mask = (1 << 64) - 1
    for i in range(3, WBLOCK // 8 - 1):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        words[i] = x
    h = FNV_OFFSET
    for byte in words[:-1].tobytes():
        h = ((h ^ byte) * FNV_PRIME) & mask
    words[-1] = h
    image = bytearray(WBLOCK * 8)
    image[block * WBLOCK : (block + 1) * WBLOCK] = words.tobytes()
    assert check_writer_image(bytes(image)).passed
    image[block * WBLOCK + 100] ^= 1
    damaged = check_writer_image(bytes(image))
    assert not damaged.passed and "first [3]" in damaged.detail
