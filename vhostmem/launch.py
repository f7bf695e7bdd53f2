"""How vhostmem is started by others: the vhost-user backend program conventions and systemd.

* vhost-user.rst, "Backend program conventions": ``--socket-path=PATH``, ``--fd=FDNUM`` (the
  backend is handed its listening socket), ``--print-capabilities`` (JSON on stdout, then exit
  0, every other argument ignored), and for a "block" backend ``--blk-file`` and
  ``--read-only``. ``vhostmem-blk`` (:func:`blk_main`) is that program; ``vhostmem serve`` takes
  the same ``--socket-path``, ``--fd`` and ``--print-capabilities``.
* systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, fds from 3) and
  ``sd_notify`` (``READY=1``, ``STOPPING=1``, ``STATUS=``) as one datagram to
  ``NOTIFY_SOCKET``, without libsystemd.

How inherited sockets are matched to devices (:func:`assign_inherited`), in this order:

1. ``fd=N`` (``--fd N``) takes fd N, whether systemd passed it or any other launcher did;
2. ``fdname=NAME`` takes the systemd socket named NAME in ``LISTEN_FDNAMES`` (the unit's
   ``FileDescriptorName=``);
3. ``socket=PATH`` (``--socket-path PATH``) takes a systemd socket already bound to PATH
   instead of binding it (the same command line works with and without activation);
4. the systemd sockets still unmatched go, in ``LISTEN_FDS`` order, to the devices that named
   no socket at all, in command-line order; the two counts must be equal.

A systemd socket that no device takes is an error: the process refuses to start (exit 2), as
vhost-user.rst asks of a backend that cannot do what it was asked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vhostmem.sockets import check_listening_fd

if TYPE_CHECKING:
    from vhostmem.devspec import BlkSpec

log = logging.getLogger("vhostmem")

# vhost-user.json, VHostUserBackendCapabilitiesBlock: the "block" features are exactly the two
# optional options of the vhost-user-blk section, and vhostmem-blk supports both.
CAPABILITIES: dict[str, object] = {"type": "block", "features": ["read-only", "blk-file"]}
PRINT_CAPABILITIES = "--print-capabilities"
SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed fds start at 3, numbered consecutively


class LaunchError(ValueError):
    """A launch setting (inherited fd, systemd environment) that cannot be honoured; the
    message names the option or variable."""


def capabilities_json() -> str:
    return json.dumps(CAPABILITIES, indent=2)


def wants_capabilities(argv: Sequence[str]) -> bool:
    """vhost-user.rst: with --print-capabilities "other options and arguments should be
    ignored", so it is looked for before any parsing that could fail on them."""
    return PRINT_CAPABILITIES in argv


# ------------------------------------------------------------------------ inherited fds


@dataclass
class InheritedSocket:
    fd: int
    name: str  # LISTEN_FDNAMES entry ("" when not given)
    path: str | None  # the path it is bound to (None: abstract or unbound)
    taken: bool = False


def systemd_sockets(environ: MutableMapping[str, str] | None = None) -> list[InheritedSocket]:
    """The listening sockets systemd passed (sd_listen_fds(3) semantics), or [].

    LISTEN_PID must be this process: the variables are inherited by children that were not
    meant to take the fds. They are removed from the environment once read (sd_listen_fds with
    unset_environment), so nothing this process starts sees them either.
    """
    env = os.environ if environ is None else environ
    count_text = env.get("LISTEN_FDS")
    pid_text = env.get("LISTEN_PID")
    names_text = env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if count_text is None:
        return []
    if pid_text is None or not pid_text.isdigit() or int(pid_text) != os.getpid():
        log.info("LISTEN_FDS is set for process %s, not this one (%d); ignored",
                 pid_text, os.getpid())
        return []
    if not count_text.isdigit():
        raise LaunchError(f"LISTEN_FDS={count_text!r}: expected a number of fds")
    count = int(count_text)
    names = names_text.split(":") if names_text else [""] * count
    if len(names) != count:
        raise LaunchError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
    found = []
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        label = f"LISTEN_FDS fd {fd}" + (f" ({name})" if name else "")
        path = check_listening_fd(fd, label)
        found.append(InheritedSocket(fd, name, path))
    return found


def assign_inherited(specs: list[BlkSpec], inherited: list[InheritedSocket]) -> None:
    """Give each device its inherited socket (the rule is in the module docstring) and check
    every explicit fd; sets ``spec.fd`` and ``spec.fd_path``."""
    by_fd = {s.fd: s for s in inherited}
    for spec in specs:
        if spec.fd is not None:
            sock = by_fd.get(spec.fd)
            path = sock.path if sock else check_listening_fd(spec.fd, spec.fd_option)
            _take(spec, spec.fd, path, sock)
    for spec in specs:
        if spec.fdname is not None:
            named = [s for s in inherited if s.name == spec.fdname and not s.taken]
            if not named:
                names = [s.name for s in inherited]
                raise LaunchError(f"fdname={spec.fdname}: no such socket in LISTEN_FDNAMES "
                                  f"(names: {names})")
            _take(spec, named[0].fd, named[0].path, named[0])
    for spec in specs:
        if spec.fd is None and spec.socket is not None:
            want = os.path.realpath(spec.socket)
            for sock in inherited:
                if not sock.taken and sock.path and os.path.realpath(sock.path) == want:
                    _take(spec, sock.fd, sock.path, sock)
                    break
    left = [s for s in inherited if not s.taken]
    unplaced = [spec for spec in specs if spec.fd is None and spec.names_no_socket()]
    if left and len(left) != len(unplaced):
        raise LaunchError(
            f"LISTEN_FDS: {len(left)} socket(s) ({', '.join(_label(s) for s in left)}) for "
            f"{len(unplaced)} device(s) that name no socket; match them with fdname=NAME, "
            "fd=N or socket=PATH")
    for spec, sock in zip(unplaced if left else [], left, strict=False):
        _take(spec, sock.fd, sock.path, sock)


def _take(spec: BlkSpec, fd: int, path: str | None, sock: InheritedSocket | None) -> None:
    if sock is not None:
        if sock.taken:
            raise LaunchError(f"{_label(sock)} is given to two devices")
        sock.taken = True
    spec.fd = fd
    spec.fd_path = path


def _label(sock: InheritedSocket) -> str:
    return f"fd {sock.fd}" + (f" ({sock.name})" if sock.name else "")


# ------------------------------------------------------------------------------ sd_notify


class Notifier:
    """sd_notify(3) without libsystemd: one datagram per state change to NOTIFY_SOCKET (a path,
    or an abstract name written with a leading "@"). Silent when the variable is unset; a
    failed send is logged and never stops the service."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        # Removed like the LISTEN_* variables: it addresses this process's supervisor only.
        target = env.pop("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if target.startswith("@"):
            self.address = b"\0" + target[1:].encode()
        elif target.startswith("/"):
            self.address = target
        elif target:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor an @abstract name; ignored",
                        target)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines (e.g. "READY=1", "STATUS=..."); whether it was sent."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.sendto(data, self.address)
        except OSError as exc:
            log.warning("sd_notify %s to NOTIFY_SOCKET failed: %s", assignments, exc)
            return False
        finally:
            sock.close()
        return True


# ---------------------------------------------------------------------- vhostmem-blk


def build_blk_parser() -> argparse.ArgumentParser:
    from vhostmem.cli import MAX_QUEUES
    from vhostmem.server import DEFAULT_SOCKET_MODE

    parser = argparse.ArgumentParser(
        prog="vhostmem-blk",
        description=(
            "vhost-user-blk backend following vhost-user.rst \"Backend program conventions\": "
            "one disk on one socket. Without --blk-file it serves a RAM disk (--ram-size)."
        ),
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--fd", metavar="FDNUM", help="serve this inherited listening socket")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--blk-file", metavar="PATH", help="block device or raw image to serve")
    what.add_argument("--ram-size", help="serve a RAM disk of this size (default 1G)")
    parser.add_argument("--read-only", action="store_true", help="refuse writes")
    parser.add_argument(PRINT_CAPABILITIES, action="store_true",
                        help="print the backend capabilities as JSON and exit")
    parser.add_argument("--num-queues", default="1", help=f"1..{MAX_QUEUES} queues")
    parser.add_argument("--serial", help="GET_ID serial (<= 20 bytes, default vhostmem)")
    parser.add_argument("--io-mode", help="inline (the default) or thread")
    parser.add_argument("--workers", help="serve the rings in N worker processes (default 0)")
    # The same names and meanings as in `vhostmem serve` (cli.serve_specs reads them).
    parser.add_argument("--socket-mode", default=f"{DEFAULT_SOCKET_MODE:o}",
                        help="octal mode of the socket file")
    parser.add_argument("--socket-group", help="group owning the socket file")
    parser.add_argument("--require-sealed-memory", action="store_true",
                        help="refuse guest memory fds not sealed against shrinking")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-file", metavar="PATH", help="log here (reopened on SIGHUP)")
    return parser


def blk_specs(args: argparse.Namespace, inherited: list[InheritedSocket]) -> list[BlkSpec]:
    from vhostmem.cli import (
        BlkSpec,
        UsageError,
        check_spec,
        parse_fd,
        parse_io_mode,
        parse_num_queues,
        parse_size,
        parse_workers,
    )

    spec = BlkSpec(
        socket=args.socket_path,
        fd=None if args.fd is None else parse_fd(args.fd, "--fd"),
        fd_option=f"--fd {args.fd}",
        disk=args.blk_file,
        ram=parse_size(args.ram_size) if args.ram_size else None,
        readonly=args.read_only,
        num_queues=parse_num_queues(args.num_queues),
        serial=BlkSpec.serial if args.serial is None else args.serial,
        io_mode=parse_io_mode(args.io_mode or BlkSpec.io_mode),
        workers=parse_workers(args.workers or str(BlkSpec.workers)),
    )
    if spec.socket is None and spec.fd is None and not inherited:
        raise UsageError("give --socket-path=PATH or --fd=FDNUM (or start from a systemd "
                         "socket unit)")
    return [check_spec(spec, "vhostmem-blk")]


def blk_main(argv: list[str] | None = None) -> int:
    """The ``vhostmem-blk`` program."""
    from vhostmem.cli import report_errors, serve_specs, setup_logging

    argv = sys.argv[1:] if argv is None else argv
    if wants_capabilities(argv):
        print(capabilities_json())
        return 0
    args = build_blk_parser().parse_args(argv)

    def run() -> int:
        handler = setup_logging(args)
        inherited = systemd_sockets()
        return serve_specs(blk_specs(args, inherited), args, inherited, handler)

    return report_errors("vhostmem-blk", run)


if __name__ == "__main__":
    sys.exit(blk_main())
