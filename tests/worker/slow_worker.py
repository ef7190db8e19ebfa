"""`python -m tests.worker.slow_worker SECONDS worker ...`: the real `orcd` command line with
every engine step made SECONDS longer (fault injection for the liveness tests)."""

from __future__ import annotations

import sys
import time

from gpu.engine import Engine
from worker.cli import main


def _slowed(step, seconds: float):
    def slow_step(self):
        time.sleep(seconds)
        return step(self)

    return slow_step


if __name__ == "__main__":
    Engine.step = _slowed(Engine.step, float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
