"""``vhostmem``: serve vhost-user devices.

One process serves several devices, each on its own socket. The simple form serves one
vhost-user-blk device::

    vhostmem serve --socket /run/vm1-disk.sock --disk vm1.img --num-queues 2

Several devices: repeat ``--blk`` with comma-separated ``key=value`` settings::

    vhostmem serve --blk socket=a.sock,disk=a.img --blk client=b.sock,ram=256M,readonly=on

With no device option, ``vhostmem serve`` serves a 1 GiB RAM disk on ./vhostmem.sock and prints
the QEMU command line that attaches a VM to it.

``--rpc-socket PATH`` adds a management socket (JSON-RPC, docs/rpc.md) to add, list, inspect and
remove devices at run time; with it, no device option means no device at start. ``vhostmem rpc
METHOD KEY=VALUE ...`` is its client.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

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
    parse_io_mode,
    parse_num_queues,
    parse_size,
    parse_socket_mode,
    share_key,
)
from vhostmem.manager import DeviceManager
from vhostmem.memmap import MemRegistry
from vhostmem.rpc import client as rpc_client
from vhostmem.rpc.methods import Methods
from vhostmem.rpc.server import RpcServer
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
    where.add_argument("--socket", help="listen on this Unix socket (default ./vhostmem.sock)")
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
    serve.add_argument(
        "--rpc-socket",
        metavar="PATH",
        help=(
            "management socket (JSON-RPC, mode 0600): device_add/device_del/device_list/"
            "device_stats at run time; with it, no device option means no device at start"
        ),
    )
    rpc_client.add_parser(sub)
    return parser


def specs_from_args(args: argparse.Namespace) -> list[BlkSpec]:
    simple = [
        option
        for option, given in (
            ("--socket", args.socket),
            ("--client", args.client),
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
    if not args.blk and not simple and args.rpc_socket:
        return []  # devices come from the management socket (device_add)
    if args.blk:
        specs = [parse_blk_spec(text) for text in args.blk]
    else:
        spec = BlkSpec(
            socket=args.socket,
            client=args.client,
            disk=args.disk,
            ram=parse_size(args.ram_size) if args.ram_size else None,
            readonly=args.readonly,
            num_queues=parse_num_queues(args.num_queues),
            serial=BlkSpec.serial if args.serial is None else args.serial,
            io_mode=parse_io_mode(args.io_mode or BlkSpec.io_mode),
        )
        specs = [check_spec(spec, "serve")]
    paths = [spec.path for spec in specs]
    if len(set(paths)) != len(paths):
        raise UsageError(f"two devices on the same socket: {paths}")
    return specs


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
    specs = specs_from_args(args)
    mode = parse_socket_mode(args.socket_mode)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    server = Server(loop, MemRegistry())
    manager = DeviceManager(loop, server, socket_mode=mode, socket_group=args.socket_group,
                            require_sealed_memory=args.require_sealed_memory)
    rpc: RpcServer | None = None
    try:
        for spec in specs:
            manager.add(spec)
            print(
                f"vhost-user-blk on {spec.path}; attach a VM with:\n  {qemu_command(spec)}\n"
                "(add your kernel/disk options, -accel tcg where KVM cannot run the guest; "
                "`make vm` boots a small test guest on ./vhostmem.sock)",
                flush=True,
            )
        if args.rpc_socket:
            rpc = RpcServer(loop, Methods(manager), args.rpc_socket)
            loop.run_until_complete(rpc.start())
            manager.reserved_fds.add(rpc.fileno())
            print(f"management socket on {args.rpc_socket}", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.run_until_complete(stop.wait())
        log.info("shutting down")
    finally:
        if rpc is not None:
            loop.run_until_complete(rpc.close())
        manager.close()  # endpoints, then devices: joins I/O threads, makes images durable
        loop.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "rpc":
        return rpc_client.main(args)
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        print(f"vhostmem: error: --log-level {args.log_level!r}: expected DEBUG, INFO, "
              "WARNING or ERROR", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return serve(args)
    except (UsageError, ValueError) as exc:
        print(f"vhostmem: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vhostmem: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
