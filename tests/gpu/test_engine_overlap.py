"""The engine's overlapped decode (gpu/engine.py docstring) against the same engine without it,
on the real SmolLM2 file, on the torch backend and (marked gpu) on the CUDA backend.

Overlap launches step t+1 from step t's ids on the device before reading them. It must change
nothing a client sees: same tokens, finish reasons, logprobs and cache hits, and every block
back at the end, through stops on the pending token, aborts while a step is in flight, requests
arriving mid-run, sessions, and rows with penalties (which turn overlap off while they run).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from gpu.request import Request, SamplingParams
from tests.gpu import test_engine as base
from tests.gpu.test_engine import greedy, make_engine, prompts, run

backend = base.backend  # the same fixture: the torch backend and, marked gpu, the CUDA one

SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=21)
PENALISED = SamplingParams(temperature=0.0, repetition_penalty=1.3)


def drain(engine, after_step=None):
    """Step until done (calling after_step() after each step): ({id: tokens}, {id: finish
    reason}) of what the steps returned."""
    tokens, reasons = defaultdict(list), {}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        if after_step is not None:
            after_step()
    return tokens, reasons


def both_modes(backend, requests_of, **engine_kwargs):
    """run() the same requests with overlap on and off: (results on, results off, engines)."""
    results, engines = [], []
    for overlap in (True, False):
        engine = make_engine(backend, overlap=overlap, **engine_kwargs)
        results.append(run(engine, requests_of()))
        engines.append(engine)
    return results[0], results[1], engines


def test_overlap_matches_sync_with_stops_logprobs_and_seeds(backend):
    ps = prompts(4, seed=11)
    free = run(make_engine(backend, kv_blocks=64, overlap=False), [greedy(ps[0], "s")])[0]["s"]
    stop_at = free[4]  # stops on a token while the step after it is in flight

    def requests():
        return [
            greedy(ps[0], "s", max_tokens=12, stop_token_ids=frozenset({stop_at})),
            greedy(ps[1], "short", max_tokens=3),
            Request("seeded", ps[2], SEEDED, max_tokens=9, ignore_eos=True),
            Request("lp", ps[3], SamplingParams(temperature=0.0, logprobs=2), max_tokens=7,
                    ignore_eos=True),
        ]  # fmt: skip

    on, off, (engine_on, engine_off) = both_modes(backend, requests, kv_blocks=64)
    tokens, reasons, cached, _ = on
    assert (tokens, reasons, cached) == off[:3]
    assert reasons["s"] == "stop" and tokens["s"][-1] == stop_at
    assert tokens["s"] == free[: free.index(stop_at) + 1]
    assert len(tokens["short"]) == 3 and len(tokens["seeded"]) == 9
    assert engine_on.overlapped_steps > 0 and engine_off.overlapped_steps == 0
    for engine in (engine_on, engine_off):
        assert engine.stats().kv_blocks_used == 0 and engine.kv.num_free == engine.kv.num_blocks


def test_overlap_logprobs_equal_sync(backend):
    p = prompts(1, seed=12)[0]
    params = SamplingParams(temperature=0.0, logprobs=3)
    logprobs = []
    for overlap in (True, False):
        engine = make_engine(backend, kv_blocks=16, overlap=overlap)
        engine.add(Request("lp", p, params, max_tokens=6, ignore_eos=True))
        got = []
        while engine.has_work():
            got += [lp for out in engine.step() for lp in (out.logprobs or [])]
        logprobs.append(got)
    assert len(logprobs[0]) == 6 and logprobs[0] == logprobs[1]


def test_penalties_turn_overlap_off(backend):
    p = prompts(1, seed=13)[0]
    on, off, (engine, _) = both_modes(
        backend, lambda: [Request("pen", p, PENALISED, max_tokens=8, ignore_eos=True)],
        kv_blocks=64,
    )  # fmt: skip
    assert on[:2] == off[:2] and len(on[0]["pen"]) == 8
    assert engine.overlapped_steps == 0  # penalties read every id on the host


def test_arrival_mid_run_drains_the_overlap(backend):
    ps = prompts(2, seed=16)
    results = []
    for overlap in (True, False):
        engine = make_engine(backend, kv_blocks=64, overlap=overlap)
        engine.add(greedy(ps[0], "a", max_tokens=10))
        early = [t for _ in range(4) for out in engine.step() for t in out.new_token_ids]
        assert (engine._in_flight is not None) == overlap  # a step launched ahead, unread
        engine.add(greedy(ps[1], "late", max_tokens=5))
        tokens, reasons = drain(engine)
        tokens["a"] = early + tokens["a"]
        results.append((dict(tokens), reasons))
        assert engine.stats().kv_blocks_used == 0
    assert results[0] == results[1]
    assert len(results[0][0]["a"]) == 10 and len(results[0][0]["late"]) == 5


def test_abort_while_a_step_is_in_flight(backend):
    ps = prompts(2, seed=14)
    engine = make_engine(backend, kv_blocks=32)
    engine.add(greedy(ps[0], "x", max_tokens=40))
    engine.add(greedy(ps[1], "y", max_tokens=6))
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None
    assert engine.abort("x")
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == "x"] == ["abort"]
    assert all(not o.new_token_ids for o in outs if o.request_id == "x")
    drain(engine)
    assert engine.stats().kv_blocks_used == 0 and engine.kv.num_free == engine.kv.num_blocks


def test_session_blocks_and_cache_hits_equal_sync(backend):
    turn1 = prompts(1, seed=15)[0] * 2
    outs = []
    for overlap in (True, False):
        engine = make_engine(backend, kv_blocks=64, overlap=overlap)
        out1 = run(engine, [greedy(turn1, "t1", max_tokens=19, session_id="s")])[0]
        session = engine.kv.sessions["s"]
        turn2 = turn1 + out1["t1"] + [900, 901]
        out2, _, cached, _ = run(engine, [greedy(turn2, "t2", session_id="s")])
        outs.append((out1, out2, cached, session.num_tokens, len(session.block_ids)))
        assert engine.end_session("s") and engine.stats().kv_blocks_used == 0
    assert outs[0] == outs[1]
    assert outs[0][2]["t2"] >= 32


def test_a_failed_read_drops_the_step_launched_on_it(backend):
    """A read that raises (a device error) must not leave a step in flight fed by ids nobody
    read: the engine recomputes from the last token it has and the tokens stay the same."""
    p = prompts(1, seed=17)[0]
    want = run(make_engine(backend, kv_blocks=32, overlap=False), [greedy(p, "r", max_tokens=8)])
    engine = make_engine(backend, kv_blocks=32)
    engine.add(greedy(p, "r", max_tokens=8))
    launch, calls = engine.sampler.launch, 0

    def failing_third_launch(logits, rows, mask=None):
        nonlocal calls
        calls += 1
        pending = launch(logits, rows, mask)
        if calls == 3:
            pending._read = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))
        return pending

    engine.sampler.launch = failing_third_launch
    got = []
    for _ in range(2):
        got += [t for out in engine.step() for t in out.new_token_ids]
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert engine._in_flight is None
    tokens, reasons = drain(engine)
    assert got + tokens["r"] == want[0]["r"] and reasons == {"r": "length"}
    assert engine.stats().kv_blocks_used == 0


def test_full_load_with_a_queue_still_overlaps(backend):
    """max_num_seqs running and more waiting: the scheduler admits nobody, so steps overlap;
    a finish frees its place for the queue (one step later than without overlap) and every
    request gets the tokens it gets without overlap."""
    ps = prompts(4, seed=18)
    lengths = {f"q{i}": 4 + 3 * i for i in range(4)}
    results, queued_overlaps = [], []
    for overlap in (True, False):
        engine = make_engine(backend, kv_blocks=64, max_num_seqs=2, overlap=overlap)
        for i, p in enumerate(ps):
            engine.add(greedy(p, f"q{i}", max_tokens=lengths[f"q{i}"]))
        tokens, reasons = drain(engine, lambda e=engine: queued_overlaps.append(
            bool(e.scheduler.waiting and e._in_flight is not None)))  # fmt: skip
        results.append((dict(tokens), reasons))
        assert engine.stats().kv_blocks_used == 0
    assert results[0] == results[1]
    assert {rid: len(t) for rid, t in results[0][0].items()} == lengths
    assert any(queued_overlaps)  # steps ran ahead while requests waited


def test_a_cpu_backend_reads_a_first_token_before_launching_ahead(backend):
    """On the CPU a launch computes the step: the step that samples a request's first token
    is read before the next is launched (else the first token waits a decode step more);
    the decode steps after it overlap as before. On a GPU nothing changes."""
    engine = make_engine(backend, kv_blocks=64)
    engine.add(greedy(prompts(1, seed=5)[0], "first", max_tokens=6))
    outputs = engine.step()
    assert [len(out.new_token_ids) for out in outputs] == [1]
    cpu = backend.device.type == "cpu"
    assert engine.overlapped_steps == (0 if cpu else 1)
    tokens, reasons = drain(engine)
    assert len(tokens["first"]) == 5 and reasons["first"] == "length"
    assert engine.overlapped_steps > 0


def test_prefill_and_admissions_launched_ahead_match_sync(backend):
    """`prefill_ahead` (the GPU default, forced here on the CPU too): a step launched ahead also
    runs the next prefill chunks and admits waiting requests. Long prompts in chunks of a small
    token budget, arrivals while steps are in flight, a stop on a pending token, a seeded row
    and a session's second turn: the same tokens, finish reasons and cache hits as without
    overlap, every block back, and steps launched ahead while a prompt was half done or a
    request waited."""
    ps = prompts(6, seed=19)
    long_prompt = ps[0] * 4  # 4 chunks of the 32-token budget, at least
    free = run(make_engine(backend, kv_blocks=96, overlap=False, max_batch_tokens=32),
               [greedy(ps[1], "s", max_tokens=10)])[0]["s"]  # fmt: skip
    stop_at = free[3]
    results, prefilling_overlaps = [], []
    for overlap in (True, False):
        engine = make_engine(backend, kv_blocks=96, overlap=overlap, max_batch_tokens=32,
                             prefill_ahead=True)  # fmt: skip
        engine.add(greedy(ps[1], "s", max_tokens=10, stop_token_ids=frozenset({stop_at})))
        engine.add(greedy(long_prompt, "long", max_tokens=6))
        engine.add(Request("seeded", ps[2], SEEDED, max_tokens=9, ignore_eos=True))
        arrivals = {2: [greedy(ps[3], "late", max_tokens=5)],
                    4: [greedy(ps[4] * 2, "later", max_tokens=7, session_id="t")]}

        def after_step(e=engine, arrivals=arrivals, steps=[0]):  # noqa: B006 - a counter per engine
            steps[0] += 1
            for request in arrivals.pop(steps[0], []):
                e.add(request)
            busy = e.scheduler.waiting or any(
                seq.num_computed + seq.num_in_flight < seq.num_prompt_tokens
                for seq in e.scheduler.running)  # fmt: skip
            prefilling_overlaps.append(bool(busy and e._in_flight is not None))

        tokens, reasons = drain(engine, after_step)
        turn2 = ps[4] * 2 + tokens["later"] + [900, 901]
        out2, reasons2, cached, _ = run(engine, [greedy(turn2, "turn2", session_id="t")])
        results.append((dict(tokens), reasons, out2, reasons2, cached))
        assert engine.end_session("t")
        assert engine.stats().kv_blocks_used == 0 and engine.kv.num_free == engine.kv.num_blocks
    assert results[0] == results[1]
    tokens, reasons = results[0][:2]
    assert reasons["s"] == "stop" and tokens["s"] == free[: free.index(stop_at) + 1]
    assert [len(tokens[r]) for r in ("long", "seeded", "late", "later")] == [6, 9, 5, 7]
    assert results[0][4]["turn2"] >= 16  # the session's blocks were reused
    assert any(prefilling_overlaps)


def test_prefill_ahead_is_on_for_gpus_only(backend):
    engine = make_engine(backend, kv_blocks=16)
    assert engine.prefill_ahead == (backend.device.type != "cpu")
