"""`--blk ...,nbd=URI` and device_add's ``nbd``: parsed and checked by devspec."""

from __future__ import annotations

import pytest

from vhostmem.devices.nbd_conn import seconds_from_env
from vhostmem.devspec import UsageError, parse_blk_spec, spec_from_params


def test_blk_spec_takes_an_nbd_uri_and_timeout() -> None:
    spec = parse_blk_spec("socket=a.sock,nbd=nbd+unix:///d?socket=/run/n.sock,nbd-timeout=2.5")
    assert spec.nbd == "nbd+unix:///d?socket=/run/n.sock"
    assert spec.nbd_timeout == 2.5
    assert spec.ram is None and spec.disk is None  # no default RAM disk beside it
    assert spec.nbd_conns is None  # one per queue where the server offers multi-conn
    assert parse_blk_spec("socket=a,nbd=nbd://h/d,num-queues=4,nbd-conns=2").nbd_conns == 2


@pytest.mark.parametrize(("text", "match"), [
    ("socket=a,nbd=http://x/y", "nbd='http://x/y': .*scheme 'http'"),
    ("socket=a,nbd=nbd+unix:///d", "needs \\?socket=PATH"),
    ("socket=a,nbd=nbd://h/d,disk=x.img", "give nbd or disk, not both"),
    ("socket=a,nbd=nbd://h/d,ram=1M", "give nbd or ram, not both"),
    ("socket=a,nbd=nbd://h/d,io-mode=thread", "io-mode does not apply to nbd"),
    ("socket=a,nbd=nbd://h/d,nbd-timeout=0", "nbd-timeout='0': expected seconds"),
    ("socket=a,nbd=nbd://h/d,nbd-timeout=60", "nbd-timeout='60'"),
    ("socket=a,nbd=nbd://h/d,nbd-timeout=soon", "nbd-timeout='soon'"),
    ("socket=a,nbd=nbd://h/d,num-queues=2,nbd-conns=3",
     "nbd-conns=3 is more than num-queues=2"),
    ("socket=a,nbd=nbd://h/d,nbd-conns=0", "nbd-conns='0': expected 1..16"),
    ("socket=a,ram=1M,nbd-conns=1", "nbd-conns goes with nbd"),
])
def test_blk_spec_errors_name_the_setting(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_blk_spec(text)


def test_device_add_params() -> None:
    spec = spec_from_params({"socket": "a.sock", "nbd": "nbd://h:1/e", "nbd_timeout": 3})
    assert (spec.nbd, spec.nbd_timeout) == ("nbd://h:1/e", 3.0)
    spec = spec_from_params({"socket": "a.sock", "nbd": "nbd://h/e", "num_queues": 2,
                             "nbd_conns": 2})
    assert spec.nbd_conns == 2
    with pytest.raises(UsageError, match=r"^nbd_conns: "):
        spec_from_params({"socket": "a.sock", "nbd": "nbd://h/e", "nbd_conns": 17})
    with pytest.raises(UsageError, match=r"^nbd: "):
        spec_from_params({"socket": "a.sock", "nbd": "nbds://h/e"})
    with pytest.raises(UsageError, match=r"^nbd_timeout: "):
        spec_from_params({"socket": "a.sock", "nbd": "nbd://h/e", "nbd_timeout": True})


def test_timeouts_for_tests_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "VHOSTMEM_NBD_CONNECT_TIMEOUT"
    monkeypatch.delenv(name, raising=False)
    assert seconds_from_env(name, 5.0) == 5.0
    monkeypatch.setenv(name, "0.5")
    assert seconds_from_env(name, 5.0) == 0.5
    for bad in ("soon", "0", "-1", "6", "nan"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SystemExit, match=f"{name}='{bad}': want seconds in"):
            seconds_from_env(name, 5.0)
