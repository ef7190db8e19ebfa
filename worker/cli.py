"""`orcd` command line: one subcommand per module under `worker/commands/`.

Every subcommand turns an `OrcdError` into its one-line message on stderr and exit status 2,
so a bad file or name never shows a traceback; so does a Redis error (Redis unreachable, a
restart that outlasted the retries, a refused command), with the Redis URL it was using
(password hidden). Ctrl-C ends any command with one line and exit status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from jobs.client import one_line, shown_url
from jobs.errors import OrcdError

# Subcommand name -> module under worker.commands exposing add_arguments(parser) and run(args).
COMMANDS = {
    "inspect": "Show what a GGUF model holds: architecture, sizes, quant mix, tokenizer, tensors.",
    "synth": "Write a GGUF with a real architecture's shapes and random weights.",
    "tokenize": "Encode, decode or render chat prompts, JSON lines in and out.",
    "generate": "Generate an answer to one prompt, streamed to stdout.",
    "perplexity": "Perplexity of a text file, computed as llama.cpp's llama-perplexity does.",
    "worker": "Serve a model's Redis job stream until SIGTERM (the daemon).",
    "submit": "Submit a generation job to Redis; --wait streams the answer.",
    "tail": "Print a job's events from the first, as JSON lines.",
    "cancel": "Ask the worker running (or about to run) a job to stop it.",
    "status": "Workers, job streams, pending jobs, dead letters and sessions.",
    "batch": "Batch jobs through RQ: submit a JSONL file, follow progress, fetch results.",
    "demo": "A Redis, a worker and a two-turn chat with its narration, end to end.",
    "gateway": "Serve an OpenAI-compatible HTTP API (chat, completions, batches) over the queue.",
}
INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or with `only` of that one alone: its module is then
    the only one imported (`orcd gateway` must not import torch, which others load)."""
    parser = argparse.ArgumentParser(prog="orcd", description="GGUF inference worker.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            continue
        module = importlib.import_module(f"worker.commands.{name}")
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def describe_redis_error(exc: RedisError, url: str | None) -> str:
    """One line: what went wrong with which Redis."""
    reason = one_line(exc)
    where = f"Redis at {shown_url(url)}" if url else "Redis"
    if isinstance(exc, RedisTimeoutError):
        return f"{where} did not answer in time: {reason}"
    if isinstance(exc, RedisConnectionError):
        return f"cannot reach {where}: {reason}"
    return f"{where} refused a command: {reason}"


def main(argv: list[str] | None = None) -> int:
    name, url = "orcd", None
    try:
        words = sys.argv[1:] if argv is None else argv
        only = words[0] if words and words[0] in COMMANDS else None
        args = build_parser(only).parse_args(argv)
        name, url = f"orcd {args.command}", getattr(args, "redis", None)
        return args.run(args) or 0
    except OrcdError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"{name}: error: {describe_redis_error(exc, url)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
