"""Device specs: the settings of one vhost-user-blk device, parsed and checked the same way for
``vhostmem serve --blk`` and the management socket's ``device_add``, and the device they make.

Every error is a :class:`UsageError` whose message names the setting that was wrong.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nbd import ExportInfo, NbdUriError, parse_nbd_uri
from vhostmem.devices.blk import BlkDevice
from vhostmem.devices.blk_backend import BlkBackend, open_image, ram_disk
from vhostmem.devices.nbd_backend import DEFAULT_TIMEOUT as DEFAULT_NBD_TIMEOUT
from vhostmem.devices.nbd_backend import NbdBackend

DEFAULT_SOCKET = "vhostmem.sock"
DEFAULT_RAM_SIZE = 1 << 30
MAX_QUEUES = 16
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
TRUE_WORDS = {"on", "yes", "true", "1"}
FALSE_WORDS = {"off", "no", "false", "0"}
SOCKET_MODE_BITS = 0o777
BLK_KEYS = {"socket", "client", "disk", "ram", "readonly", "num-queues", "serial", "io-mode",
            "share", "fd", "fdname", "nbd", "nbd-timeout", "nbd-conns",
            "workers"}
# nbd-timeout bounds: a request must fail before a departing frontend's drain gives up
# (server.DRAIN_TIMEOUT_SECONDS, 30 s), so the guest sees an error, not a dropped connection.
NBD_TIMEOUT_MIN = 0.1
NBD_TIMEOUT_MAX = 25.0
# inline: requests are served on the event loop (fastest on RAM and page cache);
# thread: file I/O runs on a thread pool so a slow disk cannot stall the control plane.
IO_MODES = ("inline", "thread")
# Data-plane worker processes per device (docs/architecture.md, "Data plane"); 0: none, the
# rings run on the event loop (the default: see bench/RESULTS.md for when workers pay off).
MAX_WORKERS = MAX_QUEUES
DEFAULT_WORKERS = 0


class UsageError(Exception):
    """A command-line or device-spec error; the message names the offending option."""


@dataclass
class BlkSpec:
    socket: str | None = None
    client: str | None = None
    disk: str | None = None
    ram: int | None = None
    nbd: str | None = None  # an NBD URI: the disk is that export (devices/nbd_backend.py)
    nbd_timeout: float = DEFAULT_NBD_TIMEOUT
    # NBD connections on a multi-conn export (None: one per queue); one without multi-conn.
    nbd_conns: int | None = None
    readonly: bool = False
    num_queues: int = 1
    serial: str = "vhostmem"
    io_mode: str = "inline"
    workers: int = DEFAULT_WORKERS
    # Devices naming the same share serve one disk (a RAM disk, too); so do devices given the
    # same disk file. Only one frontend at a time may run rings on it (live migration).
    share: str | None = None
    # An inherited listening socket (fd=N, --fd N, device_add's fd, or one systemd passed:
    # vhostmem.launch).
    fd: int | None = None
    fdname: str | None = None  # the systemd socket of this LISTEN_FDNAMES name
    fd_path: str | None = None  # the path the inherited socket is bound to, if any
    fd_option: str = "--fd"  # how the fd was given, for errors
    name: str | None = None  # the device's name (device_add; default: default_name)

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

    @property
    def default_name(self) -> str:
        """The name a device gets when none is given: its socket file's name."""
        if self.fd is not None and not (self.socket or self.client):
            return f"fd{self.fd}"
        return os.path.basename(self.path.rstrip("/")) or self.path


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


def parse_workers(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= MAX_WORKERS:
        raise UsageError(f"workers={text!r}: expected 0..{MAX_WORKERS}")
    return int(text)


def parse_nbd_uri_setting(text: str) -> str:
    try:
        parse_nbd_uri(text)
    except NbdUriError as exc:
        raise UsageError(f"nbd={text!r}: {exc}") from None
    return text


def parse_nbd_timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not NBD_TIMEOUT_MIN <= value <= NBD_TIMEOUT_MAX:
        raise UsageError(f"nbd-timeout={text!r}: expected seconds in "
                         f"{NBD_TIMEOUT_MIN:g}..{NBD_TIMEOUT_MAX:g}")
    return value


def parse_nbd_conns(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_QUEUES:
        raise UsageError(f"nbd-conns={text!r}: expected 1..{MAX_QUEUES}")
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
        elif key == "nbd":
            spec.nbd = parse_nbd_uri_setting(value)
        elif key == "nbd-timeout":
            spec.nbd_timeout = parse_nbd_timeout(value)
        elif key == "nbd-conns":
            spec.nbd_conns = parse_nbd_conns(value)
        elif key == "workers":
            spec.workers = parse_workers(value)
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
    if spec.nbd is not None:
        other = [k for k in ("disk", "ram") if getattr(spec, k) is not None]
        if other:
            raise UsageError(f"{where}: give nbd or {other[0]}, not both")
        if spec.io_mode != "inline":
            raise UsageError(f"{where}: io-mode does not apply to nbd (NBD requests are "
                             "always asynchronous on the event loop)")
        if spec.nbd_conns is not None and spec.nbd_conns > spec.num_queues:
            # A connection serves one queue or more: more connections than queues would idle.
            raise UsageError(f"{where}: nbd-conns={spec.nbd_conns} is more than "
                             f"num-queues={spec.num_queues}")
    elif spec.nbd_conns is not None:
        raise UsageError(f"{where}: nbd-conns goes with nbd")
    if spec.workers and (spec.nbd is not None or spec.io_mode != "inline"):
        raise UsageError(f"{where}: workers= needs io-mode=inline and a disk or ram (NBD and "
                         "thread-mode requests are served by this process only)")
    if spec.ram is None and spec.disk is None and spec.share is None and spec.nbd is None:
        spec.ram = DEFAULT_RAM_SIZE
    if len(spec.serial.encode()) > 20:
        raise UsageError(f"{where}: serial {spec.serial!r} is longer than 20 bytes")
    return spec


def make_device(spec: BlkSpec, shared: dict[str, tuple[BlkSpec, BlkBackend]] | None = None,
                nbd_connection: tuple[socket.socket, ExportInfo] | None = None) -> BlkDevice:
    """A device for ``spec``; specs with the same ``share`` or disk file get one backend
    (``shared`` remembers them across calls). ``nbd_connection``: the export of ``spec.nbd``
    already connected (see NbdBackend)."""
    options: dict[str, Any] = {
        "num_queues": spec.num_queues,
        "serial": spec.serial,
        "io_mode": spec.io_mode,
    }
    key = share_key(spec)
    if shared is not None and key is not None and key in shared:
        first, backend = shared[key]
        check_same_disk(first, spec)
        return BlkDevice(backend, **options)
    if spec.nbd is not None:
        backend = NbdBackend(spec.nbd, readonly=spec.readonly, timeout=spec.nbd_timeout,
                             connections=spec.nbd_conns or spec.num_queues,
                             connection=nbd_connection)
        # The export's minimum block size is the guest's logical block size (NBD "Block size
        # constraints": smaller requests could be refused).
        options["blk_size"] = max(512, backend.min_block)
    elif spec.disk is not None:
        backend = open_image(spec.disk, readonly=spec.readonly)
    elif spec.ram is not None:
        backend = ram_disk(spec.ram, readonly=spec.readonly)
    else:
        raise UsageError(f"share={spec.share}: no device names its disk= or ram=")
    try:
        device = BlkDevice(backend, **options)
    except BaseException:
        backend.close()  # the spec was checked, but a refused device must not keep the disk
        raise
    if shared is not None and key is not None:
        shared[key] = (spec, backend)
    return device


def share_key(spec: BlkSpec) -> str | None:
    if spec.share is not None:
        return f"share:{spec.share}"
    if spec.disk is not None:
        return f"disk:{os.path.realpath(spec.disk)}"
    if spec.nbd is not None:
        return f"nbd:{parse_nbd_uri(spec.nbd)}"
    return None


def check_same_disk(first: BlkSpec, spec: BlkSpec) -> None:
    """Devices sharing a disk must agree on it (a later one may leave disk/ram out)."""
    where = f"{spec.path} shares the disk of {first.path}"
    if spec.readonly != first.readonly:
        raise UsageError(f"{where}: readonly must be the same on both")
    for key in ("disk", "ram", "nbd"):
        mine, theirs = getattr(spec, key), getattr(first, key)
        if mine is not None and theirs is not None and mine != theirs:
            raise UsageError(f"{where}: {key}={mine} differs from {key}={theirs}")
        if mine is not None and theirs is None:
            raise UsageError(f"{where}: it gives {key}= where the first one does not")


T = TypeVar("T")
# device_add parameter -> its --blk key (the JSON names use underscores).
PARAM_KEYS = {
    "socket": "socket", "client": "client", "fd": "fd", "disk": "disk", "ram": "ram",
    "readonly": "readonly", "num_queues": "num-queues", "serial": "serial",
    "io_mode": "io-mode", "share": "share", "name": "name", "nbd": "nbd",
    "nbd_timeout": "nbd-timeout", "nbd_conns": "nbd-conns", "workers": "workers",
}
MAX_NAME_BYTES = 64


def spec_from_params(params: dict[str, Any]) -> BlkSpec:
    """A :class:`BlkSpec` from ``device_add`` parameters (JSON values). Strings where ``--blk``
    takes strings; ``ram`` a byte count or a size string; ``readonly`` a boolean (or on/off);
    ``num_queues`` and ``fd`` integers. Exactly one of socket, client and fd."""
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise UsageError(f"unknown parameter {unknown[0]!r} (parameters: {sorted(PARAM_KEYS)})")
    spec = BlkSpec()
    for key in ("socket", "client", "disk", "serial", "share", "name"):
        if key in params:
            setattr(spec, key, _string(params, key))
    if "ram" in params:
        value = params["ram"]
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageError(f"ram: expected a byte count or a size like 64M, got {value!r}")
        if isinstance(value, int) and value <= 0:
            raise UsageError(f"ram: {value} is not a positive size")
        spec.ram = _named("ram", parse_size, str(value))
    if "readonly" in params:
        value = params["readonly"]
        if isinstance(value, bool):
            spec.readonly = value
        elif isinstance(value, str):
            spec.readonly = parse_bool("readonly", value)
        else:
            raise UsageError(f"readonly: expected true or false, got {value!r}")
    if "num_queues" in params:
        spec.num_queues = _named("num_queues", parse_num_queues,
                                 str(_integer(params, "num_queues")))
    if "io_mode" in params:
        spec.io_mode = _named("io_mode", parse_io_mode, _string(params, "io_mode"))
    if "workers" in params:
        spec.workers = _named("workers", parse_workers, str(_integer(params, "workers")))
    if "nbd" in params:
        spec.nbd = _named("nbd", parse_nbd_uri_setting, _string(params, "nbd"))
    if "nbd_timeout" in params:
        value = params["nbd_timeout"]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise UsageError(f"nbd_timeout: expected seconds, got {value!r}")
        spec.nbd_timeout = _named("nbd_timeout", parse_nbd_timeout, str(value))
    if "nbd_conns" in params:
        spec.nbd_conns = _named("nbd_conns", parse_nbd_conns, str(_integer(params, "nbd_conns")))
    if "fd" in params:
        spec.fd = _integer(params, "fd")
        spec.fd_option = f"fd {spec.fd}"
    where = "device_add"
    given = [key for key in ("socket", "client", "fd") if params.get(key) is not None]
    if len(given) != 1:
        raise UsageError(f"{where}: give exactly one of socket, client and fd "
                         f"(got {', '.join(given) or 'none'})")
    for key in ("socket", "client"):
        if getattr(spec, key) == "":
            raise UsageError(f"{key}: an empty path")
    if spec.name is not None and not _good_name(spec.name):
        raise UsageError(f"name {spec.name!r}: expected 1..{MAX_NAME_BYTES} printable "
                         "characters without spaces")
    return check_spec(spec, where)


def _named(key: str, parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``; its error names the device_add parameter (the --blk parsers name the
    --blk key)."""
    try:
        return parse(text)
    except UsageError as exc:
        raise UsageError(f"{key}: {exc}") from None


def _good_name(name: str) -> bool:
    return 0 < len(name.encode()) <= MAX_NAME_BYTES and name.isprintable() and " " not in name


def _string(params: dict[str, Any], key: str) -> str:
    value = params[key]
    if not isinstance(value, str):
        raise UsageError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    if "\0" in value:
        raise UsageError(f"{key}: contains a NUL character")
    return value


def _integer(params: dict[str, Any], key: str) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    return value
