"""The harness itself: it must notice wrong disks, clean up after failures, and agree with the
guest program on the data pattern."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qemu.assets import GuestAssets, build_vmtest
from qemu.backends import Backend, BackendRequest, command_backend, qsd_backend
from qemu.guestlog import GuestLog
from qemu.launch import GuestConfig, interactive, run_guest
from qemu.pattern import DiskLayout, expected_image, first_difference, pattern
from tests.peers import QsdHandle

pytestmark = pytest.mark.qemu
MIB = 1 << 20
INTERACTIVE_TIMEOUT = 30.0
SHELL_SETTLE = 0.5


def children_of_this_process() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        text = (task / "children").read_text().split()
        pids.update(int(p) for p in text)
    return pids


@pytest.mark.parametrize(("seed", "length"), [(0, 4), (1, 4096), (4242, 3 * MIB + 12)])
def test_guest_pattern_generator_matches_python(seed: int, length: int) -> None:
    binary = build_vmtest()
    out = subprocess.run([str(binary), "--dump-pattern", str(seed), str(length)],
                         capture_output=True, check=True).stdout
    assert out == pattern(seed, length)


def test_expected_image_layout() -> None:
    layout = DiskLayout.for_size(16 * MIB)
    image = expected_image(layout, 9, discard_zeroes=True)
    assert len(image) == 16 * MIB
    assert image[: 4 * MIB] == pattern(9, 4 * MIB)
    assert image[layout.discard.offset : layout.discard.offset + MIB] == bytes(MIB)
    assert image[layout.zeroout.offset : layout.zeroout.offset + MIB] == bytes(MIB)
    assert image[-512:] == pattern(10, 512)
    tampered = bytearray(image)
    tampered[12345] ^= 1
    assert first_difference(bytes(tampered), bytes(image)) == 12345
    with pytest.raises(ValueError, match="at least 8 MiB"):
        DiskLayout.for_size(MIB)


def test_guestlog_parses_lines_behind_escape_codes() -> None:
    log = GuestLog()
    log.feed("\x1b[2JBooting..VHOSTMEM-TEST r1.flush PASS fsync=0")
    log.feed("VHOSTMEM-TEST r1.bad MAYBE x")
    log.feed("VHOSTMEM-DIGEST r1 abc")
    assert log.feed("VHOSTMEM-SYNC plug") == "plug"
    log.feed("VHOSTMEM-VERDICT PASS")
    assert [(c.name, c.passed) for c in log.checks] == [
        ("r1.flush", True), ("guest.malformed-line", False)]
    assert log.digests == {"r1": "abc"} and log.verdict == "PASS"


def shrinking_qsd() -> Backend:
    """qemu-storage-daemon on an image cut to half the size the guest is told to expect."""
    qsd = qsd_backend()

    def command(req: BackendRequest) -> list[str]:
        shrink = f'truncate -s {8 * MIB} "$1" && shift && exec "$@"'
        return ["sh", "-c", shrink, "sh", str(req.disk), *qsd.argv(req)]

    return Backend(name="qsd-shrunk", command=command)


def test_wrong_disk_size_fails(guest_assets: GuestAssets) -> None:
    result = run_guest(shrinking_qsd(), GuestConfig(), assets=guest_assets)
    assert not result.passed
    assert result.verdict == "FAIL"
    failed = {c.name for c in result.failures}
    assert {"boot.sysfs-size", "r1.ioctl-geometry", "host.image"} <= failed


def test_timeout_kills_everything(guest_assets: GuestAssets) -> None:
    before = children_of_this_process()
    result = run_guest(qsd_backend(), GuestConfig(timeout=0.5), assets=guest_assets)
    assert not result.passed
    assert result.error is not None and result.error.startswith("timeout")
    assert children_of_this_process() <= before


def test_backend_that_exits_is_reported(guest_assets: GuestAssets) -> None:
    result = run_guest(command_backend("broken", "false"), assets=guest_assets)
    assert not result.passed
    assert result.error is not None and "backend exited with status 1" in result.error


def test_interactive_needs_a_backend_socket(tmp_path: Path) -> None:
    assert interactive(tmp_path / "absent.sock", GuestConfig()) == 1


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    """Serial output up to ``marker`` (or all of it if QEMU exits or time runs out)."""
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
    return seen


def test_interactive_shell_sees_the_disk(
    qsd: Callable[..., QsdHandle], guest_assets: GuestAssets
) -> None:
    """What `make vm` runs: a shell guest on an already running backend's socket."""
    handle = qsd(size=16 * MIB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemu.launch", "--interactive", "--socket", handle.socket_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    assert proc.stdin is not None
    try:
        out = read_until(proc, b"Exit the shell to power off", INTERACTIVE_TIMEOUT)
        assert b"Exit the shell" in out, out.decode(errors="replace")
        # Typed only once the shell is up: earlier input would be lost in the serial FIFO.
        time.sleep(SHELL_SETTLE)
        proc.stdin.write(b"cat /sys/block/vda/size; echo SHELL-$((40+2)); exit\n")
        proc.stdin.flush()
        out += read_until(proc, b"Power down", INTERACTIVE_TIMEOUT)
        assert proc.wait(INTERACTIVE_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its QEMU: our own session
            proc.wait()
        proc.stdin.close()
        assert proc.stdout is not None
        proc.stdout.close()
    text = out.decode(errors="replace")
    assert "32768" in text and "SHELL-42" in text, text
