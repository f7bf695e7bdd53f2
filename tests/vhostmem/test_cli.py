"""The command line: option parsing, device specs and their errors, and a real serve process."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostmem import cli
from vhostmem.frontend import GuestRam, Listener, VhostUserBlk

REPO = Path(__file__).resolve().parents[2]


def specs(*argv: str) -> list[cli.BlkSpec]:
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli.specs_from_args(args)


def test_default_is_a_1g_ram_disk_on_vhostmem_sock() -> None:
    (spec,) = specs()
    assert spec.path == "vhostmem.sock"
    assert spec.ram == 1 << 30
    assert spec.disk is None
    assert spec.num_queues == 1


def test_simple_options() -> None:
    (spec,) = specs("--socket", "/tmp/x.sock", "--disk", "a.img", "--readonly", "--num-queues", "4")
    got = (spec.path, spec.disk, spec.readonly, spec.num_queues)
    assert got == ("/tmp/x.sock", "a.img", True, 4)
    assert spec.ram is None


def test_repeated_blk_specs() -> None:
    a, b = specs("--blk", "socket=a.sock,disk=a.img", "--blk", "client=b.sock,ram=256M,readonly=on")
    assert (a.path, a.disk, a.client) == ("a.sock", "a.img", None)
    assert (b.path, b.client, b.ram, b.readonly) == ("b.sock", "b.sock", 256 << 20, True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--blk", "socket=a.sock,colour=red"], "unknown setting 'colour=red'"),
        (["--blk", "socket=a.sock,ram=12Q"], "bad size '12Q'"),
        (["--blk", "socket=a.sock,num-queues=17"], "num-queues='17'"),
        (["--blk", "socket=a.sock,readonly=maybe"], "readonly='maybe'"),
        (["--blk", "socket=a.sock,client=b.sock"], "socket or client"),
        (["--blk", "socket=a.sock,disk=a.img,ram=1G"], "disk or ram"),
        (["--blk", "socket=a.sock", "--blk", "socket=a.sock,ram=1M"], "same socket"),
        (["--blk", "socket=a.sock", "--disk", "x.img"], "cannot be combined with --disk"),
        (["--blk", "socket=a.sock", "--serial", "XYZ"], "cannot be combined with --serial"),
        (["--blk", "socket=a.sock", "--io-mode", "thread"], "combined with --io-mode"),
        (["--io-mode", "async"], "io-mode='async'"),
        (["--serial", "x" * 21], "longer than 20 bytes"),
    ],
)
def test_bad_specs_name_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(cli.UsageError, match=message):
        specs(*argv)


def test_parse_size_units() -> None:
    assert cli.parse_size("4096") == 4096
    assert cli.parse_size("512M") == 512 << 20
    assert cli.parse_size("1GiB") == 1 << 30
    with pytest.raises(cli.UsageError):
        cli.parse_size("0")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_serve_creates_a_0600_socket_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    sock_path = tmp_path / "d.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(sock_path),
         "--ram-size", "8M"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock_path, proc)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock_path))
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert b"vhost-user-blk-pci" in out
    assert not sock_path.exists()


def test_serve_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(victim),
         "--ram-size", "1M"],
        cwd=REPO, capture_output=True, timeout=20,
    )
    assert proc.returncode != 0
    assert b"is not a socket" in proc.stderr
    assert victim.read_text() == "keep me"


def test_serve_reports_a_missing_disk(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(tmp_path / "s.sock"),
         "--disk", str(tmp_path / "missing.img")],
        cwd=REPO, capture_output=True, timeout=20,
    )
    assert proc.returncode != 0
    assert b"missing.img" in proc.stderr
    assert not (tmp_path / "s.sock").exists()


# ------------------------------------------------------- serve processes and fake guests

SECTOR = 512
GUEST_RAM = 8 << 20


def start_serve(*argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "vhostmem.cli", "serve", *argv],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def stop_serve(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM; asserts a clean exit; returns the log (stderr)."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    return err.decode()


def guest_roundtrip(path: str, sector: int, pattern: bytes) -> None:
    with VhostUserBlk.open(path, ram_size=GUEST_RAM) as dev:
        q = dev.start_queue(0, size=16)
        q.write(sector, pattern * SECTOR)
        assert q.read(sector, SECTOR) == pattern * SECTOR


def test_one_process_serves_repeated_blk_specs(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    proc = start_serve("--blk", f"socket={a},ram=4M", "--blk", f"socket={b},disk={image}")
    try:
        wait_for_socket(a, proc)
        wait_for_socket(b, proc)
        guest_roundtrip(str(a), 1, b"A")
        guest_roundtrip(str(b), 2, b"B")
    finally:
        log = stop_serve(proc)
    assert image.read_bytes()[2 * SECTOR : 3 * SECTOR] == b"B" * SECTOR
    assert f"pid={os.getpid()}" in log  # SO_PEERCRED of the frontend
    assert not a.exists() and not b.exists()


def test_client_mode_connects_to_a_listening_frontend_and_reconnects(tmp_path: Path) -> None:
    path = tmp_path / "fe.sock"
    with Listener(str(path)) as listener:
        proc = start_serve("--client", str(path), "--ram-size", "4M")
        try:
            for round_ in range(2):
                ram = GuestRam()
                ram.add_region(0, GUEST_RAM)
                with VhostUserBlk(listener.accept(timeout=10), ram, own_ram=True) as dev:
                    dev.negotiate()
                    dev.send_memory("table")
                    q = dev.start_queue(0, size=16)
                    q.write(round_, b"c" * SECTOR)
                    assert q.read(round_, SECTOR) == b"c" * SECTOR
        finally:
            stop_serve(proc)


def test_socket_mode_and_group_options(tmp_path: Path) -> None:
    path = tmp_path / "g.sock"
    group = grp.getgrgid(os.getgid()).gr_name
    proc = start_serve("--socket", str(path), "--ram-size", "1M", "--socket-mode", "660",
                       "--socket-group", group)
    try:
        wait_for_socket(path, proc)
        st = os.stat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, os.getgid())
    finally:
        stop_serve(proc)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--socket-group", "no-such-group-xyz"], "no-such-group-xyz"),
        (["--socket-mode", "9z"], "--socket-mode"),
        (["--socket-mode", "1777"], "--socket-mode"),
        (["--log-level", "LOUD"], "--log-level"),
    ],
)
def test_bad_socket_options_are_named(tmp_path: Path, argv: list[str], message: str) -> None:
    path = tmp_path / "s.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(path), "--ram-size",
         "1M", *argv],
        cwd=REPO, capture_output=True, timeout=20,
    )
    assert proc.returncode == 2
    assert message in proc.stderr.decode()
    assert not path.exists()


def test_a_live_socket_is_refused_and_its_server_unaffected(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    first = start_serve("--socket", str(path), "--ram-size", "4M")
    try:
        wait_for_socket(path, first)
        second = subprocess.run(
            [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(path),
             "--ram-size", "1M"],
            cwd=REPO, capture_output=True, timeout=20,
        )
        assert second.returncode != 0
        assert b"another process is serving" in second.stderr
        guest_roundtrip(str(path), 0, b"L")
    finally:
        stop_serve(first)


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    proc = start_serve("--socket", str(path), "--ram-size", "4M")
    try:
        wait_for_socket(path, proc)
        guest_roundtrip(str(path), 0, b"S")
    finally:
        stop_serve(proc)


def test_io_mode_option_and_blk_key() -> None:
    (spec,) = specs("--io-mode", "thread")
    assert spec.io_mode == "thread"
    (a,) = specs("--blk", "socket=a.sock,io-mode=thread")
    assert a.io_mode == "thread"
    assert cli.make_device(cli.BlkSpec(ram=1 << 20, io_mode="thread")).io_mode == "thread"
    with pytest.raises(cli.UsageError, match="io-mode='fast'"):
        specs("--io-mode", "fast")
