"""``process_stats`` on a real `vhostmem serve`: the startup heap frozen before serving, the
collector's pauses reported per generation."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vhostmem.rpc.rpcenv import RpcFailed, Serve, wait_until
from tests.vhostmem.rpc.test_rpc_devices import roundtrip
from vhostmem.gc_stats import GENERATIONS
from vhostmem.rpc.protocol import INVALID_PARAMS

# The imports alone leave ~20000 tracked objects; a process that did not freeze has none frozen.
FROZEN_AT_LEAST = 5000


def test_the_startup_heap_is_frozen_and_collections_are_reported(tmp_path: Path) -> None:
    disk = tmp_path / "b.sock"
    with Serve(tmp_path, "--blk", f"socket={disk},ram=1M,io-mode=thread",
               cwd=tmp_path) as serve:
        roundtrip(disk, 3, b"\x5a")  # the device serves with the heap frozen
        stats = serve.call("process_stats")
        assert stats["pid"] == serve.pid
        gc = stats["gc"]
        assert gc["timed"] is True
        assert gc["frozen"] >= FROZEN_AT_LEAST
        gens = gc["generations"]
        assert [g["generation"] for g in gens] == list(range(GENERATIONS))
        # The freeze's own full collection ran after the counting started.
        assert gens[2]["collections"] >= 1
        for g in gens:
            assert 0 <= g["pause_us_max"] <= g["pause_us_total"]
        serve.call("process_stats", reset=True)
        after = serve.call("process_stats")["gc"]["generations"]
        assert after[2]["collections"] == 0 and after[2]["pause_us_total"] == 0
        with pytest.raises(RpcFailed) as bad:
            serve.call("process_stats", reset="yes")
        assert bad.value.code == INVALID_PARAMS and "reset" in bad.value.message
        with pytest.raises(RpcFailed) as unknown:
            serve.call("process_stats", name="b.sock")
        assert unknown.value.code == INVALID_PARAMS and "name" in unknown.value.message


def test_a_frozen_command_line_device_deleted_closes_its_files(tmp_path: Path) -> None:
    """The startup heap includes the command-line devices: deleting one still closes its disk
    and socket (explicitly, not by a collection that no longer looks at them)."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "a.sock"
    with Serve(tmp_path, "--blk", f"socket={sock},disk={image}", cwd=tmp_path) as serve:
        roundtrip(sock, 1, b"\x33")
        assert serve.call("process_stats")["gc"]["frozen"] >= FROZEN_AT_LEAST
        assert str(image) in serve.fds().values()
        serve.call("device_del", name="a.sock")
        wait_until(lambda: str(image) not in serve.fds().values(), "the disk to be closed")
        assert not sock.exists()
        assert serve.call("device_list") == []
