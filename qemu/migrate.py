"""Live migration under disk I/O: a guest moves between QEMU processes on one vhost-user-blk
backend, again and again, while it writes and re-verifies its disk.

One backend process serves the same image on two sockets, A and B (``MigrationBackend``:
qemu-storage-daemon with two writable vhost-user-blk exports of one block node, or ``vhostmem
serve --blk socket=A,disk=IMG --blk socket=B,disk=IMG``). The guest boots under QEMU on socket A
and runs ``vmtest --migrate-io J`` (init.sh mode=migrate): J writer jobs (checksummed O_DIRECT
blocks, read back) and J page-cache jobs (each rewrites a block with O_DIRECT, reads it through
the page cache, and keeps re-reading its whole slice from the page cache, comparing each block
with the last version it wrote). The page-cache copies are data the backend wrote into guest RAM;
a page it wrote during a migration without marking it in the dirty log reaches the destination
stale, and the next sweep on the destination finds it (``VHOSTMEM-INFO cache ... stale``). The
guest boots with ``init_on_alloc=0``: otherwise its kernel zeroes each new page-cache page from
the vCPU just before the backend fills it, QEMU's own dirty tracking sends it again, and a
missing dirty log goes unnoticed.

The host runs a list of steps, each with a fresh destination QEMU (``-incoming defer``, the same
command line, the other socket of the backend; every chardev has ``reconnect=1``) and QMP
``migrate`` over a Unix socket:

- ``migrate``: a full migration (``query-migrate`` polled until ``completed``; its total time,
  downtime and RAM counters are kept), the source QEMU quits, the guest's serial console is
  followed on the destination, and every job must report progress there (each page-cache job two
  whole sweeps of its slice) before the next step;
- ``cancel``: the migration is slowed down (``max-bandwidth``) and ``migrate_cancel`` lands
  halfway through the first pass over RAM; the source must be ``running`` and its jobs progress;
- ``kill-cancel``: slowed down likewise; halfway the backend is SIGKILLed and the migration
  cancelled at once (what the management layer must do with QEMU 7.2, see ``kill``), the backend
  is restarted on both sockets, the source reconnects and must be ``running`` with its jobs
  progressing, and later steps migrate as usual;
- ``kill``: the same without the cancel: QEMU decides, and QEMU 7.2 does not fail the migration.
  With qemu-storage-daemon it completes and the destination has stale page-cache blocks (39 to
  904 per run here), loaded by the old backend seconds before the kill: on the chardev's close
  event vhost-user-blk marks the vhost device stopped before its deferred stop syncs the dirty
  log, and ``vhost_sync_dirty_bitmap`` skips a stopped device, so every bit the dead backend set
  since the last sync is dropped (any backend). A second window: on reconnect
  ``vhost_dev_start`` sends SET_VRING_KICK before SET_LOG_BASE, and a backend that serves the
  ring at its kick (qemu-storage-daemon's libvhost-user does; its ``vu_log_write`` marks nothing
  while it has no log) writes unlogged pages. The step passes if the data checks pass (the
  migration failed with the source running, or completed with no stale page); it is there for a
  backend that works around QEMU's part (e.g. marks every page when it starts with LOG_ALL on).

After every completed migration the destination (started with ``-S``) is held while the host
compares its guest RAM with the stopped source's, page by page, through /proc/PID/mem
(``compare_guest_ram``: any page a migration lost, whoever wrote it), then let run. At the end
the host answers the guest's ``migrate-stop`` sync point on the QEMU that runs it, the jobs do a
last sweep through the page cache and check every block with O_DIRECT, the guest prints its
verdict, and the host checks the image (every written block a whole, valid writer block, as
qemu/reconnect.py's ``check_writer_image``).

The control ``qemu-builtin`` runs the same guest and steps on QEMU's own virtio-blk, without
vhost-user (and, with ``guest_ram="anonymous"``, on private RAM instead of the memfd): QEMU 7.2
under TCG loses guest pages now and then when it migrates fd-backed RAM, whatever the disk, so
the memfd is preallocated (``prealloc_ram``), which makes that rare; docs/qemu.md has the
numbers.

Negative controls (the in-guest check must fail, one ``migrate`` step is enough):
``decoy_log`` (``--decoy-log``) puts a vhost-user relay (``MigrationTap``) between each QEMU and
the backend that hands the backend a fresh memfd instead of QEMU's dirty log at SET_LOG_BASE, so
whatever the backend marks, QEMU never sees it (any backend); ``MigrationBackend.env``
(``--backend-env VHOSTMEM_DEBUG_NO_DIRTY_LOG=1``) runs the backend with extra environment
variables. ``trace_vhost_user`` (``--trace-vhost-user``) relays without a decoy and reports, per
connection, LOG_ALL switches, SET_LOG_BASE, ring kicks, enables and stops, and the last messages.

Library use::

    from qemu.migrate import MigrationConfig, qsd_migration_backend, run_migration_test
    result = run_migration_test(qsd_migration_backend(), MigrationConfig(steps=("migrate",) * 3))
    assert result.passed, result.report()

Command line: ``python -m qemu.migrate [--backend qsd|vhostmem|qemu-builtin | --backend-command
TEMPLATE] [--steps migrate,cancel,kill-cancel,kill] [--decoy-log] [--backend-env K=V]
[--trace-vhost-user] [--guest-ram memfd|anonymous] [--bandwidth MiB/s] [--verbose]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu import assets as guest_assets
from qemu.accel import resolve_accel
from qemu.backends import ROOT
from qemu.guestlog import Check, GuestLog
from qemu.launch import SOCKET_WAIT, GuestConfig, _stop, _tail, qemu_command
from qemu.migrate_oracle import MigrationTap, compare_guest_ram
from qemu.qmp import QMPClient, QMPError
from qemu.reconnect import KERNEL_ERROR_MARKERS, check_writer_image

MIB = 1 << 20
MIGRATE, CANCEL, KILL, KILL_CANCEL = "migrate", "cancel", "kill", "kill-cancel"
STEPS = (MIGRATE, CANCEL, KILL, KILL_CANCEL)
MIGRATE_STOP = "migrate-stop"
DIAG = "diag"  # the guest's answer: requests in flight and blocked tasks (sysrq w)
DIAG_WAIT = 3.0
WRITER_RE = re.compile(r"VHOSTMEM-INFO writer job=(\d+) writes=(\d+)")
CACHE_RE = re.compile(
    r"VHOSTMEM-INFO cache job=(\d+) loads=\d+ sweeps=(\d+) verified=\d+ mismatches=(\d+)")
STALE_MARK = "VHOSTMEM-INFO cache job="
STALE_WORD = " stale "
FINAL_STATES = ("completed", "failed", "cancelled")
POLL = 0.05
QMP_TIMEOUT = 10.0
START_MARK = "=== backend start"
SOCKET_NAMES = ("blk-a.sock", "blk-b.sock")


# ---- backends: one process, one image, two sockets ------------------------------------------

@dataclass(frozen=True)
class MigrationRequest:
    """What the harness asks a migration backend to serve: ``image`` on both ``sockets``."""

    sockets: tuple[Path, Path]
    image: Path
    num_queues: int
    size: int


@dataclass(frozen=True)
class MigrationBackend:
    """A backend process serving one image on two vhost-user-blk sockets at once (the source
    QEMU on one, the destination on the other), and the environment it runs with."""

    name: str
    command: Callable[[MigrationRequest], list[str]]
    env: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    # No backend process: QEMU's own virtio-blk on the image (qemu_builtin_migration_backend).
    builtin: bool = False

    def argv(self, request: MigrationRequest) -> list[str]:
        return self.command(request)

    def with_env(self, env: Mapping[str, str]) -> MigrationBackend:
        return MigrationBackend(self.name, self.command, {**self.env, **env}, self.description,
                                self.builtin)


def _qsd_command(req: MigrationRequest) -> list[str]:
    # Two exports of one node: each export's BlockBackend takes WRITE and shares every
    # permission (block/export/export.c), so both may be writable=on at once; one process
    # holds the image's file locks once. qsd serves each export's socket to one client at a
    # time, which is what a migration needs: source on one socket, destination on the other.
    argv = [
        shutil.which("qemu-storage-daemon") or "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={req.image},discard=unmap",
        "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap",
    ]
    for i, sock in enumerate(req.sockets):
        argv += ["--export", f"type=vhost-user-blk,id=export{i},node-name=disk0,addr.type=unix,"
                             f"addr.path={sock},writable=on,num-queues={req.num_queues}"]
    return argv


def qsd_migration_backend() -> MigrationBackend:
    """qemu-storage-daemon: one process, two writable vhost-user-blk exports of one node."""
    return MigrationBackend("qsd", _qsd_command,
                            description="qemu-storage-daemon, two writable exports of one node")


def backend_pythonpath() -> dict[str, str]:
    """This checkout first on PYTHONPATH: the backend runs its vhostmem, not an installed one."""
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _vhostmem_command(req: MigrationRequest, workers: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "vhostmem.cli", "serve"]
    extra = f",workers={workers}" if workers else ""
    for sock in req.sockets:
        argv += ["--blk", f"socket={sock},disk={req.image},num-queues={req.num_queues}{extra}"]
    return argv


def vhostmem_migration_backend(workers: int = 0) -> MigrationBackend:
    """``vhostmem serve`` with two --blk specs on the same disk file (one disk, two sockets);
    ``workers``: each device's rings in that many data-plane worker processes."""
    return MigrationBackend("vhostmem", functools.partial(_vhostmem_command, workers=workers),
                            backend_pythonpath(),
                            "vhostmem serve, two --blk sockets on one disk file"
                            + (f", workers={workers}" if workers else ""))


def command_migration_backend(name: str, template: str,
                              env: Mapping[str, str] | None = None) -> MigrationBackend:
    """Any command line; ``{socket0}``, ``{socket1}``, ``{disk}``, ``{size}`` and
    ``{num_queues}`` are substituted."""

    def command(req: MigrationRequest) -> list[str]:
        values = {"socket0": str(req.sockets[0]), "socket1": str(req.sockets[1]),
                  "disk": str(req.image), "size": str(req.size),
                  "num_queues": str(req.num_queues)}
        return [word.format(**values) for word in template.split()]

    return MigrationBackend(name, command, dict(env or {}), template)


def qemu_builtin_migration_backend() -> MigrationBackend:
    """The control: no vhost-user at all, QEMU's own virtio-blk-pci on the image (both QEMUs
    open it, ``file.locking=off``). Same guest, workload and checks: a failure here is QEMU's
    (or TCG's), not a backend's. It also allows ``guest_ram="anonymous"``."""
    return MigrationBackend("qemu-builtin", lambda req: [], builtin=True,
                            description="QEMU's built-in virtio-blk, no backend process")


MIGRATION_BACKENDS: dict[str, Callable[[], MigrationBackend]] = {
    "qsd": qsd_migration_backend,
    "vhostmem": vhostmem_migration_backend,
    "qemu-builtin": qemu_builtin_migration_backend,
}
GUEST_RAMS = ("memfd", "anonymous")


# ---- configuration and results ---------------------------------------------------------------

@dataclass(frozen=True)
class MigrationConfig:
    steps: tuple[str, ...] = (MIGRATE, MIGRATE, MIGRATE)
    jobs: int = 2  # writer jobs, and as many page-cache jobs
    disk_size: int = 16 * MIB
    memory_mib: int = 512
    num_queues: int = 1
    smp: int = 1
    max_bandwidth: int = 4 << 30  # bytes/s for a `migrate` step (QEMU 7.2's default: 128 MiB/s)
    slow_bandwidth: int = 16 * MIB  # `cancel` and `kill`: slow enough to land halfway
    halfway: float = 0.5  # cancel / kill once this share of RAM's first pass was sent
    # Or once this many bytes were sent (None: by share). The share jumps while QEMU skips
    # zero pages; a byte count keeps the time left after the action steady.
    act_after_bytes: int | None = None
    downtime_limit_ms: int = 300  # QEMU's default
    reconnect: int = 1  # QEMU's redial period in seconds, on every chardev
    backend_down: float = 0.5  # seconds a killed backend stays dead
    resume_lines: int = 2  # progress lines every writer job must print after a step
    resume_sweeps: int = 2  # sweeps every page-cache job must complete after a step
    resume_timeout: float = 20.0
    migration_timeout: float = 60.0
    timeout: float = 180.0
    decoy_log: bool = False  # negative control: QEMU never sees the backend's dirty log
    # Destinations start paused (-S); after each completed migration the host compares the
    # source's guest RAM with the destination's, page by page, before it lets the guest run.
    compare_ram: bool = True
    # "memfd": memory-backend-memfd,share=on (what vhost-user needs); "anonymous": QEMU's
    # private anonymous RAM, for the qemu-builtin control only.
    guest_ram: str = "memfd"
    # prealloc=on on the memfd: QEMU 7.2 under TCG loses guest pages now and then when it
    # migrates fd-backed RAM (memfd or file; anonymous RAM never did here), more often the
    # longer a migration takes, and reading never-touched memfd pages (each one allocated
    # on the read) makes a migration several times longer. See docs/qemu.md.
    prealloc_ram: bool = True
    # Relay vhost-user through MigrationTap and report each connection's dirty-log messages.
    trace_vhost_user: bool = False


@dataclass
class Migration:
    """One step: what QMP said about the migration, and how long the guest took to resume."""

    step: str
    source: str  # "vm0 on blk-a.sock"
    destination: str
    status: str = ""
    total_ms: int | None = None
    downtime_ms: int | None = None
    setup_ms: int | None = None
    transferred: int = 0
    dirty_syncs: int = 0
    error_desc: str = ""
    host_ms: int = 0  # `migrate` to the final state, as the host saw it
    action_at: float | None = None  # share of RAM's first pass sent at cancel / kill
    source_after: str = ""  # the source's run state after a step that did not switch over
    resumed_s: float | None = None  # step end -> every job progressed (on the running VM)
    mismatches_after: int = 0  # stale blocks the page-cache jobs found after this step
    # compare_ram: guest pages that differ between the stopped source and the destination
    # (None: not compared), and the first few guest-physical addresses.
    ram_diff_pages: int | None = None
    ram_diff_first: list[tuple[int, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.step}: {self.source} -> {self.destination}: {self.status or '-'}"
        text += f" after {self.host_ms} ms"
        if self.total_ms is not None:
            text += f", total {self.total_ms} ms"
        if self.downtime_ms is not None:
            text += f", downtime {self.downtime_ms} ms"
        if self.setup_ms is not None:
            text += f", setup {self.setup_ms} ms"
        text += f", {self.transferred / MIB:.1f} MiB sent, {self.dirty_syncs} dirty syncs"
        if self.action_at is not None:
            text += f", {self.step} at {self.action_at:.0%} of the first pass"
        if self.source_after:
            text += f", source then {self.source_after}"
        if self.resumed_s is not None:
            text += f", jobs resumed in {self.resumed_s:.1f} s"
        if self.ram_diff_pages is not None:
            text += f", RAM {'identical' if not self.ram_diff_pages else 'DIFFERS'}"
            if self.ram_diff_pages:
                text += f" in {self.ram_diff_pages} pages (" + "; ".join(
                    f"gpa {a:#x} source {src} destination {dst}"
                    for a, src, dst in self.ram_diff_first) + ")"
        if self.mismatches_after:
            text += f", then {self.mismatches_after} stale page-cache blocks"
        if self.error_desc:
            text += f" ({self.error_desc})"
        return text


@dataclass
class MigrationResult:
    backend: str
    config: MigrationConfig
    migrations: list[Migration] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    verdict: str | None = None
    error: str | None = None
    serial_log: str = ""
    backend_log: str = ""
    qemu_logs: dict[str, str] = field(default_factory=dict)  # each QEMU's stderr
    backend_argv: list[str] = field(default_factory=list)
    seconds: float = 0.0
    accel: str = ""
    stale_lines: list[str] = field(default_factory=list)
    vhost_user: dict[str, str] = field(default_factory=dict)  # per socket, with a relay

    @property
    def passed(self) -> bool:
        return self.error is None and self.verdict == "PASS" and bool(self.checks) and all(
            c.passed for c in self.checks)

    def completed(self) -> list[Migration]:
        return [m for m in self.migrations if m.status == "completed"]

    def report(self, with_logs: bool = True) -> str:
        c = self.config
        lines = [
            f"{'PASS' if self.passed else 'FAIL'} backend={self.backend} "
            f"steps={','.join(c.steps)} jobs={c.jobs}+{c.jobs} memory={c.memory_mib} MiB"
            f"{' decoy-log' if c.decoy_log else ''} {self.seconds:.1f} s",
            f"guest verdict: {self.verdict}",
            f"accel: {self.accel or '-'}",
        ]
        if self.backend_argv:
            lines.append(f"backend command: {' '.join(self.backend_argv)}")
        if self.error:
            lines.append(f"error: {self.error}")
        lines += [str(m) for m in self.migrations]
        lines += [str(check) for check in self.checks]
        lines += self.stale_lines[:8]
        lines += [f"vhost-user {sock}: {text}" for sock, text in self.vhost_user.items()]
        if with_logs and not self.passed:
            lines += ["--- serial (tail) ---", *_tail(self.serial_log)]
            lines += ["--- backend (tail) ---", *_tail(self.backend_log)]
            for name, text in self.qemu_logs.items():
                if text.strip():
                    lines += [f"--- {name} stderr ---", *_tail(text)]
        return "\n".join(lines)


def migrate_cmdline(config: MigrationConfig) -> str:
    settings = {"mode": "migrate", "size": config.disk_size, "lbs": 512,
                "queues": min(config.num_queues, config.smp), "ro": 0,
                "migrate_jobs": config.jobs}
    # init_on_alloc=0: the Debian kernel zeroes every page it allocates (INIT_ON_ALLOC_DEFAULT_ON),
    # so a page-cache page would be dirtied by the vCPU a moment before the backend fills it
    # and be sent again anyway: QEMU's own dirty tracking would hide a missing dirty log.
    words = ["console=ttyS0", "quiet", "panic=-1", "init_on_alloc=0"]
    return " ".join(words + [f"vmtest.{k}={v}" for k, v in settings.items()])


def _builtin_disk(argv: list[str], image: Path, config: MigrationConfig) -> list[str]:
    """QEMU's own virtio-blk on ``image`` in place of the vhost-user device; with
    ``guest_ram="anonymous"`` also QEMU's private anonymous RAM in place of the memfd."""
    argv = list(argv)
    i = argv.index("-chardev")
    argv[i : i + 4] = [
        "-drive", f"file={image},if=none,id=disk0,format=raw,cache=none,aio=threads,"
                  "file.locking=off",
        "-device", f"virtio-blk-pci,drive=disk0,num-queues={config.num_queues}"]
    if config.guest_ram == "anonymous":
        j = next(k for k, a in enumerate(argv) if a.startswith("memory-backend-memfd"))
        argv[j] = f"memory-backend-ram,id=mem,size={config.memory_mib}M,share=off"
    return argv


# ---- QEMU processes and the serial console that follows the guest ----------------------------

def _pump_chunks(stream: Any, chunks: queue.Queue[bytes | None]) -> None:
    fd = stream.fileno()
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            data = b""
        if not data:
            chunks.put(None)
            return
        chunks.put(data)


class _Vm:
    """One QEMU process: serial on stdin/stdout, QMP on a socket, stderr in a file."""

    def __init__(self, name: str, socket_path: Path, argv: list[str], workdir: Path) -> None:
        self.name, self.socket = name, socket_path
        self.err_path = workdir / f"{name}.err"
        self.chunks: queue.Queue[bytes | None] = queue.Queue()
        self.eof = False
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err)
        threading.Thread(target=_pump_chunks, args=(self.proc.stdout, self.chunks),
                         daemon=True).start()
        self.qmp: QMPClient | None = None
        self.exit_status: int | None = None  # how QEMU ended on its own, if it did

    @property
    def label(self) -> str:
        return f"{self.name} on {self.socket.name}"

    def connect(self, qmp_socket: Path) -> QMPClient:
        self.qmp = QMPClient(qmp_socket, timeout=QMP_TIMEOUT)
        return self.qmp

    def execute(self, command: str, **arguments: Any) -> Any:
        """A QMP command; QMPError naming this QEMU if it fails or QEMU does not answer (its
        main loop blocked, e.g. waiting for a vhost-user reply that never comes)."""
        if self.qmp is None:
            raise QMPError(f"{self.label}: no QMP connection")
        try:
            return self.qmp.execute(command, **arguments)
        except TimeoutError as exc:
            raise QMPError(f"{self.label}: no answer to {command} within {QMP_TIMEOUT:.0f} s "
                           "(QEMU's main loop is blocked)") from exc
        except QMPError as exc:
            raise QMPError(f"{self.label}: {exc}") from exc

    def run_state(self) -> str:
        return str(self.execute("query-status").get("status"))

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def stderr(self) -> str:
        try:
            text = self.err_path.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        if self.exit_status not in (None, 0):
            text += f"[QEMU exited by itself with status {self.exit_status}]\n"
        return text

    def close(self) -> None:
        if self.exit_status is None:
            self.exit_status = self.proc.poll()  # None: still running, we end it
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        _stop(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class _Run:
    """The processes of one migration test; ``close`` ends them whatever happened."""

    def __init__(self, backend: MigrationBackend, config: MigrationConfig, workdir: Path,
                 assets: guest_assets.GuestAssets) -> None:
        self.backend, self.config, self.workdir, self.assets = backend, config, workdir, assets
        self.image = workdir / "disk.img"
        a, b = SOCKET_NAMES
        self.backend_sockets = (workdir / a, workdir / b)
        # With relays (decoy log, trace) QEMU dials the relays and they dial the backend.
        self.relay = config.decoy_log or config.trace_vhost_user
        self.qemu_sockets = ((workdir / f"front-{a}", workdir / f"front-{b}")
                             if self.relay else self.backend_sockets)
        self.backend_log = workdir / "backend.log"
        self.backend_proc: subprocess.Popen[bytes] | None = None
        self.backend_argv: list[str] = []
        self.taps: list[MigrationTap] = []
        self.vms: list[_Vm] = []
        self.vm: _Vm | None = None  # the QEMU the guest runs on
        self.log = GuestLog()
        self.partial = ""  # the console's unfinished line, carried across a switchover
        self.stop_requested = False
        jobs = 2 * config.jobs
        self.lines_since = [0] * jobs  # progress lines since the last mark, per job
        self.sweeps = [0] * jobs  # the page-cache jobs' latest sweep count
        self.sweeps_at_mark = [0] * jobs
        self.mismatches = [0] * jobs  # the page-cache jobs' latest mismatch count
        self.current: Migration | None = None  # the last step, for mismatches found after it
        self.stale: list[str] = []
        self.backend_exit: int | None = None  # the backend's status if it had died by the end

    # -- backend --

    def start_backend(self) -> str | None:
        if self.backend.builtin:
            return None
        request = MigrationRequest(self.backend_sockets, self.image, self.config.num_queues,
                                   self.config.disk_size)
        self.backend_argv = self.backend.argv(request)
        for sock in self.backend_sockets:
            sock.unlink(missing_ok=True)
        with self.backend_log.open("ab") as out:
            out.write(f"{START_MARK}\n".encode())
            out.flush()
            self.backend_proc = subprocess.Popen(
                self.backend_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **self.backend.env}, cwd=ROOT)
        deadline = time.monotonic() + SOCKET_WAIT
        while not all(s.exists() for s in self.backend_sockets):
            if self.backend_proc.poll() is not None:
                return f"backend exited with status {self.backend_proc.returncode} at start"
            if time.monotonic() > deadline:
                return f"backend did not create its sockets within {SOCKET_WAIT:.0f} s"
            time.sleep(0.02)
        return None

    def kill_backend(self) -> None:
        if self.backend.builtin:
            raise RuntimeError("the qemu-builtin control has no backend process to kill")
        assert self.backend_proc is not None
        self.backend_proc.kill()  # SIGKILL: no cleanup of any kind
        self.backend_proc.wait()

    def start_taps(self) -> None:
        if self.relay:
            self.taps = [MigrationTap(front, back, decoy=self.config.decoy_log) for front, back
                         in zip(self.qemu_sockets, self.backend_sockets, strict=True)]

    # -- QEMU --

    def start_vm(self, side: int, incoming: bool) -> _Vm:
        cfg = self.config
        name = f"vm{len(self.vms)}"
        guest = GuestConfig(disk_size=cfg.disk_size, memory_mib=cfg.memory_mib,
                            num_queues=cfg.num_queues, smp=cfg.smp)
        qmp_socket = self.workdir / f"{name}.qmp"
        argv = qemu_command(self.assets, guest, self.qemu_sockets[side], migrate_cmdline(cfg),
                            qmp_socket=qmp_socket, reconnect=cfg.reconnect)
        if cfg.prealloc_ram and cfg.guest_ram == "memfd":
            j = next(k for k, a in enumerate(argv) if a.startswith("memory-backend-memfd"))
            argv[j] += ",prealloc=on"
        if self.backend.builtin:
            argv = _builtin_disk(argv, self.image, cfg)
        if incoming:
            argv += ["-incoming", "defer"] + (["-S"] if cfg.compare_ram else [])
        vm = _Vm(name, self.backend_sockets[side], argv, self.workdir)
        self.vms.append(vm)
        try:
            vm.connect(qmp_socket)
        except QMPError as exc:
            vm.proc.poll()
            raise QMPError(f"{name}: {exc}; QEMU status {vm.proc.returncode}: "
                           f"{vm.stderr().strip()[-500:]}") from exc
        return vm

    def side_of(self, vm: _Vm) -> int:
        return self.backend_sockets.index(vm.socket)

    # -- the console --

    def _feed(self, data: bytes) -> None:
        text = self.partial + data.decode(errors="replace")
        *lines, self.partial = text.split("\n")
        for line in lines:
            self._line(line.rstrip("\r"))

    def _line(self, line: str) -> None:
        if (m := WRITER_RE.search(line)) and int(m[1]) < len(self.lines_since):
            self.lines_since[int(m[1])] += 1
        elif (m := CACHE_RE.search(line)) and int(m[1]) < len(self.lines_since):
            job = int(m[1])
            self.lines_since[job] += 1
            self.sweeps[job] = int(m[2])
            found = int(m[3]) - self.mismatches[job]
            self.mismatches[job] = int(m[3])
            if found and self.current is not None:
                self.current.mismatches_after += found
        elif STALE_MARK in line and STALE_WORD in line:
            self.stale.append(line[line.index("VHOSTMEM-INFO"):])
        if self.log.feed(line) == MIGRATE_STOP:
            self.stop_requested = True

    def drain(self, until: float) -> None:
        """Feeds the current VM's serial output to the log until ``until`` or its EOF."""
        vm = self.vm
        assert vm is not None
        while not vm.eof:
            left = until - time.monotonic()
            try:
                data = vm.chunks.get(timeout=max(0.0, min(left, POLL)))
            except queue.Empty:
                if left <= 0:
                    return
                continue
            if data is None:
                vm.eof = True
                return
            self._feed(data)

    def sleep(self, seconds: float) -> None:
        self.drain(time.monotonic() + seconds)

    def handover(self, destination: _Vm) -> None:
        """The source has stopped for good: read its serial output to the end, then follow the
        destination's (a line the source began, the destination finishes)."""
        source = self.vm
        assert source is not None
        if source.qmp is not None:
            with contextlib.suppress(QMPError, OSError):
                source.execute("quit")
        self.drain(time.monotonic() + QMP_TIMEOUT)
        source.close()
        self.vm = destination
        self.mark()

    def mark(self) -> None:
        self.lines_since = [0] * len(self.lines_since)
        self.sweeps_at_mark = list(self.sweeps)

    def stalled(self) -> list[int]:
        cfg = self.config
        writers = [j for j in range(cfg.jobs) if self.lines_since[j] < cfg.resume_lines]
        caches = [j for j in range(cfg.jobs, 2 * cfg.jobs)
                  if self.sweeps[j] < self.sweeps_at_mark[j] + cfg.resume_sweeps]
        return writers + caches

    def wait_resumed(self, deadline: float) -> list[int]:
        """Waits until every job progressed since the last mark; the jobs that did not."""
        assert self.vm is not None
        while (stalled := self.stalled()) and not self.vm.eof and time.monotonic() < deadline:
            self.sleep(POLL)
        return stalled

    # -- the steps --

    def step(self, kind: str, result: MigrationResult, deadline: float) -> str | None:
        cfg = self.config
        source = self.vm
        assert source is not None and source.qmp is not None
        side = 1 - self.side_of(source)
        destination = self.start_vm(side, incoming=True)
        assert destination.qmp is not None
        uri = f"unix:{self.workdir / f'migrate-{len(result.migrations)}.sock'}"
        record = Migration(kind, source.label, destination.label)
        result.migrations.append(record)
        self.current = record
        destination.execute("migrate-incoming", uri=uri)
        bandwidth = cfg.max_bandwidth if kind == MIGRATE else cfg.slow_bandwidth
        source.execute("migrate-set-parameters", **{
            "max-bandwidth": bandwidth, "downtime-limit": cfg.downtime_limit_ms})
        started = time.monotonic()
        source.execute("migrate", uri=uri)
        info = self._follow(kind, source, record, min(deadline, started + cfg.migration_timeout))
        ended = time.monotonic()
        record.host_ms = round((ended - started) * 1000)
        record.status = str(info.get("status", ""))
        record.total_ms = info.get("total-time")
        record.downtime_ms = info.get("downtime")
        record.setup_ms = info.get("setup-time")
        record.error_desc = str(info.get("error-desc", ""))
        if record.status not in FINAL_STATES:
            return f"{kind}: the migration did not end within {cfg.migration_timeout:.0f} s " \
                   f"(status {record.status!r})"
        if record.status == "completed":
            if cfg.compare_ram:
                error = self._compare_ram(source, destination, record, deadline)
                if error is not None:
                    return f"{kind}: {error}"
            error = self._await_running(destination, deadline)
            if error is not None:
                return f"{kind}: {error}"
            self.handover(destination)
        else:
            destination.close()
            record.source_after = source.run_state()
            self.mark()
        if stalled := self.wait_resumed(min(deadline, time.monotonic() + cfg.resume_timeout)):
            self.diagnose()
            return (f"{kind} ({record.status}): jobs {stalled} made no progress on "
                    f"{self.vm.label if self.vm else '-'} within {cfg.resume_timeout:.0f} s")
        record.resumed_s = time.monotonic() - ended
        return None

    def diagnose(self) -> None:
        """The guest's jobs stalled: have it print the disk's requests in flight and its
        blocked tasks (init.sh answers "diag" at its stop sync point) into the serial log."""
        vm = self.vm
        if vm is None or vm.eof or not self.stop_requested:
            return
        with contextlib.suppress(OSError):
            vm.send(f"{DIAG}\n")
        self.sleep(DIAG_WAIT)

    def _follow(self, kind: str, source: _Vm, record: Migration,
                deadline: float) -> dict[str, Any]:
        """Polls query-migrate until the migration ends; halfway through the first pass over
        RAM, cancels it (cancel), kills the backend (kill), or both (kill-cancel); restarts a
        killed backend ``backend_down`` seconds later. The last query-migrate answer."""
        assert source.qmp is not None
        cfg = self.config
        acted = kind == MIGRATE
        restart_at: float | None = None
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = source.execute("query-migrate")
            status = info.get("status")
            ram = info.get("ram", {})
            # A cancelled migration reports no RAM counters: keep the last ones.
            record.transferred = max(record.transferred, int(ram.get("transferred", 0)))
            record.dirty_syncs = max(record.dirty_syncs, int(ram.get("dirty-sync-count", 0)))
            if not acted and status == "active" and ram.get("total"):
                sent = 1 - ram.get("remaining", 0) / ram["total"]
                if ram.get("dirty-sync-count", 0) > 1:
                    sent = 1.0  # past the first pass
                if (sent >= cfg.halfway if cfg.act_after_bytes is None
                        else int(ram.get("transferred", 0)) >= cfg.act_after_bytes):
                    acted = True
                    record.action_at = sent
                    if kind in (KILL, KILL_CANCEL):
                        self.kill_backend()
                        restart_at = time.monotonic() + cfg.backend_down
                    if kind in (CANCEL, KILL_CANCEL):
                        source.execute("migrate_cancel")
            if restart_at is not None and time.monotonic() >= restart_at:
                restart_at = None
                error = self.start_backend()
                if error is not None:
                    raise RuntimeError(f"restarting the backend: {error}")
            if status in FINAL_STATES and restart_at is None:
                return info
            self.sleep(POLL)
        return info

    def _compare_ram(self, source: _Vm, destination: _Vm, record: Migration,
                     deadline: float) -> str | None:
        """The destination (started with -S) holds after the migration; compare its guest
        RAM with the stopped source's, then let it run."""
        until = min(deadline, time.monotonic() + QMP_TIMEOUT)
        state = destination.run_state()
        while state == "inmigrate" and time.monotonic() < until:
            self.sleep(POLL)
            state = destination.run_state()
        if state == "inmigrate":
            return f"{destination.label} still in migration after the source completed"
        size = self.config.memory_mib * MIB
        try:
            record.ram_diff_pages, record.ram_diff_first = compare_guest_ram(
                source.proc.pid, destination.proc.pid, size)
        except (OSError, LookupError) as exc:
            record.error_desc = f"RAM not compared: {exc}"
        destination.execute("cont")
        return None

    def _await_running(self, vm: _Vm, deadline: float) -> str | None:
        until = min(deadline, time.monotonic() + QMP_TIMEOUT)
        state = ""
        while time.monotonic() < until:
            state = vm.run_state()
            if state == "running":
                return None
            self.sleep(POLL)
        return f"{vm.label} is {state!r}, not running, after the migration"

    def finish(self, result: MigrationResult, deadline: float) -> None:
        """Answers the guest's stop sync point on the VM it runs on; waits for it to power off."""
        vm = self.vm
        assert vm is not None
        while not self.stop_requested and not vm.eof and time.monotonic() < deadline:
            self.sleep(POLL)
        if not self.stop_requested:
            result.error = result.error or "the guest never reached its migrate-stop sync point"
            return
        vm.send(f"{MIGRATE_STOP}\n")
        while not vm.eof and time.monotonic() < deadline:
            self.drain(deadline)
        if not vm.eof:
            result.error = result.error or f"timeout after {self.config.timeout} s"
            return
        status = vm.proc.wait()
        if status != 0:
            result.error = result.error or f"QEMU {vm.label} exited with status {status}"
        if self.backend_proc is not None:
            self.backend_exit = self.backend_proc.poll()

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        for tap in self.taps:
            tap.close()
        _stop(self.backend_proc)


def _host_checks(run: _Run, result: MigrationResult) -> list[Check]:
    cfg = run.config
    serial = run.log.text
    errors = [m for m in KERNEL_ERROR_MARKERS if m in serial]
    names = {c.name for c in run.log.checks}
    expected = [f"writer.job{j}" for j in range(cfg.jobs)]
    expected += [f"cache.job{j}" for j in range(cfg.jobs, 2 * cfg.jobs)]
    missing = [n for n in expected if n not in names]
    checks = [
        Check("host.steps", len(result.migrations) == len(cfg.steps),
              f"{len(result.migrations)} of {len(cfg.steps)} steps run"),
        Check("host.no-guest-io-errors", not errors,
              f"kernel log mentions {errors}" if errors else "no I/O error in the serial log"),
        Check("host.all-jobs-reported", not missing,
              f"missing {missing}" if missing else f"{len(expected)} jobs reported"),
        Check("host.no-stale-page-cache", not run.stale,
              f"{len(run.stale)} stale blocks, first: {run.stale[0]}" if run.stale
              else "no stale block seen through the page cache"),
        check_writer_image(run.image.read_bytes()),
    ]
    if not run.backend.builtin:
        checks.append(Check("host.backend-alive", run.backend_exit is None,
                            "the backend served to the end" if run.backend_exit is None
                            else f"the backend had exited with status {run.backend_exit}"))
    for i, m in enumerate(result.migrations):
        stopped = m.status in ("cancelled", "failed") and m.source_after == "running"
        if m.step == MIGRATE:
            want, ok = "completed", m.status == "completed"
        elif m.step == KILL:  # QEMU decides; the data checks judge either outcome
            want = "failed with the source running, or completed"
            ok = stopped or m.status == "completed"
        else:
            want, ok = "not completed, the source running", stopped
        ok = ok and not m.mismatches_after and not m.ram_diff_pages
        checks.append(Check(f"host.step{i}-{m.step}", ok,
                            f"{m}; expected {want}, identical RAM, no stale block after it"))
    if cfg.decoy_log:
        decoys = sum(t.decoys for t in run.taps)
        checks.append(Check("host.decoy-logs", decoys > 0,
                            f"{decoys} SET_LOG_BASE handed a decoy log"))
    return checks


def run_migration_test(
    backend: MigrationBackend | None = None,
    config: MigrationConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
) -> MigrationResult:
    """Boots a guest doing disk I/O, runs ``config.steps``, checks the guest's and the image's
    data."""
    backend = backend or qsd_migration_backend()
    config = config or MigrationConfig()
    unknown = [s for s in config.steps if s not in STEPS]
    assets = assets or guest_assets.prepare()
    result = MigrationResult(backend=backend.name, config=config)
    if unknown:
        result.error = f"unknown steps {unknown} (known: {', '.join(STEPS)})"
        return result
    if config.guest_ram not in GUEST_RAMS or (config.guest_ram != "memfd"
                                              and not backend.builtin):
        result.error = (f"guest_ram={config.guest_ram!r}: one of {GUEST_RAMS}; vhost-user "
                        "needs memfd (anonymous is for the qemu-builtin control)")
        return result
    accel, why = resolve_accel(GuestConfig().accel, assets)  # what qemu_command will pick
    result.accel = f"{accel} ({why})"
    started = time.monotonic()
    deadline = started + config.timeout
    with tempfile.TemporaryDirectory(prefix="vhostmem-migrate-") as tmp:
        run = _Run(backend, config, Path(tmp), assets)
        with run.image.open("wb") as f:
            f.truncate(config.disk_size)
        try:
            try:
                result.error = run.start_backend()
                if result.error is None:
                    run.start_taps()
                    run.vm = run.start_vm(0, incoming=False)
                    run.mark()
                    if stalled := run.wait_resumed(min(deadline, started + 60.0)):
                        run.diagnose()
                        result.error = f"jobs {stalled} never made progress after boot"
                for kind in config.steps:
                    if result.error is not None:
                        break
                    result.error = run.step(kind, result, deadline)
                if result.error is None:
                    run.finish(result, deadline)
            except (QMPError, OSError, RuntimeError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.close()
            result.seconds = time.monotonic() - started
            result.serial_log = run.log.text + (f"\n{run.partial}" if run.partial else "")
            result.backend_argv = run.backend_argv
            if run.backend_log.exists():
                result.backend_log = run.backend_log.read_text(errors="replace")
            result.qemu_logs = {vm.label: vm.stderr() for vm in run.vms}
            result.stale_lines = list(run.stale)
            result.vhost_user = {t.back.name: t.summary() for t in run.taps}
        result.verdict = run.log.verdict
        result.checks = run.log.checks
        if result.error is None or run.log.verdict is not None:
            result.checks += _host_checks(run, result)
    return result


def _parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--backend-env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _exit_on_sigterm(signum: int, frame: object) -> None:
    del frame
    raise SystemExit(128 + signum)  # unwinds through run_migration_test's cleanup


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    p = argparse.ArgumentParser(prog="python -m qemu.migrate", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=sorted(MIGRATION_BACKENDS), default="qsd")
    p.add_argument("--backend-command", metavar="TEMPLATE",
                   help="any backend: a command line with {socket0} {socket1} {disk} {size} "
                        "{num_queues} (overrides --backend)")
    p.add_argument("--steps", default="migrate,migrate,migrate",
                   help=f"comma-separated, each one of {', '.join(STEPS)} "
                        "(default: migrate,migrate,migrate)")
    p.add_argument("--bandwidth", type=int, default=4096,
                   help="max-bandwidth of a migrate step in MiB/s (default 4096)")
    p.add_argument("--jobs", type=int, default=2, help="writer jobs, and as many page-cache jobs")
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB")
    p.add_argument("--disk-size", type=int, default=16, help="disk size in MiB")
    p.add_argument("--num-queues", type=int, default=1)
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--backend-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the backend, e.g. VHOSTMEM_DEBUG_NO_DIRTY_LOG=1")
    p.add_argument("--decoy-log", action="store_true",
                   help="negative control: hand the backend a decoy dirty log (must FAIL)")
    p.add_argument("--guest-ram", choices=GUEST_RAMS, default="memfd",
                   help="anonymous: QEMU's private RAM (only with --backend qemu-builtin)")
    p.add_argument("--no-prealloc", action="store_true",
                   help="leave the guest's memfd unpopulated (slower migrations, and QEMU "
                        "7.2 under TCG then loses pages more often)")
    p.add_argument("--no-compare-ram", action="store_true",
                   help="let destinations run at once, without comparing guest RAM")
    p.add_argument("--trace-vhost-user", action="store_true",
                   help="relay vhost-user and print each connection's dirty-log messages")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    args = p.parse_args(argv)
    if args.backend_command:
        backend = command_migration_backend("command", args.backend_command)
    else:
        backend = MIGRATION_BACKENDS[args.backend]()
    backend = backend.with_env(_parse_env(args.backend_env))
    config = MigrationConfig(
        steps=tuple(s.strip() for s in args.steps.split(",") if s.strip()), jobs=args.jobs,
        memory_mib=args.memory, disk_size=args.disk_size * MIB, num_queues=args.num_queues,
        smp=args.smp, decoy_log=args.decoy_log, timeout=args.timeout,
        max_bandwidth=args.bandwidth * MIB,
        trace_vhost_user=args.trace_vhost_user, guest_ram=args.guest_ram,
        compare_ram=not args.no_compare_ram, prealloc_ram=not args.no_prealloc)
    result = run_migration_test(backend, config)
    if args.verbose:
        print(result.serial_log)
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
