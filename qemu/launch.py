"""Boots the test guest under QEMU beside a vhost-user-blk backend and judges the result.

Library use::

    from qemu.backends import qsd_backend
    from qemu.launch import GuestConfig, run_guest
    result = run_guest(qsd_backend(), GuestConfig(num_queues=2, smp=2))
    assert result.passed, result.report()

Command line::

    python -m qemu.launch --backend qsd --num-queues 2 --smp 2     # one checked boot
    python -m qemu.launch --interactive --socket ./vhostmem.sock   # a shell on a running backend

Acceleration is TCG: /dev/kvm exists on the development machines but cannot run a guest, and
a cloud kernel boots and runs the checks in a few seconds under TCG anyway.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from qemu import assets as guest_assets
from qemu.backends import BACKEND_FACTORIES, Backend, BackendRequest
from qemu.guestlog import Check, GuestLog
from qemu.hotplug import EXPECTED_HOST_CHECKS, HotplugDriver
from qemu.pattern import DiskLayout, expected_image, first_difference, md5_hex, pattern

MIB = 1 << 20
QEMU = "qemu-system-x86_64"
SOCKET_WAIT = 10.0
TERMINATE_WAIT = 3.0
HOTPLUG_SLOTS, HOTPLUG_MAXMEM = 2, "2G"
HOTPLUG_ROUNDS = 3  # before the plug, with the DIMM, after the unplug
DEFAULT_SOCKET = Path("vhostmem.sock")
LOG_TAIL_LINES = 40

BOOT_CHECKS = ("boot.disk", "boot.sysfs-size", "boot.sysfs-lbs", "boot.sysfs-ro", "boot.queues")
RW_ROUND_CHECKS = ("ioctl-geometry", "pattern-write", "flush", "pattern-read", "last-sector",
                   "discard", "write-zeroes", "flush-final", "read-past-end", "write-past-end")
RO_ROUND_CHECKS = ("ioctl-geometry", "readonly-reject", "pattern-read", "read-past-end")
HOTPLUG_GUEST_CHECKS = ("hotplug-online", "r2.hotplug-buffer", "hotunplug-offline")


@dataclass(frozen=True)
class GuestConfig:
    """One boot: the VM's shape and what the guest program does."""

    disk_size: int = 16 * MIB
    num_queues: int = 1
    smp: int = 1
    readonly: bool = False
    hotplug: bool = False
    rounds: int = 1
    seed: int = 1
    memory_mib: int = 512
    timeout: float = 90.0
    accel: str = "tcg"
    # > 0: instead of the checks, the guest runs `vmtest --bench` (O_DIRECT 4 KiB random reads)
    # for this many seconds in ``bench_jobs`` processes and reports VHOSTMEM-INFO bench lines.
    bench_seconds: int = 0
    bench_jobs: int = 1

    @property
    def round_count(self) -> int:
        return HOTPLUG_ROUNDS if self.hotplug else self.rounds

    def round_seed(self, round_number: int) -> int:
        """Each read-write round writes a fresh pattern (seed + 1 is the last-sector stream)."""
        return self.seed if self.readonly else self.seed + 2 * (round_number - 1)


@dataclass
class GuestResult:
    """The outcome of one boot: guest and host checks, logs, and timings."""

    backend: str
    config: GuestConfig
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    serial_log: str = ""
    backend_log: str = ""
    seconds: float = 0.0
    first_result_seconds: float | None = None

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict == "PASS" and not self.failures and bool(
            self.checks
        )

    def report(self, with_logs: bool = True) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} backend={self.backend} {self.config}"
        lines = [head, f"guest verdict: {self.verdict}; {self.seconds:.1f} s"]
        if self.error:
            lines.append(f"error: {self.error}")
        lines += [str(c) for c in self.checks]
        if with_logs and not self.passed:
            lines += ["--- serial (tail) ---", *_tail(self.serial_log)]
            lines += ["--- backend (tail) ---", *_tail(self.backend_log)]
        return "\n".join(lines)


def _tail(text: str) -> list[str]:
    return text.splitlines()[-LOG_TAIL_LINES:]


def kernel_cmdline(config: GuestConfig, layout: DiskLayout, backend: Backend) -> str:
    settings = {
        "size": layout.size,
        "lbs": layout.block_size,
        "queues": min(config.num_queues, config.smp),
        "ro": int(config.readonly),
        "seed": config.seed,
        "rounds": config.rounds,
        "discard": layout.discard.arg(),
        "discard_zeroes": int(backend.discard_zeroes),
        "zeroout": layout.zeroout.arg(),
        "hotplug": int(config.hotplug),
    }
    if config.bench_seconds:
        settings.update(mode="bench", bench_seconds=config.bench_seconds,
                        bench_jobs=config.bench_jobs)
    words = ["console=ttyS0", "quiet", "panic=-1"]
    if config.hotplug:
        # Movable zone: the DIMM's pages can be migrated away, so the unplug can succeed.
        words.append("memhp_default_state=online_movable")
    return " ".join(words + [f"vmtest.{k}={v}" for k, v in settings.items()])


def qemu_command(
    assets: guest_assets.GuestAssets,
    config: GuestConfig,
    socket: Path,
    append: str,
    *,
    qmp_socket: Path | None = None,
    interactive: bool = False,
    reconnect: int = 0,
) -> list[str]:
    """The QEMU command line: shared memfd RAM (vhost-user needs it) and a vhost-user-blk disk.
    ``reconnect`` > 0: QEMU redials a backend that went away every that many seconds."""
    chardev = f"socket,id=blk0,path={socket}" + (f",reconnect={reconnect}" if reconnect else "")
    memory = f"{config.memory_mib}M"
    if config.hotplug:
        memory += f",slots={HOTPLUG_SLOTS},maxmem={HOTPLUG_MAXMEM}"
    argv = [
        QEMU, "-accel", config.accel, "-machine", "q35,memory-backend=mem",
        "-smp", str(config.smp), "-m", memory,
        "-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on",
        "-chardev", chardev,
        "-device", f"vhost-user-blk-pci,chardev=blk0,num-queues={config.num_queues}",
        "-kernel", str(assets.kernel), "-initrd", str(assets.initrd), "-append", append,
        "-nographic", "-no-reboot", "-nodefaults",
        # mon:stdio lets an interactive user leave with Ctrl-A X.
        "-serial", "mon:stdio" if interactive else "stdio",
    ]
    if qmp_socket is not None:
        argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    return argv


def expected_check_names(config: GuestConfig) -> list[str]:
    per_round = RO_ROUND_CHECKS if config.readonly else RW_ROUND_CHECKS
    names = list(BOOT_CHECKS)
    for r in range(1, config.round_count + 1):
        names += [f"r{r}.{name}" for name in per_round]
    if config.hotplug:
        names += [*HOTPLUG_GUEST_CHECKS, *EXPECTED_HOST_CHECKS]
    return names


def _make_image(path: Path, config: GuestConfig, layout: DiskLayout) -> None:
    with path.open("wb") as f:
        if config.readonly:
            f.write(pattern(config.seed, layout.size))
        else:
            f.truncate(layout.size)


def _image_model(config: GuestConfig, layout: DiskLayout, backend: Backend, round_number: int,
                 actual: bytes) -> bytes:
    if config.readonly:
        return pattern(config.seed, layout.size)
    seed = config.round_seed(round_number)
    model = expected_image(layout, seed, discard_zeroes=backend.discard_zeroes)
    if not backend.discard_zeroes:  # unspecified contents: take them from the real image
        r = layout.discard
        model[r.offset : r.offset + r.length] = actual[r.offset : r.offset + r.length]
    return bytes(model)


def _host_checks(log: GuestLog, reported: list[Check], config: GuestConfig, layout: DiskLayout,
                 backend: Backend, image: Path) -> list[Check]:
    actual = image.read_bytes()
    final = config.round_count
    model = _image_model(config, layout, backend, final, actual)
    diff = first_difference(actual, model)
    checks = [Check("host.image", diff is None,
                    "image matches the guest's writes" if diff is None
                    else f"first difference at byte {diff}")]
    for r in range(1, final + 1):
        # Digests of earlier rounds are predictable only if discarded ranges read as zeroes.
        if r != final and not backend.discard_zeroes:
            continue
        want = md5_hex(model if r == final else _image_model(config, layout, backend, r, actual))
        got = log.digests.get(f"r{r}")
        checks.append(Check(f"host.r{r}.md5", got == want, f"guest={got} host={want}"))
    seen = {c.name for c in reported}
    missing = [n for n in expected_check_names(config) if n not in seen]
    checks.append(Check("host.all-checks-reported", not missing, f"missing: {missing}"
                        if missing else f"{len(seen)} checks"))
    return checks


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(TERMINATE_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pump_lines(stream: IO[bytes], lines: queue.Queue[str | None]) -> None:
    for raw in stream:
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            return f"backend exited with status {proc.returncode} before creating {path}"
        if time.monotonic() > deadline:
            return f"backend did not create {path} within {timeout:.0f} s"
        time.sleep(0.02)
    return None


class _Session:
    """Runs the processes of one boot; ``close`` ends them whatever happened."""

    def __init__(self, backend: Backend, config: GuestConfig, workdir: Path) -> None:
        self.backend, self.config, self.workdir = backend, config, workdir
        self.layout = DiskLayout.for_size(config.disk_size, backend.block_size)
        self.image, self.socket = workdir / "disk.img", workdir / "blk.sock"
        self.qmp_socket, self.backend_log = workdir / "qmp.sock", workdir / "backend.log"
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.qemu_proc: subprocess.Popen[bytes] | None = None
        self.hotplug: HotplugDriver | None = None
        self.log = GuestLog()

    def start_backend(self) -> str | None:
        _make_image(self.image, self.config, self.layout)
        request = BackendRequest(self.socket, self.image, self.config.readonly,
                                 self.config.num_queues)
        with self.backend_log.open("wb") as out:
            self.backend_proc = subprocess.Popen(
                self.backend.argv(request), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        return _wait_for_socket(self.socket, self.backend_proc, SOCKET_WAIT)

    def start_qemu(self, assets: guest_assets.GuestAssets) -> None:
        append = kernel_cmdline(self.config, self.layout, self.backend)
        argv = qemu_command(assets, self.config, self.socket, append, qmp_socket=self.qmp_socket)
        self.qemu_proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT)
        assert self.backend_proc is not None
        self.hotplug = HotplugDriver(self.qmp_socket, self.backend, self.backend_proc.pid,
                                     self.backend_log)

    def run(self, result: GuestResult, started: float) -> None:
        """Feeds serial lines to the log until QEMU exits; answers the guest's sync points."""
        assert self.qemu_proc is not None and self.qemu_proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(self.qemu_proc.stdout, lines),
                         daemon=True).start()
        deadline = started + self.config.timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                result.error = f"timeout: the guest did not finish within {self.config.timeout} s"
                return
            if line is None:
                break
            tag = self.log.feed(line)
            if result.first_result_seconds is None and self.log.checks:
                result.first_result_seconds = time.monotonic() - started
            if tag is not None:
                self._answer(tag, result)
        status = self.qemu_proc.wait()
        if status != 0:
            result.error = f"QEMU exited with status {status}"

    def _answer(self, tag: str, result: GuestResult) -> None:
        assert self.hotplug is not None and self.qemu_proc is not None
        result.checks += self.hotplug.handle(tag)
        if self.qemu_proc.stdin is not None:
            self.qemu_proc.stdin.write(f"{tag}\n".encode())
            self.qemu_proc.stdin.flush()

    def close(self) -> None:
        if self.hotplug is not None:
            self.hotplug.close()
        _stop(self.qemu_proc)
        _stop(self.backend_proc)
        for proc in (self.qemu_proc,):
            if proc is not None and proc.stdin is not None:
                proc.stdin.close()
            if proc is not None and proc.stdout is not None:
                proc.stdout.close()


def run_guest(
    backend: Backend,
    config: GuestConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
) -> GuestResult:
    """Boots one guest beside ``backend`` and returns every guest and host check."""
    config = config or GuestConfig()
    assets = assets or guest_assets.prepare()
    result = GuestResult(backend=backend.name, config=config)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostmem-vm-") as tmp:
        session = _Session(backend, config, Path(tmp))
        try:
            result.error = session.start_backend()
            if result.error is None:
                session.start_qemu(assets)
                session.run(result, started)
        finally:
            session.close()
            result.seconds = time.monotonic() - started
            result.serial_log = session.log.text
            if session.backend_log.exists():
                result.backend_log = session.backend_log.read_text(errors="replace")
        result.checks = session.log.checks + result.checks
        result.verdict = session.log.verdict
        if result.error is None and not config.bench_seconds:  # a bench writes no pattern
            result.checks += _host_checks(session.log, result.checks, config, session.layout,
                                          backend, session.image)
    return result


def interactive(socket: Path, config: GuestConfig) -> int:
    """Boots a guest with a shell on an already running backend; returns QEMU's status."""
    if not socket.exists():
        print(f"no backend socket at {socket}: start one first (make run)", file=sys.stderr)
        return 1
    assets = guest_assets.prepare()
    append = "console=ttyS0 quiet panic=-1 vmtest.mode=shell"
    argv = qemu_command(assets, config, socket.resolve(), append, interactive=True)
    print("booting; leave with Ctrl-A X or by exiting the guest shell", file=sys.stderr)
    return subprocess.call(argv)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qemu.launch", description=__doc__.split("\n")[0])
    p.add_argument("--interactive", action="store_true",
                   help="boot a shell guest on the backend at --socket instead of the checks")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET,
                   help="backend socket for --interactive (default: ./vhostmem.sock)")
    p.add_argument("--backend", choices=sorted(BACKEND_FACTORIES), default="qsd",
                   help="backend to start for a checked boot (default: qsd)")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    p.add_argument("--disk-size", type=int, default=16, help="test disk size in MiB")
    p.add_argument("--readonly", action="store_true")
    p.add_argument("--hotplug", action="store_true", help="plug and unplug a DIMM mid-test")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    return p.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)  # unwinds through run_guest's cleanup


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = _parse_args(argv)
    config = GuestConfig(
        disk_size=args.disk_size * MIB, num_queues=args.num_queues, smp=args.smp,
        readonly=args.readonly, hotplug=args.hotplug, rounds=args.rounds, seed=args.seed,
        memory_mib=args.memory, timeout=args.timeout)
    if args.interactive:
        return interactive(args.socket, config)
    result = run_guest(BACKEND_FACTORIES[args.backend](), config)
    if args.verbose:
        print(result.serial_log)
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
