"""Unix socket files for vhost-user endpoints: created with their final mode, stale ones
replaced, live ones refused; the peer's credentials (SO_PEERCRED)."""

from __future__ import annotations

import errno
import grp
import os
import socket
import stat
import struct

__all__ = ["bind_unix_socket", "group_id", "peer_credentials"]

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
