"""Scheduler decisions without a model: budgets, chunking, FCFS, caps, preemption order."""

from __future__ import annotations

from gpu.kv_cache import KVCache
from gpu.request import Request
from gpu.scheduler import Scheduler
from gpu.sequence import Sequence, SequenceStatus


def seq(rid: str, n_prompt: int, base: int = 0) -> Sequence:
    tokens = [base + i for i in range(n_prompt)]
    return Sequence(Request(rid, tokens), tokens, n_prompt)


def advance(schedule) -> None:
    """What the engine does after a forward: mark tokens computed, append a sampled token."""
    for s, n in schedule.items:
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.token_ids.append(7)


def test_long_prompt_is_chunked_and_never_stalls_running_decodes():
    sched = Scheduler(KVCache(512, 16), max_batch_tokens=64)
    short = seq("short", 10)
    sched.add(short)
    advance(sched.schedule())  # short prefilled, now decoding
    long = seq("long", 4000, base=100)
    sched.add(long)
    steps = 0
    while long.num_computed < long.num_prompt_tokens:
        schedule = sched.schedule()
        items = {s.request_id: n for s, n in schedule.items}
        assert items["short"] == 1  # the decode runs every step
        remaining = long.num_prompt_tokens - long.num_computed
        assert items["long"] == min(63, remaining)  # the rest of the budget: a prompt chunk
        assert schedule.num_tokens <= 64
        advance(schedule)
        steps += 1
    assert steps == -(-4000 // 63)


def test_fcfs_admission_bounded_by_cap_and_blocks():
    sched = Scheduler(KVCache(8, 4), max_num_seqs=2, max_batch_tokens=100)
    a, b, c = seq("a", 8), seq("b", 8, 50), seq("c", 4, 90)
    for s in (a, b, c):
        sched.add(s)
    first = sched.schedule()
    assert [s.request_id for s, _ in first.items] == ["a", "b"]  # cap of 2 sequences
    assert c.status == SequenceStatus.WAITING


def test_head_of_line_blocks_later_requests():
    sched = Scheduler(KVCache(4, 4), max_batch_tokens=100)
    sched.add(seq("big", 20))  # needs 5 blocks; the pool has 4
    sched.add(seq("small", 2, 50))
    assert not sched.schedule()  # strict FCFS: small waits behind big


def test_preempts_most_recently_admitted_when_blocks_run_out():
    kv = KVCache(6, 4)
    sched = Scheduler(kv, max_batch_tokens=100)
    old, new = seq("old", 8), seq("new", 8, 50)
    sched.add(old)
    sched.add(new)
    advance(sched.schedule())  # both prefilled: 2 blocks each, plus 2 free
    for _ in range(4):  # decode until the pool is exhausted
        advance(sched.schedule())
    schedule = sched.schedule()
    preempted = [e for e in kv.events if e.kind == "preempted"]
    assert preempted and preempted[0].request_id == "new"
    assert [s.request_id for s, _ in schedule.items] == ["old"]
    assert new.status == SequenceStatus.WAITING and new.num_computed == 0
    assert sched.waiting[0] is new and new.token_ids[:8] == list(range(50, 58))


def test_finish_returns_blocks_and_pins_session():
    kv = KVCache(8, 4)
    sched = Scheduler(kv, max_batch_tokens=100)
    s = seq("s", 9)
    s.request.session_id = "chat"
    sched.add(s)
    advance(sched.schedule())
    sched.finish(s, "stop")
    assert kv.sessions["chat"].num_tokens == 8  # two full blocks pinned, the partial freed
    assert kv.num_used == 2 and not sched.has_work()


def prio(rid: str, n_prompt: int, priority: int, arrival: float, base: int = 0) -> Sequence:
    tokens = [base + i for i in range(n_prompt)]
    return Sequence(Request(rid, tokens, priority=priority, arrival_time=arrival), tokens,
                    n_prompt)


def test_priority_admission_with_aging():
    """One level per 2 s of waiting: at t=100 a priority-0 job from t=80 (score 10) beats a
    priority-8 one from t=99 (8.5) and loses to a priority-20 one that just came."""
    now = [100.0]
    sched = Scheduler(KVCache(64, 4), max_num_seqs=1, max_batch_tokens=100,
                      priority_aging_s=2.0, clock=lambda: now[0])
    old, mid, urgent = prio("old", 4, 0, 80.0), prio("mid", 4, 8, 99.0, 50), \
        prio("urgent", 4, 20, 100.0, 90)
    for s in (old, mid, urgent):
        sched.add(s)
    order = []
    for _ in range(3):
        schedule = sched.schedule()
        order.append(schedule.items[0][0].request_id)
        sched.finish(schedule.items[0][0], "stop")
    assert order == ["urgent", "old", "mid"]


def test_equal_priorities_stay_first_come_first_served():
    sched = Scheduler(KVCache(64, 4), max_num_seqs=1, max_batch_tokens=100,
                      clock=lambda: 50.0)
    for i in range(4):
        sched.add(prio(f"r{i}", 4, 3, 10.0, 10 * i))  # same arrival: queue order decides
    order = []
    for _ in range(4):
        schedule = sched.schedule()
        order.append(schedule.items[0][0].request_id)
        sched.finish(schedule.items[0][0], "stop")
    assert order == ["r0", "r1", "r2", "r3"]


def test_preemption_takes_the_lowest_priority_first():
    """Blocks run out while three sequences decode: the low-priority one is preempted, though
    the high-priority one was admitted last."""
    sched = Scheduler(KVCache(6, 4), max_batch_tokens=100)
    low, mid, high = prio("low", 8, 0, 1.0), prio("mid", 4, 5, 2.0, 50), \
        prio("high", 4, 9, 3.0, 90)
    for s in (low, mid, high):
        sched.add(s)
    advance(sched.schedule())  # 2 + 1 + 1 blocks; each now needs one more token
    for s in (low, mid, high):
        s.token_ids += [7] * (4 - len(s.token_ids) % 4)  # fill their last block
    schedule = sched.schedule()
    assert [s.request_id for s, _ in schedule.items] == ["high", "mid"]
    assert low.status == SequenceStatus.WAITING
