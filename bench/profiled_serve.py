"""``wattproxy serve`` whose own process can be profiled while it serves (benchmarks only):
SIGUSR1 starts a cProfile of its main thread, SIGUSR2 stops it and writes the stats, so a
profile covers a load run and nothing of startup or shutdown.

    python -m bench.profiled_serve STATS_PATH [wattproxy arguments...]

Signal only this process: the workers it starts (``listen.workers``) take the signals' default
action, which ends them.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from pathlib import Path
from types import FrameType


def install(stats_path: Path) -> cProfile.Profile:
    prof = cProfile.Profile()

    def start(signum: int, frame: FrameType | None) -> None:
        prof.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        prof.disable()
        part = stats_path.with_suffix(".part")
        prof.dump_stats(str(part))
        os.replace(part, stats_path)  # the reader waits for the whole file

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return prof


def main(argv: list[str]) -> int:
    install(Path(argv[0]))
    from proxy.cli import main as wattproxy

    return wattproxy(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
