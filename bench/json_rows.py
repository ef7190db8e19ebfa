"""Stdin to stdout, each JSON line cut down to the keys named (in that order), any other line
as it is: the device scripts' short view of bench/worker_loop.py's rows.

    python3 -m bench.worker_loop ... | python3 -m bench.json_rows clients overhead_pct
"""

from __future__ import annotations

import json
import sys


def main(keys: list[str]) -> None:
    for line in sys.stdin:
        try:
            row = json.loads(line)
        except ValueError:
            print(line.rstrip())
            continue
        print(json.dumps({k: row[k] for k in keys if k in row}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
