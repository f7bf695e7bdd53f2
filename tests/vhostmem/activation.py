"""Starting vhostmem the way systemd and other launchers do, for the launch and signal tests.

* :func:`spawn_activated`: the child gets ``sockets`` as fds 3, 4, ... (no close-on-exec),
  ``LISTEN_FDS``, optionally ``LISTEN_FDNAMES`` and ``NOTIFY_SOCKET``, and ``LISTEN_PID`` equal
  to its own pid (``sh -c 'LISTEN_PID=$$ exec ...'``: the shell's pid is the pid of the program
  it execs), exactly what systemd's service manager sets up before it execs ExecStart.
* :class:`NotifyListener`: a real NOTIFY_SOCKET (a datagram socket at a path or an abstract
  "@name") collecting what the process sends with sd_notify.
* ``python -m tests.vhostmem.activation --listen PATH [--name NAME] -- COMMAND...`` creates the
  listening socket itself, puts it at fd 3 and execs COMMAND (the same pid): a socket unit plus
  its service in one command line, for harnesses that only take an argv (the QEMU test).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIRST_FD = 3
SCRATCH_FD = 100  # fds are parked above this while they are moved to 3, 4, ...
SELF_PID = "$$"


def move_fds_to_3(fds: Sequence[int]) -> None:
    """In the child: fds[i] becomes fd 3 + i, inheritable. Parked high first, so a source
    that already sits in 3.. is never overwritten before it is copied."""
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, SCRATCH_FD) for fd in fds]
    for i, fd in enumerate(parked):
        os.dup2(fd, FIRST_FD + i)  # the copy has no close-on-exec
        os.close(fd)


def spawn_activated(
    argv: Sequence[str],
    sockets: Sequence[socket.socket],
    *,
    names: Sequence[str] | None = None,
    notify: str | None = None,
    listen_pid: str = SELF_PID,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``argv`` as a socket-activated service (see the module docstring); stdout and
    stderr are pipes. ``listen_pid`` other than "$$" sets LISTEN_PID to that value instead."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")}
    env["LISTEN_FDS"] = str(len(sockets))
    if names is not None:
        env["LISTEN_FDNAMES"] = ":".join(names)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify
    env.update(extra_env or {})
    fds = [s.fileno() for s in sockets]
    pid = "$$" if listen_pid == SELF_PID else listen_pid
    return subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID={pid} exec "$0" "$@"', *argv],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        close_fds=False,  # only the fds moved to 3.. are inheritable; Python's are not
        preexec_fn=lambda: move_fds_to_3(fds),
    )


def listening_socket(path: Path | str, backlog: int = 4) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


class NotifyListener:
    """A NOTIFY_SOCKET: ``address`` is what goes into the variable."""

    def __init__(self, where: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if where is None:  # abstract: "@name" in NOTIFY_SOCKET, "\0name" on the wire
            name = f"vhostmem-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(where))
            self.address = str(where)
        self.received: list[str] = []

    def wait_for(self, line: str, timeout: float = 10.0) -> list[str]:
        """Collect datagrams until one has ``line`` among its lines; all lines so far."""
        deadline = time.monotonic() + timeout
        while not any(line in msg.split("\n") for msg in self.received):
            left = deadline - time.monotonic()
            assert left > 0, f"no {line!r} from the service; got {self.received}"
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.received

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="socket path to create and pass")
    parser.add_argument("--name", help="its LISTEN_FDNAMES entry")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sock = listening_socket(args.listen)
    move_fds_to_3([sock.fileno()])
    if sock.fileno() != FIRST_FD:
        sock.close()
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid
    if args.name:
        os.environ["LISTEN_FDNAMES"] = args.name
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
