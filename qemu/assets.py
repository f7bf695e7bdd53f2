"""Guest assets: a Debian kernel, busybox, the vmtest program and the initramfs that holds them.

Everything lands in ``qemu/cache/`` (or ``$VHOSTMEM_QEMU_CACHE``). The first call downloads the
kernel package with ``apt-get download`` and unpacks it with ``dpkg -x``; later calls touch only
the cache, so the harness runs offline once warmed. Every artefact is written to a temporary
name and renamed into place, so an interrupted build never leaves a half-written file behind.

Run ``python -m qemu.assets`` to warm the cache and print the paths.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("VHOSTMEM_QEMU_CACHE", HERE / "cache"))
GUEST_DIR = HERE / "guest"
INIT_SCRIPT = GUEST_DIR / "init.sh"
VMTEST_SOURCE = GUEST_DIR / "vmtest.c"
BUSYBOX = Path("/bin/busybox")

# The cloud flavour is LZ4-compressed and small: it boots in a few seconds under TCG.
KERNEL_METAPACKAGES = ("linux-image-cloud-amd64", "linux-image-amd64")
# virtio-blk and its dependencies are modules in Debian's kernel; insmod order matters.
GUEST_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
)
KERNEL_STAMP = "kernel.json"

# cpio "newc" format constants.
CPIO_MAGIC = b"070701"
CPIO_TRAILER = "TRAILER!!!"
CPIO_ALIGN = 4
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
GZIP_LEVEL = 1  # the initramfs is rebuilt rarely but decompressed on every boot: keep it cheap

# ELF64 program-header fields used to prove busybox is static (no PT_INTERP segment).
ELF_MAGIC = b"\x7fELF"
ELF_PHOFF_AT, ELF_PHENTSIZE_AT, ELF_PHNUM_AT = 0x20, 0x36, 0x38
PT_INTERP = 3


class AssetError(RuntimeError):
    """A guest asset could not be fetched or built; the message says which and why."""


@dataclass(frozen=True)
class GuestAssets:
    kernel: Path
    initrd: Path
    kernel_release: str


def _run(argv: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssetError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


# ---- kernel ----------------------------------------------------------------------------------


def _cached_kernel() -> tuple[Path, dict[str, str]] | None:
    stamps = sorted(CACHE_DIR.glob(f"kernel-*/{KERNEL_STAMP}"))
    for stamp in reversed(stamps):
        info = json.loads(stamp.read_text())
        folder = stamp.parent
        if (folder / "vmlinuz").is_file() and all(
            (folder / f"{m}.ko").is_file() for m in GUEST_MODULES
        ):
            return folder, info
    return None


def _resolve_kernel_package() -> str:
    """The versioned kernel package a metapackage depends on (apt-get update if unknown)."""
    for attempt in range(2):
        for meta in KERNEL_METAPACKAGES:
            proc = subprocess.run(
                ["apt-cache", "depends", meta], capture_output=True, text=True, check=False
            )
            match = re.search(r"Depends: (linux-image-\S+)", proc.stdout)
            if match:
                return match.group(1)
        if attempt == 0:  # a fresh machine may have no package lists yet
            sudo = [] if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo"]
            _run([*sudo, "apt-get", "update", "-qq"])
    raise AssetError(f"none of {KERNEL_METAPACKAGES} is known to apt")


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed on the host: busybox insmod takes only plain .ko files."""
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return _run_bytes(["zstd", "-dc", str(path)])
    return data


def _run_bytes(argv: list[str]) -> bytes:
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        raise AssetError(f"{' '.join(argv)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def _find_module(tree: Path, name: str) -> Path:
    for suffix in (".ko", ".ko.xz", ".ko.zst"):
        found = sorted(tree.rglob(f"{name}{suffix}"))
        if found:
            return found[0]
    raise AssetError(f"kernel module {name} not found under {tree}")


def fetch_kernel() -> tuple[Path, str]:
    """A folder with ``vmlinuz`` and the plain ``.ko`` guest modules, plus the kernel release."""
    cached = _cached_kernel()
    if cached:
        return cached[0], cached[1]["release"]
    package = _resolve_kernel_package()
    with tempfile.TemporaryDirectory(prefix="vhostmem-kernel-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise AssetError(f"apt-get download {package} produced no .deb")
        _run(["dpkg", "-x", str(debs[0]), str(work / "root")])
        vmlinuz = sorted((work / "root/boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise AssetError(f"{debs[0].name} holds no /boot/vmlinuz-*")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        folder = CACHE_DIR / f"kernel-{release}"
        modules = work / "root/lib/modules" / release
        for name in GUEST_MODULES:
            _atomic_write(folder / f"{name}.ko", _read_module(_find_module(modules, name)))
        _atomic_write(folder / "vmlinuz", vmlinuz[0].read_bytes())
        config = work / "root/boot" / f"config-{release}"
        if config.is_file():  # kept for reference: which options the guest kernel has
            _atomic_write(folder / "config", config.read_bytes())
        stamp = {"package": package, "release": release, "deb": debs[0].name}
        _atomic_write(folder / KERNEL_STAMP, json.dumps(stamp, indent=1).encode())
    return folder, release


# ---- busybox and vmtest ----------------------------------------------------------------------


def _is_static_elf(data: bytes) -> bool:
    if data[:4] != ELF_MAGIC:
        return False
    (phoff,) = struct.unpack_from("<Q", data, ELF_PHOFF_AT)
    (phentsize,) = struct.unpack_from("<H", data, ELF_PHENTSIZE_AT)
    (phnum,) = struct.unpack_from("<H", data, ELF_PHNUM_AT)
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == PT_INTERP:
            return False
    return True


def busybox_binary() -> bytes:
    """The static busybox from Debian's busybox-static package."""
    if not BUSYBOX.is_file():
        raise AssetError(f"{BUSYBOX} missing: install busybox-static (qemu/install-deps.sh)")
    data = BUSYBOX.read_bytes()
    if not _is_static_elf(data):
        raise AssetError(f"{BUSYBOX} is dynamically linked: install busybox-static instead")
    return data


def build_vmtest() -> Path:
    """Compiles the guest checker statically; cached by the hash of its source."""
    source = VMTEST_SOURCE.read_bytes()
    out = CACHE_DIR / f"vmtest-{_sha256(source)}"
    if out.is_file():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, prefix=".vmtest.")
    os.close(fd)
    try:
        _run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", tmp, str(VMTEST_SOURCE)])
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(out, "vmtest-*")
    return out


# ---- initramfs -------------------------------------------------------------------------------


class CpioWriter:
    """Builds a cpio archive in the kernel's "newc" format, in memory."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        # ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        # rdevminor, namesize (with its NUL), check
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        header = CPIO_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        blob = header + name.encode() + b"\0"
        self._parts.append(blob + b"\0" * (-len(blob) % CPIO_ALIGN))
        self._parts.append(data + b"\0" * (-len(data) % CPIO_ALIGN))

    def directory(self, name: str) -> None:
        self._entry(name, S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o755) -> None:
        self._entry(name, S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry(CPIO_TRAILER, 0)
        return b"".join(self._parts)


def build_initramfs(kernel_dir: Path) -> Path:
    """The gzip'd initramfs: /init (init.sh), busybox, vmtest and the virtio modules."""
    init = INIT_SCRIPT.read_bytes()
    busybox = busybox_binary()
    vmtest = build_vmtest().read_bytes()
    modules = [(m, (kernel_dir / f"{m}.ko").read_bytes()) for m in GUEST_MODULES]
    key = _sha256(init, busybox, vmtest, *(data for _, data in modules))
    out = CACHE_DIR / f"initramfs-{key}.cpio.gz"
    if out.is_file():
        return out
    cpio = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "modules"):
        cpio.directory(d)
    cpio.char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR)
    cpio.file("init", init)
    cpio.file("bin/busybox", busybox)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("bin/vmtest", vmtest)
    for name, data in modules:
        cpio.file(f"modules/{name}.ko", data, 0o644)
    _atomic_write(out, gzip.compress(cpio.finish(), compresslevel=GZIP_LEVEL))
    _prune(out, "initramfs-*.cpio.gz")
    return out


def _prune(keep: Path, pattern: str) -> None:
    """Drops stale builds of an artefact (older init scripts or sources)."""
    for old in CACHE_DIR.glob(pattern):
        if old != keep:
            old.unlink(missing_ok=True)


def prepare() -> GuestAssets:
    """Fetches or reuses everything a boot needs."""
    kernel_dir, release = fetch_kernel()
    initrd = build_initramfs(kernel_dir)
    return GuestAssets(kernel=kernel_dir / "vmlinuz", initrd=initrd, kernel_release=release)


def main() -> None:
    assets = prepare()
    print(f"kernel  {assets.kernel} ({assets.kernel_release})")
    print(f"initrd  {assets.initrd}")


if __name__ == "__main__":
    main()
