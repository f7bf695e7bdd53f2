"""``vhostmem``: serve vhost-user devices.

One process serves several devices, each on its own socket. The simple form serves one
vhost-user-blk device::

    vhostmem serve --socket /run/vm1-disk.sock --disk vm1.img --num-queues 2

Several devices: repeat ``--blk`` with comma-separated ``key=value`` settings::

    vhostmem serve --blk socket=a.sock,disk=a.img --blk client=b.sock,ram=256M,readonly=on

With no device option, ``vhostmem serve`` serves a 1 GiB RAM disk on ./vhostmem.sock and prints
the QEMU command line that attaches a VM to it.

Started by a launcher: ``--fd N`` / ``fd=N`` serve an inherited listening socket, systemd socket
activation is honoured (``vhostmem.launch``), ``--print-capabilities`` prints the vhost-user.rst
capabilities JSON. SIGTERM/SIGINT drain and exit 0, SIGHUP reopens ``--log-file``
(``vhostmem.lifecycle``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from vhostmem.devices.blk import BlkDevice
from vhostmem.devices.blk_backend import BlkBackend, open_image, ram_disk
from vhostmem.launch import (
    InheritedSocket,
    Notifier,
    assign_inherited,
    capabilities_json,
    systemd_sockets,
    wants_capabilities,
)
from vhostmem.lifecycle import Lifecycle, ReopenableFileHandler, configure_logging
from vhostmem.memmap import MemRegistry
from vhostmem.server import DEFAULT_SOCKET_MODE, EndpointConfig, Server, new_event_loop

log = logging.getLogger("vhostmem")

DEFAULT_SOCKET = "vhostmem.sock"
DEFAULT_RAM_SIZE = 1 << 30
MAX_QUEUES = 16
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
TRUE_WORDS = {"on", "yes", "true", "1"}
FALSE_WORDS = {"off", "no", "false", "0"}
SOCKET_MODE_BITS = 0o777
BLK_KEYS = {"socket", "client", "disk", "ram", "readonly", "num-queues", "serial", "io-mode",
            "share", "fd", "fdname"}
# inline: requests are served on the event loop (fastest on RAM and page cache);
# thread: file I/O runs on a thread pool so a slow disk cannot stall the control plane.
IO_MODES = ("inline", "thread")


class UsageError(Exception):
    """A command-line or device-spec error; the message names the offending option."""


@dataclass
class BlkSpec:
    socket: str | None = None
    client: str | None = None
    disk: str | None = None
    ram: int | None = None
    readonly: bool = False
    num_queues: int = 1
    serial: str = "vhostmem"
    io_mode: str = "inline"
    # Devices naming the same share serve one disk (a RAM disk, too); so do devices given the
    # same disk file. Only one frontend at a time may run rings on it (live migration).
    share: str | None = None
    # An inherited listening socket (fd=N, --fd N, or one systemd passed: vhostmem.launch).
    fd: int | None = None
    fdname: str | None = None  # the systemd socket of this LISTEN_FDNAMES name
    fd_path: str | None = None  # the path the inherited socket is bound to, if any
    fd_option: str = "--fd"  # how the fd was given, for errors

    @property
    def path(self) -> str:
        if self.fd is not None:
            return self.fd_path or f"fd{self.fd}"
        if self.fdname is not None:
            return f"fdname={self.fdname}"
        return self.client or self.socket or DEFAULT_SOCKET

    def names_no_socket(self) -> bool:
        return self.socket is None and self.client is None and self.fd is None \
            and self.fdname is None


def parse_size(text: str) -> int:
    """'1G', '512M', '4096' -> bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = value[-1:] if value[-1:] in SIZE_SUFFIXES else ""
    number = value[: len(value) - len(suffix)]
    if not number.isdigit() or int(number) == 0:
        raise UsageError(f"bad size {text!r}: expected e.g. 1G, 512M or a byte count")
    return int(number) * SIZE_SUFFIXES[suffix]


def parse_bool(key: str, text: str) -> bool:
    word = text.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise UsageError(f"{key}={text!r}: expected on or off")


def parse_socket_mode(text: str) -> int:
    """'600', '0660' -> permission bits; only rwx bits for user, group and others."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"--socket-mode {text!r}: expected octal bits, e.g. 660") from None
    if not 0 <= mode <= SOCKET_MODE_BITS:
        raise UsageError(f"--socket-mode {text!r}: only permission bits 0..777 are allowed")
    return mode


def parse_io_mode(text: str) -> str:
    if text not in IO_MODES:
        raise UsageError(f"io-mode={text!r}: expected one of {', '.join(IO_MODES)}")
    return text


def parse_num_queues(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUEUES:
        raise UsageError(f"num-queues={text!r}: expected 1..{MAX_QUEUES}")
    return int(text)


def parse_fd(text: str, option: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{option} {text!r}: expected a file descriptor number")
    return int(text)


def parse_blk_spec(text: str) -> BlkSpec:
    spec = BlkSpec()
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in BLK_KEYS:
            raise UsageError(f"--blk {text!r}: unknown setting {item!r} (keys: {sorted(BLK_KEYS)})")
        if key in ("socket", "client", "disk", "serial", "share", "fdname"):
            setattr(spec, key, value)
        elif key == "fd":
            spec.fd_option = f"--blk {text!r}: fd={value}"
            spec.fd = parse_fd(value, f"--blk {text!r}: fd=")
        elif key == "ram":
            spec.ram = parse_size(value)
        elif key == "readonly":
            spec.readonly = parse_bool(key, value)
        elif key == "io-mode":
            spec.io_mode = parse_io_mode(value)
        else:
            spec.num_queues = parse_num_queues(value)
    return check_spec(spec, f"--blk {text!r}")


def check_spec(spec: BlkSpec, where: str) -> BlkSpec:
    if spec.socket and spec.client:
        raise UsageError(f"{where}: give socket or client, not both")
    given = [key for key, value in (("socket", spec.socket), ("client", spec.client),
                                    ("fd", spec.fd), ("fdname", spec.fdname)) if value is not None]
    if len(given) > 1:
        raise UsageError(f"{where}: give one of socket, client, fd or fdname, not "
                         f"{' and '.join(given)}")
    if spec.disk and spec.ram:
        raise UsageError(f"{where}: give disk or ram, not both")
    if spec.ram is None and spec.disk is None and spec.share is None:
        spec.ram = DEFAULT_RAM_SIZE
    if len(spec.serial.encode()) > 20:
        raise UsageError(f"{where}: serial {spec.serial!r} is longer than 20 bytes")
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhostmem",
        description="vhost-user backend with SPDK-style guest memory registration",
    )
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser(
        "serve",
        help="serve vhost-user-blk devices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = serve.add_mutually_exclusive_group()
    where.add_argument("--socket", "--socket-path", dest="socket",
                       help="listen on this Unix socket (default ./vhostmem.sock)")
    where.add_argument("--fd", metavar="FDNUM", help="serve this inherited listening socket")
    where.add_argument("--client", help="connect to a frontend listening on this socket")
    what = serve.add_mutually_exclusive_group()
    what.add_argument("--disk", help="raw image file to serve")
    what.add_argument("--ram-size", type=str, help="serve a RAM disk of this size (e.g. 1G)")
    serve.add_argument("--readonly", action="store_true", help="refuse writes (VIRTIO_BLK_F_RO)")
    serve.add_argument("--num-queues", type=str, default="1", help=f"1..{MAX_QUEUES} queues")
    serve.add_argument("--serial", help="GET_ID serial (<= 20 bytes, default vhostmem)")
    serve.add_argument(
        "--io-mode",
        help="inline (serve on the event loop, the default) or thread (file I/O on a pool)",
    )
    serve.add_argument(
        "--blk",
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            "a device: socket=P|client=P, disk=F|ram=SIZE, readonly=on, num-queues=N, "
            "serial=S, io-mode=inline|thread, share=NAME (devices naming the same share, or "
            "the same disk file, serve one disk; one frontend at a time runs rings on it)"
        ),
    )
    serve.add_argument(
        "--socket-mode", default=f"{DEFAULT_SOCKET_MODE:o}", help="octal mode of socket files"
    )
    serve.add_argument("--socket-group", help="group owning the socket files")
    serve.add_argument(
        "--require-sealed-memory",
        action="store_true",
        help=(
            "refuse guest memory fds not sealed against shrinking (F_SEAL_SHRINK, QEMU's "
            "memory-backend-memfd default): a frontend truncating one would crash the process"
        ),
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    serve.add_argument("--log-file", metavar="PATH", help="log here (reopened on SIGHUP)")
    serve.add_argument("--print-capabilities", action="store_true",
                       help="print the vhost-user backend capabilities (JSON) and exit")
    return parser


def specs_from_args(args: argparse.Namespace) -> list[BlkSpec]:
    simple = [
        option
        for option, given in (
            ("--socket", args.socket),
            ("--client", args.client),
            ("--fd", args.fd is not None),
            ("--disk", args.disk),
            ("--ram-size", args.ram_size),
            ("--readonly", args.readonly),
            ("--num-queues", args.num_queues != "1"),
            ("--serial", args.serial is not None),
            ("--io-mode", args.io_mode is not None),
        )
        if given
    ]
    if args.blk and simple:
        raise UsageError(
            f"--blk cannot be combined with {', '.join(simple)}: give them as settings of "
            "each --blk (socket=, client=, disk=, ram=, readonly=, num-queues=, serial=, "
            "io-mode=)"
        )
    if args.blk:
        specs = [parse_blk_spec(text) for text in args.blk]
    else:
        spec = BlkSpec(
            socket=args.socket,
            client=args.client,
            fd=None if args.fd is None else parse_fd(args.fd, "--fd"),
            fd_option=f"--fd {args.fd}",
            disk=args.disk,
            ram=parse_size(args.ram_size) if args.ram_size else None,
            readonly=args.readonly,
            num_queues=parse_num_queues(args.num_queues),
            serial=BlkSpec.serial if args.serial is None else args.serial,
            io_mode=parse_io_mode(args.io_mode or BlkSpec.io_mode),
        )
        specs = [check_spec(spec, "serve")]
    # Devices naming no socket may still get one each from systemd (checked again then).
    check_distinct_paths([spec for spec in specs if not spec.names_no_socket()])
    return specs


def check_distinct_paths(specs: list[BlkSpec]) -> None:
    paths = [spec.path for spec in specs]
    if len(set(paths)) != len(paths):
        raise UsageError(f"two devices on the same socket: {paths}")


def make_device(spec: BlkSpec, shared: dict[str, tuple[BlkSpec, BlkBackend]] | None = None
                ) -> BlkDevice:
    """A device for ``spec``; specs with the same ``share`` or disk file get one backend
    (``shared`` remembers them across calls)."""
    options = {
        "num_queues": spec.num_queues,
        "serial": spec.serial,
        "io_mode": spec.io_mode,
    }
    key = share_key(spec)
    if shared is not None and key is not None and key in shared:
        first, backend = shared[key]
        check_same_disk(first, spec)
        return BlkDevice(backend, **options)
    if spec.disk is not None:
        backend = open_image(spec.disk, readonly=spec.readonly)
    elif spec.ram is not None:
        backend = ram_disk(spec.ram, readonly=spec.readonly)
    else:
        raise UsageError(f"share={spec.share}: no device names its disk= or ram=")
    if shared is not None and key is not None:
        shared[key] = (spec, backend)
    return BlkDevice(backend, **options)


def share_key(spec: BlkSpec) -> str | None:
    if spec.share is not None:
        return f"share:{spec.share}"
    if spec.disk is not None:
        return f"disk:{os.path.realpath(spec.disk)}"
    return None


def check_same_disk(first: BlkSpec, spec: BlkSpec) -> None:
    """Devices sharing a disk must agree on it (a later one may leave disk/ram out)."""
    where = f"{spec.path} shares the disk of {first.path}"
    if spec.readonly != first.readonly:
        raise UsageError(f"{where}: readonly must be the same on both")
    for key in ("disk", "ram"):
        mine, theirs = getattr(spec, key), getattr(first, key)
        if mine is not None and theirs is not None and mine != theirs:
            raise UsageError(f"{where}: {key}={mine} differs from {key}={theirs}")
        if mine is not None and theirs is None:
            raise UsageError(f"{where}: it gives {key}= where the first one does not")


def qemu_command(spec: BlkSpec) -> str:
    server = ",server=on" if spec.client else ""
    return (
        "qemu-system-x86_64 -accel kvm -m 512M "
        "-object memory-backend-memfd,id=mem,size=512M,share=on "
        "-machine q35,memory-backend=mem "
        f"-chardev socket,id=vhost0,path={spec.path}{server} "
        f"-device vhost-user-blk-pci,chardev=vhost0,num-queues={spec.num_queues} ..."
    )


def serve(args: argparse.Namespace) -> int:
    handler = setup_logging(args)
    specs = specs_from_args(args)
    return serve_specs(specs, args, systemd_sockets(), handler)


def setup_logging(args: argparse.Namespace) -> ReopenableFileHandler | None:
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        raise UsageError(f"--log-level {args.log_level!r}: expected DEBUG, INFO, WARNING or "
                         "ERROR")
    return configure_logging(level, args.log_file)


def serve_specs(specs: list[BlkSpec], args: argparse.Namespace,
                inherited: list[InheritedSocket],
                log_handler: ReopenableFileHandler | None) -> int:
    """Serve ``specs`` until a stop signal; ``args`` gives the socket and memory options."""
    assign_inherited(specs, inherited)
    check_distinct_paths(specs)
    mode = parse_socket_mode(args.socket_mode)
    notifier = Notifier()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(loop, MemRegistry())
    devices: list[BlkDevice] = []
    shared: dict[str, tuple[BlkSpec, BlkBackend]] = {}
    lifecycle = Lifecycle(loop, server, notifier, log_handler)
    lifecycle.install_signals()
    try:
        for spec in specs:
            device = make_device(spec, shared)
            devices.append(device)
            config = EndpointConfig(
                path=spec.path,
                client=spec.client is not None,
                socket_mode=mode,
                socket_group=args.socket_group,
                require_sealed_memory=args.require_sealed_memory,
                fd=spec.fd,
            )
            server.add(device, config)
            print(
                f"vhost-user-blk on {spec.path}; attach a VM with:\n  {qemu_command(spec)}\n"
                "(add your kernel/disk options, -accel tcg where KVM cannot run the guest; "
                "`make vm` boots a small test guest on ./vhostmem.sock)",
                flush=True,
            )
        lifecycle.run()
    finally:
        restore = lifecycle.closing()
        server.close()
        for device in devices:
            device.close()  # joins I/O threads, makes the image durable and closes it
        loop.close()
        if lifecycle.stop_signal is not None:
            log.info("stopped: images flushed, sockets closed")
        restore()
    return 0


def report_errors(prog: str, run: Callable[[], int]) -> int:
    """Run ``run``; a usage error exits 2 and a path, disk or system error 1, each with one
    line on stderr naming what was wrong."""
    try:
        return run()
    except (UsageError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and wants_capabilities(argv):
        print(capabilities_json())  # every other argument ignored (vhost-user.rst)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return report_errors("vhostmem", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
