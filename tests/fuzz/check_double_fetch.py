"""Regression check of the concurrent ring mutator: it catches the double fetch of git 5fd9bdf.

    git worktree add /tmp/base-fuzz 5fd9bdf
    .venv/bin/python tests/fuzz/check_double_fetch.py /tmp/base-fuzz --expect-hang
    .venv/bin/python tests/fuzz/check_double_fetch.py .

At 5fd9bdf a request whose buffer is outside guest memory had its failure status placed by
``ChainWalker._last_descriptor``, which walked the chain again in shared memory: a guest that
links the last descriptor to itself between the two walks makes it spin forever. This runs the
"double-fetch" seed of fuzz_session.py (the ring kept full of such requests while a mutator
thread links descriptor 2 to itself) TRIES times in-process, without atheris, against the
``vhostmem`` and ``protocol`` packages of TREE and the fuzz target and mutator of this
directory, and counts the inputs the watchdog stopped. The race is won only when the write
lands between the two walks (on this 2-core machine, shared, between 1 and 20 inputs in 100 on
the old code), so the count varies from run to run; on code that reads each descriptor once it
must be zero.

Exit status 0 when the outcome is the expected one: with --expect-hang a hang (the check stops
at the first), otherwise none in TRIES inputs.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path, help="source tree whose vhostmem is tested")
    parser.add_argument("--tries", type=int, default=200)
    parser.add_argument("--watchdog", type=float, default=1.0, help="seconds per chunk")
    parser.add_argument("--expect-hang", action="store_true")
    args = parser.parse_args()

    sys.path.insert(0, str(args.tree.resolve()))
    os.environ["VHOSTMEM_DEBUG_BOUNDS"] = "1"
    import fuzz_session
    from ring_mutator import WatchdogTimeout

    from vhostmem import descriptors

    fuzz_session.WATCHDOG_SECONDS = args.watchdog
    one_input = fuzz_session.build_target()
    data = fuzz_session.seed_double_fetch()
    old = hasattr(descriptors.ChainWalker, "_last_descriptor")
    print(f"vhostmem from {Path(descriptors.__file__).parent} "
          f"({'re-walks the chain' if old else 'no second walk'})")
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(args.tries):
        try:
            one_input(data)
            outcomes["finished"] += 1
        except WatchdogTimeout:
            outcomes["hang (watchdog)"] += 1
            one_input.watchdog.fired = False  # type: ignore[attr-defined]
            if args.expect_hang:
                break
    hangs = outcomes["hang (watchdog)"]
    print(f"{outcomes.total()} tries: {dict(outcomes)}")
    return 0 if (hangs > 0) == args.expect_hang else 1


if __name__ == "__main__":
    sys.exit(main())
