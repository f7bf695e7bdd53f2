"""NBD URIs (the NBD project's doc/uri.md): ``nbd://host[:port]/export`` over TCP and
``nbd+unix:///export?socket=PATH`` over a Unix socket. TLS (``nbds``, ``nbds+unix``) and
``nbd+vsock`` are not supported and say so."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

# doc/uri.md: "the default port is 10809" (the IANA-assigned NBD port).
NBD_DEFAULT_PORT = 10809
UNSUPPORTED_SCHEMES = {"nbds": "TLS", "nbds+unix": "TLS", "nbd+vsock": "vsock",
                       "nbds+vsock": "TLS over vsock"}


class NbdUriError(ValueError):
    """An NBD URI that cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class NbdAddress:
    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket: str | None = None  # a Unix socket path

    def __str__(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_nbd_uri(uri: str) -> NbdAddress:
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise NbdUriError(f"NBD URI {uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme in UNSUPPORTED_SCHEMES:
        raise NbdUriError(f"NBD URI {uri!r}: {scheme}:// ({UNSUPPORTED_SCHEMES[scheme]}) is "
                          "not supported; use nbd:// or nbd+unix://")
    if scheme not in ("nbd", "nbd+unix"):
        raise NbdUriError(f"NBD URI {uri!r}: scheme {parts.scheme or '(none)'!r} is not "
                          "nbd or nbd+unix")
    if parts.fragment:
        raise NbdUriError(f"NBD URI {uri!r}: a fragment (#{parts.fragment}) has no meaning")
    if parts.username is not None or parts.password is not None:
        raise NbdUriError(f"NBD URI {uri!r}: user names and passwords are not supported")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise NbdUriError(f"NBD URI {uri!r}: malformed query {parts.query!r}") from None
    for key, values in query.items():
        if key != "socket" or scheme != "nbd+unix":
            raise NbdUriError(f"NBD URI {uri!r}: query parameter {key!r} is not supported")
        if len(values) != 1:
            raise NbdUriError(f"NBD URI {uri!r}: socket= is given {len(values)} times")
    if scheme == "nbd+unix":
        if parts.netloc:
            raise NbdUriError(f"NBD URI {uri!r}: nbd+unix takes no host ({parts.netloc!r}); "
                              "write nbd+unix:///export?socket=PATH")
        socket_path = query.get("socket", [""])[0]
        if not socket_path:
            raise NbdUriError(f"NBD URI {uri!r}: nbd+unix needs ?socket=PATH")
        return NbdAddress(export, socket=socket_path)
    host = parts.hostname
    if not host:
        raise NbdUriError(f"NBD URI {uri!r}: nbd:// needs a host")
    try:
        port = parts.port
    except ValueError:
        raise NbdUriError(f"NBD URI {uri!r}: the port is not a number in 0..65535") from None
    if port == 0:
        raise NbdUriError(f"NBD URI {uri!r}: port 0")
    return NbdAddress(export, host=host, port=port or NBD_DEFAULT_PORT)
