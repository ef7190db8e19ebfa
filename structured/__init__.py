"""Structured output: grammars (JSON Schema, regex, Lark/GBNF) compiled for a model's vocabulary
with llguidance, and the per-sequence matchers that give the sampler its token bitmask.

    spec = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {...}})
    spec.check()                                   # GrammarError naming what is wrong
    compiler = GrammarCompiler(tokenizer)          # compiles on its own threads, cached by hash
    future = compiler.submit(spec)                 # -> Future[GrammarMatcher]
    fill_bitmasks([(matcher, row)], bitmask)       # the next token's allowed set, 1 bit a token
    matcher.consume(token_id)

On the floor of `tokenizer/`: no torch, no Redis. `GrammarSpec` and `GrammarError` live in the
contract (`jobs/response_format.py`), which checks grammars at validation; the worker compiles
them here; the engine (`gpu/`) drives the matchers.
"""

from jobs.response_format import GrammarError, GrammarSpec
from structured.compiler import GrammarCompiler, llg_tokenizer
from structured.matcher import GrammarMatcher, bitmask_words, fill_bitmasks

__all__ = [
    "GrammarCompiler",
    "GrammarError",
    "GrammarMatcher",
    "GrammarSpec",
    "bitmask_words",
    "fill_bitmasks",
    "llg_tokenizer",
]
