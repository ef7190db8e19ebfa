"""`orcd tail JOB_ID`: a job's events from the first, as JSON lines, until done or error."""

from __future__ import annotations

import argparse
import json

from jobs import OrcdClient
from worker.commands.submit import add_redis_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id")
    parser.add_argument("--timeout", type=float, help="seconds to wait for done/error")
    add_redis_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with OrcdClient(args.redis, prefix=args.prefix) as client:
        for event in client.events(args.job_id, timeout=args.timeout):
            print(json.dumps({"id": event.id, "event": event.kind, "data": event.data},
                             ensure_ascii=False), flush=True)
    return 0
