"""The command line: option parsing, device specs and their errors, and a real serve process."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vhostmem import cli

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
        (["--blk", "socket=a.sock", "--disk", "x.img"], "cannot be combined"),
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
