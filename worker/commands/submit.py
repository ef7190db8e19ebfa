"""`orcd submit PROMPT`: put a job on the stream; with `--wait`, stream its answer."""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs import JobError, OrcdClient
from loader.registry import DEFAULT_MODEL
from worker.commands.worker import DEFAULT_REDIS_URL


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
                        help=f"Redis URL (default: $REDIS_URL or {DEFAULT_REDIS_URL})")
    parser.add_argument("--prefix", default="orcd", help="Redis key prefix (default: orcd)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="raw text to continue (or use --messages)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--messages", help="JSON file of chat messages [{role, content}...]")
    parser.add_argument("--session", help="session id: later turns reuse the KV cache")
    parser.add_argument("--wait", action="store_true",
                        help="stream the answer to stdout (default: print the job id)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, help="seconds to wait for the answer")
    add_redis_arguments(parser)


def stream_answer(client: OrcdClient, job_id: str, timeout: float | None, out=sys.stdout):
    """Print the answer as it comes; a redelivered attempt restarts it. Returns `done`."""
    for event in client.stream(job_id, timeout=timeout):
        if event.restart:
            out.write(f"\n[attempt {event.attempt} on {event.data['worker_id']}: restarting]\n")
        if event.kind == "token":
            out.write(event.data["text"])
            out.flush()
        elif event.kind == "error":
            raise JobError(f"job {job_id}: {event.data['code']}: {event.data['message']}")
        elif event.kind == "done":
            out.write("\n")
            return event.data
    return None


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.messages is None):
        raise JobError("give a PROMPT or --messages FILE, not both")
    messages = None
    if args.messages:
        with open(args.messages, encoding="utf-8") as file:
            messages = json.load(file)
    with OrcdClient(args.redis, prefix=args.prefix) as client:
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature,
                    "top_p": args.top_p, "seed": args.seed, "stop": args.stop}
        job_id = client.submit(args.prompt, messages=messages, model=args.model,
                               session_id=args.session, sampling=sampling)
        if not args.wait:
            print(job_id)
            return 0
        print(f"job {job_id}", file=sys.stderr)
        done = stream_answer(client, job_id, args.timeout)
        if done is not None:
            usage, timings = done["usage"], done["timings"]
            print(f"[{done['finish_reason']}: {usage['completion_tokens']} tokens, "
                  f"{usage['cached_tokens']} cached, ttft {timings['ttft_ms']} ms, "
                  f"{timings['decode_tokens_per_s']} tok/s]", file=sys.stderr)
    return 0
