"""`orcd generate PROMPT`: stream one answer to the terminal, or print it as JSON at the end."""

from __future__ import annotations

import argparse
import json
import sys
import time

from pydantic import ValidationError

from gpu.request import Request, SamplingParams
from jobs.errors import JobError
from jobs.schema import Sampling, describe_validation_error, grammar_spec
from structured import GrammarCompiler
from worker.commands.options import add_model_options
from worker.loaded_model import load_model
from worker.log import configure_logging
from worker.text_stream import TextStream


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user message (or raw text with --raw)")
    add_model_options(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the model's chat template (default)")
    mode.add_argument("--raw", dest="chat", action="store_false",
                      help="continue the prompt text as is")
    parser.add_argument("--system", help="system message (chat mode)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy (default, reproducible)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string, not printed (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object at the end instead of streaming")
    parser.add_argument("--response-format", metavar="JSON",
                        help="constrain the answer, as a job's sampling.response_format, e.g. "
                        '\'{"type": "regex", "pattern": "(yes|no)"}\'')


def run(args: argparse.Namespace) -> int:
    configure_logging()
    spec = _grammar(args.response_format)  # refused before minutes of loading
    model = load_model(args.model, models_dir=args.models_dir, backend=args.backend,
                       dtype=args.dtype, matmul=args.matmul)
    tokenizer, engine = model.tokenizer, model.engine
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.prompt})
        _, prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    grammar = None
    if spec is not None:
        grammar = GrammarCompiler(tokenizer, engine.config.vocab_size, threads=1).submit(spec)
    request = Request(
        "generate", prompt_ids, sampling, max_tokens=args.max_tokens,
        stop_token_ids=tokenizer.end_of_generation_ids, grammar=grammar,
    )
    stream = TextStream(tokenizer, args.stop)
    start = time.perf_counter()
    first_token_at = None
    engine.add(request)
    token_ids: list[int] = []
    finish_reason = None
    while finish_reason is None:
        for output in engine.step():
            if first_token_at is None and output.new_token_ids:
                first_token_at = time.perf_counter()
            token_ids += output.new_token_ids
            delta = stream.push(output.new_token_ids)
            if output.finish_reason == "error":
                raise JobError(f"response_format: {output.error}")
            if output.finished:
                finish_reason = output.finish_reason
                delta += stream.finish()
            elif stream.stopped:
                engine.abort(request.request_id)
                finish_reason = "stop"
            if delta and not args.json:
                sys.stdout.write(delta)
                sys.stdout.flush()
    while engine.has_work():  # collect the abort of a stop-string finish
        engine.step()
    total = time.perf_counter() - start
    decode_s = total - ((first_token_at or start) - start)
    if args.json:
        print(json.dumps({
            "text": stream.text,
            "token_ids": token_ids,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(token_ids)},
            "backend": engine.backend.name,
            "dtype": model.dtype if engine.backend.name == "torch" else None,
            "timings": {
                "load_s": round(model.load_seconds, 3),
                "ttft_ms": round(((first_token_at or start) - start) * 1e3, 1),
                "total_ms": round(total * 1e3, 1),
                "decode_tokens_per_s": round((len(token_ids) - 1) / decode_s, 2)
                if len(token_ids) > 1 and decode_s > 0 else None,
            },
        }))
    else:
        sys.stdout.write("\n")
    return 0


def _grammar(response_format: str | None):
    """The GrammarSpec of --response-format, checked as the wire checks a job's (JobError)."""
    if response_format is None:
        return None
    try:
        value = json.loads(response_format)
        sampling = Sampling.model_validate({"response_format": value})
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError
        reason = describe_validation_error(exc) if isinstance(exc, ValidationError) else exc
        raise JobError(f"--response-format: {reason}") from None
    return grammar_spec(sampling.response_format)
