"""Run `mailpipe` under cProfile with a CPU clock: `mailpipe bench --profile DIR` starts the
service processes through this, so each writes DIR/<name>.pstats when it stops.

    python -m pipeline.bench.profile OUT.pstats -- [mailpipe arguments...]

The clock is the process's CPU time, not the wall: time spent waiting for the CPU on a busy
machine (or in a blocking system call) is not charged to the function that happened to run,
as a sampling profiler would charge it. Calls cost more under cProfile; the shares hold.
"""

from __future__ import annotations

import cProfile
import sys
import time


def main(argv: list[str]) -> None:
    out, sep, *rest = argv
    if sep != "--":
        raise SystemExit("usage: python -m pipeline.bench.profile OUT.pstats -- ARGS...")
    from pipeline.__main__ import main as mailpipe

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        mailpipe(rest)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main(sys.argv[1:])
