"""What a step's outputs cost on the engine process's pipe: pickling `StepOutput` objects
against `pack_outputs` tuples (worker/engine_process.py), each way, for C outputs of one
token. The child's loop is a small model's critical path, so its per-step host time counts.

    python bench/pipe_outputs.py [--outputs 1,16,64,128,256] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from gpu.request import StepOutput  # noqa: E402
from worker.engine_process import pack_outputs, unpack_outputs  # noqa: E402


def per_call_us(fn, repeat: int) -> float:
    for _ in range(repeat // 10):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return 1e6 * (time.perf_counter() - start) / repeat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default="1,16,64,128,256")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.outputs.split(",")):
        outputs = [StepOutput(f"{i:032x}", [1234]) for i in range(n)]
        objects = pickle.dumps(("out", outputs), pickle.HIGHEST_PROTOCOL)
        tuples = pickle.dumps(("out", pack_outputs(outputs)), pickle.HIGHEST_PROTOCOL)
        row = {
            "outputs": n,
            "objects_send_us": per_call_us(
                lambda o=outputs: pickle.dumps(("out", o), pickle.HIGHEST_PROTOCOL), args.repeat),
            "tuples_send_us": per_call_us(
                lambda o=outputs: pickle.dumps(("out", pack_outputs(o)),
                                               pickle.HIGHEST_PROTOCOL), args.repeat),
            "objects_read_us": per_call_us(lambda b=objects: pickle.loads(b), args.repeat),
            "tuples_read_us": per_call_us(lambda b=tuples: unpack_outputs(pickle.loads(b)[1]),
                                          args.repeat),
            "objects_bytes": len(objects), "tuples_bytes": len(tuples),
        }
        rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
        print(f"{n:4d} outputs: send {row['objects_send_us']:7.1f} -> {row['tuples_send_us']:6.1f}"
              f" µs, read {row['objects_read_us']:7.1f} -> {row['tuples_read_us']:6.1f} µs, "
              f"{len(objects)} -> {len(tuples)} bytes")
    print(write_result("pipe_outputs", {"repeat": args.repeat, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
