"""Unix socket files for vhost-user endpoints: created with their final mode, stale ones
replaced, live ones refused; the peer's credentials (SO_PEERCRED)."""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct

__all__ = ["adopt_listening_socket", "bind_unix_socket", "bound_path", "check_listening_fd",
           "group_id", "peer_credentials"]

# struct ucred {pid_t pid; uid_t uid; gid_t gid;}
UCRED = struct.Struct("3i")
LISTEN_BACKLOG = 4
# A connect() probing whether a socket file is live must not hang on a full backlog.
PROBE_TIMEOUT_SECONDS = 1.0


def bind_unix_socket(path: str, mode: int, group: str | None) -> socket.socket:
    """Listening socket at ``path`` created with ``mode`` (never wider, even for an instant).

    Refuses a path that exists and is not a socket, and a socket someone still listens on; a
    stale socket file is replaced.
    """
    gid = -1 if group is None else group_id(group)
    _check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        # The umask gave the file its mode. Nothing below follows a symlink: if someone swapped
        # the path meanwhile, that is an error, not a chown of whatever it now points to.
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} was replaced while binding")
        if gid >= 0:
            os.chown(path, -1, gid, follow_symlinks=False)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        os.unlink(path)
        raise
    return sock


def group_id(group: str) -> int:
    """A group name or number -> gid; ValueError naming the group if there is no such group."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"socket group {group!r} does not exist") from None


def _check_socket_path(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT_SECONDS)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: nobody listens
        return
    except TimeoutError:
        pass  # a listener with a full backlog: live
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, f"{path}: another process is serving this socket")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(raw)
    return pid, uid, gid


def check_listening_fd(fd: int, what: str) -> str | None:
    """Check that ``fd`` is a listening AF_UNIX SOCK_STREAM socket (an inherited ``--fd``,
    vhost-user.rst "Backend program conventions", or a systemd socket); returns the path it
    is bound to (None: abstract or unbound). ValueError naming ``what`` otherwise; the fd is
    left as it was either way."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ValueError(f"{what}: not an open file descriptor ({exc.strerror})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{what}: not a socket (a listening Unix stream socket is expected)")
    sock = socket.socket(fileno=fd)  # family and type are read from the fd
    try:
        problem = _listener_problem(sock)
        path = bound_path(sock)
    finally:
        sock.detach()  # not ours yet: never closed here
    if problem is not None:
        raise ValueError(f"{what}: {problem} (a listening Unix stream socket is expected)")
    return path


def adopt_listening_socket(fd: int, what: str) -> socket.socket:
    """Take over an inherited listening socket (checked as :func:`check_listening_fd` does).
    Close-on-exec is set: systemd and most launchers hand fds over without it."""
    check_listening_fd(fd, what)
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)
    return sock


def _listener_problem(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX:
        return f"a {sock.family.name} socket, not AF_UNIX"
    kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    if kind != socket.SOCK_STREAM:
        return f"a {socket.SocketKind(kind).name} socket, not SOCK_STREAM"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "a socket that is not listening"
    return None


def bound_path(sock: socket.socket) -> str | None:
    """The file system path a Unix socket is bound to (None: unbound or abstract)."""
    name = sock.getsockname()
    if isinstance(name, str) and name:
        return name
    return None
