"""Paged KV bookkeeping: block pool, reference counts, prefix cache, sessions, LRU eviction.

Only ids live here; the backend owns the memory. A sequence's KV is a list of fixed-size
blocks (its block table). A block that is full is content-addressed by a hash chain of token
ids (block i's key covers every token of blocks 0..i), so a request sharing a prefix with
anything still cached reuses those blocks instead of recomputing them.

Block states: *in use* (ref_count > 0), *cached* (ref_count 0 but still holding a
registered prefix, evictable in LRU order), *free*. A session pins the blocks of its last
turn with references of its own. When blocks run short the pool reclaims, in order: idle
sessions (least recently used first), then cached blocks (LRU); preempting a running
sequence is the scheduler's last resort. Every eviction is recorded for the caller.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpu.events import EngineEvent
from jobs.limits import DEFAULT_SESSION_TTL_S


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    key: int | None = None  # prefix hash, once the block is full and registered
    tokens: tuple[int, ...] = ()  # the block's own tokens, checked on a hash hit


@dataclass(slots=True)
class Session:
    """Blocks pinned for a chat session between turns, and when it was last used."""

    session_id: str
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    last_used: float = 0.0
    active: bool = False  # a request of this session is running: not evictable


def chain_key(parent: int, tokens: tuple[int, ...]) -> int:
    """Key of a full block: its tokens chained to the key of the block before (0 for the first)."""
    return hash((parent, tokens))


def prefix_keys(token_ids: Sequence[int], block_size: int) -> list[tuple[int, tuple[int, ...]]]:
    """(chained hash, tokens) of every full block of `token_ids`."""
    keys = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        tokens = tuple(token_ids[start : start + block_size])
        parent = chain_key(parent, tokens)
        keys.append((parent, tokens))
    return keys


class KVCache:
    """The block pool: allocation, prefix lookup, sessions, eviction; emits `EngineEvent`s."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_sessions: int = 1024,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        clock=time.monotonic,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_sessions = max_sessions
        self.session_ttl_s = session_ttl_s
        self._clock = clock
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._by_key: dict[int, int] = {}
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # LRU first
        self._events: list[EngineEvent] = []

    # ----- accounting -------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks obtainable without evicting a session: free plus unreferenced cached."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks that still hold a registered prefix."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # ----- events -----------------------------------------------------------------------------

    @property
    def events(self) -> list[EngineEvent]:
        """Evictions, expiries and preemptions not yet taken by `pop_events`, oldest first."""
        return list(self._events)

    def record(self, event: EngineEvent) -> None:
        """Note an event for the caller: the pool's own evictions, the scheduler's preemptions."""
        self._events.append(event)

    def pop_events(self) -> list[EngineEvent]:
        """The events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # ----- allocation -------------------------------------------------------------------------

    def can_allocate(self, n: int) -> bool:
        """Whether n blocks can be had, counting what evicting every idle session would free."""
        if n <= self.num_free:
            return True
        reclaimable = sum(
            sum(1 for b in s.block_ids if self._blocks[b].ref_count == 1)
            for s in self.sessions.values()
            if not s.active
        )
        return n <= self.num_free + reclaimable

    def allocate(self, n: int) -> list[int] | None:
        """n blocks with one reference each, evicting as needed; None (and no change) if short."""
        if not self.can_allocate(n):
            return None
        # Order of reclaim: idle sessions, least recently used first, before any
        # unreferenced cached prefix; an evicted session's blocks go to the LRU end of the cache.
        while len(self._free) < n and self._evict_lru_session():
            pass
        out = []
        for _ in range(n):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._cached.popitem(last=False)
                self._unregister(block_id)
            self._blocks[block_id].ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; unreferenced blocks become cached or free."""
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.ref_count <= 0:
                raise AssertionError(f"KV block {block_id} freed more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self._free.append(block_id)
                else:
                    self._cached[block_id] = None

    def _unregister(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.key is not None and self._by_key.get(block.key) == block_id:
            del self._by_key[block.key]
        block.key, block.tokens = None, ()

    # ----- prefix cache -----------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Take a reference on each cached block of the longest registered prefix of token_ids."""
        matched = []
        for key, tokens in prefix_keys(token_ids, self.block_size):
            block_id = self._by_key.get(key)
            if block_id is None or self._blocks[block_id].tokens != tokens:
                break
            matched.append(block_id)
        for block_id in matched:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._cached[block_id]
            block.ref_count += 1
        return matched

    def register(self, block_id: int, key: int, tokens: tuple[int, ...]) -> None:
        """Make a full block findable by its prefix key (first writer of a key wins)."""
        block = self._blocks[block_id]
        if block.key is not None or key in self._by_key:
            return
        block.key, block.tokens = key, tokens
        self._by_key[key] = block_id

    # ----- sessions ---------------------------------------------------------------------------

    def claim_session(self, session_id: str) -> None:
        """A request of this session starts: its pinned blocks stay pinned until it finishes."""
        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= self.max_sessions:
                self._evict_lru_session(reason="cap")
            session = Session(session_id)
            self.sessions[session_id] = session
        session.active = True
        session.last_used = self._clock()
        self.sessions.move_to_end(session_id)

    def pin_session(self, session_id: str, block_ids: Sequence[int], num_tokens: int) -> None:
        """The session's request finished: pin its blocks (taking new references), unpin old."""
        session = self.sessions.get(session_id)
        if session is None:  # ended or evicted while the request ran
            return
        for block_id in block_ids:
            self._blocks[block_id].ref_count += 1
        old = session.block_ids
        session.block_ids, session.num_tokens = list(block_ids), num_tokens
        session.active = False
        session.last_used = self._clock()
        self.sessions.move_to_end(session_id)
        self.free(old)

    def release_session_claim(self, session_id: str) -> None:
        """The session's request ended without pinning (aborted): it becomes idle again."""
        session = self.sessions.get(session_id)
        if session is not None:
            session.active = False
            session.last_used = self._clock()
            self.sessions.move_to_end(session_id)  # the order stays that of last_used

    def end_session(self, session_id: str) -> bool:
        """Forget a session and free its blocks; False if there was none."""
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self.free(session.block_ids)
        return True

    def expire_sessions(self) -> None:
        """Drop idle sessions unused for longer than the TTL. `sessions` is in order of
        `last_used` (every update moves the session to the end), so the walk stops at the
        first one still fresh: the engine calls this every step, and a worker holds up to
        `max_sessions` (1,024) of them (a full walk was 1.5% of a SmolLM2 engine process's
        time at 128 clients, H100, 2026-12-07)."""
        deadline = self._clock() - self.session_ttl_s
        stale = []
        for session in self.sessions.values():
            if session.last_used >= deadline:
                break
            if not session.active:
                stale.append(session)
        for session in stale:
            self._drop_session(session, "session_expired")

    def _evict_lru_session(self, reason: str = "blocks") -> bool:
        for session in self.sessions.values():
            if not session.active:
                self._drop_session(session, "session_evicted", reason)
                return True
        return False

    def _drop_session(self, session: Session, kind: str, reason: str = "ttl") -> None:
        del self.sessions[session.session_id]
        self.free(session.block_ids)
        # An evicted session's blocks are the ones meant to be reclaimed: move those that
        # became unreferenced to the LRU end of the cache so they go before older prefixes.
        for block_id in reversed(session.block_ids):
            if block_id in self._cached:
                self._cached.move_to_end(block_id, last=False)
        self.record(
            EngineEvent(
                kind=kind,
                session_id=session.session_id,
                num_blocks=len(session.block_ids),
                num_tokens=session.num_tokens,
                reason=reason,
            )
        )
