"""A request's state inside the engine: its tokens, how many have KV, and where that KV lives."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gpu.request import Request
from structured.matcher import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed` of them have KV in `block_table`."""

    request: Request
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    # Set while a launched step is unread: its tokens of this sequence (KV being written,
    # counted into num_computed at the read) and the token it samples (appended at the read).
    num_in_flight: int = 0
    num_pending: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix keys of registered blocks
    num_cached_tokens: int = 0  # reused from the prefix cache at (first) admission
    finish_reason: str | None = None
    matcher: GrammarMatcher | None = None  # a constrained request's place in its grammar
    error: str | None = None  # set with finish_reason "error"

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def reaches_length(self, max_model_len: int, pending: int = 0) -> bool:
        """Whether the sequence, with `pending` more tokens (sampled, not yet read), has as many
        output tokens as the request allows or fills the context: it stops on length there."""
        return (self.num_output_tokens + pending >= self.request.max_tokens
                or self.num_tokens + pending >= max_model_len)  # fmt: skip
