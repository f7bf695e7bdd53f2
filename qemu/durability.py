"""Write-through across a backend crash: a guest's cache-mode choice must survive a SIGKILL.

A guest sets its vhost-user-blk disk to write-through (``write through`` into virtio_blk's
``/sys/block/vda/cache_type``, which writes the config's ``writeback`` byte: QEMU forwards it as
SET_CONFIG). QEMU 7.2 caches the config it showed the guest and never sends SET_CONFIG (or
GET_CONFIG) to a backend it reconnects to, so the guest keeps writing without flushes after a
backend restart, and only the backend can keep its writes durable: it must fdatasync every write
before acknowledging it, before and after the restart alike.

The guest runs ``init.sh`` mode=durability; each phase is ``vmtest --direct-writes N``, N
O_DIRECT 4 KiB writes issued one at a time, then a sync point named after the phase, where the
host counts the backend's fdatasync calls of the phase with strace attached to the backend
(``strace -f -e trace=fdatasync -p PID``; strace writes each line at the call's exit stop,
before the backend can acknowledge the write, so a count taken when the guest reports is
complete):

1. ``boot-default``: N writes in the write-back mode the guest booted with (no fdatasync per
   write expected: QEMU shows the guest the writeback byte of the backend's first GET_CONFIG);
2. ``writeback``: the guest sets ``write through`` and then ``write back`` (QEMU forwards only
   changes, so the backend now holds write-back from the guest's own SET_CONFIG), N writes: the
   control, no fdatasync per write;
3. ``before-kill``: the guest sets ``write through``, N writes: one fdatasync per write; then
   the host kills the backend with SIGKILL, restarts it on the same socket and image and
   attaches a new strace; QEMU (``reconnect=1``) redials it;
4. ``after-restart``: the guest reads ``write through`` again (QEMU's cached config), N writes:
   one fdatasync per write.

The backend runs as ``python -m vhostmem.cli serve`` with this checkout first on PYTHONPATH, so
a git worktree tests its own vhostmem (``host.backend-code`` names the file that was run).

Library use::

    from qemu.durability import DurabilityConfig, run_durability_test
    result = run_durability_test(config=DurabilityConfig(writes=64))
    assert result.passed, result.report()

Command line: ``python -m qemu.durability [--backend vhostmem|qsd] [--writes 64]
[--trace-vhost-user]`` (the tap prints every vhost-user message of each QEMU connection).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qemu import assets as guest_assets
from qemu.accel import resolve_accel
from qemu.backends import ROOT, Backend, BackendRequest, qsd_backend
from qemu.guestlog import Check, GuestLog
from qemu.launch import (
    SOCKET_WAIT,
    GuestConfig,
    _pump_lines,
    _stop,
    _tail,
    _wait_for_socket,
    qemu_command,
)
from qemu.reconnect import KERNEL_ERROR_MARKERS, START_MARK, WBLOCK, check_writer_image
from qemu.vhost_tap import TapMessage, VhostUserTap

MIB = 1 << 20
STRACE = "strace"
STRACE_ATTACH_WAIT = 10.0
STRACE_EXIT_WAIT = 5.0
POLL = 0.02
# The phases, in the guest's order (init.sh run_durability): phase i writes blocks i*N..i*N+N-1
# and ends at a sync point of the same name; the host kills and restarts the backend at KILL_AT.
BOOT_DEFAULT, WRITEBACK = "boot-default", "writeback"
BEFORE_KILL, AFTER_RESTART = "before-kill", "after-restart"
PHASES = (BOOT_DEFAULT, WRITEBACK, BEFORE_KILL, AFTER_RESTART)
KILL_AT = BEFORE_KILL
ACKED_RE = re.compile(r"direct-writes first=\d+ writes=(\d+) acknowledged=(\d+)")


@dataclass(frozen=True)
class DurabilityConfig:
    writes: int = 64  # O_DIRECT writes per phase
    disk_size: int = 4 * MIB
    memory_mib: int = 512
    reconnect: int = 1  # QEMU's redial period in seconds
    timeout: float = 120.0
    # Relay vhost-user through qemu/vhost_tap.py and keep every message (result.vhost_user).
    trace_vhost_user: bool = False


@dataclass
class DurabilityResult:
    backend: str
    config: DurabilityConfig
    fdatasyncs: dict[str, int] = field(default_factory=dict)  # per phase, counted by strace
    acknowledged: dict[str, int] = field(default_factory=dict)  # per phase, as the guest says
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    serial_log: str = ""
    backend_log: str = ""
    backend_code: str = ""  # the vhostmem package the backend ran (vhostmem backends)
    seconds: float = 0.0
    accel: str = ""
    vhost_user: list[TapMessage] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict == "PASS" and bool(self.checks) and all(
            c.passed for c in self.checks)

    def report(self, with_logs: bool = True) -> str:
        counts = " ".join(f"{p}={self.fdatasyncs.get(p, '-')}/{self.acknowledged.get(p, '-')}"
                          for p in PHASES)
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} backend={self.backend} "
            f"writes/phase={self.config.writes} {self.seconds:.1f} s",
            f"fdatasyncs/acknowledged writes: {counts}",
            f"guest verdict: {self.verdict}",
            f"accel: {self.accel or '-'}",
        ]
        if self.backend_code:
            lines.append(f"backend code: {self.backend_code}")
        if self.error:
            lines.append(f"error: {self.error}")
        lines += [str(c) for c in self.checks]
        if with_logs and not self.passed:
            lines += ["--- serial (tail) ---", *_tail(self.serial_log)]
            lines += ["--- backend (tail) ---", *_tail(self.backend_log)]
        return "\n".join(lines)


def backend_env() -> dict[str, str]:
    """This checkout first on PYTHONPATH: the backend runs its vhostmem, not an installed one."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def vhostmem_module_backend() -> Backend:
    """``python -m vhostmem.cli serve`` on the image, with this interpreter (its venv)."""

    def command(req: BackendRequest) -> list[str]:
        return [sys.executable, "-m", "vhostmem.cli", "serve", "--socket", str(req.socket),
                "--disk", str(req.image()), "--num-queues", str(req.num_queues)]

    return Backend(name="vhostmem", command=command)


def vhostmem_code() -> str:
    """The file ``import vhostmem`` loads with ``backend_env`` (what the backend runs)."""
    out = subprocess.run([sys.executable, "-c", "import vhostmem; print(vhostmem.__file__)"],
                         capture_output=True, text=True, env=backend_env(), cwd=ROOT, check=False)
    return out.stdout.strip() or out.stderr.strip()


def durability_cmdline(config: DurabilityConfig) -> str:
    settings = {"mode": "durability", "size": config.disk_size, "lbs": 512, "queues": 1,
                "ro": 0, "durability_writes": config.writes}
    words = ["console=ttyS0", "quiet", "panic=-1"]
    return " ".join(words + [f"vmtest.{k}={v}" for k, v in settings.items()])


def _traced_by(pid: int, tracer: int) -> bool:
    """Whether every thread of ``pid`` is ptrace-attached by ``tracer``."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
            match = re.search(r"^TracerPid:\s*(\d+)", status, re.M)
            if match is None or int(match[1]) != tracer:
                return False
    except OSError:
        return False
    return bool(tasks)


class _Strace:
    """``strace -f`` attached to a running process, one output line per fdatasync call."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        with out.with_suffix(".err").open("wb") as err:
            self.proc = subprocess.Popen(
                [shutil.which(STRACE) or STRACE, "-f", "-qq", "-e", "trace=fdatasync",
                 "-e", "signal=none", "-o", str(out), "-p", str(pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def wait_attached(self, timeout: float = STRACE_ATTACH_WAIT) -> str | None:
        deadline = time.monotonic() + timeout
        while not _traced_by(self.pid, self.proc.pid):
            if self.proc.poll() is not None:
                err = self.out.with_suffix(".err").read_text(errors="replace").strip()
                return f"strace -p {self.pid} exited with status {self.proc.returncode}: {err}"
            if time.monotonic() > deadline:
                return f"strace did not attach to every thread of {self.pid} in {timeout:.0f} s"
            time.sleep(POLL)
        return None

    def count(self) -> int:
        """Completed fdatasync calls so far (a call split by another thread's line counts once,
        on its ``<... fdatasync resumed>`` line)."""
        try:
            text = self.out.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines()
                   if "fdatasync" in line and re.search(r"= 0$", line.rstrip()))

    def wait_exit(self) -> None:
        """After the tracee died: strace exits by itself (else it is stopped)."""
        try:
            self.proc.wait(STRACE_EXIT_WAIT)
        except subprocess.TimeoutExpired:
            _stop(self.proc)

    def close(self) -> None:
        _stop(self.proc)  # SIGTERM: strace detaches and exits


class _Run:
    """The processes of one durability test; ``close`` ends them whatever happened."""

    def __init__(self, backend: Backend, config: DurabilityConfig, workdir: Path) -> None:
        self.backend, self.config, self.workdir = backend, config, workdir
        self.image, self.socket = workdir / "disk.img", workdir / "blk.sock"
        self.backend_socket = workdir / ("backend.sock" if config.trace_vhost_user
                                         else "blk.sock")
        self.backend_log = workdir / "backend.log"
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.qemu_proc: subprocess.Popen[bytes] | None = None
        self.tap: VhostUserTap | None = None
        self.straces: list[_Strace] = []
        self.log = GuestLog()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.syncs: list[str] = []
        self.counted = 0  # fdatasyncs of the current backend counted into earlier phases

    def start_backend(self) -> str | None:
        """Start the backend, wait for its socket, attach strace to it."""
        request = BackendRequest(self.backend_socket, self.image, False, 1,
                                 size=self.config.disk_size)
        with self.backend_log.open("ab") as out:
            out.write(f"{START_MARK}\n".encode())
            out.flush()
            self.backend_proc = subprocess.Popen(
                self.backend.argv(request), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=backend_env(), cwd=ROOT)
        error = _wait_for_socket(self.backend_socket, self.backend_proc, SOCKET_WAIT)
        if error is not None:
            return error
        strace = _Strace(self.backend_proc.pid, self.workdir / f"strace-{len(self.straces)}.txt")
        self.straces.append(strace)
        return strace.wait_attached()

    def kill_backend(self) -> None:
        assert self.backend_proc is not None
        self.backend_proc.kill()  # SIGKILL: no cleanup, no flush at close
        self.backend_proc.wait()
        self.straces[-1].wait_exit()
        self.backend_socket.unlink(missing_ok=True)  # so that start_backend waits for the new one

    def start_qemu(self, assets: guest_assets.GuestAssets) -> None:
        if self.config.trace_vhost_user:
            self.tap = VhostUserTap(self.socket, self.backend_socket)
        guest = GuestConfig(disk_size=self.config.disk_size, memory_mib=self.config.memory_mib)
        argv = qemu_command(assets, guest, self.socket, durability_cmdline(self.config),
                            reconnect=self.config.reconnect)
        self.qemu_proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        assert self.qemu_proc.stdout is not None
        threading.Thread(target=_pump_lines, args=(self.qemu_proc.stdout, self.lines),
                         daemon=True).start()

    def serve(self, result: DurabilityResult, deadline: float) -> None:
        """Feed serial lines to the log until QEMU exits; do the host's part at each sync."""
        assert self.qemu_proc is not None and self.qemu_proc.stdin is not None
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                result.error = f"timeout: the guest did not finish within {self.config.timeout} s"
                return
            if line is None:
                break
            tag = self.log.feed(line)
            if tag is None:
                continue
            self.syncs.append(tag)
            result.error = self._at_sync(tag, result)
            if result.error is not None:
                return
            self.qemu_proc.stdin.write(f"{tag}\n".encode())
            self.qemu_proc.stdin.flush()
        status = self.qemu_proc.wait()
        if status != 0:
            result.error = f"QEMU exited with status {status}"

    def _at_sync(self, tag: str, result: DurabilityResult) -> str | None:
        if tag not in PHASES or tag in result.fdatasyncs:
            return f"unexpected sync point {tag!r}"
        counted = self.straces[-1].count()
        result.fdatasyncs[tag] = counted - self.counted
        self.counted = counted
        if tag == KILL_AT:
            self.kill_backend()
            self.counted = 0
            return self.start_backend()
        return None

    def close(self) -> None:
        _stop(self.qemu_proc)
        if self.tap is not None:
            self.tap.close()
        for strace in self.straces:
            strace.close()
        _stop(self.backend_proc)
        if self.qemu_proc is not None:
            for stream in (self.qemu_proc.stdin, self.qemu_proc.stdout):
                if stream is not None:
                    stream.close()


def _acknowledged(log: GuestLog) -> dict[str, int]:
    """Acknowledged writes per phase, from the guest's ``direct-writes`` lines (in phase order)."""
    counts = [int(m[2]) for line in log.info if (m := ACKED_RE.search(line))]
    return dict(zip(PHASES, counts, strict=False))


def _host_checks(run: _Run, result: DurabilityResult) -> list[Check]:
    n = run.config.writes
    synced, acked = result.fdatasyncs, result.acknowledged

    def per_write(phase: str, what: str) -> Check:
        done, ack = synced.get(phase), acked.get(phase, 0)
        ok = done is not None and ack == n and done >= ack
        return Check(f"host.fdatasync-per-write-{phase}", ok,
                     f"{done} fdatasyncs for {ack} acknowledged writes of {n} ({what})")

    def not_per_write(phase: str, what: str) -> Check:
        done, ack = synced.get(phase), acked.get(phase, 0)
        ok = done is not None and ack == n and done < ack
        return Check(f"host.no-fdatasync-per-write-{phase}", ok,
                     f"{done} fdatasyncs for {ack} acknowledged writes of {n} ({what})")

    serial = run.log.text
    errors = [m for m in KERNEL_ERROR_MARKERS if m in serial]
    image = run.image.read_bytes()
    written = int(np.frombuffer(image, dtype="<u8").reshape(-1, WBLOCK // 8).any(axis=1).sum())
    checks = [
        Check("host.sync-points", run.syncs == list(PHASES), f"{run.syncs}"),
        not_per_write(BOOT_DEFAULT, "write-back as booted"),
        not_per_write(WRITEBACK, "write-back set by the guest: the control"),
        per_write(BEFORE_KILL, "write-through, first backend"),
        per_write(AFTER_RESTART, "write-through, backend restarted after SIGKILL"),
        Check("host.no-guest-io-errors", not errors,
              f"kernel log mentions {errors}" if errors else "no I/O error in the serial log"),
        check_writer_image(image),
        Check("host.image-written-blocks", written == len(PHASES) * n,
              f"{written} blocks written, expected {len(PHASES) * n}"),
    ]
    if result.backend_code:
        checks.append(Check("host.backend-code", result.backend_code.startswith(f"{ROOT}/"),
                            f"{result.backend_code} (checkout {ROOT})"))
    return checks


def run_durability_test(
    backend: Backend | None = None,
    config: DurabilityConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
) -> DurabilityResult:
    """Boot a guest, set write-through, kill -9 and restart the backend, count fdatasyncs."""
    backend = backend or vhostmem_module_backend()
    config = config or DurabilityConfig()
    assets = assets or guest_assets.prepare()
    result = DurabilityResult(backend=backend.name, config=config)
    accel, why = resolve_accel(GuestConfig().accel, assets)  # what qemu_command will pick
    result.accel = f"{accel} ({why})"
    if backend.name == "vhostmem":
        result.backend_code = vhostmem_code()
    if shutil.which(STRACE) is None:
        result.error = "strace is not installed (qemu/install-deps.sh installs it)"
        return result
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostmem-durability-") as tmp:
        run = _Run(backend, config, Path(tmp))
        with run.image.open("wb") as f:
            f.truncate(config.disk_size)
        try:
            result.error = run.start_backend()  # strace is attached before QEMU starts
            if result.error is None:
                run.start_qemu(assets)
                run.serve(result, started + config.timeout)
        finally:
            run.close()
            result.seconds = time.monotonic() - started
            result.serial_log = run.log.text
            if run.backend_log.exists():
                result.backend_log = run.backend_log.read_text(errors="replace")
            if run.tap is not None:
                result.vhost_user = run.tap.snapshot()
        result.verdict = run.log.verdict
        result.acknowledged = _acknowledged(run.log)
        result.checks = run.log.checks
        if result.error is None:
            result.checks += _host_checks(run, result)
    return result


def _messages_by_connection(messages: list[TapMessage]) -> str:
    lines = []
    for c in sorted({m.connection for m in messages}):
        names = [f"{m.name}{' reply' if m.is_reply else ''}"
                 + ("" if m.ring is None else f"[{m.ring}]")
                 for m in messages if m.connection == c]
        lines.append(f"connection {c}: {', '.join(names)}")
    return "\n".join(lines)


BACKENDS = {"vhostmem": vhostmem_module_backend, "qsd": qsd_backend}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.durability",
                                description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=sorted(BACKENDS), default="vhostmem")
    p.add_argument("--writes", type=int, default=64, help="O_DIRECT writes per phase")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--trace-vhost-user", action="store_true",
                   help="relay vhost-user through a tap and print each connection's messages")
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    args = p.parse_args(argv)
    config = DurabilityConfig(writes=args.writes, timeout=args.timeout,
                              trace_vhost_user=args.trace_vhost_user)
    result = run_durability_test(BACKENDS[args.backend](), config)
    if args.verbose:
        print(result.serial_log)
    if result.vhost_user:
        print(_messages_by_connection(result.vhost_user))
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
