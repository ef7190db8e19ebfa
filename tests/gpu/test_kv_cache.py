"""KV pool bookkeeping: allocation, prefix reuse, sessions, reclaim order, accounting."""

from __future__ import annotations

import pytest

from gpu.kv_cache import KVCache, prefix_keys


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fill(kv: KVCache, tokens: list[int]) -> list[int]:
    """Allocate blocks for `tokens` and register the full ones, as the engine does."""
    blocks = kv.allocate(-(-len(tokens) // kv.block_size))
    assert blocks is not None
    for block_id, (key, toks) in zip(blocks, prefix_keys(tokens, kv.block_size), strict=False):
        kv.register(block_id, key, toks)
    return blocks


def test_allocate_and_free_round_trip():
    kv = KVCache(8, 4)
    blocks = kv.allocate(8)
    assert sorted(blocks) == list(range(8)) and kv.num_free == 0
    assert kv.allocate(1) is None
    kv.free(blocks)
    assert kv.num_free == 8 and kv.num_used == 0
    with pytest.raises(AssertionError):
        kv.free(blocks[:1])


def test_prefix_hit_shares_blocks_and_verifies_tokens():
    kv = KVCache(8, 4)
    a = fill(kv, list(range(10)))  # 2 full blocks + 1 partial
    assert kv.match_prefix(list(range(8)) + [99]) == a[:2]
    assert kv.ref_count(a[0]) == 2
    assert kv.match_prefix([0, 1, 2, 3, 9, 9, 9, 9]) == a[:1]  # diverges in block 2
    assert kv.match_prefix([5, 1, 2, 3]) == []
    kv.free(a)  # the matches still hold a[0] twice and a[1] once; the partial block is free
    assert kv.num_used == 2 and kv.num_cached == 0 and kv.num_free == 6
    kv.free(a[:2])
    kv.free(a[:1])
    assert kv.num_cached == 2 and kv.num_used == 0


def test_cached_blocks_reclaimed_lru_and_forgotten():
    kv = KVCache(4, 2)
    a = fill(kv, [1, 2])
    b = fill(kv, [3, 4])
    kv.free(a)
    kv.free(b)
    assert kv.num_cached == 2
    fresh = kv.allocate(3)  # two truly free, then the LRU cached block (a's)
    assert a[0] in fresh and b[0] not in fresh
    assert kv.match_prefix([1, 2]) == []
    assert kv.match_prefix([3, 4]) == b


def test_whole_pool_accounting_with_sessions():
    clock = FakeClock()
    kv = KVCache(6, 2, session_ttl_s=10, clock=clock)
    kv.claim_session("s1")
    blocks = fill(kv, [1, 2, 3, 4])
    kv.pin_session("s1", blocks, 4)
    kv.free(blocks)  # the request ends; the session keeps its own references
    assert kv.num_used == 2 and kv.sessions["s1"].num_tokens == 4
    kv.claim_session("s1")
    assert kv.match_prefix([1, 2, 3, 4, 5]) == blocks  # next turn reuses both blocks
    kv.pin_session("s1", blocks, 4)  # re-pin the same blocks: old pins released
    kv.free(blocks)
    assert kv.num_used == 2
    assert kv.end_session("s1") and not kv.end_session("s1")
    assert kv.num_used == 0 and kv.num_free == 6


def test_idle_session_evicted_before_cached_blocks():
    kv = KVCache(4, 2)
    anon = fill(kv, [7, 7])
    kv.free(anon)  # an unreferenced cached prefix
    kv.claim_session("old")
    s_blocks = fill(kv, [1, 2])
    kv.pin_session("old", s_blocks, 2)
    kv.free(s_blocks)
    got = kv.allocate(3)  # 2 free; the shortfall evicts the idle session first
    assert got is not None and s_blocks[0] in got and anon[0] not in got
    assert "old" not in kv.sessions
    assert [e.kind for e in kv.events] == ["session_evicted"]
    assert kv.match_prefix([7, 7]) == anon


def test_active_session_not_evicted():
    kv = KVCache(2, 2)
    kv.claim_session("s")
    blocks = fill(kv, [1, 2])
    kv.pin_session("s", blocks, 2)
    kv.free(blocks)
    kv.claim_session("s")  # its next turn is running
    assert kv.allocate(2) is None
    assert "s" in kv.sessions and kv.num_used == 1


def test_session_ttl_and_cap():
    clock = FakeClock()
    kv = KVCache(8, 2, max_sessions=2, session_ttl_s=5, clock=clock)
    for name in ("a", "b"):
        kv.claim_session(name)
        kv.pin_session(name, fill(kv, [ord(name), 0]), 2)
    kv.claim_session("c")  # over the cap: LRU idle session "a" goes
    assert list(kv.sessions) == ["b", "c"]
    clock.now = 6
    kv.expire_sessions()  # "b" idle past the TTL; "c" is active
    assert list(kv.sessions) == ["c"]
    assert [e.kind for e in kv.events] == ["session_evicted", "session_expired"]
    assert kv.events[0].reason == "cap"


def test_expiry_walks_only_the_stale_end_of_the_session_order():
    """Sessions stay in `last_used` order (an aborted turn's release moves its session to
    the end too), so expiry stops at the first fresh one; an old active session in front
    is skipped, not a stop, and stale idle ones behind it still go."""
    clock = FakeClock()
    kv = KVCache(16, 2, session_ttl_s=5, clock=clock)
    kv.claim_session("running")  # active since t=0: never expired while it runs
    for t, name in enumerate(["idle1", "idle2", "fresh"], start=1):
        clock.now = t
        kv.claim_session(name)
        kv.pin_session(name, [], 0)
    clock.now = 3.5
    kv.claim_session("idle1")
    kv.release_session_claim("idle1")  # an aborted turn: idle1 was used at 3.5
    assert list(kv.sessions) == ["running", "idle2", "fresh", "idle1"]
    clock.now = 7.8  # deadline 2.8: idle2 (2) is stale; fresh (3) and idle1 (3.5) are not
    kv.expire_sessions()
    assert list(kv.sessions) == ["running", "fresh", "idle1"]
    clock.now = 8.2  # deadline 3.2: fresh (3) goes; the walk stops at idle1 (3.5)
    kv.expire_sessions()
    assert list(kv.sessions) == ["running", "idle1"]
    assert [e.session_id for e in kv.events] == ["idle2", "fresh"]
