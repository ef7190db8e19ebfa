"""Structured output: grammars (JSON Schema, regex, Lark/GBNF) compiled for a model's vocabulary
with llguidance, and the per-sequence matchers that give the sampler its token bitmask.

    spec = GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {...}})
    spec.check()                                   # GrammarError naming what is wrong
    compiler = GrammarCompiler(tokenizer)          # compiles on its own threads, cached by hash
    future = compiler.submit(spec)                 # -> Future[GrammarMatcher]
    fill_bitmasks([(matcher, row)], bitmask)       # the next token's allowed set, 1 bit a token
    matcher.consume(token_id)

A leaf like `tokenizer/`: no torch, no Redis. The contract (`jobs/schema.py`) checks grammars
with `GrammarSpec.check`; the worker compiles them; the engine (`gpu/`) drives the matchers.
"""

from structured.compiler import GrammarCompiler, llg_tokenizer
from structured.formats import GrammarError, GrammarSpec
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
