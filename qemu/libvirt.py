"""Boots the test guest under a real libvirtd, on a ``<disk type='vhostuser'>`` vhostmem serves.

The domain is ``contrib/libvirt/vhostmem-disk.xml`` with the test's values filled in (name,
kernel, initramfs, command line, socket, serial log): what an operator copies is what runs here.

Library use::

    from qemu.libvirt import run_libvirt_guest, start_libvirtd
    with start_libvirtd() as daemon:
        result = run_libvirt_guest(daemon)
        assert result.passed, result.report()

Command line::

    python -m qemu.libvirt            # start a private libvirtd, one checked boot, PASS/FAIL

The daemon is private: ``libvirtd`` runs as root (the system driver, ``qemu:///system``) in a
mount namespace of its own (``unshare --mount --propagation private``) where a temp dir is
bind-mounted over each directory it uses (``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/log/libvirt``) and the project's cache over
``/var/cache/libvirt``. A root libvirtd reads its paths from nowhere but those compiled-in
directories, so the namespace is what keeps it off the host's own libvirt: its configuration,
autostarted networks and domains, sockets and state. It needs no systemd, dbus, virtlogd or
cgroups (disabled in its qemu.conf), and a system libvirtd running beside it is not touched.
Clients reach it through its socket, which lies in the temp dir
(``qemu+unix:///system?socket=<dir>/run/libvirt-sock``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from qemu import assets as guest_assets
from qemu.backends import (
    FILE,
    ROOT,
    VHOSTMEM_BIN,
    Backend,
    BackendRequest,
    vhostmem_backend,
)
from qemu.guestlog import Check, GuestLog
from qemu.hostchecks import host_checks, is_ram_backed, make_image, storage_check
from qemu.launch import DISK_DIR_FALLBACK, SOCKET_WAIT, GuestConfig, GuestResult, kernel_cmdline
from qemu.pattern import DiskLayout

TEMPLATE = ROOT / "contrib" / "libvirt" / "vhostmem-disk.xml"
# Debian's path: /usr/sbin is not on every PATH (qemu/install-deps.sh checks the same file).
LIBVIRTD = Path("/usr/sbin/libvirtd")
VIRSH, VALIDATOR = "virsh", "virt-xml-validate"
# libvirt's capability cache (QEMU probed once, ~8 s here) outlives a test run: libvirt itself
# throws an entry away when the QEMU binary or libvirtd changes.
CAPS_CACHE = guest_assets.CACHE_DIR / "libvirt-cache"
# The directories a root libvirtd uses, each replaced by one of ours inside its namespace.
PRIVATE_DIRS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
                ("log", "/var/log/libvirt"))
CACHE_MOUNT = "/var/cache/libvirt"
DAEMON_START = 90.0  # the first start probes QEMU's capabilities (~8 s here, slower under load)
DAEMON_STOP = 10.0
VIRSH_TIMEOUT = 60.0
POLL = 0.2
LOG_TAIL_LINES = 40
DOMAIN_NAME = "vhostmem-test"
SHUTDOWN_STATE = "shut off (shutdown)"  # the guest powered itself off
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FRONTEND_CONNECTED = re.compile(r"frontend connected \(pid=(\d+) ")

# libvirtd.conf: only root may use the sockets, and without polkit (no dbus here).
LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

# qemu.conf for a test daemon, not for production (README "### libvirt" says what a host needs):
# QEMU runs as root so it can open the root-owned 0600 vhostmem socket, the kernel and the
# serial log without relabelling (no DAC chown, no AppArmor/SELinux); no cgroups (they would
# create machine slices on the host), no per-VM /dev namespace, and QEMU's stdout and file
# chardevs written directly instead of through virtlogd (which is not running).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

# Run inside the new mount namespace: bind our directories over libvirt's, then become libvirtd
# (exec: the pid we started is libvirtd's). Mount points missing on the host are created empty.
NAMESPACE_SCRIPT = """\
set -e
while [ $# -gt 0 ]; do
    mkdir -p "$2"
    mount --bind "$1" "$2"
    shift 2
done
exec "$LIBVIRTD" -f /etc/libvirt/libvirtd.conf
"""


class LibvirtError(RuntimeError):
    """libvirtd or virsh failed; the message has the command, its output and the daemon's log."""


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class LibvirtDaemon:
    """A private libvirtd started by ``start_libvirtd``; ``stop`` ends it."""

    root: Path
    proc: subprocess.Popen[bytes]
    temporary: bool = True  # remove ``root`` on stop

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log_file(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    def qemu_log(self, domain: str) -> Path:
        """QEMU's command line and stderr, written by libvirtd."""
        return self.root / "log" / "qemu" / f"{domain}.log"

    def qemu_pid_file(self, domain: str) -> Path:
        return self.root / "run" / "qemu" / f"{domain}.pid"

    def diagnostics(self) -> str:
        out = self.root / "libvirtd.out"
        parts = [f"libvirtd pid {self.proc.pid}, status {self.proc.poll()}"]
        for path in (out, self.log_file):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{_tail(path.read_text(errors='replace'))}")
        return "\n".join(parts)

    def virsh(self, *args: str, check: bool = True,
              timeout: float = VIRSH_TIMEOUT) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise LibvirtError(f"virsh {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}\n{self.diagnostics()}")
        return proc

    def qemu_pids(self) -> list[int]:
        """The QEMUs this daemon runs, from its pid files (there while a domain runs or
        starts)."""
        pids = []
        for pid_file in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pid_file.read_text().strip()))
        return pids

    def stop(self) -> None:
        """Destroys the domains still running (libvirtd leaves them running when it exits),
        SIGTERM, SIGKILL if it does not exit, and SIGKILL to any QEMU of its still alive (one
        stuck starting); the namespace and its mounts go with the last of these processes."""
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung daemon: kill it below
                listed = self.virsh("list", "--name", check=False, timeout=DAEMON_STOP)
                for name in listed.stdout.split():
                    self.virsh("destroy", name, check=False, timeout=DAEMON_STOP)
        leftovers = self.qemu_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_STOP)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in leftovers:
            kill_qemu(pid)
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LibvirtDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def kill_qemu(pid: int, domain: str = "") -> None:
    """SIGKILL to ``pid`` if it still is a QEMU (of ``domain``): a pid file can outlive its
    process, and the number may belong to another process by now."""
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"qemu-system" in cmdline and f"guest={domain}".encode() in cmdline:
            os.kill(pid, signal.SIGKILL)


def missing_tools() -> list[str]:
    """Commands the libvirt harness needs that are not installed (qemu/install-deps.sh adds
    them); ``unshare`` and ``mount`` come with util-linux and mount."""
    missing = [t for t in (VIRSH, VALIDATOR, "xmllint", "unshare", "mount")
               if shutil.which(t) is None]
    return missing if os.access(LIBVIRTD, os.X_OK) else [str(LIBVIRTD), *missing]


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the thread that started it exits (so start the
    daemon from a thread that lives as long as it should). The setting survives exec, and
    unshare, sh and libvirtd run as root throughout, so nothing resets it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def start_libvirtd(root: Path | None = None, timeout: float = DAEMON_START) -> LibvirtDaemon:
    """Starts a private libvirtd (see the module docstring) and waits until it answers."""
    if os.geteuid() != 0:
        raise LibvirtError("a private system libvirtd needs root (a mount namespace and "
                           "libvirt's root-only directories)")
    missing = missing_tools()
    if missing:
        raise LibvirtError(f"not installed: {', '.join(missing)} (run qemu/install-deps.sh)")
    temporary = root is None
    root = Path(tempfile.mkdtemp(prefix="vhostmem-libvirt-")) if root is None else root
    mounts: list[str] = []
    for name, target in PRIVATE_DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)
        mounts += [str(root / name), target]
    CAPS_CACHE.mkdir(parents=True, exist_ok=True)
    mounts += [str(CAPS_CACHE), CACHE_MOUNT]
    (root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    with (root / "libvirtd.out").open("wb") as out:
        # A session of its own: a Ctrl-C meant for the test does not reach the daemon first;
        # and SIGTERM when the test process dies, so a killed run leaves no daemon behind.
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", NAMESPACE_SCRIPT, "sh", *mounts],
            env={**os.environ, "LIBVIRTD": str(LIBVIRTD)},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_terminate_with_parent)
    daemon = LibvirtDaemon(root, proc, temporary)
    try:
        _wait_until_ready(daemon, timeout)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def _wait_until_ready(daemon: LibvirtDaemon, timeout: float) -> None:
    """The socket appears before the QEMU driver has probed QEMU; ``virsh version`` answers
    (with the hypervisor's version) only once the driver is up."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if daemon.proc.poll() is not None:
            raise LibvirtError(f"libvirtd exited with status {daemon.proc.returncode}\n"
                               f"{daemon.diagnostics()}")
        if daemon.socket.exists():
            proc = daemon.virsh("version", check=False, timeout=max(1.0, timeout))
            if proc.returncode == 0 and "Running hypervisor: QEMU" in proc.stdout:
                return
            last = (proc.stderr or proc.stdout).strip()
        if time.monotonic() > deadline:
            raise LibvirtError(f"libvirtd did not answer within {timeout:.0f} s "
                               f"(last: {last or 'no socket'})\n{daemon.diagnostics()}")
        time.sleep(POLL)


# ---- the domain ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainValues:
    """What the test puts into the template."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    socket: Path
    serial_log: Path
    memory_mib: int = 512
    vcpus: int = 1
    num_queues: int = 1


def _find(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    if element is None:
        raise ValueError(f"{TEMPLATE.name}: no <{path}> (the test fills it in)")
    return element


def render_domain(values: DomainValues, template: Path = TEMPLATE) -> str:
    """The template with ``values`` filled in, as XML text."""
    root = ET.parse(template).getroot()
    _find(root, "name").text = values.name
    memory = _find(root, "memory")
    memory.set("unit", "MiB")
    memory.text = str(values.memory_mib)
    _find(root, "vcpu").text = str(values.vcpus)
    _find(root, "os/kernel").text = str(values.kernel)
    _find(root, "os/initrd").text = str(values.initrd)
    _find(root, "os/cmdline").text = values.cmdline
    disk = _find(root, "devices/disk[@type='vhostuser']")
    _find(disk, "driver").set("queues", str(values.num_queues))
    _find(disk, "source").set("path", str(values.socket))
    for chardev in ("serial", "console"):
        _find(root, f"devices/{chardev}[@type='file']/source").set("path",
                                                                   str(values.serial_log))
    return ET.tostring(root, encoding="unicode")


def validate_domain_xml(path: Path) -> tuple[bool, str]:
    """``virt-xml-validate`` against libvirt's domain schema: (valid, its output)."""
    proc = subprocess.run([VALIDATOR, str(path), "domain"], capture_output=True, text=True,
                          check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


# ---- one boot --------------------------------------------------------------------------------


@dataclass
class _Boot:
    """The processes and files of one libvirt boot; ``close`` ends them whatever happened."""

    daemon: LibvirtDaemon
    workdir: Path
    name: str
    backend_proc: subprocess.Popen[bytes] | None = None
    defined: bool = False
    qemu_pid: int | None = None
    checks: list[Check] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "blk.sock"

    @property
    def backend_log(self) -> Path:
        return self.workdir / "backend.log"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def start_backend(self, backend: Backend, image: Path, config: GuestConfig,
                      layout: DiskLayout) -> list[str]:
        argv = backend.argv(BackendRequest(self.socket, image, False, config.num_queues,
                                           size=layout.size))
        with self.backend_log.open("wb") as out:
            self.backend_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + SOCKET_WAIT
        while not self.socket.exists():
            if self.backend_proc.poll() is not None:
                raise LibvirtError(f"{argv[0]} exited with status {self.backend_proc.returncode}"
                                   f": {_tail(self.backend_log.read_text(errors='replace'))}")
            if time.monotonic() > deadline:
                raise LibvirtError(f"{argv[0]} did not create {self.socket}")
            time.sleep(0.02)
        return argv

    def start_domain(self, xml_path: Path) -> None:
        self.daemon.virsh("define", str(xml_path))
        self.defined = True
        try:
            self.daemon.virsh("start", self.name)
        finally:  # also after a start that failed or hung: close() must find the QEMU
            with contextlib.suppress(OSError, ValueError):
                pid_file = self.daemon.qemu_pid_file(self.name)
                self.qemu_pid = int(pid_file.read_text().strip())

    def state(self) -> str:
        return self.daemon.virsh("domstate", "--reason", self.name).stdout.strip()

    def wait_for_shutoff(self, deadline: float) -> str | None:
        """The final state, or None on timeout."""
        while time.monotonic() < deadline:
            state = self.state()
            if state.startswith("shut off"):
                return state
            time.sleep(POLL)
        return None

    def close(self) -> None:
        if self.defined and self.daemon.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):  # the kill below still runs
                self.daemon.virsh("destroy", self.name, check=False)
                self.daemon.virsh("undefine", self.name, check=False)
        # A QEMU that libvirtd could not stop (the daemon died) must not outlive the test.
        if self.qemu_pid is not None:
            kill_qemu(self.qemu_pid, self.name)
        proc = self.backend_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _qemu_command_line_check(log_text: str, socket: Path) -> Check:
    """libvirt turned <disk type='vhostuser'> and <memoryBacking> into what vhost-user needs:
    a vhost-user-blk-pci device on a chardev to our socket, and guest RAM in a shared memfd."""
    wanted = {
        "vhost-user-blk-pci": '"driver":"vhost-user-blk-pci"' in log_text,
        "chardev-on-socket": f"path={socket}" in log_text,
        "memfd-shared": '"qom-type":"memory-backend-memfd"' in log_text
                        and '"share":true' in log_text,
    }
    missing = [k for k, ok in wanted.items() if not ok]
    return Check("host.libvirt-qemu-command-line", not missing,
                 f"missing: {missing}" if missing else ", ".join(wanted))


def _frontend_check(backend_log: str, qemu_pid: int | None) -> Check:
    """vhostmem logged a frontend whose pid (SO_PEERCRED) is the QEMU libvirtd started."""
    pids = [int(m.group(1)) for m in FRONTEND_CONNECTED.finditer(backend_log)]
    ok = qemu_pid is not None and bool(pids) and all(p == qemu_pid for p in pids)
    return Check("host.vhostmem-frontend-is-libvirt-qemu", ok,
                 f"vhostmem saw frontend pids {pids}; libvirt's QEMU pid {qemu_pid}")


def run_libvirt_guest(
    daemon: LibvirtDaemon,
    config: GuestConfig | None = None,
    *,
    assets: guest_assets.GuestAssets | None = None,
    backend: Backend | None = None,
    name: str = DOMAIN_NAME,
) -> GuestResult:
    """Boots the test guest as a libvirt domain on ``daemon``, its disk served by ``vhostmem
    serve`` on a file image; returns the guest's checks and the host's."""
    config = config or GuestConfig()
    if config.readonly or config.hotplug or config.bench_seconds or config.storage != FILE:
        raise ValueError("the libvirt boot runs the read-write checks on an image file only")
    assets = assets or guest_assets.prepare()
    backend = backend or vhostmem_backend(VHOSTMEM_BIN)
    result = GuestResult(backend=f"{backend.name} via libvirt", config=config, accel="tcg",
                         accel_reason="libvirt <domain type='qemu'>")
    layout = DiskLayout.for_size(config.disk_size, backend.block_size)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostmem-libvirt-vm-") as tmp:
        workdir = Path(tmp)
        # O_DIRECT in the guest reaches the image: keep it on a disk file system.
        image_dir = (Path(tempfile.mkdtemp(prefix="vhostmem-vm-", dir=DISK_DIR_FALLBACK))
                     if is_ram_backed(workdir) else workdir)
        image = image_dir / "disk.img"
        boot = _Boot(daemon, workdir, name)
        log = GuestLog()
        try:
            make_image(image, config, layout)
            boot.checks.append(storage_check(image, config.storage))
            result.backend_argv = boot.start_backend(backend, image, config, layout)
            values = DomainValues(name=name, kernel=assets.kernel, initrd=assets.initrd,
                                  cmdline=kernel_cmdline(config, layout, backend),
                                  socket=boot.socket, serial_log=boot.serial_log,
                                  memory_mib=config.memory_mib, vcpus=config.smp,
                                  num_queues=config.num_queues)
            xml_path = workdir / "domain.xml"
            xml_path.write_text(render_domain(values))
            valid, output = validate_domain_xml(xml_path)
            boot.checks.append(Check("host.domain-xml-valid", valid, output))
            boot.start_domain(xml_path)
            state = boot.wait_for_shutoff(started + config.timeout)
            if state is None:
                result.error = f"timeout: the domain did not shut off within {config.timeout} s"
            else:
                boot.checks.append(Check("host.libvirt-domain-state", state == SHUTDOWN_STATE,
                                         f"{state!r}; want {SHUTDOWN_STATE!r}"))
        except (LibvirtError, OSError, subprocess.TimeoutExpired) as e:
            result.error = str(e)
        finally:
            boot.close()
            result.seconds = time.monotonic() - started
            if boot.serial_log.exists():
                for line in boot.serial_log.read_text(errors="replace").splitlines():
                    log.feed(line.rstrip("\r"))
            if boot.backend_log.exists():
                result.backend_log = boot.backend_log.read_text(errors="replace")
            qemu_log = daemon.qemu_log(name)
            qemu_text = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
        result.serial_log = log.text
        result.verdict = log.verdict
        result.checks = log.checks + boot.checks
        if boot.qemu_pid is not None or result.error is None:
            result.checks += [_qemu_command_line_check(qemu_text, boot.socket),
                              _frontend_check(result.backend_log, boot.qemu_pid)]
        if result.error is None:
            result.checks += host_checks(log, result.checks, config, layout, backend, image,
                                         result.not_applicable)
        elif qemu_text:
            result.error += f"\n--- QEMU log (tail) ---\n{_tail(qemu_text)}"
        if image_dir != workdir:
            shutil.rmtree(image_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qemu.libvirt", description=__doc__.split("\n")[0])
    p.add_argument("--timeout", type=float, default=90.0)
    p.add_argument("--verbose", action="store_true", help="print the serial log too")
    args = p.parse_args(argv)
    started = time.monotonic()
    with start_libvirtd() as daemon:
        print(f"libvirtd ready in {time.monotonic() - started:.1f} s at {daemon.uri}")
        result = run_libvirt_guest(daemon, GuestConfig(timeout=args.timeout))
    if args.verbose:
        print(result.serial_log)
    print(result.report())
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
