"""The engine on the real SmolLM2 file, on the torch backend and (marked gpu) on the CUDA
backend: batching, chunking, caching, sessions, eviction and preemption never change the
tokens; aborts give every block back.

Where two runs of different batch shapes disagree, the test proves that step was a near-tie
(top-2 logit gap under 1e-3 relative) by recomputing the logits at the first divergence.
"""

from __future__ import annotations

import random

import pytest
import torch

from gpu.engine import Engine
from gpu.perplexity import chunk_batch
from gpu.request import Request, RequestError, SamplingParams
from loader.registry import resolve_model

GREEDY = SamplingParams(temperature=0.0)
NEAR_TIE = 1e-3


@pytest.fixture(scope="module", params=["torch", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request, default_model_path):
    """Every engine test runs on the torch reference and, on a GPU, on our CUDA kernels."""
    if request.param == "torch":
        return request.getfixturevalue("smollm2_backend")  # each Engine allocates its KV pool
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from gpu.backends.cuda_backend import CudaBackend

    return CudaBackend(default_model_path)


def make_engine(backend, **kwargs) -> Engine:
    return Engine(resolve_model("smollm2-135m"), backend=backend, **kwargs)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(200, 20000) for _ in range(rng.randrange(5, 40))]
            for _ in range(n)]


def run(engine: Engine, requests: list[Request], max_steps: int = 10_000):
    """Run to completion; returns ({id: tokens}, {id: finish_reason}, {id: cached}, events)."""
    for request in requests:
        engine.add(request)
    tokens = {r.request_id: [] for r in requests}
    reasons, cached, events = {}, {}, []
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        events += engine.pop_events()
    assert not engine.has_work(), "engine did not finish"
    return tokens, reasons, cached, events


def greedy(prompt_ids, rid, max_tokens=12, **kw) -> Request:
    return Request(rid, list(prompt_ids), GREEDY, max_tokens=max_tokens, ignore_eos=True, **kw)


def assert_same_or_near_tie(backend, prompt, got, want):
    """Token lists equal, or the first difference is a provable near-tie of the model."""
    if got == want:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    context = list(prompt) + want[:i]
    backend.allocate_kv(-(-len(context) // 16), 16)
    logits = backend.forward(chunk_batch(context, 16, backend.device))[-1]
    gap = abs(float(logits[got[i]] - logits[want[i]]))
    scale = float(logits.abs().max())
    assert gap < NEAR_TIE * scale, (
        f"tokens differ at {i}: {got[i]} vs {want[i]}, logit gap {gap:.4g} is not a near-tie"
    )


def test_batched_equals_one_at_a_time(backend):
    ps = prompts(4)
    alone = {}
    for i, p in enumerate(ps):
        tokens, reasons, _, _ = run(make_engine(backend, kv_blocks=64),
                                    [greedy(p, f"r{i}")])
        alone[f"r{i}"] = tokens[f"r{i}"]
        assert reasons[f"r{i}"] == "length" and len(tokens[f"r{i}"]) == 12
    batched, _, _, _ = run(make_engine(backend, kv_blocks=256),
                           [greedy(p, f"r{i}") for i, p in enumerate(ps)])
    for i, p in enumerate(ps):
        assert_same_or_near_tie(backend, p, batched[f"r{i}"], alone[f"r{i}"])


def test_seeded_sampling_batched_equals_alone_and_reproduces(backend):
    ps = prompts(3, seed=1)

    def sampled(p, rid, seed):
        params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=seed)
        return Request(rid, p, params, max_tokens=10, ignore_eos=True)

    alone = run(make_engine(backend, kv_blocks=64), [sampled(ps[0], "a", 7)])[0]
    again = run(make_engine(backend, kv_blocks=64), [sampled(ps[0], "a", 7)])[0]
    assert alone == again
    mixed = run(
        make_engine(backend, kv_blocks=256, seed=3),
        [sampled(ps[1], "x", 11), sampled(ps[0], "a", 7), greedy(ps[2], "g")],
    )[0]
    assert mixed["a"] == alone["a"]
    other_seed = run(make_engine(backend, kv_blocks=64), [sampled(ps[0], "a", 8)])[0]
    assert other_seed["a"] != alone["a"]


def test_chunked_prefill_equals_whole_prefill(backend):
    p = prompts(1, seed=2)[0] * 3  # ~60-120 tokens
    whole = run(make_engine(backend, kv_blocks=64), [greedy(p, "r")])[0]["r"]
    chunked_engine = make_engine(backend, kv_blocks=64, max_batch_tokens=16)
    chunked = run(chunked_engine, [greedy(p, "r")])[0]["r"]
    assert_same_or_near_tie(backend, p, chunked, whole)


def test_prefix_cache_hit_equals_miss(backend):
    base = prompts(1, seed=3)[0] * 2
    first, second = base + [500, 501], base + [777, 778, 779]
    engine = make_engine(backend, kv_blocks=64)
    run(engine, [greedy(first, "a")])
    tokens, _, cached, _ = run(engine, [greedy(second, "b")])
    assert cached["b"] >= 16 and cached["b"] % 16 == 0
    cold = run(make_engine(backend, kv_blocks=64), [greedy(second, "b")])[0]
    assert_same_or_near_tie(backend, second, tokens["b"], cold["b"])


def test_session_second_turn_reuses_cache(backend):
    turn1 = prompts(1, seed=4)[0] * 2
    engine = make_engine(backend, kv_blocks=64)
    out1, _, cached1, _ = run(engine, [greedy(turn1, "t1", session_id="s")])
    assert cached1["t1"] == 0 and "s" in engine.kv.sessions
    turn2 = turn1 + out1["t1"] + [900, 901, 902]
    out2, _, cached2, _ = run(engine, [greedy(turn2, "t2", session_id="s")])
    assert cached2["t2"] >= 32
    cold = run(make_engine(backend, kv_blocks=64), [greedy(turn2, "t2")])[0]
    assert_same_or_near_tie(backend, turn2, out2["t2"], cold["t2"])
    assert engine.end_session("s") and engine.stats().kv_blocks_used == 0


def test_small_pool_evicts_sessions_and_preempts_yet_completes(backend):
    ps = prompts(3, seed=5)
    want = {}
    for i, p in enumerate(ps):
        want[f"r{i}"] = run(make_engine(backend, kv_blocks=64),
                            [greedy(p, f"r{i}", max_tokens=20)])[0][f"r{i}"]
    # 9 blocks of 8 tokens: one idle session, then three requests that cannot all fit.
    engine = make_engine(backend, kv_blocks=9, block_size=8)
    run(engine, [greedy(prompts(1, seed=9)[0], "warm", max_tokens=4, session_id="idle")])
    assert "idle" in engine.kv.sessions
    got, reasons, _, events = run(
        engine, [greedy(p, f"r{i}", max_tokens=20) for i, p in enumerate(ps)]
    )
    kinds = {e.kind for e in events}
    assert "session_evicted" in kinds and "preempted" in kinds
    assert all(reasons[f"r{i}"] == "length" for i in range(3))
    for i, p in enumerate(ps):
        assert_same_or_near_tie(backend, p, got[f"r{i}"], want[f"r{i}"])
    assert engine.stats().kv_blocks_used == 0


def test_abort_frees_every_block(backend):
    engine = make_engine(backend, kv_blocks=32)
    for i, p in enumerate(prompts(3, seed=6)):
        engine.add(greedy(p, f"r{i}", max_tokens=50))
    engine.add(greedy(prompts(1, seed=7)[0], "queued", max_tokens=5))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    for rid in ("r0", "r1", "r2", "queued"):
        assert engine.abort(rid)
    assert not engine.abort("r0") and not engine.abort("never-added")
    outs = engine.step()
    assert {o.request_id: o.finish_reason for o in outs} == dict.fromkeys(
        ("r0", "r1", "r2", "queued"), "abort")
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0
    assert engine.kv.num_free == engine.kv.num_blocks
    assert not engine.has_work()


def test_stop_tokens_eos_and_length(backend):
    p = prompts(1, seed=8)[0]
    free_run = run(make_engine(backend, kv_blocks=64), [greedy(p, "r")])[0]["r"]
    stop_at = free_run[3]
    engine = make_engine(backend, kv_blocks=64)
    tokens, reasons, _, _ = run(
        engine, [greedy(p, "r", stop_token_ids=frozenset({stop_at}))]
    )
    assert tokens["r"] == free_run[: free_run.index(stop_at) + 1]
    assert reasons["r"] == "stop"
    assert engine.eos_token_ids  # the file declares EOS (and EOT)
    eos = next(iter(engine.eos_token_ids))
    engine2 = make_engine(backend, kv_blocks=64)
    engine2.eos_token_ids = frozenset({stop_at})
    tokens2, reasons2, _, _ = run(engine2, [Request("e", p, GREEDY, max_tokens=12)])
    assert reasons2["e"] == "stop" and tokens2["e"][-1] == stop_at
    assert eos not in (free_run[:1])


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        ({"prompt_token_ids": []}, "empty prompt"),
        ({"prompt_token_ids": [1] * 9000}, "does not fit"),
        ({"prompt_token_ids": [1, 10**9]}, "token ids must be in"),
        ({"prompt_token_ids": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt_token_ids": [1, 2], "sampling": SamplingParams(top_p=0)}, "top_p"),
    ],
)
def test_bad_requests_refused(backend, request_kwargs, message):
    engine = make_engine(backend, kv_blocks=1024)
    with pytest.raises(RequestError, match=message):
        engine.add(Request("bad", **request_kwargs))
    assert not engine.has_work()


def test_duplicate_request_id_refused(backend):
    engine = make_engine(backend, kv_blocks=16)
    engine.add(greedy([1, 2, 3], "same"))
    with pytest.raises(RequestError, match="already"):
        engine.add(greedy([1, 2, 3], "same"))


def test_logprobs_reported(backend):
    params = SamplingParams(temperature=0.0, logprobs=3)
    engine = make_engine(backend, kv_blocks=16)
    engine.add(Request("lp", [1, 504, 3045], params, max_tokens=2))
    outs = [o for _ in range(4) for o in engine.step()]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 2
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id
        assert lp.logprob <= 0 and torch.isfinite(torch.tensor(lp.logprob))


def test_default_kv_pool_from_free_gpu_memory(monkeypatch, backend):
    """On a GPU the pool is sized from the memory free after the weights, less a reserve."""
    from gpu import engine as engine_module

    per_block = backend.kv_bytes_per_block(16)
    fake = type("FakeCudaBackend", (), {
        "device": torch.device("cuda", 0),
        "kv_bytes_per_block": lambda self, block_size: per_block,
    })()
    free = 10 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 << 30))
    blocks = engine_module.default_kv_blocks(fake, 16)
    assert blocks == (int(free * engine_module.GPU_KV_FRACTION)
                      - engine_module.GPU_RESERVE_BYTES) // per_block
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 30, 80 << 30))
    with pytest.raises(RequestError, match="no memory left for a KV cache"):
        engine_module.default_kv_blocks(fake, 16)
    if backend.device.type == "cpu":
        assert engine_module.default_kv_blocks(backend, 16) == (1 << 30) // per_block


def test_non_finite_logits_end_one_request_alone(backend):
    """NaN logits for one request (injected) end it with `error`; the others, greedy and
    sampled, get exactly the tokens they get without it; the engine goes on."""
    from gpu.faults import FaultInjector

    def batch():
        ps = prompts(4, seed=7)
        return [greedy(ps[0], "a"), greedy(ps[1], "poisoned"),
                Request("c", ps[2], SamplingParams(temperature=0.8, seed=3), max_tokens=12,
                        ignore_eos=True), greedy(ps[3], "d")]

    clean, _, _, _ = run(make_engine(backend, faults=FaultInjector()), batch())
    engine = make_engine(backend, faults=FaultInjector(nan_requests=frozenset({"poisoned"})))
    outputs = []
    for request in batch():
        engine.add(request)
    while engine.has_work():
        outputs += engine.step()
    poisoned = [o for o in outputs if o.request_id == "poisoned"]
    assert [o.finish_reason for o in poisoned] == ["error"]
    assert "not finite" in poisoned[0].error and poisoned[0].engine_fault
    assert not poisoned[0].new_token_ids
    for rid in ("a", "c", "d"):
        assert sum((o.new_token_ids for o in outputs if o.request_id == rid), []) == clean[rid]
    assert engine.stats().kv_blocks_used == 0


@pytest.fixture
def inference_backend(monkeypatch, smollm2_backend):
    """smollm2_backend whose forward runs under torch.inference_mode, as the CUDA backend's
    does: its logits are inference tensors, which refuse in-place writes outside it."""
    forward = smollm2_backend.forward

    def inference_forward(batch):
        with torch.inference_mode():
            return forward(batch)

    monkeypatch.setattr(smollm2_backend, "forward", inference_forward)
    return smollm2_backend


def test_sampled_rows_take_logits_made_in_inference_mode(inference_backend):
    """The CUDA backend's forward runs under torch.inference_mode, so its logits are inference
    tensors: the engine's finite check must not write them in place outside it (it did, and
    every step with a sampled row failed on the GPU)."""
    request = Request("s", prompts(1, seed=5)[0], SamplingParams(temperature=0.8, seed=3),
                      max_tokens=6, ignore_eos=True)  # fmt: skip
    tokens, reasons, _, _ = run(make_engine(inference_backend), [request])
    assert len(tokens["s"]) == 6 and reasons["s"] == "length"


def test_injected_nan_reaches_logits_made_in_inference_mode(inference_backend):
    """Fault injection writes NaN into the CUDA backend's logits, which are inference tensors:
    the write must happen inside inference mode (outside it, every step raised on the GPU)."""
    from gpu.faults import FaultInjector

    ps = prompts(2, seed=9)
    engine = make_engine(inference_backend, faults=FaultInjector(nan_requests=frozenset({"bad"})))
    tokens, reasons, _, _ = run(engine, [greedy(ps[0], "ok"), greedy(ps[1], "bad")])
    assert reasons == {"ok": "length", "bad": "error"} and tokens["bad"] == []


def test_engine_tells_waiting_for_budget_from_waiting_for_memory(smollm2_backend):
    """A request that waits only for the step's token budget (a long prefill in chunks) fits;
    one the KV pool or the running set cannot take does not: the worker's admission reads
    this to decide whether to take more jobs from Redis."""
    ps = prompts(3, seed=11)
    long = [1] + [300 + i for i in range(200)]  # 13 blocks of 16
    engine = make_engine(smollm2_backend, max_batch_tokens=64, kv_blocks=40, max_num_seqs=8)
    engine.add(greedy(long, "long", max_tokens=2))
    engine.add(greedy(ps[0], "short", max_tokens=2))
    assert engine.stats().waiting == 2
    assert engine.prompt_blocks_wanted() == 13 + -(-len(ps[0]) // 16)
    assert engine.waiting_fits()
    engine.step()  # the long prompt's first 64-token chunk: the short one still waits
    assert engine.stats().waiting == 1 and engine.waiting_fits()
    assert engine.prompt_blocks_wanted() == 13 - 4 + -(-len(ps[0]) // 16)  # the rest of "long"
    engine.add(greedy(long + long[1:], "huge", max_tokens=2))  # 26 blocks: 36 are free, but
    assert not engine.waiting_fits()  # "long" still needs 9 of them
    full = make_engine(smollm2_backend, max_batch_tokens=64, kv_blocks=40, max_num_seqs=1)
    assert full.waiting_fits()  # nothing waits
    full.add(greedy(ps[1], "a"))
    full.add(greedy(ps[2], "b"))
    assert not full.waiting_fits()  # two for a running set of one


def test_a_lost_device_is_sticky(backend):
    from gpu.faults import FaultInjector
    from gpu.request import DeviceLostError

    engine = make_engine(backend, faults=FaultInjector(device_lost_after=2))
    engine.add(greedy(prompts(1)[0], "r"))
    engine.step()
    engine.step()
    for _ in range(2):
        with pytest.raises(DeviceLostError, match="device lost after 2 steps"):
            engine.step()


def test_abort_with_a_reason(backend):
    engine = make_engine(backend)
    engine.add(greedy(prompts(1)[0], "r", max_tokens=50))
    engine.step()
    assert engine.abort("r", "deadline")
    (output,) = engine.step()
    assert output.finish_reason == "deadline" and engine.stats().kv_blocks_used == 0


def test_prepare_decode_builds_nothing_on_the_torch_backend():
    from gpu.backends.torch_backend import TorchBackend

    engine = make_engine(TorchBackend(resolve_model("smollm2-135m")), kv_blocks=16)
    assert engine.prepare_decode() == 0
