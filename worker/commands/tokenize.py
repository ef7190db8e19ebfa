"""`orcd tokenize`: a model's own tokenizer on JSON lines: encode, decode, render chat prompts."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from loader.registry import DEFAULT_MODEL, resolve_model
from tokenizer import GGUFTokenizer, TokenizerError, load_tokenizer

EPILOG = """\
One JSON value per line on stdin, one JSON object per line on stdout, in order:
  (encode)   "some text"                              -> {"ids": [...]}
  --decode   [1, 2, 3]                                -> {"text": "..."}
             or {"ids": [...]}, as encoding or --chat prints it (its "prompt" is ignored)
  --chat     [{"role": "user", "content": "Hi"}]      -> {"prompt": "...", "ids": [...]}
             or {"messages": [...], "add_generation_prompt": true, "tools": [...],
                 "parse_special": false}
Encoding adds BOS/EOS as the model file says; a chat prompt gets BOS unless its template
writes it, and ends with the assistant's turn opened unless "add_generation_prompt" is false.

Special tokens: by default control-token text such as <|im_start|> in the input is read as
that one token, and decoding writes special tokens out. --no-special treats such text as
plain characters (use it for untrusted text) and leaves special tokens out of decoded text.
--chat tokenizes as a worker does a job's messages: only the template's own text makes
control tokens, control-token text in message content stays plain characters; a line with
"parse_special": true parses it too (as a job with parse_special does).

Errors: a line that cannot be handled (invalid JSON, a value of the wrong type, a token id
outside the vocabulary, a failing chat template) produces {"error": "line N: reason"} in its
place, and the following lines are still processed; the exit status is then 1. Blank lines
are skipped. A model that cannot be loaded is a one-line error on stderr and exit status 2.
"""


class _BadLine(Exception):
    """An input line that is valid JSON but not what the mode expects."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help=f"a .gguf path or a model name (default: {DEFAULT_MODEL})",
    )  # fmt: skip
    parser.add_argument("--models-dir", help="directory of NAME.gguf files (or $ORCD_MODELS_DIR)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--decode", action="store_true",
                      help='lines are lists of token ids, or {"ids": [...]} objects')
    mode.add_argument("--chat", action="store_true", help="lines are chat conversations")
    parser.add_argument(
        "--no-special", action="store_true",
        help="special-token text is plain text; decoded text leaves special tokens out",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.chat and args.no_special:
        raise TokenizerError(
            "--no-special cannot be combined with --chat: message content is plain text there "
            'already, and the template\'s own control tokens must be parsed (a line may set '
            '"parse_special": true)'
        )
    tokenizer = load_tokenizer(resolve_model(args.model, args.models_dir))
    handle = _handler(tokenizer, args)
    status = 0
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            result = handle(json.loads(line))
        except (ValueError, RecursionError, _BadLine, TokenizerError) as exc:
            reason = f"invalid JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            result = {"error": f"line {number}: {reason or type(exc).__name__}"}
            status = 1
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return status


def _handler(tokenizer: GGUFTokenizer, args: argparse.Namespace) -> Callable[[Any], dict]:
    if args.decode:
        return lambda value: _decode(tokenizer, value, args.no_special)
    if args.chat:
        return lambda value: _chat(tokenizer, value)
    return lambda value: _encode(tokenizer, value, args.no_special)


def _encode(tokenizer: GGUFTokenizer, value: Any, no_special: bool) -> dict:
    if not isinstance(value, str):
        raise _BadLine(f"expected a JSON string to encode, got {_kind(value)}")
    return {"ids": tokenizer.encode(value, parse_special=not no_special)}


def _decode(tokenizer: GGUFTokenizer, value: Any, no_special: bool) -> dict:
    if isinstance(value, dict):  # a line of `orcd tokenize` or `orcd tokenize --chat`
        unknown = set(value) - {"ids", "prompt"}
        if unknown or "ids" not in value:
            raise _BadLine(
                'expected {"ids": [...]} (a "prompt" may come with it)'
                + (f"; unknown keys: {', '.join(sorted(unknown))}" if unknown else "")
            )
        value = value["ids"]
    if not isinstance(value, list) or not all(_is_int(i) for i in value):
        raise _BadLine(f"expected a JSON list of integer token ids to decode, got {_kind(value)}")
    return {"text": tokenizer.decode(value, skip_special_tokens=no_special)}


def _chat(tokenizer: GGUFTokenizer, value: Any) -> dict:
    options: dict[str, Any] = {}
    if isinstance(value, dict):
        unknown = set(value) - {"messages", "add_generation_prompt", "tools", "parse_special"}
        if unknown or "messages" not in value:
            raise _BadLine(
                'expected {"messages": [...], "add_generation_prompt": ..., "tools": [...], '
                '"parse_special": ...}'
                + (f"; unknown keys: {', '.join(sorted(unknown))}" if unknown else "")
            )
        if not isinstance(value.get("parse_special", False), bool):
            raise _BadLine('"parse_special" must be true or false, got '
                           f'{_kind(value["parse_special"])}')
        options = {k: value[k] for k in ("add_generation_prompt", "tools", "parse_special")
                   if k in value}
        value = value["messages"]
    if not isinstance(value, list):
        raise _BadLine(f"expected a JSON list of chat messages, got {_kind(value)}")
    prompt, ids = tokenizer.encode_chat(value, **options)
    return {"prompt": prompt, "ids": ids}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list" if all(_is_int(i) for i in value) else "a list holding other values"
    return {dict: "an object", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )
