"""Where a py-spy profile's samples went: per process and thread, the functions with the most
samples inclusive (on the stack) and exclusive (on top), in % of that thread's samples.

    python bench/spy_summary.py results/worker-C64.txt [--top 25] [--under Worker.iteration]

Reads `py-spy record --format raw` (collapsed stacks, gzipped or not, `bench/serve.py --py-spy DIR` writes
them). `--under NAME` keeps only the stacks through a frame whose function is NAME and
reports their inclusive split one level below it: what one loop turn spends its time on.
"""

from __future__ import annotations

import argparse
import gzip
import re
from collections import Counter, defaultdict

FRAME = re.compile(r"^(?P<func>.*?) \((?P<where>[^()]*)\)$")


def parse(path: str) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks per `process pid / thread` (frames outermost first, without line numbers)."""
    threads: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            parts = stack.split(";")
            # `--subprocesses` prefixes a child's stacks with its parent's process frame too.
            heads = [i for i, part in enumerate(parts) if part.startswith(("process ", "thread ("))]
            body = heads[-1] + 1 if heads else 0
            process = next((parts[i].split(":", 1)[0] for i in reversed(heads)
                            if parts[i].startswith("process ")), "")
            thread = next((parts[i] for i in heads if parts[i].startswith("thread (")), "")
            frames = [function(frame) for frame in parts[body:]]
            threads[f"{process} / {thread}"].append((frames, int(count)))
    return threads


def function(frame: str) -> str:
    """`Worker._step (worker/daemon.py:772)` -> `Worker._step (worker/daemon.py)`."""
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match['func']} ({match['where'].rsplit(':', 1)[0]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--under", help="split the time below this function (e.g. "
                        "Worker.iteration)")
    args = parser.parse_args()
    for thread, stacks in sorted(parse(args.profile).items(),
                                 key=lambda item: -sum(n for _, n in item[1])):
        total = sum(n for _, n in stacks)
        print(f"== {thread}: {total} samples")
        inclusive: Counter = Counter()
        exclusive: Counter = Counter()
        below: Counter = Counter()
        for frames, n in stacks:
            for name in set(frames):
                inclusive[name] += n
            if frames:
                exclusive[frames[-1]] += n
            if args.under:
                names = [f.split(" (", 1)[0] for f in frames]
                if args.under in names:
                    at = names.index(args.under)
                    below[frames[at + 1] if at + 1 < len(frames) else "(itself)"] += n
        if args.under and below:
            under = sum(below.values())
            print(f"  below {args.under} ({under} samples, {100 * under / total:.1f}%):")
            for name, n in below.most_common(args.top):
                print(f"    {100 * n / under:5.1f}%  {name}")
        print("  inclusive:")
        for name, n in inclusive.most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")
        print("  exclusive:")
        for name, n in exclusive.most_common(args.top):
            print(f"    {100 * n / total:5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
