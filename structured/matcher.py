"""One sequence's place in its grammar (`GrammarMatcher`) and the batch's next-token bitmasks.

A bitmask row holds one bit per token of the logits' width, 32 to an int32 word, bit
`token % 32` of word `token // 32` set where the token may come next (llguidance's layout, and
the one our sampling kernel reads). Rows are filled by llguidance's executor, on its own threads
and without the GIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jobs.response_format import GrammarError


def bitmask_words(vocab_size: int) -> int:
    """int32 words of one bitmask row for `vocab_size` tokens."""
    return (vocab_size + 31) // 32


class GrammarMatcher:
    """Where a sequence is in its grammar: which tokens may come next, and whether it is done.

    `consume` advances by the sampled token; `finished` means no token may follow (the grammar
    is complete), `accepting` that the output so far is a whole sentence of the grammar (EOS is
    allowed then). A matcher that fails (a token the grammar rejects, a parser limit) keeps its
    `error` and allows nothing more.
    """

    __slots__ = ("_matcher",)

    def __init__(self, matcher) -> None:
        self._matcher = matcher  # llguidance.LLMatcher, this sequence's own copy

    def consume(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise GrammarError(f"the grammar rejects token {token_id}: {self.error}")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def llmatcher(self):
        return self._matcher


_executor = None


def fill_bitmasks(rows: Sequence[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
    """Write each matcher's next-token mask into row `index` of `bitmask` ([N, words] int32,
    C-contiguous, host memory); rows not named are left as they are."""
    global _executor
    if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous:
        raise ValueError("bitmask must be a C-contiguous [rows, words] int32 array")
    for _, index in rows:
        if not 0 <= index < bitmask.shape[0]:
            raise ValueError(f"bitmask row {index} outside 0..{bitmask.shape[0] - 1}")
    if _executor is None:
        from llguidance import LLExecutor

        _executor = LLExecutor()
    _executor.unsafe_compute_mask_ptr(
        [(matcher.llmatcher, index) for matcher, index in rows],
        bitmask.ctypes.data, bitmask.shape[1] * 4, bitmask.shape[0],
    )
