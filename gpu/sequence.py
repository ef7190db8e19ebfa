"""A request's state inside the engine: its tokens, how many have KV, and where that KV lives."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from gpu.request import Request, TokenLogprobs


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
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)  # prefix keys of registered blocks
    num_cached_tokens: int = 0  # reused from the prefix cache at (first) admission
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    arrival: int = 0  # FCFS order of add()

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
