"""`orcd cancel JOB_ID`: ask the worker to stop a job (sets `orcd:cancel:{job_id}`).

Exit 0 with a line on stdout when the cancel is requested: the job is running (it ends within
one engine step with `done`, finish_reason `cancelled`) or still queued (a worker cancels it as
soon as it takes it, within the key's hour). Exit 2, setting nothing, when the job already
finished (its output stream ends with `done` or `error`) or is unknown: in no job stream and
without an output stream (a wrong id or prefix, or it ended more than the worker's `--out-ttl`
ago). `--force` sets the key whatever the job's state.
"""

from __future__ import annotations

import argparse

from jobs import JobError
from worker.commands.submit import add_redis_arguments, redis_client


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job_id")
    parser.add_argument("--force", action="store_true",
                        help="set the cancel key even if the job is finished or unknown")
    add_redis_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with redis_client(args) as client:
        state = client.job_state(args.job_id)
        if not args.force:
            if state.state == "finished":
                data = state.last.data
                how = (f"done, finish_reason {data.get('finish_reason')}"
                       if state.last.kind == "done" else f"error {data.get('code')}")
                raise JobError(f"job {args.job_id} already finished ({how}); nothing to cancel")
            if state.state == "unknown":
                raise JobError(f"no job {args.job_id}: not queued and no output stream (a wrong "
                               "id or --prefix, or it ended longer ago than the worker's "
                               "--out-ttl); --force sets the cancel key anyway")
        client.cancel(args.job_id)
    if state.state == "queued":
        print(f"cancel requested for job {args.job_id} (queued on {state.stream}: it ends as "
              "soon as a worker takes it)")
    elif state.state == "running":
        print(f"cancel requested for job {args.job_id} (running: it ends within one step)")
    else:
        print(f"cancel key set for job {args.job_id} ({state.state}; --force)")
    return 0
