"""The vhostmem backend of two source trees, A/B, qemu-storage-daemon as the peer in the same run.

    python bench/ab_trees.py --a /tmp/bench-before --b . [--rounds 2] [--turn-log]

Times one blk_bench case (default: shm randread 4 KiB, QD128, 1 queue, 1.5 s after 0.3 s of
warm-up) with the vhostmem backend started from tree A or tree B, in the slot order A B B A per
round. Each slot runs that tree's vhostmem and a fresh qemu-storage-daemon back to back (v q, then
q v in the next slot), on the same image, driven by the same load generator (bench/ringdriver.py
and vhostmem.frontend of this script's tree): only the backend process differs. It runs with cwd
and PYTHONPATH set to its tree and reports the files it imported (``vhostmem.__file__``); a run
whose backend came from elsewhere is an error.

Before each run ``top -bn1`` is read and other processes using more than 20 % of a CPU are
recorded (``busy``); ``--wait-quiet S`` waits up to S seconds for none (``--ignore``: but
these, e.g. a long job known to hold one core). ``--turn-log`` wraps the
backend's ``Virtqueue.pop`` (and ``pop_batch``) and ``BlkDevice.handle_queue`` to record how
many chains each turn
(each handle_queue call) served and whether it yielded (that slows the backend: timing runs should
not use it). ``--micro``: instead of the blk bench, the backend's hot path alone in-process
(MICRO; ``--micro-ring packed``: MICRO_PACKED, ``--micro-layout indirect`` with indirect chains;
``--micro-inflight-b`` / ``--micro-inflight-a``: MICRO_PACKED_INFLIGHT, tree B's / A's ring
tracked in an inflight region: A and B the same tree with only B tracked gives the cost of
tracking, two trees both tracked compare their tracking), same slot order. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.blk_bench import STORAGE_DIRS, machine, make_image, run_once, summarize

BUSY_PCT = 20.0
# Runs in the backend process: import vhostmem from the tree (argv[1]), write what was imported
# (and with AB_TURN_LOG the turn statistics) to argv[2] at exit, then run vhostmem.cli.
BOOT = r"""
import atexit, json, os, runpy, sys
tree, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
import vhostmem, vhostmem.virtqueue, vhostmem.devices.blk, vhostmem.session
info = {"vhostmem": vhostmem.__file__, "virtqueue": vhostmem.virtqueue.__file__,
        "has_turns": hasattr(vhostmem.virtqueue.Virtqueue, "new_turn")}
if os.environ.get("AB_TURN_LOG"):
    Vq, Blk = vhostmem.virtqueue.Virtqueue, vhostmem.devices.blk.BlkDevice
    Ses = vhostmem.session.Session
    st = {"kicks": 0, "deferred_turns": 0, "turns": 0, "chains": 0, "yielded": 0, "max": 0,
          "hist": {}}
    cur = [0]
    origin = ["other"]
    pop0, hq0, kick0 = Vq.pop, Blk.handle_queue, Ses.on_kick
    def pop(self):
        c = pop0(self)
        if c is not None:
            cur[0] += 1
        return c
    def handle_queue(self, vq):
        cur[0] = 0
        hq0(self, vq)
        n = cur[0]
        y = bool(getattr(vq, "yielded", False))
        st["turns"] += 1
        st["chains"] += n
        st["yielded"] += y
        st["max"] = max(st["max"], n)
        key = f"{origin[0]}:{n}" + (":yielded" if y else "")
        st["hist"][key] = st["hist"].get(key, 0) + 1
        origin[0] = "other"
    def on_kick(self, i):
        st["kicks"] += 1
        origin[0] = "kick"
        kick0(self, i)
    Vq.pop, Blk.handle_queue, Ses.on_kick = pop, handle_queue, on_kick
    if hasattr(Vq, "pop_batch"):  # inline turns take their chains a batch at a time
        batch0 = Vq.pop_batch
        def pop_batch(self):
            b = batch0(self)
            cur[0] += len(b)
            return b
        Vq.pop_batch = pop_batch
    if hasattr(Ses, "_next_turn"):
        nt0 = Ses._next_turn
        def next_turn(self, i):
            st["deferred_turns"] += 1
            origin[0] = "deferred"
            nt0(self, i)
        Ses._next_turn = next_turn
    info["turns"] = st
def dump():
    with open(out, "w") as f:
        json.dump(info, f)
atexit.register(dump)
dump()
sys.argv = ["vhostmem.cli", *sys.argv[3:]]
runpy.run_module("vhostmem.cli", run_name="__main__", alter_sys=True)
"""

# ``--micro``: in a process of its own per tree, tests/vhostmem/devices/bench_blk.py's setup (85
# direct 3-descriptor 4 KiB read chains on a 256-entry ring, RAM disk, one thread, no event loop);
# each batch is ``new_turn()`` (where the tree has it) + ``handle_queue`` (pop, serve, push_used,
# notify), timed alone; prints ns per request: min, 10th percentile and median over the batches.
MICRO = r"""
import json, sys, time
tree, seconds = sys.argv[1], float(sys.argv[2])
sys.path.insert(0, tree)
import vhostmem
from tests.vhostmem.devices.bench_blk import QUEUE_SIZE, build
from tests.vhostmem.ringhelpers import GPA_BASE
dev, vq, ring, heads, ram = build("direct", "inline")
avail = memoryview(ram.mm)[ring.avail - GPA_BASE:][:4 + 2 * QUEUE_SIZE].cast("H")
idx = ring.avail_idx
new_turn = getattr(vq, "new_turn", None)
per = []
clock = time.perf_counter_ns
end = time.monotonic() + seconds
while time.monotonic() < end:
    used0 = vq._used_idx
    t0 = clock()
    if new_turn is not None:
        new_turn()
    dev.handle_queue(vq)
    t1 = clock()
    assert (vq._used_idx - used0) & 0xFFFF == len(heads), "batch not fully served"
    per.append((t1 - t0) / len(heads))
    for h in heads:
        avail[2 + idx % QUEUE_SIZE] = h
        idx = (idx + 1) & 0xFFFF
    avail[1] = idx
per.sort()
print(json.dumps({"imported": vhostmem.__file__, "batches": len(per), "per_batch": len(heads),
                  "min_ns": round(per[0], 1), "p10_ns": round(per[len(per) // 10], 1),
                  "median_ns": round(per[len(per) // 2], 1)}))
"""

# The same on a packed ring (bench_blk.build_packed: 85 direct chains, or 256 indirect ones):
# the driver writes each chain's descriptors again between batches (not timed).
MICRO_PACKED = r"""
import json, sys, time
tree, seconds, layout = sys.argv[1], float(sys.argv[2]), sys.argv[3]
sys.path.insert(0, tree)
import vhostmem
from tests.vhostmem.devices.bench_blk import build_packed, republish_packed
dev, vq, ring, chains, ram = build_packed(layout, "inline")
per = []
clock = time.perf_counter_ns
end = time.monotonic() + seconds
while time.monotonic() < end:
    republish_packed(ring, chains, layout == "indirect")
    done0 = vq._returned
    t0 = clock()
    vq.new_turn()
    dev.handle_queue(vq)
    t1 = clock()
    assert vq._returned - done0 == len(chains) * (1 if layout == "indirect" else 3), "not served"
    per.append((t1 - t0) / len(chains))
per.sort()
print(json.dumps({"imported": vhostmem.__file__, "batches": len(per), "per_batch": len(chains),
                  "min_ns": round(per[0], 1), "p10_ns": round(per[len(per) // 10], 1),
                  "median_ns": round(per[len(per) // 2], 1)}))
"""

# A packed ring with its own driver (``--micro-inflight-a/-b``): the driver writes every chain
# again at its avail position between batches (not timed); buffer id = chain number. With
# argv[3] == "inflight" the ring is tracked in a packed inflight region
# (vhostmem/inflight_packed.py).
MICRO_PACKED_INFLIGHT = r"""
import json, os, sys, time
tree, seconds, inflight = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "inflight"
sys.path.insert(0, tree)
import vhostmem
from tests.vhostmem.devices.bench_blk import DISK_SIZE, HEADER, QUEUE_SIZE, READ_SIZE
from tests.vhostmem.ringhelpers import GuestRam, PackedDriver
from vhostmem.devices import BlkDevice, ram_disk
from vhostmem.devices.blk import VIRTIO_BLK_T_IN
from vhostmem.guest_memory import GuestMemory
from vhostmem.memmap import MemRegistry
from vhostmem.virtqueue import Virtqueue
ram = GuestRam(32 << 20)
mem = GuestMemory(MemRegistry())
ram.add_to(mem)
dev = BlkDevice(ram_disk(DISK_SIZE), queue_size=QUEUE_SIZE, io_mode="inline")
dev.set_features(dev.features())
vq = Virtqueue(0, mem)
ring = PackedDriver(ram, QUEUE_SIZE)
ring.counts = {}
region = None
if inflight:
    from vhostmem.inflight import InflightRegion, create_inflight_fd
    from vhostmem.inflight_packed import PACKED_LAYOUT
    fd, p = create_inflight_fd(1, QUEUE_SIZE, layout=PACKED_LAYOUT)
    region = InflightRegion.attach(fd, p["mmap_size"], 0, 1, QUEUE_SIZE, layout=PACKED_LAYOUT)
    from tests.vhostmem.ringhelpers import PACKED_FEATURES
    vq.set_features(PACKED_FEATURES)
    vq.set_inflight(region.queue(0))
ring.attach(vq)
chains = []
for n in range(QUEUE_SIZE // 3):
    hdr = ram.alloc(16)
    ram.write(hdr, HEADER.pack(VIRTIO_BLK_T_IN, 0, (n * 8) % (DISK_SIZE // 512)))
    chains.append([(hdr, 16, False), (ram.alloc(READ_SIZE, 4096), READ_SIZE, True),
                   (ram.alloc(1), 1, True)])
per = []
clock = time.perf_counter_ns
end = time.monotonic() + seconds
while time.monotonic() < end:
    for n, bufs in enumerate(chains):
        ring.add(n, bufs)
    t0 = clock()
    vq.new_turn()
    dev.handle_queue(vq)
    t1 = clock()
    assert vq._used_pos == ring.pos, "batch not fully served"
    per.append((t1 - t0) / len(chains))
per.sort()
print(json.dumps({"imported": vhostmem.__file__, "batches": len(per), "per_batch": len(chains),
                  "inflight": inflight, "min_ns": round(per[0], 1),
                  "p10_ns": round(per[len(per) // 10], 1),
                  "median_ns": round(per[len(per) // 2], 1)}))
"""


def micro(tree: Path, seconds: float, ring: str = "split", layout: str = "direct",
          inflight: bool | None = None) -> dict[str, Any]:
    """One slot. ``inflight``: None runs MICRO_PACKED (``layout`` chains); True or False runs
    MICRO_PACKED_INFLIGHT with or without a region (direct chains)."""
    if ring == "split" and (layout != "direct" or inflight is not None):
        raise ValueError("the split micro-benchmark has direct chains and no region only")
    if ring == "split":
        script, extra = MICRO, []
    elif inflight is None:
        script, extra = MICRO_PACKED, [layout]
    else:
        if layout != "direct":
            raise ValueError("the inflight micro-benchmark has direct chains only")
        script, extra = MICRO_PACKED_INFLIGHT, ["inflight" if inflight else "-"]
    out = subprocess.run([sys.executable, "-c", script, str(tree), str(seconds), *extra],
                         cwd=tree,
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True,
                         text=True, check=True).stdout
    res = json.loads(out)
    if not res["imported"].startswith(str(tree) + os.sep):
        raise RuntimeError(f"micro-benchmark for {tree} imported {res['imported']}")
    return res


def tree_info(tree: Path) -> dict[str, Any]:
    """Commit, local changes and a hash of the backend sources (vhostmem/, protocol/)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                              check=False).stdout.strip()
    h = hashlib.sha256()
    for sub in ("vhostmem", "protocol"):
        for p in sorted((tree / sub).rglob("*.py")):
            h.update(str(p.relative_to(tree)).encode() + b"\0" + p.read_bytes())
    return {"path": str(tree), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty_backend": git("status", "--porcelain", "--", "vhostmem", "protocol"),
            "src_sha256": h.hexdigest()[:16]}


def busy_processes() -> list[str]:
    """Other processes above BUSY_PCT % CPU in one ``top -bn1`` sample."""
    out = subprocess.run(["top", "-bn1", "-w", "400"], capture_output=True, text=True,
                         check=False).stdout.splitlines()
    busy = []
    try:
        start = next(i for i, line in enumerate(out) if line.lstrip().startswith("PID"))
    except StopIteration:
        return ["top: no process table"]
    for line in out[start + 1:]:
        f = line.split(None, 11)
        if len(f) < 12 or int(f[0]) == os.getpid():
            continue
        if float(f[8]) > BUSY_PCT:
            try:
                with open(f"/proc/{f[0]}/cmdline", "rb") as c:
                    cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                cmd = ""
            busy.append(f"{f[0]} {f[8]}% {(cmd or f[11])[:80]}")
    return busy


def wait_quiet(limit: float, ignore: set[str]) -> list[str]:
    """Wait up to ``limit`` s for no busy process but those whose pid or command line (a
    substring) is in ``ignore``; the last sample's busy list, ignored ones included."""
    def others(busy: list[str]) -> list[str]:
        return [b for b in busy if b.split()[0] not in ignore
                and not any(i in b.split(None, 2)[2] for i in ignore)]
    deadline = time.monotonic() + limit
    busy = busy_processes()
    while others(busy) and time.monotonic() < deadline:
        time.sleep(2)
        busy = busy_processes()
    return busy


def vhostmem_from(tree: Path, info_path: str, extra: tuple[str, ...] = ()) -> Any:
    """A peers.backend_argv that starts vhostmem through BOOT from ``tree`` (``extra``: more
    ``vhostmem serve`` arguments)."""
    orig = peers.backend_argv

    def argv(name: str, socket: str, image: str, num_queues: int,
             *rest: Any) -> list[str]:  # rest: peers.backend_argv's NBD socket
        cmd = orig(name, socket, image, num_queues, *rest)
        if name != "vhostmem":
            return cmd
        assert cmd[1:3] == ["-m", "vhostmem.cli"], cmd
        return [cmd[0], "-c", BOOT, str(tree), info_path, *cmd[3:], *extra]
    return argv


def one(backend: str, tree: Path, image: str, a: argparse.Namespace, seed: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="ab-backend-", suffix=".json", delete=False) as f:
        info_path = f.name
    saved = peers.ROOT, peers.backend_argv
    try:
        peers.ROOT = tree  # the backend's cwd and PYTHONPATH
        peers.backend_argv = vhostmem_from(tree, info_path, ("--io-mode", a.io_mode))
        r = run_once(backend, image, a.rw, a.qd, a.queues, a.seconds, seed)
    finally:
        peers.ROOT, peers.backend_argv = saved
    s = summarize([r])
    res = {k: s[k] for k in ("iops", "backend_cpu_us_per_io", "backend_cpu", "loadgen_cpu",
                             "p50_us", "p99_us", "p999_us", "kicks_per_io", "ios_per_batch")}
    if backend == "vhostmem":
        with open(info_path) as f:
            info = json.load(f)
        if not info["vhostmem"].startswith(str(tree) + os.sep):
            raise RuntimeError(f"backend for {tree} imported {info['vhostmem']}")
        res["imported"] = info["vhostmem"]
        res["has_turns"] = info["has_turns"]
        if "turns" in info:
            res["turns"] = info["turns"]
    os.unlink(info_path)
    return res


def spread(xs: list[float]) -> dict[str, float]:
    med = statistics.median(xs)
    return {"median": round(med, 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
            "spread_pct": round((max(xs) - min(xs)) / med * 100, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", required=True, type=Path, help="tree A (e.g. a worktree of BEFORE)")
    ap.add_argument("--b", required=True, type=Path, help="tree B")
    ap.add_argument("--rounds", type=int, default=2, help="A B B A rounds")
    ap.add_argument("--storage", default="shm", choices=sorted(STORAGE_DIRS))
    ap.add_argument("--rw", default="randread", choices=["randread", "randwrite"])
    ap.add_argument("--qd", type=int, default=128)
    ap.add_argument("--queues", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="seconds to wait before each run for no other busy process")
    ap.add_argument("--ignore", default="",
                    help="comma list of pids or command-line substrings --wait-quiet does not "
                    "wait for (still recorded)")
    ap.add_argument("--io-mode", choices=("inline", "thread"), default="inline",
                    help="vhostmem's --io-mode on both trees")
    ap.add_argument("--turn-log", action="store_true", help="record chains per turn (slower)")
    ap.add_argument("--micro", action="store_true",
                    help="instead: the in-process hot-path micro-benchmark, --seconds per slot")
    ap.add_argument("--micro-ring", choices=("split", "packed"), default="split",
                    help="--micro on a split (default) or packed ring")
    ap.add_argument("--micro-inflight-b", action="store_true",
                    help="--micro-ring packed: tree B's ring tracked in an inflight region")
    ap.add_argument("--micro-inflight-a", action="store_true",
                    help="--micro-ring packed: tree A's ring tracked too (both tracked: "
                         "compares two trees' tracking)")
    ap.add_argument("--micro-layout", default="direct", choices=["direct", "indirect"],
                    help="chains of the packed micro-benchmark")
    a = ap.parse_args(argv)
    if a.turn_log:
        os.environ["AB_TURN_LOG"] = "1"  # read by BOOT in the backend (qsd ignores it)
    ignore = {p for p in a.ignore.split(",") if p}
    trees = {"A": a.a.resolve(), "B": a.b.resolve()}
    info0 = {k: tree_info(t) for k, t in trees.items()}
    if a.micro:
        run_micro(a, trees, ignore, info0)
        return
    image = make_image(a.storage, a.image_mib)
    runs: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        slot = 0
        for rnd in range(a.rounds):
            for side in ("A", "B", "B", "A"):
                order = ("vhostmem", "qsd") if slot % 2 == 0 else ("qsd", "vhostmem")
                run: dict[str, Any] = {"round": rnd, "slot": slot, "side": side,
                                       "order": "/".join(order)}
                for backend in order:
                    run[f"busy_before_{backend}"] = wait_quiet(a.wait_quiet, ignore)
                    run[backend] = one(backend, trees[side], image, a, rnd)
                run["src_sha256"] = tree_info(trees[side])["src_sha256"]
                run["ratio_iops"] = round(run["vhostmem"]["iops"] / run["qsd"]["iops"], 3)
                print(json.dumps({k: run[k] for k in ("slot", "side", "ratio_iops")}
                                 | {"v": run["vhostmem"]["iops"], "q": run["qsd"]["iops"],
                                    "busy": run["busy_before_vhostmem"]}), file=sys.stderr,
                      flush=True)
                runs.append(run)
                slot += 1
    finally:
        os.unlink(image)
    summary: dict[str, Any] = {}
    for side in ("A", "B"):
        rs = [r for r in runs if r["side"] == side]
        summary[side] = {
            "vhostmem_iops": spread([r["vhostmem"]["iops"] for r in rs]),
            "vhostmem_cpu_us_per_io": spread([r["vhostmem"]["backend_cpu_us_per_io"] for r in rs]),
            "qsd_iops": spread([r["qsd"]["iops"] for r in rs]),
            "qsd_cpu_us_per_io": spread([r["qsd"]["backend_cpu_us_per_io"] for r in rs]),
            "ratio_iops": spread([r["ratio_iops"] for r in rs]),
        } | {f"{b}_{p}": spread([r[b][p] for r in rs])
             for b in ("vhostmem", "qsd") for p in ("p99_us", "p999_us")}
    for key in ("vhostmem_iops", "vhostmem_cpu_us_per_io", "qsd_iops", "ratio_iops",
                "vhostmem_p99_us", "vhostmem_p999_us"):
        ma, mb = summary["A"][key]["median"], summary["B"][key]["median"]
        summary.setdefault("b_vs_a_pct", {})[key] = round((mb - ma) / ma * 100, 1)
    out = {"bench": "ab_trees", "machine": machine(), "case": {
        "storage": a.storage, "rw": a.rw, "bs": 4096, "qd": a.qd, "queues": a.queues,
        "io_mode": a.io_mode,
        "seconds": a.seconds, "warmup_s": 0.3}, "turn_log": a.turn_log,
        "argv": sys.argv[1:], "loadgen_frontend": sys.modules["vhostmem.frontend"].__file__,
        "trees": info0, "trees_at_end": {k: tree_info(t) for k, t in trees.items()},
        "runs": runs, "summary": summary, "wall_s": round(time.monotonic() - t0, 1)}
    print(json.dumps(out, indent=1))


def run_micro(a: argparse.Namespace, trees: dict[str, Path], ignore: set[str],
              info0: dict[str, Any]) -> None:
    runs = []
    t0 = time.monotonic()
    for rnd in range(a.rounds):
        for side in ("A", "B", "B", "A"):
            busy = wait_quiet(a.wait_quiet, ignore)
            r = {"round": rnd, "side": side, "busy_before": busy} | micro(
                trees[side], a.seconds, a.micro_ring, a.micro_layout,
                (a.micro_inflight_a if side == "A" else a.micro_inflight_b)
                if a.micro_inflight_a or a.micro_inflight_b else None)
            r["src_sha256"] = tree_info(trees[side])["src_sha256"]
            print(json.dumps({k: r[k] for k in ("side", "min_ns", "median_ns", "busy_before")}),
                  file=sys.stderr, flush=True)
            runs.append(r)
    summary: dict[str, Any] = {}
    for side in ("A", "B"):
        rs = [r for r in runs if r["side"] == side]
        summary[side] = {k: spread([r[k] for r in rs]) for k in ("min_ns", "p10_ns", "median_ns")}
    summary["b_vs_a_pct"] = {
        k: round((summary["B"][k]["median"] - summary["A"][k]["median"])
                 / summary["A"][k]["median"] * 100, 1) for k in ("min_ns", "p10_ns", "median_ns")}
    print(json.dumps({"bench": "ab_trees --micro", "machine": machine(), "argv": sys.argv[1:],
                      "trees": info0, "runs": runs, "summary": summary,
                      "wall_s": round(time.monotonic() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
