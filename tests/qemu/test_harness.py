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

from protocol.constants import REPLY_FLAG, FrontendRequest
from qemu.assets import GuestAssets, build_vmtest
from qemu.backends import (
    RAM,
    VHOSTMEM_BIN,
    Backend,
    BackendRequest,
    command_backend,
    qsd_backend,
    vhostmem_backend,
)
from qemu.guestlog import GuestLog
from qemu.launch import GuestConfig, interactive, run_guest
from qemu.pattern import DiskLayout, expected_image, first_difference, pattern
from qemu.vhost_tap import BACK, FRONT, TapMessage, ring_restart_check
from tests.peers import QsdHandle

pytestmark = pytest.mark.qemu
MIB = 1 << 20
GIB = 1 << 30
INTERACTIVE_TIMEOUT = 30.0
SHELL_SETTLE = 0.5
ROOT = Path(__file__).resolve().parents[2]
INSTALL_DEPS = ROOT / "qemu" / "install-deps.sh"
SERVE_STARTUP = 10.0


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


def test_idle_queue_fails_queues_used(guest_assets: GuestAssets) -> None:
    """queues-used can fail: with every reader pinned to vCPU 0, queue 1 carries nothing."""
    config = GuestConfig(num_queues=2, smp=2, queue_io_cpus=(0,))
    result = run_guest(qsd_backend(), config, assets=guest_assets)
    assert not result.passed
    assert [c.name for c in result.failures] == ["queues-used"], result.report()
    detail = result.failures[0].detail
    assert "value=1 expected=2" in detail and "req.1=+0" in detail, detail


def test_readonly_own_ram_disk_is_refused(guest_assets: GuestAssets) -> None:
    """A backend's own RAM disk starts zeroed, so it cannot hold the read-only pattern."""
    result = run_guest(vhostmem_backend(), GuestConfig(storage=RAM, readonly=True),
                       assets=guest_assets)
    assert not result.passed and result.error is not None and "zero-filled" in result.error


def _tap(connection: int, sender: str, name: str, ring: int, num: int | None = None,
         reply: bool = False) -> TapMessage:
    return TapMessage(connection, sender, FrontendRequest[name], REPLY_FLAG if reply else 1,
                      ring, num, 0)


def test_ring_restart_check_needs_start_stop_start_on_one_connection() -> None:
    start = [_tap(1, FRONT, "SET_VRING_KICK", 0)]
    stop = [_tap(1, FRONT, "GET_VRING_BASE", 0, 0), _tap(1, BACK, "GET_VRING_BASE", 0, 3, True)]
    assert ring_restart_check(start + stop + start).passed
    assert not ring_restart_check(start + stop).passed  # never started again
    # A GET_VRING_BASE the backend never answered is not a stop.
    assert not ring_restart_check(start + stop[:1] + start).passed
    # Started again, but on a new connection (a reconnect), not a restart.
    again = [_tap(2, FRONT, "SET_VRING_KICK", 0)]
    assert not ring_restart_check(start + stop + again).passed
    assert not ring_restart_check(start + stop + start, ring=1).passed


@pytest.mark.parametrize(("busybox", "wanted"), [("/bin/busybox", False), ("/bin/ls", True),
                                                  ("/nonexistent", True)])
def test_install_deps_wants_a_static_busybox(busybox: str, wanted: bool) -> None:
    """A dynamically linked (or missing) busybox makes install-deps install busybox-static; the
    static one the initramfs is built from (this suite needs it) does not."""
    out = subprocess.run(["bash", str(INSTALL_DEPS), "--dry-run"], capture_output=True,
                         text=True, check=True, env={**os.environ, "BUSYBOX": busybox}).stdout
    assert ("busybox-static" in out.split()) == wanted, out


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


def shell_session(launcher_args: list[str], cwd: Path) -> str:
    """Runs `python -m qemu.launch --interactive ...` in ``cwd``, asks the guest shell for the
    disk's size in bytes, exits, and returns the serial output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "qemu.launch", "--interactive", *launcher_args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    assert proc.stdin is not None
    try:
        out = read_until(proc, b"Exit the shell to power off", INTERACTIVE_TIMEOUT)
        assert b"Exit the shell" in out, out.decode(errors="replace")
        # Typed only once the shell is up: earlier input would be lost in the serial FIFO.
        time.sleep(SHELL_SETTLE)
        proc.stdin.write(b"echo VDA-BYTES-$(($(cat /sys/block/vda/size) * 512)); "
                         b"echo SHELL-$((40+2)); exit\n")
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
    return out.decode(errors="replace")


def test_interactive_shell_sees_the_disk(
    qsd: Callable[..., QsdHandle], guest_assets: GuestAssets
) -> None:
    """The interactive guest on an already running qemu-storage-daemon's socket."""
    handle = qsd(size=16 * MIB)
    text = shell_session(["--socket", handle.socket_path], ROOT)
    assert f"VDA-BYTES-{16 * MIB}" in text and "SHELL-42" in text, text


def test_make_vm_on_make_run_backend(tmp_path: Path, guest_assets: GuestAssets) -> None:
    """What `make run` + `make vm` do: `vhostmem serve` with no options (a 1 GiB RAM disk on
    ./vhostmem.sock), then `python -m qemu.launch --interactive` in the same directory."""
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([str(VHOSTMEM_BIN), "serve"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVE_STARTUP
        while not (tmp_path / "vhostmem.sock").exists():
            assert serve.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "serve.log").read_text()
            time.sleep(0.02)
        text = shell_session([], tmp_path)
        assert serve.poll() is None, "vhostmem serve died under the guest"
    finally:
        serve.terminate()
        serve.wait(10)
        log.close()
    assert f"VDA-BYTES-{GIB}" in text and "SHELL-42" in text, text
    assert "frontend connected" in (tmp_path / "serve.log").read_text()
