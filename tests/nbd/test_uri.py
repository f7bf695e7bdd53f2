"""NBD URIs (the NBD URI specification): what is accepted, and errors naming what is wrong."""

from __future__ import annotations

import pytest

from nbd import NbdAddress, NbdUriError, parse_nbd_uri


@pytest.mark.parametrize(("uri", "expected"), [
    ("nbd://example.com/disk", NbdAddress("disk", host="example.com", port=10809)),
    ("nbd://10.0.0.1:1234/", NbdAddress("", host="10.0.0.1", port=1234)),
    ("nbd://host", NbdAddress("", host="host")),
    ("nbd://[::1]:5000/a%2Fb", NbdAddress("a/b", host="::1", port=5000)),
    ("nbd+unix:///vm1?socket=/run/nbd.sock", NbdAddress("vm1", socket="/run/nbd.sock")),
    ("nbd+unix:///?socket=rel.sock", NbdAddress("", socket="rel.sock")),
    ("NBD://h/x", NbdAddress("x", host="h")),
])
def test_accepted(uri: str, expected: NbdAddress) -> None:
    assert parse_nbd_uri(uri) == expected


def test_str_round_trips() -> None:
    for uri in ("nbd://h:77/x", "nbd+unix:///e?socket=/s", "nbd://[::1]:9/e"):
        assert parse_nbd_uri(str(parse_nbd_uri(uri))) == parse_nbd_uri(uri)


@pytest.mark.parametrize(("uri", "match"), [
    ("nbds://h/x", "TLS"),
    ("nbd+vsock:///x", "vsock"),
    ("http://h/x", "scheme 'http'"),
    ("/just/a/path", r"scheme '\(none\)'"),
    ("nbd:///x", "needs a host"),
    ("nbd://h:99999/x", "port"),
    ("nbd://h:0/x", "port 0"),
    ("nbd+unix:///x", r"needs \?socket=PATH"),
    ("nbd+unix://host/x?socket=/s", "takes no host"),
    ("nbd+unix:///x?socket=/a&socket=/b", "2 times"),
    ("nbd://h/x?tls=on", "'tls' is not supported"),
    ("nbd://u:p@h/x", "user names"),
    ("nbd://h/x#frag", "fragment"),
])
def test_refused_with_the_reason(uri: str, match: str) -> None:
    with pytest.raises(NbdUriError, match=match):
        parse_nbd_uri(uri)
