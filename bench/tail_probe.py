"""Where a backend's latency tail comes from: its pauses, measured inside it, under blk_bench load.

    python bench/tail_probe.py [--tree .] [--backend vhostmem|vhostmem-nbd] [--io-mode thread]
                               [--rw randread] [--qd 128] [--seconds 2] [--runs 2]
                               [--notify-every N]

Starts ``vhostmem serve`` from ``--tree`` (any tree: tree A of an A/B too) through a wrapper
that records, while bench/ringdriver.py keeps ``--qd`` requests in flight on one queue:

* every cyclic garbage collection (``gc.callbacks``), per generation: count, total and longest
  pause, and how much of the pause the collecting thread was on a CPU (its thread CPU time), split
  into the ones before the first ring turn (startup) and during the load;
* every ring turn (``RingTurns.process_queue``): log2 histograms of its wall time, of the time
  the thread ran on a CPU during it (its thread CPU time: schedstat's run time is only brought
  up to date at switches and ticks) and of the time it waited runnable for one (the machine's
  other jobs: schedstat's run delay), and of the chains it popped; the longest turns with
  their split and whether a collection ran inside.

On a shared machine the wall time of a turn is what other jobs make it; its on-CPU time is the
backend's own. A tail the backend causes shows as long on-CPU turns or long collections; a tail
the machine causes shows as runqueue wait. The wrapper slows each turn by a few microseconds
(a schedstat read and a thread CPU clock read at each end) and each request by a wrapped
``pop``: compare runs of this tool with each other, not with blk_bench.

``--notify-every N``: the experiment of signalling the driver every N completions within a
turn instead of once at its end (virtio 1.2 2.7.10 allows it), inline mode only.

Prints one JSON object per run: the load generator's IOPS and p50/p99/p99.9/max latency and the
backend's record.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import peers
from bench.blk_bench import make_image, run_once, summarize

US = 1e6
LONG_TURN_US = 2000  # turns longer than this are listed one by one
LONG_TURNS_KEPT = 20

# Runs in the backend process: argv[1] the tree, argv[2] where to write the record at exit.
PROBE = r"""
import atexit, gc, json, os, runpy, sys, time
tree, out = sys.argv[1], sys.argv[2]
sys.path.insert(0, tree)
clock = time.perf_counter_ns
sched_f = open("/proc/thread-self/schedstat", "rb", buffering=0)
def sched_wait():  # ns the event loop's thread waited runnable (updated at each switch-in)
    sched_f.seek(0)
    return int(sched_f.read().split()[1])
def bucket(h, us):
    k = str(int(us).bit_length())
    h[k] = h.get(k, 0) + 1
rec = {"gc_startup": {}, "gc_load": {}, "turns": 0, "turn_wall_us": {}, "turn_cpu_us": {},
       "turn_wait_us": {}, "chains": {}, "turns_with_gc": 0, "long_turns": []}
loaded = [False]
gc_start = [0, 0]
gc_in_turn = [0]
def on_gc(phase, info):
    if phase == "start":
        gc_start[0], gc_start[1] = clock(), time.thread_time_ns()  # any thread may collect
        return
    wall = (clock() - gc_start[0]) // 1000
    cpu = (time.thread_time_ns() - gc_start[1]) // 1000
    g = rec["gc_load" if loaded[0] else "gc_startup"].setdefault(
        str(info["generation"]), {"n": 0, "wall_us": 0, "max_wall_us": 0, "cpu_us": 0,
                                  "max_cpu_us": 0})
    g["n"] += 1
    g["wall_us"] += wall
    g["cpu_us"] += cpu
    g["max_wall_us"] = max(g["max_wall_us"], wall)
    g["max_cpu_us"] = max(g["max_cpu_us"], cpu)
    gc_in_turn[0] += wall
gc.callbacks.append(on_gc)
import vhostmem.devices.blk as blk, vhostmem.session_turns as turns, vhostmem.virtqueue as vqm
popped = [0]
pop0 = vqm.Virtqueue.pop
def pop(self):
    c = pop0(self)
    if c is not None:
        popped[0] += 1
    return c
vqm.Virtqueue.pop = pop
pq0 = turns.RingTurns.process_queue
def process_queue(self, i):
    loaded[0] = True
    popped[0] = gc_in_turn[0] = 0
    w0, c0 = sched_wait(), time.thread_time_ns()
    t0 = clock()
    pq0(self, i)
    wall = (clock() - t0) // 1000
    cpu, wait = (time.thread_time_ns() - c0) // 1000, (sched_wait() - w0) // 1000
    rec["turns"] += 1
    bucket(rec["turn_wall_us"], wall)
    bucket(rec["turn_cpu_us"], cpu)
    bucket(rec["turn_wait_us"], wait)
    bucket(rec["chains"], popped[0])
    rec["turns_with_gc"] += gc_in_turn[0] > 0
    if wall > LONG and len(rec["long_turns"]) < KEPT:
        rec["long_turns"].append({"wall_us": wall, "cpu_us": cpu, "wait_us": wait,
                                  "gc_us": gc_in_turn[0], "chains": popped[0]})
turns.RingTurns.process_queue = process_queue
every = int(os.environ.get("PROBE_NOTIFY_EVERY", "0"))
if every:
    hq0 = blk.BlkDevice.handle_queue
    def handle_queue(self, vq):
        if self.backend.asynchronous or self._pool is not None:
            return hq0(self, vq)
        pop, push, serve = vq.pop, vq.push_used, self.serve
        tally = [0, 0, 0]
        started = time.monotonic_ns()
        n = used_bytes = 0
        while (chain := pop()) is not None:
            used = serve(chain, tally)
            push(chain.head, used)
            n += 1
            used_bytes += used
            if n % every == 0:
                vq.notify()
        vq.notify()
        if n:
            vq.account_turn(n, used_bytes, tally[1], tally[2], started)
    blk.BlkDevice.handle_queue = handle_queue
def dump():
    rec["frozen"] = gc.get_freeze_count()
    rec["imported"] = blk.__file__
    with open(out, "w") as f:
        json.dump(rec, f)
atexit.register(dump)
sys.argv = ["vhostmem.cli", *sys.argv[3:]]
runpy.run_module("vhostmem.cli", run_name="__main__", alter_sys=True)
""".replace("LONG", str(LONG_TURN_US)).replace("KEPT", str(LONG_TURNS_KEPT))


def probed(tree: Path, record: str, extra: list[str]) -> Any:
    """A peers.backend_argv that starts vhostmem backends through PROBE from ``tree``."""
    orig = peers.backend_argv

    def argv(name: str, socket: str, image: str, num_queues: int, *rest: Any) -> list[str]:
        cmd = orig(name, socket, image, num_queues, *rest)
        if not name.startswith("vhostmem"):
            return cmd
        assert cmd[1:3] == ["-m", "vhostmem.cli"], cmd
        return [cmd[0], "-c", PROBE, str(tree), record, *cmd[3:], *extra]
    return argv


def probe_once(a: argparse.Namespace, image: str, seed: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="tail-probe-", suffix=".json", delete=False) as f:
        record = f.name
    saved = peers.ROOT, peers.backend_argv
    extra = ["--io-mode", a.io_mode] if a.backend == "vhostmem" else []
    try:
        peers.ROOT = a.tree
        peers.backend_argv = probed(a.tree, record, extra)
        r = run_once(a.backend, image, a.rw, a.qd, 1, a.seconds, seed)
        with open(record) as f:
            backend = json.load(f)
    finally:
        peers.ROOT, peers.backend_argv = saved
        os.unlink(record)
    if not backend["imported"].startswith(str(a.tree) + os.sep):
        raise RuntimeError(f"backend for {a.tree} imported {backend['imported']}")
    s = summarize([r])
    lat = r["lat"]
    return {"iops": s["iops"], "p50_us": s["p50_us"], "p99_us": s["p99_us"],
            "p999_us": s["p999_us"], "max_us": round(float(lat.max()) * US, 1),
            "backend_cpu_us_per_io": s["backend_cpu_us_per_io"],
            "backend_runqueue_wait": s["backend_runqueue_wait"],
            "interrupts_per_io": s["interrupts_per_io"], "record": backend}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=Path("."), help="the vhostmem tree to probe")
    ap.add_argument("--backend", default="vhostmem", choices=("vhostmem", "vhostmem-nbd"))
    ap.add_argument("--io-mode", default="inline", choices=("inline", "thread"))
    ap.add_argument("--rw", default="randread", choices=("randread", "randwrite"))
    ap.add_argument("--qd", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--notify-every", type=int, default=0,
                    help="signal the driver every N completions within a turn (inline)")
    a = ap.parse_args(argv)
    a.tree = a.tree.resolve()
    if a.notify_every:
        os.environ["PROBE_NOTIFY_EVERY"] = str(a.notify_every)
    image = make_image("shm", a.image_mib)
    try:
        for run in range(a.runs):
            res = probe_once(a, image, run)
            print(json.dumps({"run": run, "tree": str(a.tree), "backend": a.backend,
                              "io_mode": a.io_mode, "rw": a.rw, "qd": a.qd,
                              "notify_every": a.notify_every} | res), flush=True)
    finally:
        os.unlink(image)


if __name__ == "__main__":
    main()
