"""`orcd tail JOB_ID`: a job's events from the first, as JSON lines, until done or error.

If Redis restarts meanwhile, a note goes to stderr and reading resumes after the last event
printed: none is printed twice.
"""

from __future__ import annotations

import argparse
import json

from worker.commands.submit import (
    add_reconnect_argument,
    add_redis_arguments,
    reconnect_note,
    redis_client,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id")
    parser.add_argument("--timeout", type=float, help="seconds to wait for done/error")
    add_reconnect_argument(parser)
    add_redis_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with redis_client(args) as client:
        client.redis.ping()  # a Redis unreachable from the start is an error, not an outage
        for event in client.events(args.job_id, timeout=args.timeout,
                                   reconnect_s=args.reconnect,
                                   on_disconnect=reconnect_note("tail", args.redis)):
            print(json.dumps({"id": event.id, "event": event.kind, "data": event.data},
                             ensure_ascii=False), flush=True)
    return 0
