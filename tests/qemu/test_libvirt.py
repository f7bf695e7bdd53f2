"""vhostmem under libvirt (issue 12, item 5): a real libvirtd, started here in a private mount
namespace (qemu/libvirt.py), runs a TCG domain whose disk is ``<disk type='vhostuser'>`` on a
``vhostmem serve`` process; the domain is contrib/libvirt/vhostmem-disk.xml, which
virt-xml-validate checks against libvirt's schema."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemu.assets import GuestAssets
from qemu.backends import ROOT, VHOSTMEM_BIN
from qemu.launch import GuestConfig
from qemu.libvirt import (
    LIBVIRTD,
    TEMPLATE,
    DomainValues,
    LibvirtDaemon,
    render_domain,
    run_libvirt_guest,
    start_libvirtd,
    validate_domain_xml,
)

pytestmark = pytest.mark.qemu

INSTALL_DEPS = ROOT / "qemu" / "install-deps.sh"
BOOT_TIMEOUT = 90.0
QEMU_USER = "libvirt-qemu"  # the user Debian's libvirt runs QEMU as (libvirt-daemon-system)
CONNECT_WAIT = 10.0
# Host checks the boot must make and pass: those only a libvirt boot makes, and the image's.
LIBVIRT_CHECKS = ("host.domain-xml-valid", "host.libvirt-domain-state",
                  "host.libvirt-qemu-command-line", "host.vhostmem-frontend-is-libvirt-qemu",
                  "host.image", "host.r1.md5", "host.all-checks-reported")


def _values(tmp_path: Path, name: str = "vhostmem-xml") -> DomainValues:
    return DomainValues(name=name, kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd",
                        cmdline="console=ttyS0 vmtest.mode=probe", socket=tmp_path / "blk.sock",
                        serial_log=tmp_path / "serial.log", memory_mib=256, vcpus=2,
                        num_queues=2)


def test_libvirt_domain_template_validates() -> None:
    valid, output = validate_domain_xml(TEMPLATE)
    assert valid, output
    root = ET.parse(TEMPLATE).getroot()
    assert root.get("type") == "qemu"  # TCG: runs where KVM does not
    # vhost-user needs guest RAM the backend can map.
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    disk = root.find("devices/disk[@type='vhostuser']")
    assert disk is not None and disk.get("device") == "disk"
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw", "queues": "1"}
    assert disk.find("source").get("type") == "unix"


def test_libvirt_rendered_domain_validates_and_carries_the_values(tmp_path: Path) -> None:
    values = _values(tmp_path)
    path = tmp_path / "domain.xml"
    path.write_text(render_domain(values))
    valid, output = validate_domain_xml(path)
    assert valid, output
    root = ET.parse(path).getroot()
    assert root.findtext("name") == values.name
    assert root.findtext("memory") == "256" and root.findtext("vcpu") == "2"
    assert root.findtext("os/kernel") == str(values.kernel)
    assert root.findtext("os/cmdline") == values.cmdline
    disk = root.find("devices/disk[@type='vhostuser']")
    assert disk.find("source").get("path") == str(values.socket)
    assert disk.find("driver").get("queues") == "2"
    assert {root.find(f"devices/{c}/source").get("path") for c in ("serial", "console")} == {
        str(values.serial_log)}


def test_libvirt_schema_check_rejects_a_broken_vhostuser_disk(tmp_path: Path) -> None:
    """The control: virt-xml-validate does check the disk (a vhostuser source needs a path)."""
    root = ET.fromstring(render_domain(_values(tmp_path)))
    del root.find("devices/disk[@type='vhostuser']/source").attrib["path"]
    path = tmp_path / "broken.xml"
    path.write_text(ET.tostring(root, encoding="unicode"))
    valid, output = validate_domain_xml(path)
    assert not valid, output
    assert "fails to validate" in output


@pytest.mark.parametrize(("libvirtd", "wanted"), [(str(LIBVIRTD), False),
                                                  ("/nonexistent/libvirtd", True)])
def test_libvirt_install_deps_wants_the_daemon_when_missing(libvirtd: str, wanted: bool) -> None:
    """install-deps installs libvirt-daemon when there is no libvirtd, not when there is one
    (this suite needs it installed)."""
    out = subprocess.run(["bash", str(INSTALL_DEPS), "--dry-run"], capture_output=True,
                         text=True, check=True, env={**os.environ, "LIBVIRTD": libvirtd}).stdout
    assert ("libvirt-daemon" in out.split()) == wanted, out


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[LibvirtDaemon]:
    """One private libvirtd for this module (not a system service: see qemu/libvirt.py)."""
    with start_libvirtd() as daemon:
        yield daemon


@pytest.mark.slow
def test_libvirt_boots_guest_on_vhostmem_disk(libvirtd: LibvirtDaemon,
                                              guest_assets: GuestAssets) -> None:
    result = run_libvirt_guest(libvirtd, GuestConfig(timeout=BOOT_TIMEOUT), assets=guest_assets)
    report = result.report()
    print(report)
    assert result.passed, report
    checks = {c.name: c for c in result.checks}
    for name in LIBVIRT_CHECKS:
        assert name in checks and checks[name].passed, f"{name}\n{report}"
    # The guest wrote and read back its whole disk, on vhostmem's socket, through libvirt.
    assert checks["r1.pattern-read"].passed and checks["queues-used"].passed, report
    assert "frontend disconnected" in result.backend_log, result.backend_log


@pytest.mark.slow
def test_libvirt_refuses_vhostuser_disk_without_shared_memory(libvirtd: LibvirtDaemon,
                                                              tmp_path: Path) -> None:
    """Why the template has <memoryBacking>: libvirt itself refuses the domain without it (the
    daemon is real: this is its own validation, before any QEMU starts)."""
    root = ET.fromstring(render_domain(_values(tmp_path, name="vhostmem-no-shared-memory")))
    root.remove(root.find("memoryBacking"))
    path = tmp_path / "no-shared-memory.xml"
    path.write_text(ET.tostring(root, encoding="unicode"))
    assert validate_domain_xml(path)[0]  # the schema alone has nothing against it
    proc = libvirtd.virsh("create", str(path), check=False)
    assert proc.returncode != 0, proc.stdout
    assert "'vhostuser' requires shared memory" in proc.stderr, proc.stderr
    assert "vhostmem-no-shared-memory" not in libvirtd.virsh("list", "--all", "--name").stdout


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory QEMU's user may search (connect() needs search permission on every directory
    above the socket; pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="vhostmem-qemu-user-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("socket_options", [[], ["--socket-group", QEMU_USER,
                                                 "--socket-mode", "660"]],
                         ids=["default-0600", "group-660"])
def test_libvirt_qemu_user_reaches_the_socket_only_with_group_access(
        shared_dir: Path, socket_options: list[str]) -> None:
    """What README "### libvirt" tells a production host: QEMU running as libvirt-qemu (not
    root, as in the test daemon) cannot connect to vhostmem's default 0600 socket, and can with
    --socket-group libvirt-qemu --socket-mode 660. QEMU is started as that user directly (the
    way libvirt's DAC driver starts it), stopped before it runs the guest (-S)."""
    user = pwd.getpwnam(QEMU_USER)
    image, socket, log = shared_dir / "disk.img", shared_dir / "blk.sock", shared_dir / "log"
    image.write_bytes(bytes(1 << 20))
    with log.open("wb") as out:
        backend = subprocess.Popen([str(VHOSTMEM_BIN), "serve", "--socket", str(socket),
                                    "--disk", str(image), *socket_options],
                                   stdout=out, stderr=subprocess.STDOUT)
    qemu = None
    try:
        deadline = time.monotonic() + CONNECT_WAIT
        while not socket.exists():
            assert backend.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        qemu = subprocess.Popen(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
             "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35,memory-backend=mem",
             "-m", "128M", "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
             "-chardev", f"socket,id=blk0,path={socket}",
             "-device", "vhost-user-blk-pci,chardev=blk0", "-S", "-display", "none",
             "-nodefaults", "-monitor", "none", "-serial", "none"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        connected = f"uid={user.pw_uid} "
        while connected not in log.read_text() and qemu.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        if socket_options:
            assert qemu.poll() is None, qemu.communicate()[0]
            assert f"frontend connected (pid={qemu.pid} {connected}" in log.read_text()
        else:
            output = qemu.communicate(timeout=CONNECT_WAIT)[0]
            assert qemu.returncode != 0
            assert f"Failed to connect to '{socket}': Permission denied" in output, output
            assert "frontend connected" not in log.read_text()
    finally:
        for proc in (qemu, backend):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(5)
