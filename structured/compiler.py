"""Grammars compiled for one model's vocabulary, off the caller's thread and cached by hash.

Compiling a JSON Schema takes under a millisecond to tens of milliseconds, a large grammar up
to a second: never on the engine's loop. The vocabulary goes to llguidance as each token's
exact bytes (our `DecodeTable`: byte-level pieces decoded from the GPT-2 alphabet, SentencePiece
"▁" as a space and `<0xNN>` as its byte), control and unknown tokens marked special (prefixed
with 0xFF, llguidance's convention; a SentencePiece `<0xFF>` byte token reads as special too,
harmless: 0xFF never occurs in UTF-8 text) so no grammar can spell them, and the model's
end-of-generation ids as the grammar's EOS: any of them may end an accepting output.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from jobs.response_format import GrammarError, GrammarSpec
from structured.matcher import GrammarMatcher
from tokenizer.tokenizer import GGUFTokenizer

# llguidance's marker of a special token's bytes (its llama.cpp adapter uses it too).
SPECIAL_PREFIX = b"\xff"


def llg_tokenizer(tokenizer: GGUFTokenizer, vocab_size: int | None = None):
    """An `llguidance.LLTokenizer` over our tokenizer's vocabulary, padded with empty (never
    allowed) tokens up to `vocab_size` (the logits' width) when the model's is larger."""
    import llguidance

    table = tokenizer.decode_table
    pieces = [SPECIAL_PREFIX + piece if special else piece
              for piece, special in zip(table.pieces, table.special, strict=True)]  # fmt: skip
    if vocab_size is not None and vocab_size > len(pieces):
        pieces += [b""] * (vocab_size - len(pieces))
    end_ids = sorted(tokenizer.end_of_generation_ids)
    if not end_ids:
        raise GrammarError("the tokenizer declares no end-of-generation token for grammars")
    # llguidance tokenizes text it forces (a literal, a fixed key) with this callback and needs
    # ids whose bytes are exactly that text: a SentencePiece space prefix would shift them all.
    encoder = tokenizer
    if tokenizer.vocab.add_space_prefix:
        encoder = GGUFTokenizer(dataclasses.replace(tokenizer.vocab, add_space_prefix=False))

    class _Vocabulary:  # what llguidance.TokenizerWrapper reads
        tokens = pieces
        eos_token_id = end_ids[0]
        bos_token_id = tokenizer.bos_id
        special_token_ids = sorted(tokenizer.special_ids)

        def __call__(self, text: str) -> list[int]:
            return encoder.encode(text, add_special_tokens=False, parse_special=False)

    wrapper = llguidance.TokenizerWrapper(_Vocabulary())
    return llguidance.LLTokenizer(wrapper, n_vocab=len(pieces), eos_token=end_ids)


def after_tokens(grammar: Future, token_ids: list[int]) -> Future:
    """A future of `grammar`'s matcher once it has consumed `token_ids` (a resumed job's tokens
    streamed by an earlier attempt); it fails with GrammarError if the grammar rejects them."""
    result: Future = Future()

    def advance(done: Future) -> None:
        try:
            matcher = done.result()
            for token_id in token_ids:
                matcher.consume(token_id)
        except Exception as exc:  # noqa: BLE001 - handed to whoever waits on the future
            result.set_exception(exc)
        else:
            result.set_result(matcher)

    grammar.add_done_callback(advance)
    return result


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer on a small thread pool; each spec is compiled
    once (kept for the `cache_size` most recently used), and every request gets its own matcher
    copied from the compiled one."""

    def __init__(self, tokenizer: GGUFTokenizer, vocab_size: int | None = None, *,
                 threads: int = 2, cache_size: int = 256) -> None:  # fmt: skip
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._llg_tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._cache_size = cache_size

    def submit(self, spec: GrammarSpec) -> Future:
        """A future of a fresh `GrammarMatcher` for `spec`; it fails with GrammarError."""
        with self._cache_lock:
            compiled = self._cache.get(spec.key)
            if compiled is None:
                compiled = self._cache[spec.key] = self._pool.submit(self._compile, spec)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec.key)
        result: Future = Future()

        def copy(done: Future) -> None:
            error = done.exception()
            if error is not None:
                result.set_exception(error)
            else:
                result.set_result(GrammarMatcher(done.result().deep_copy()))

        compiled.add_done_callback(copy)
        return result

    def compile(self, spec: GrammarSpec) -> GrammarMatcher:
        """`submit(spec).result()`: for callers that may block."""
        return self.submit(spec).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def tokenizer(self):
        """The llguidance tokenizer, built on first use (~0.2 s for a 49k vocabulary)."""
        with self._tokenizer_lock:
            if self._llg_tokenizer is None:
                self._llg_tokenizer = llg_tokenizer(self._tokenizer, self._vocab_size)
            return self._llg_tokenizer

    def _compile(self, spec: GrammarSpec):
        from llguidance import LLMatcher

        matcher = LLMatcher(self.tokenizer(), spec.check(), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{spec.kind} rejected: {matcher.get_error().strip()[:500]}")
        return matcher
