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

``--rpc-socket PATH`` adds a management socket (JSON-RPC, docs/rpc.md) to add, list, inspect and
remove devices at run time; with it, no device option means no device at start. ``vhostmem rpc
METHOD KEY=VALUE ...`` is its client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable

from vhostmem.devspec import (  # noqa: F401  (re-exported: the parsing used to live here)
    BLK_KEYS,
    DEFAULT_RAM_SIZE,
    DEFAULT_SOCKET,
    IO_MODES,
    MAX_QUEUES,
    BlkSpec,
    UsageError,
    check_same_disk,
    check_spec,
    make_device,
    parse_blk_spec,
    parse_bool,
    parse_fd,
    parse_io_mode,
    parse_num_queues,
    parse_size,
    parse_socket_mode,
    parse_workers,
    share_key,
)
from vhostmem.gc_stats import GC_STATS, freeze_startup_heap
from vhostmem.launch import (
    InheritedSocket,
    Notifier,
    assign_inherited,
    capabilities_json,
    systemd_sockets,
    wants_capabilities,
)
from vhostmem.lifecycle import Lifecycle, ReopenableFileHandler, configure_logging
from vhostmem.manager import DeviceManager
from vhostmem.memmap import MemRegistry
from vhostmem.rpc import client as rpc_client
from vhostmem.rpc.methods import Methods
from vhostmem.rpc.server import DEFAULT_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT, RpcServer
from vhostmem.server import DEFAULT_SOCKET_MODE, Server, new_event_loop

log = logging.getLogger("vhostmem")

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
        "--workers",
        help="serve started rings in N worker processes (ring i in worker i %% N; 0: on the "
             "event loop, the default); needs inline I/O on a disk or RAM disk",
    )
    serve.add_argument(
        "--poll-us",
        metavar="US",
        type=poll_microseconds,
        default=0,
        help=(
            "after a turn that served requests, keep looking at the ring for new ones without "
            f"waiting for a kick until US microseconds pass with none (0..{MAX_POLL_US}; 0, the "
            "default: off); rings on the event loop only"
        ),
    )
    serve.add_argument(
        "--blk",
        action="append",
        default=[],
        metavar="SPEC",
        help=(
            "a device: socket=P|client=P, disk=F|ram=SIZE|nbd=URI (nbd-timeout=S, "
            "nbd-conns=N), readonly=on, num-queues=N, serial=S, io-mode=inline|thread, "
            "workers=N, share=NAME (devices naming the same share, or the same disk file, "
            "serve one disk; one frontend at a time runs rings on it)"
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
    serve.add_argument(
        "--rpc-socket",
        metavar="PATH",
        help=(
            "management socket (JSON-RPC, mode 0600): device_add/device_del/device_list/"
            "device_stats at run time; with it, no device option means no device at start"
        ),
    )
    serve.add_argument(
        "--rpc-idle-timeout",
        metavar="SECONDS",
        type=idle_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        help=(
            "close a management client that sends nothing or reads no reply for this long "
            f"(default {DEFAULT_IDLE_TIMEOUT:g}; 0: never)"
        ),
    )
    rpc_client.add_parser(sub)
    return parser


MAX_POLL_US = 1_000_000


def poll_microseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds in "
                                         f"0..{MAX_POLL_US}")
    return value


def idle_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_IDLE_TIMEOUT:  # also refuses nan
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds in 0..{MAX_IDLE_TIMEOUT:g}")
    return value


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
            ("--workers", args.workers is not None),
        )
        if given
    ]
    if args.blk and simple:
        raise UsageError(
            f"--blk cannot be combined with {', '.join(simple)}: give them as settings of "
            "each --blk (socket=, client=, disk=, ram=, readonly=, num-queues=, serial=, "
            "io-mode=, workers=)"
        )
    if not args.blk and not simple and args.rpc_socket:
        return []  # devices come from the management socket (device_add) or systemd
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
            workers=parse_workers(args.workers or str(BlkSpec.workers)),
        )
        specs = [check_spec(spec, "serve")]
    # Devices naming no socket may still get one each from systemd (checked again then).
    check_distinct_paths([spec for spec in specs if not spec.names_no_socket()])
    return specs


def check_distinct_paths(specs: list[BlkSpec]) -> None:
    paths = [spec.path for spec in specs]
    if len(set(paths)) != len(paths):
        raise UsageError(f"two devices on the same socket: {paths}")


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
    manager = DeviceManager(loop, server, socket_mode=mode, socket_group=args.socket_group,
                            require_sealed_memory=args.require_sealed_memory,
                            poll_us=getattr(args, "poll_us", 0))  # vhostmem-blk has none
    rpc: RpcServer | None = None
    lifecycle = Lifecycle(loop, server, notifier, log_handler)
    lifecycle.install_signals()
    GC_STATS.install()
    try:
        for spec in specs:
            manager.add(spec)
            print(
                f"vhost-user-blk on {spec.path}; attach a VM with:\n  {qemu_command(spec)}\n"
                "(add your kernel/disk options, -accel tcg where KVM cannot run the guest; "
                "`make vm` boots a small test guest on ./vhostmem.sock)",
                flush=True,
            )
        rpc_socket = getattr(args, "rpc_socket", None)  # vhostmem-blk has none
        if rpc_socket:
            rpc = RpcServer(loop, Methods(manager), rpc_socket,
                            idle_timeout=args.rpc_idle_timeout)
            loop.run_until_complete(rpc.start())
            manager.reserved_fds.add(rpc.fileno())
            print(f"management socket on {rpc_socket}", flush=True)
        # Everything the process needs at startup exists: keep it out of the collections
        # that would otherwise walk it while requests wait (vhostmem/gc_stats.py). As the
        # loop's first callback: a stop signal sent meanwhile (a launcher may send one as soon
        # as the socket exists) stays pending until the loop runs (Lifecycle.install_signals).
        loop.call_soon(freeze_startup_heap)
        lifecycle.run()
    finally:
        restore = lifecycle.closing()
        if rpc is not None:
            loop.run_until_complete(rpc.close())
        manager.close()  # endpoints, then devices: joins I/O threads, makes images durable
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
    if args.command == "rpc":
        return rpc_client.main(args)
    return report_errors("vhostmem", lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
