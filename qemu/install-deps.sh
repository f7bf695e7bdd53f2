#!/usr/bin/env bash
# Installs the Debian packages the QEMU, qemu-storage-daemon and NBD tests need, when missing.
# --dry-run: only print the packages that would be installed (one line, maybe empty).
# $BUSYBOX (default /bin/busybox): the busybox to check, for tests of this script.
# $LIBVIRTD (default /usr/sbin/libvirtd): the libvirtd to check, for tests of this script.
set -euo pipefail
dry_run=0
[ "${1:-}" = --dry-run ] && dry_run=1
busybox=${BUSYBOX:-/bin/busybox}
libvirtd=${LIBVIRTD:-/usr/sbin/libvirtd}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v qemu-img >/dev/null || need+=(qemu-utils)
# The NBD backend's tests (tests/nbd/) start real NBD servers: qemu-nbd (qemu-utils, above)
# and nbdkit with its memory and file plugins (both in Debian's nbdkit package).
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
# The initramfs needs a static busybox with blkdiscard (Debian's plain busybox package is
# dynamically linked): the ELF test qemu/assets.py applies (no PT_INTERP), with python3 alone.
busybox_is_static() {
    [ -x "$busybox" ] || return 1
    PYTHONPATH="$(dirname "$0")/.." python3 -c 'import sys
from qemu.assets import _is_static_elf
with open(sys.argv[1], "rb") as f:
    sys.exit(0 if _is_static_elf(f.read()) else 1)' "$busybox"
}
# (grep without -q reads the whole list: -q would exit at the match, busybox would get SIGPIPE,
# and pipefail would report a failure now and then.)
{ busybox_is_static && "$busybox" --list 2>/dev/null | grep -x blkdiscard >/dev/null; } || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
# The guest's checker (qemu/guest/vmtest.c) is compiled statically on the host.
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
# tests/qemu/test_durability.py counts the backend's fdatasync calls with strace -p.
command -v strace >/dev/null || need+=(strace)
# tests/hostile/slowfs.py: a FUSE file system with slow reads (fusepy, the `test` extra, loads
# libfuse 2 with ctypes).
[ -f /usr/lib/x86_64-linux-gnu/libfuse.so.2 ] || need+=(libfuse2)
# tests/qemu/test_libvirt.py starts a private libvirtd itself (qemu/libvirt.py): the daemon,
# its QEMU driver, virsh, and virt-xml-validate (a shell script around xmllint). libvirtd is
# looked for where Debian puts it: /usr/sbin is not on every PATH.
[ -x "$libvirtd" ] || need+=(libvirt-daemon)
[ -f /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] \
    || need+=(libvirt-daemon-driver-qemu)
command -v virsh >/dev/null || need+=(libvirt-clients)
command -v xmllint >/dev/null || need+=(libxml2-utils)
# A root libvirtd's QEMU driver looks up the user libvirt-qemu when it starts, even when its
# qemu.conf names another; libvirt-daemon-system creates it. Its systemd flavour would install
# systemd as init, so where systemd is not running, the sysv flavour.
if ! getent passwd libvirt-qemu >/dev/null; then
    need+=(libvirt-daemon-system)
    [ -d /run/systemd/system ] || need+=(libvirt-daemon-system-sysv)
fi
if [ "$dry_run" = 1 ]; then
    echo "${need[*]}"
elif [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
