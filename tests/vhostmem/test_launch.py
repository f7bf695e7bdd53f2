"""Launch conventions (vhost-user.rst "Backend program conventions") and systemd socket
activation, each by starting real processes with real inherited fds, a real NOTIFY_SOCKET and a
fake-guest frontend doing I/O through the socket."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vhostmem.activation import (
    REPO,
    NotifyListener,
    listening_socket,
    spawn_activated,
)
from tests.vhostmem.test_cli import wait_for_socket
from vhostmem.frontend import BlkType, VhostUserBlk
from vhostmem.launch import LaunchError, systemd_sockets

SECTOR = 512
SERVE = [sys.executable, "-m", "vhostmem.cli", "serve"]
BLK = [sys.executable, "-m", "vhostmem.launch"]
CONTRIB = REPO / "contrib" / "systemd"
EXPECTED_CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}
TIMEOUT = 10.0


def roundtrip(path: Path | str, sector: int, pattern: bytes) -> None:
    with VhostUserBlk.open(str(path), ram_size=8 << 20) as dev:
        q = dev.start_queue(0, size=16)
        q.write(sector, pattern * SECTOR)
        assert q.read(sector, SECTOR) == pattern * SECTOR


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, a clean exit asserted; the log (stderr)."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    return err.decode()


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, timeout=20, **kw)  # type: ignore[call-overload]


# ------------------------------------------------------------------ --print-capabilities


@pytest.mark.parametrize(
    "argv",
    [
        [*BLK, "--print-capabilities"],
        # "Other options and arguments should be ignored", even ones that would not parse.
        [*BLK, "--fd", "not-a-number", "--print-capabilities", "--no-such-option"],
        [*SERVE, "--print-capabilities", "--blk", "colour=red"],
        [str(REPO / ".venv" / "bin" / "vhostmem-blk"), "--print-capabilities"],
    ],
    ids=["module", "ignores-other-args", "serve", "console-script"],
)
def test_print_capabilities_prints_the_block_json_and_exits_0(argv: list[str]) -> None:
    proc = run(argv)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == EXPECTED_CAPABILITIES


# ------------------------------------------------------------------------------- --fd


def test_vhostmem_blk_serves_an_inherited_fd_and_leaves_its_file(tmp_path: Path) -> None:
    """--fd=FDNUM with --blk-file and --read-only: the guest reads the image, writes fail,
    and at SIGTERM the socket file (not ours) is left in place."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"R" * SECTOR + bytes((1 << 20) - SECTOR))
    listener = listening_socket(tmp_path / "blk.sock")
    proc = subprocess.Popen(
        [*BLK, f"--fd={listener.fileno()}", f"--blk-file={image}", "--read-only"],
        cwd=REPO, pass_fds=[listener.fileno()], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    listener.close()  # the child's copy is the only one now
    try:
        with VhostUserBlk.open(str(tmp_path / "blk.sock"), ram_size=8 << 20) as dev:
            q = dev.start_queue(0, size=16)
            assert q.read(0, SECTOR) == b"R" * SECTOR
            status, _ = q.run(BlkType.OUT, 1, data=b"w" * SECTOR)
            assert status != 0, "a write to a --read-only disk succeeded"
    finally:
        log = stop(proc)
    assert "inherited fd" in log
    assert (tmp_path / "blk.sock").exists(), "the inherited socket's file was removed"
    assert image.read_bytes()[SECTOR : 2 * SECTOR] == bytes(SECTOR)


def test_serve_blk_fd_key_and_fd_option(tmp_path: Path) -> None:
    a, b = listening_socket(tmp_path / "a.sock"), listening_socket(tmp_path / "b.sock")
    proc = subprocess.Popen(
        [*SERVE, "--blk", f"fd={a.fileno()},ram=4M", "--blk", f"fd={b.fileno()},ram=4M"],
        cwd=REPO, pass_fds=[a.fileno(), b.fileno()], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    a.close()
    b.close()
    try:
        roundtrip(tmp_path / "a.sock", 1, b"a")
        roundtrip(tmp_path / "b.sock", 2, b"b")
    finally:
        stop(proc)
    single = listening_socket(tmp_path / "c.sock")
    proc = subprocess.Popen([*SERVE, "--fd", str(single.fileno()), "--ram-size", "4M"],
                            cwd=REPO, pass_fds=[single.fileno()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    single.close()
    try:
        roundtrip(tmp_path / "c.sock", 3, b"c")
    finally:
        stop(proc)


def hostile_fd(kind: str, tmp_path: Path) -> tuple[int | None, list[object]]:
    """An fd that is not a listening Unix stream socket (None: a closed number)."""
    if kind == "closed":
        return None, []
    if kind == "file":
        f = open(tmp_path / "plain", "w")  # noqa: SIM115 (kept open for the child)
        return f.fileno(), [f]
    if kind == "pipe":
        r, w = os.pipe()
        return r, [r, w]
    if kind == "datagram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / "dgram"))
        return s.fileno(), [s]
    if kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s.fileno(), [s]
    assert kind == "not-listening"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "bound-only"))
    return s.fileno(), [s]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("closed", "not an open file descriptor"),
        ("file", "not a socket"),
        ("pipe", "not a socket"),
        ("datagram", "SOCK_DGRAM socket, not SOCK_STREAM"),
        ("tcp", "AF_INET socket, not AF_UNIX"),
        ("not-listening", "not listening"),
    ],
)
@pytest.mark.parametrize("program", ["vhostmem-blk", "serve"])
def test_a_bad_fd_is_refused_naming_the_option(tmp_path: Path, kind: str, message: str,
                                               program: str) -> None:
    fd, keep = hostile_fd(kind, tmp_path)
    number = 97 if fd is None else fd
    argv = [*BLK, f"--fd={number}"] if program == "vhostmem-blk" else \
        [*SERVE, "--fd", str(number)]
    try:
        proc = run(argv, pass_fds=[] if fd is None else [fd])
    finally:
        for item in keep:
            os.close(item) if isinstance(item, int) else item.close()  # type: ignore[attr-defined]
    assert proc.returncode == 2, proc.stderr.decode()
    err = proc.stderr.decode()
    assert f"--fd {number}" in err and message in err, err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*BLK, "--fd=abc"], "--fd 'abc': expected a file descriptor number"),
        ([*BLK, "--fd=-1"], "--fd '-1'"),
        ([*BLK, "--fd=3", "--socket-path=x.sock"], "not allowed with argument"),
        ([*BLK, "--blk-file=x.img"], "give --socket-path=PATH or --fd=FDNUM"),
        ([*BLK, "--socket-path=x.sock", "--blk-file=a", "--ram-size=1M"], "not allowed with"),
        ([*SERVE, "--fd", "3", "--socket", "x.sock"], "not allowed with argument"),
        ([*SERVE, "--blk", "fd=3,socket=x.sock"], "not socket and fd"),
        ([*SERVE, "--blk", "fd=x"], "fd= 'x'"),
        ([*SERVE, "--blk", "fd=3", "--fd", "4"], "cannot be combined with --fd"),
        ([*BLK, "--socket-path=x.sock", "--log-level=LOUD"], "--log-level 'LOUD'"),
    ],
)
def test_hostile_launch_options_are_named(tmp_path: Path, argv: list[str],
                                          message: str) -> None:
    proc = run(argv)
    assert proc.returncode == 2
    assert message in proc.stderr.decode(), proc.stderr.decode()
    assert not (REPO / "x.sock").exists()


def test_socket_path_and_a_missing_blk_file(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = run([*BLK, f"--socket-path={sock}", f"--blk-file={tmp_path / 'missing.img'}"])
    assert proc.returncode == 1  # vhost-user.rst: fail early, status != 0, reason on stderr
    assert "missing.img" in proc.stderr.decode()
    assert not sock.exists()


def test_log_file_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "no-such-dir" / "x.log"
    proc = run([*SERVE, "--socket", str(tmp_path / "s.sock"), "--log-file", str(bad)])
    assert proc.returncode == 1
    assert f"--log-file {bad}" in proc.stderr.decode()


# ------------------------------------------------------------------ systemd activation


@pytest.mark.parametrize("abstract", [False, True], ids=["notify-path", "notify-abstract"])
def test_socket_activation_with_sd_notify(tmp_path: Path, abstract: bool) -> None:
    """LISTEN_FDS=1 at fd 3 and LISTEN_PID = the child's pid: `vhostmem serve` with no socket
    option serves fd 3; NOTIFY_SOCKET gets READY=1 once it serves, STOPPING=1 at SIGTERM;
    the socket file belongs to the socket unit and stays."""
    path = tmp_path / "vm1.sock"
    sock = listening_socket(path)
    with NotifyListener(None if abstract else tmp_path / "notify") as notify:
        proc = spawn_activated([*SERVE, "--ram-size", "4M"], [sock], notify=notify.address)
        sock.close()
        try:
            ready = notify.wait_for("READY=1")
            assert not any("STOPPING=1" in m for m in ready)
            roundtrip(path, 5, b"s")
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=TIMEOUT)
        lines = "\n".join(notify.wait_for("STOPPING=1")).split("\n")
    assert proc.returncode == 0, err.decode()
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert any(line.startswith("STATUS=serving 1 device") for line in lines)
    assert "listening on" in err.decode() and "inherited fd 3" in err.decode()
    assert path.exists()


def test_listen_fdnames_and_socket_paths_pick_the_devices(tmp_path: Path) -> None:
    """Three systemd sockets: one named for fdname=, one bound to the path a socket= spec
    gives, one taken by the spec naming no socket; each device serves its own disk."""
    images = {n: tmp_path / f"{n}.img" for n in ("a", "b", "c")}
    for img in images.values():
        img.write_bytes(bytes(1 << 20))
    socks = [listening_socket(tmp_path / f"{n}.sock") for n in ("x", "y", "z")]
    proc = spawn_activated(
        [*SERVE, "--blk", f"fdname=second,disk={images['a']}",
         "--blk", f"socket={tmp_path / 'z.sock'},disk={images['b']}",
         "--blk", f"disk={images['c']}"],
        socks, names=["first", "second", "third"])
    for s in socks:
        s.close()
    try:
        roundtrip(tmp_path / "y.sock", 1, b"A")
        roundtrip(tmp_path / "z.sock", 2, b"B")
        roundtrip(tmp_path / "x.sock", 3, b"C")
    finally:
        stop(proc)
    assert images["a"].read_bytes()[SECTOR : 2 * SECTOR] == b"A" * SECTOR
    assert images["b"].read_bytes()[2 * SECTOR : 3 * SECTOR] == b"B" * SECTOR
    assert images["c"].read_bytes()[3 * SECTOR : 4 * SECTOR] == b"C" * SECTOR


@pytest.mark.parametrize(
    ("argv", "names", "message"),
    [
        (["--blk", "fdname=nope,ram=1M"], ["vm1"], "fdname=nope: no such socket"),
        (["--blk", "socket=/tmp/elsewhere.sock,ram=1M"], ["vm1"],
         "1 socket(s) (fd 3 (vm1)) for 0 device(s)"),
    ],
)
def test_unmatched_systemd_sockets_refuse_to_start(tmp_path: Path, argv: list[str],
                                                   names: list[str], message: str) -> None:
    sock = listening_socket(tmp_path / "vm1.sock")
    proc = spawn_activated([*SERVE, *argv], [sock], names=names)
    sock.close()
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 2
    assert message in err.decode(), err.decode()
    assert not Path("/tmp/elsewhere.sock").exists()


def test_listen_fds_for_another_pid_is_ignored(tmp_path: Path) -> None:
    """LISTEN_PID names someone else (the variables leaked from a parent): fd 3 is not taken,
    the process binds its own socket."""
    sock = listening_socket(tmp_path / "systemd.sock")
    own = tmp_path / "own.sock"
    proc = spawn_activated([*SERVE, "--socket", str(own), "--ram-size", "4M"], [sock],
                           listen_pid="1")
    sock.close()
    try:
        wait_for_socket(own, proc)
        roundtrip(own, 0, b"o")
    finally:
        log = stop(proc)
    assert "not this one" in log
    assert "inherited fd" not in log


# ---------------------------------------------------------------------- the unit files


def unit_exec_start(unit: Path) -> list[str]:
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    return line.removeprefix("ExecStart=").split()


def test_the_units_exec_start_runs_as_systemd_would_start_it(tmp_path: Path) -> None:
    """vhostmem@.service's ExecStart, instance "vm1" (%i), with the fd vhostmem@.socket
    creates (FileDescriptorName=%i) and a NOTIFY_SOCKET: it becomes ready (Type=notify) and
    serves the image the unit names (moved into a temporary directory)."""
    service = (CONTRIB / "vhostmem@.service")
    socket_unit = (CONTRIB / "vhostmem@.socket").read_text()
    assert "Type=notify" in service.read_text()
    listen = re.search(r"^ListenStream=(.*)$", socket_unit, re.M).group(1)  # type: ignore[union-attr]
    fdname = re.search(r"^FileDescriptorName=(.*)$", socket_unit, re.M).group(1)  # type: ignore[union-attr]
    assert (listen, fdname) == ("/run/vhostmem/%i.sock", "%i")
    image = tmp_path / "vm1.img"
    image.write_bytes(bytes(1 << 20))
    argv = [w.replace("%i", "vm1").replace("/var/lib/vhostmem", str(tmp_path))
            for w in unit_exec_start(service)]
    assert argv[:2] == ["/usr/local/bin/vhostmem", "serve"]
    argv[0] = str(REPO / ".venv" / "bin" / "vhostmem")
    path = tmp_path / "vm1.sock"
    sock = listening_socket(path)
    with NotifyListener(tmp_path / "notify") as notify:
        proc = spawn_activated(argv, [sock], names=["vm1"], notify=notify.address)
        sock.close()
        try:
            notify.wait_for("READY=1")
            roundtrip(path, 7, b"u")
        finally:
            stop(proc)
        notify.wait_for("STOPPING=1")
    assert image.read_bytes()[7 * SECTOR : 8 * SECTOR] == b"u" * SECTOR


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """Instances of both templates (verify needs an instance name; ExecStart points at this
    checkout's vhostmem, as verify checks that the program exists) verify without a warning."""
    for name in ("vhostmem@.service", "vhostmem@.socket"):
        text = (CONTRIB / name).read_text().replace(
            "/usr/local/bin/vhostmem", str(REPO / ".venv" / "bin" / "vhostmem"))
        (tmp_path / name.replace("@.", "@vm1.")).write_text(text)
    proc = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "vhostmem@vm1.socket"),
                str(tmp_path / "vhostmem@vm1.service")])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr.decode().strip() == "", proc.stderr.decode()
    # The check is real: a broken directive is reported.
    broken = (tmp_path / "vhostmem@vm1.service")
    broken.write_text(broken.read_text().replace("Type=notify", "Type=notifyy"))
    proc = run(["systemd-analyze", "verify", "--man=no", str(broken)])
    assert "notifyy" in proc.stderr.decode()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS='two'"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b:c"}, "LISTEN_FDNAMES has 3 names"),
    ],
)
def test_a_malformed_systemd_environment_is_named(env: dict[str, str], message: str) -> None:
    environ = {**env, "LISTEN_PID": str(os.getpid())}
    with pytest.raises(LaunchError, match=re.escape(message)):
        systemd_sockets(environ)
    assert "LISTEN_FDS" not in environ and "LISTEN_PID" not in environ  # unset once read


def test_an_unreachable_notify_socket_does_not_stop_the_service(tmp_path: Path) -> None:
    """NOTIFY_SOCKET names a path nobody listens on: READY=1 cannot be sent, which is logged,
    and the device serves anyway."""
    path = tmp_path / "vm1.sock"
    sock = listening_socket(path)
    proc = spawn_activated([*SERVE, "--ram-size", "4M"], [sock],
                           notify=str(tmp_path / "nobody"))
    sock.close()
    try:
        roundtrip(path, 0, b"n")
    finally:
        log = stop(proc)
    assert "sd_notify ('READY=1'" in log and "failed" in log


def test_activation_wrapper_then_vhostmem_blk_without_a_socket_option(tmp_path: Path) -> None:
    """The one-command socket unit of tests/vhostmem/activation.py (the QEMU test's backend):
    the socket exists before vhostmem-blk runs, which takes it from LISTEN_FDS with neither
    --socket-path nor --fd, and a frontend that connected early is served."""
    path = tmp_path / "early.sock"
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "vhostmem" / "activation.py"), "--listen",
         str(path), "--name", "disk0", "--", *BLK, f"--blk-file={image}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_socket(path, proc)
        roundtrip(path, 9, b"e")
    finally:
        log = stop(proc)
    assert "(inherited fd 3)" in log
    assert image.read_bytes()[9 * SECTOR : 10 * SECTOR] == b"e" * SECTOR
    assert path.exists()  # the wrapper (the socket unit) owns the file
