"""`orcd batch submit|status|results|worker`: batch jobs through RQ (see `jobs.batch`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from tqdm import tqdm

from jobs.batch import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    QUEUE,
    batch_results,
    batch_status,
    enqueue_batch,
    fetch_batch,
)
from jobs.errors import JobError
from jobs.redis_url import connect
from loader.registry import DEFAULT_MODEL
from worker.commands.submit import add_redis_arguments

FINAL_STATES = ("finished", "failed", "stopped", "canceled")
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} items{postfix}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    submit = sub.add_parser("submit", help="enqueue a JSONL file of items; prints the batch id")
    submit.add_argument("file", help="JSONL: one item per line ({\"prompt\": ...} or "
                        "{\"messages\": [...]}, optional sampling fields); '-' for stdin")
    submit.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    submit.add_argument("--out", help="JSONL results file, written by the RQ worker")
    submit.add_argument("--max-tokens", type=int, help="default max_tokens of every item")
    submit.add_argument("--temperature", type=float, help="default temperature of every item")
    submit.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS,
                        help=f"tries per item before it is reported failed "
                        f"(default {DEFAULT_MAX_ATTEMPTS})")
    submit.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds for the whole batch (default {DEFAULT_TIMEOUT_S})")
    add_redis_arguments(submit)
    status = sub.add_parser("status", help="progress of a batch")
    status.add_argument("batch_id")
    status.add_argument("--follow", action="store_true", help="update until the batch ends")
    status.add_argument("--json", action="store_true", help="one JSON object")
    add_redis_arguments(status)
    results = sub.add_parser("results", help="a finished batch's results as JSON lines")
    results.add_argument("batch_id")
    add_redis_arguments(results)
    work = sub.add_parser("worker", help=f"run an RQ worker on queue {QUEUE}")
    work.add_argument("--burst", action="store_true", help="exit once the queue is empty")
    work.add_argument("--name", help="RQ worker name (default: RQ's)")
    add_redis_arguments(work)


def read_items(path: str) -> list[dict]:
    """Items of a JSONL file; blank lines are skipped, a line that is not JSON is an error."""
    file = sys.stdin if path == "-" else open(path, encoding="utf-8")
    items = []
    with file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise JobError(f"{path} line {number}: not JSON ({exc.msg})") from None
    return items


def _fetch(args: argparse.Namespace, connection: redis.Redis):
    try:
        return fetch_batch(args.batch_id, connection)
    except NoSuchJobError:
        raise JobError(f"no batch {args.batch_id} (unknown, or its results expired)") from None


def run_submit(args: argparse.Namespace) -> int:
    items = read_items(args.file)
    sampling = {key: value for key, value in
                (("max_tokens", args.max_tokens), ("temperature", args.temperature))
                if value is not None}
    batch_id = enqueue_batch(items, args.model, sampling, redis_url=args.redis,
                             prefix=args.prefix, out_path=args.out,
                             max_attempts=args.max_attempts, timeout_s=args.timeout)
    print(batch_id)
    return 0


def _describe(status: dict) -> str:
    return (f"{status['status']}, {status['done'] or 0} done, {status['failed'] or 0} failed, "
            f"{status['retries'] or 0} retried")


def run_status(args: argparse.Namespace) -> int:
    connection = connect(args.redis)
    job = _fetch(args, connection)
    status = batch_status(job)
    if args.json:
        print(json.dumps(status))
    elif not args.follow:
        print(tqdm.format_meter(status["completed"] or 0, status["total"] or 0, 0,
                                prefix=f"batch {job.id[:8]}", bar_format=BAR_FORMAT,
                                postfix=_describe(status)))
    else:
        with tqdm(total=status["total"] or 0, file=sys.stdout, desc=f"batch {job.id[:8]}",
                  bar_format=BAR_FORMAT, dynamic_ncols=True) as bar:
            while True:
                bar.n = status["completed"] or 0
                bar.set_postfix_str(_describe(status), refresh=True)
                if status["status"] in FINAL_STATES:
                    break
                time.sleep(0.5)
                status = batch_status(job)
    return 0 if status["status"] != "failed" else 1


def run_results(args: argparse.Namespace) -> int:
    connection = connect(args.redis)
    job = _fetch(args, connection)
    results = batch_results(job)
    if results is None:
        state = job.get_status(refresh=True).value
        raise JobError(f"batch {args.batch_id} has no results: it is {state}")
    for result in results:
        print(json.dumps(result, ensure_ascii=False))
    return 0


def run_worker(args: argparse.Namespace) -> int:
    connection = connect(args.redis)
    worker = Worker([Queue(QUEUE, connection=connection)], connection=connection,
                    name=args.name)
    worker.work(burst=args.burst)
    return 0


def run(args: argparse.Namespace) -> int:
    return {"submit": run_submit, "status": run_status, "results": run_results,
            "worker": run_worker}[args.batch_command](args)
