"""Continuous batching: which sequences run this step, with how many tokens each.

Each step first gives every running sequence its next tokens (one for a decode, a chunk for
an unfinished prefill), higher priorities first, then admits waiting sequences while the token
budget, the sequence cap and the KV pool allow: the best score first, a request's `priority`
plus one level per `priority_aging_s` seconds since it arrived (so a low priority is never
starved; equal scores keep queue order, which is first come first served). Prompts are
prefilled in chunks of at most the remaining budget, so a long prompt delays running decodes by
at most one chunk per step. When KV blocks run out, the pool reclaims idle sessions and cached
prefixes; if that is not enough, the running sequence of the lowest priority (the most recently
admitted among equals) is preempted: its blocks are freed and it goes back to the front of the
queue to be recomputed later (its tokens are kept; nothing is dropped).

While a step is in flight (launched, its sampled ids not read yet), `schedule_ahead()` plans
the next one, counting each sequence's tokens in flight and its pending token (vLLM's output
placeholders): decodes of the pending tokens, the next prefill chunks and admissions, by the
same rules as `schedule()`; the engine splices the device ids into the pending tokens' rows.
A sequence's tokens do not depend on which step computes them, so the two give the same tokens.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field

from gpu.events import EngineEvent
from gpu.kv_cache import KVCache
from gpu.sequence import Sequence, SequenceStatus

DEFAULT_PRIORITY_AGING_S = 1.0  # seconds of waiting worth one priority level


@dataclass(slots=True)
class Schedule:
    """The sequences of one step and their number of new tokens, in batch order.

    Sequence i's new tokens are positions `start .. start + n - 1`, where start is its
    `num_computed + num_in_flight`; those at or past `num_tokens` are pending (on the device).
    `sampled` are the sequences whose next token this step chooses, in batch order.
    """

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    sampled: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    """Waiting and running queues over one `KVCache`."""

    def __init__(self, kv: KVCache, *, max_num_seqs: int = 256, max_batch_tokens: int = 512,
                 max_model_len: int = sys.maxsize,
                 priority_aging_s: float = DEFAULT_PRIORITY_AGING_S, clock=time.time):  # fmt: skip
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be positive")
        if priority_aging_s <= 0:
            raise ValueError("priority_aging_s must be positive")
        self.priority_aging_s = priority_aging_s
        self._clock = clock
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len  # a sequence stops on length there
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- one step ---------------------------------------------------------------------------

    def score(self, seq: Sequence, now: float) -> float:
        """A waiting sequence's claim to admission: its priority, aged by its wait."""
        request = seq.request
        return request.priority + (now - request.arrival_time) / self.priority_aging_s

    def _next_waiting(self) -> Sequence:
        """The waiting sequence of the best score; the first in queue order among equals."""
        if len(self.waiting) == 1:
            return self.waiting[0]
        now = self._clock()
        return max(self.waiting, key=lambda seq: self.score(seq, now))

    def schedule(self) -> Schedule:
        schedule = Schedule()
        budget = self.max_batch_tokens
        # Higher priorities first (stable: admission order among equals), so that they get
        # blocks and budget first and the victims of preemption come from the tail.
        if any(seq.request.priority != self.running[0].request.priority
               for seq in self.running):  # fmt: skip
            self.running.sort(key=lambda seq: -seq.request.priority)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            n = min(seq.num_uncomputed, budget)
            if self._grow_or_preempt(seq, n, index):
                schedule.items.append((seq, n))
                budget -= n
                index += 1
            # else: seq itself was preempted and removed from running; same index is next
        self._admit_waiting(schedule, budget)
        return schedule

    def schedule_ahead(self, prefill: bool = True) -> Schedule | None:
        """The step after the one in flight, planned before its ids are read: a running
        sequence with a pending token (sampled, not read) decodes it; one in the middle of its
        prompt gets its next chunk; then waiting requests are admitted while the token budget, the
        running set and the pool allow, as `schedule()` would. None where only `schedule()` can
        plan the step: a running sequence that needs blocks only preemption can free, or a
        pending token whose sampling reads every id on the host (penalties). Without `prefill`
        (decodes only), also where a running sequence has no pending token or a request waits
        that could be admitted.

        A sequence that stops on length with its pending token is left out; one that stops on
        a stop token is known only at the read, and the engine drops its row then (its budget
        and its place go to the queue one step later than `schedule()` would give them)."""
        if not prefill and self.waiting and len(self.running) < self.max_num_seqs:
            return None  # with max_num_seqs running, schedule() admits nobody either
        schedule = Schedule()
        budget = self.max_batch_tokens
        for seq in self.running:
            if budget <= 0:
                break
            start = seq.num_computed + seq.num_in_flight
            if seq.num_pending:
                # Its prompt is done and the token sampled in flight is its only new one.
                if seq.request.sampling.needs_output_ids:
                    return None
                if seq.reaches_length(self.max_model_len, seq.num_pending):
                    continue
                n = seq.num_tokens + seq.num_pending - start
            elif not prefill:
                return None
            else:
                n = min(seq.num_tokens - start, budget)  # the next chunk of known tokens
                if n <= 0:
                    continue
            need = self._blocks_needed(seq, start + n - seq.num_computed)
            blocks = self.kv.allocate(need) if need else []
            if blocks is None:
                return None  # schedule() would preempt: let it
            seq.block_table.extend(blocks)
            schedule.items.append((seq, n))
            budget -= n
        if prefill:
            self._admit_waiting(schedule, budget)
        else:
            schedule.sampled = _sampled(schedule)
        return schedule or None

    def _admit_waiting(self, schedule: Schedule, budget: int) -> None:
        """Admit waiting requests into `schedule`, best score first, while the token budget,
        the running set and the pool allow; then set the schedule's sampled sequences."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting()
            if not self._admit(seq, budget):
                break
            self.waiting.remove(seq)
            n = min(seq.num_uncomputed, budget)
            self.running.append(seq)
            schedule.items.append((seq, n))
            budget -= n
        schedule.sampled = _sampled(schedule)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        size = self.kv.block_size
        return max(0, -(-(seq.num_computed + n) // size) - len(seq.block_table))

    def _grow_or_preempt(self, seq: Sequence, n: int, index: int) -> bool:
        """Give a running sequence blocks for n more tokens, preempting later ones if needed."""
        need = self._blocks_needed(seq, n)
        while True:
            blocks = self.kv.allocate(need) if need else []
            if blocks is not None:
                seq.block_table.extend(blocks)
                return True
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq or len(self.running) <= index:
                return False

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Reuse the cached prefix and allocate the first chunk's blocks; False if it can't."""
        session_id = seq.request.session_id
        if session_id is not None:
            self.kv.claim_session(session_id)
        matched = self.kv.match_prefix(seq.token_ids)
        # At least one token must be computed to produce logits: never reuse the whole prompt.
        if matched and len(matched) * self.kv.block_size >= seq.num_tokens:
            self.kv.free(matched[-1:])
            matched = matched[:-1]
        seq.block_table = list(matched)
        seq.block_keys = []
        seq.num_computed = len(matched) * self.kv.block_size
        n = min(seq.num_tokens - seq.num_computed, budget)
        blocks = self.kv.allocate(self._blocks_needed(seq, n))
        if blocks is None:
            self.kv.free(seq.block_table)
            seq.block_table, seq.num_computed = [], 0
            if session_id is not None:
                self.kv.release_session_claim(session_id)
            return False
        seq.block_table.extend(blocks)
        seq.num_cached_tokens = seq.num_computed
        seq.status = SequenceStatus.RUNNING
        return True

    # ----- leaving the running set ------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV and put it back at the front of the queue."""
        self.running.remove(seq)
        self.kv.free(seq.block_table)
        self.kv.record(
            EngineEvent(
                kind="preempted",
                request_id=seq.request_id,
                session_id=seq.request.session_id,
                num_blocks=len(seq.block_table),
                num_tokens=seq.num_computed,
            )
        )
        seq.block_table, seq.block_keys, seq.num_computed = [], [], 0
        seq.status = SequenceStatus.WAITING
        if seq.request.session_id is not None:
            self.kv.release_session_claim(seq.request.session_id)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence for good; a session keeps references on its full blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        session_id = seq.request.session_id
        if session_id is not None and seq.block_table:
            full = seq.num_computed // self.kv.block_size
            self.kv.pin_session(session_id, seq.block_table[:full], full * self.kv.block_size)
        elif session_id is not None:
            self.kv.release_session_claim(session_id)
        self.kv.free(seq.block_table)
        seq.block_table = []


def _sampled(schedule: Schedule) -> list[Sequence]:
    """The sequences whose step ends at their last token (known or pending): their next token
    is chosen this step. Outside a step in flight nothing is in flight or pending."""
    return [seq for seq, n in schedule.items
            if seq.num_computed + seq.num_in_flight + n == seq.num_tokens + seq.num_pending]
