"""CudaSampler (gpu/cuda/sampling.py) against the torch Sampler and its filters as the reference
(run on the device: `pytest -m gpu tests/gpu/test_cuda_sampler.py`); the launch config, the
top-p bound and the draw keys on CPU.

Greedy ids and logprobs equal the reference's; every filter's kept set equals filter_logits's
exactly, unless the only difference is a provable near-tie at the top-p bound (float32 cumsum
there, an exact fixed-point sum here); draws stay in the kept set and follow the reference
distribution (chi-square on fixed seeds: deterministic, never flaky); seeded rows reproduce and
are batch-invariant; the engine generates through it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from gpu.cuda.errors import CudaError
from gpu.cuda.sampling import (
    MAX_VOCAB,
    CudaSampler,
    draw_key,
    sampling_launch_config,
    top_p_target,
)
from gpu.request import Request, SamplingParams
from gpu.sampler import Sampler, SamplingRow, apply_penalties, filter_logits
from loader.gguf_file import open_gguf
from loader.registry import ModelNotFoundError

VOCABS = [1000, 49152, 128256]
NUCLEUS = [0.15, 0.5, 0.05, 0.3]  # test_sampler.py's nucleus, out of order
# chi-square 0.1% tails by degrees of freedom
CHI2_TAIL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}
LOGPROB_TOL = 1e-5
TOP_P_NEAR_TIE = 1e-5  # mass-before distance to the bound that float32 cumsum may misplace


@pytest.fixture(scope="module")
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.usefixtures("cuda_device")(test))


def random_logits(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * scale).cuda()


def log_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()


def scaled(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The reference's filter input: penalised logits over each row's temperature."""
    temperature = [row.params.temperature or 1.0 for row in rows]
    column = torch.tensor(temperature, device=logits.device).unsqueeze(1)
    return apply_penalties(logits, rows) / column


def reference_kept(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    return torch.isfinite(filter_logits(scaled(logits, rows), [row.params for row in rows]))


# --- CPU: launch geometry and host-side encodings ----------------------------------------------


@pytest.mark.parametrize(("rows", "vocab"), [(1, 1), (8, 128256), (20_000, 8), (3, MAX_VOCAB)])
def test_launch_config_is_one_cta_per_row(rows, vocab):
    config = sampling_launch_config(rows, vocab)
    assert config.grid == (rows, 1, 1) and config.block == (1024, 1, 1)


@pytest.mark.parametrize(("rows", "vocab"), [(0, 10), (1, 0), (1, MAX_VOCAB + 1)])
def test_launch_config_refuses_empty_or_huge(rows, vocab):
    with pytest.raises(CudaError):
        sampling_launch_config(rows, vocab)


def test_top_p_bound_is_rounded_as_torch_rounds_it():
    bound = np.float32(np.float32(0.6) - np.float32(1e-6))  # float32 tensor minus a scalar
    assert top_p_target(0.6) == int(float(bound) * 2**56)
    assert top_p_target(0.9) < int(0.9 * 2**56)
    assert top_p_target(1e-9) is None  # only the best token stays


def test_draw_keys_separate_seeds_counters_and_streams():
    keys = {draw_key(seed, counter, stream) for seed in (0, 1, 7) for counter in range(4)
            for stream in range(4)}  # fmt: skip
    assert len(keys) == 48
    assert draw_key(2**64 + 5, 3, 0) == draw_key(5, 3, 0)  # folded to 64 bits like make_generator
    assert draw_key(-1, 0, 0) == draw_key(2**64 - 1, 0, 0)


# --- greedy and logprobs -----------------------------------------------------------------------

GREEDY = SamplingParams(temperature=0.0)


@on_gpu
@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_ids_equal_reference(vocab):
    logits = random_logits(8, vocab, 3.0, seed=vocab)
    top = logits.argmax(dim=-1).tolist()
    params = [
        GREEDY,
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(temperature=0.8, min_p=0.1),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, frequency_penalty=0.7),
        GREEDY,
        SamplingParams(top_k=20, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=-0.5),
    ]
    rows = [
        SamplingRow(p, prompt_token_ids=[top[i], (top[i] + 7) % vocab, 3],
                    output_token_ids=[top[i]] * (i % 3 + 1) + [5])
        for i, p in enumerate(params)
    ]  # fmt: skip
    before = logits.clone()
    ours = CudaSampler(seed=0)(logits, rows)
    ref = Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, before), "the caller's logits were written"
    greedy = [i for i, p in enumerate(params) if p.greedy]
    assert [ours[i].token_id for i in greedy] == [ref[i].token_id for i in greedy]
    penalised = [i for i in greedy if params[i] != GREEDY]
    assert any(ours[i].token_id != top[i] for i in penalised), "no penalty changed a choice"
    assert all(ours[i].logprobs is None for i in range(8))


@on_gpu
def test_greedy_ties_take_the_lowest_index():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0], [5.0] * 4, [-1.0, -0.0, 0.0, -1.0]]).cuda()
    tokens = CudaSampler(seed=0)(logits, [SamplingRow(GREEDY)] * 3)
    assert [t.token_id for t in tokens] == [1, 0, 1]


@on_gpu
@pytest.mark.parametrize("vocab", VOCABS)
def test_logprobs_equal_reference(vocab):
    logits = random_logits(6, vocab, 2.0, seed=vocab + 1)
    params = [
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, logprobs=20),
        SamplingParams(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5, logprobs=3),
        SamplingParams(top_p=0.9, frequency_penalty=0.3, logprobs=1),
        SamplingParams(temperature=0.0),
    ]
    top = logits.argmax(dim=-1).tolist()
    rows = [SamplingRow(p, prompt_token_ids=[top[i], 2], output_token_ids=[top[i], 9, 9])
            for i, p in enumerate(params)]  # fmt: skip
    ours = CudaSampler(seed=0)(logits, rows)
    ref = Sampler(seed=0)(logits, rows)
    reference_logprobs = torch.log_softmax(apply_penalties(logits, rows), dim=-1)
    for i, p in enumerate(params):
        mine, theirs = ours[i].logprobs, ref[i].logprobs
        if p.logprobs is None:
            assert mine is None
            continue
        assert mine is not None and theirs is not None
        assert mine.token_id == ours[i].token_id
        if p.greedy:
            assert ours[i].token_id == ref[i].token_id
        expected = float(reference_logprobs[i, ours[i].token_id])
        assert abs(mine.logprob - expected) <= LOGPROB_TOL
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]
        for (_, value), (_, want) in zip(mine.top, theirs.top, strict=True):
            assert abs(value - want) <= LOGPROB_TOL


@on_gpu
def test_logprobs_small_cases_of_the_torch_tests():
    # test_sampler.py: a penalised tie (2.5 / 1.25 = 2.0 against id 5's 2.0), and a count capped
    # at the vocabulary.
    raw = torch.tensor([[1.0, -0.5, 2.5, 0.25, -2.0, 2.0]]).cuda()
    row = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.25, logprobs=3),
                      prompt_token_ids=[2])  # fmt: skip
    [token] = CudaSampler(seed=0)(raw, [row])
    assert token.logprobs is not None
    assert [i for i, _ in token.logprobs.top] == [2, 5, 0]  # the tie, lowest index first
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]] * 2).cuda()
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=20)),
            SamplingRow(SamplingParams(temperature=0.0, logprobs=0))]  # fmt: skip
    many, zero = CudaSampler(seed=0)(logits, rows)
    assert many.logprobs is not None and zero.logprobs is not None
    assert [i for i, _ in many.logprobs.top] == [2, 3, 1, 0]
    assert zero.logprobs.top == []
    expected = float(torch.log_softmax(logits[0], 0)[2])
    assert abs(zero.logprobs.logprob - expected) <= LOGPROB_TOL


# --- kept sets ---------------------------------------------------------------------------------

FILTERS = [
    SamplingParams(top_k=1),
    SamplingParams(top_k=40),
    SamplingParams(top_k=999),
    SamplingParams(top_p=0.5),
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.99),
    SamplingParams(min_p=0.05),
    SamplingParams(min_p=0.5),
    SamplingParams(top_k=50, top_p=0.9),
    SamplingParams(top_p=0.8, min_p=0.02),
    SamplingParams(top_k=200, top_p=0.95, min_p=0.01),
    SamplingParams(temperature=0.6, top_p=0.9),
    SamplingParams(temperature=1.7, top_k=100, top_p=0.5),
    SamplingParams(top_p=1e-9),
    SamplingParams(top_p=0.9, repetition_penalty=1.5),
    SamplingParams(temperature=1.3),
]


def assert_same_kept(ours: torch.Tensor, ref: torch.Tensor, y: torch.Tensor, p: SamplingParams):
    """Equal kept sets, or every difference is a token whose ranked mass before it (float64, over
    the top-k set) lies within TOP_P_NEAR_TIE of top_p - 1e-6: a rounding tie, not a bug."""
    assert ((ours == 0) | (ours == 1)).all(), "kept mask left unwritten"
    ours = ours.bool()
    if torch.equal(ours, ref):
        return
    differing = (ours != ref).nonzero().flatten().tolist()
    assert len(differing) <= 4 and p.top_p < 1.0, f"{p}: kept sets differ at {differing[:10]}"
    values, order = y.double().sort(descending=True)
    k = p.top_k if 0 < p.top_k < y.numel() else y.numel()
    probs = torch.softmax(values[:k], dim=0)
    mass_before = probs.cumsum(0) - probs
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    for token in differing:
        r = int(rank[token])
        gap = abs(float(mass_before[r]) - (p.top_p - 1e-6)) if r < k else 1.0
        assert gap < TOP_P_NEAR_TIE, (
            f"{p}: token {token} (rank {r}) differs, {gap:.2e} from the bound"
        )


@on_gpu
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("scale", [1.0, 6.0], ids=["flat", "peaked"])
def test_kept_sets_equal_filter_logits(vocab, scale):
    logits = random_logits(len(FILTERS), vocab, scale, seed=vocab + int(scale))
    top = logits.argmax(dim=-1).tolist()
    rows = [SamplingRow(p, prompt_token_ids=[top[i]], output_token_ids=[top[i], 1])
            for i, p in enumerate(FILTERS)]  # fmt: skip
    kept = CudaSampler(seed=0).kept_mask(logits, rows)
    ref = reference_kept(logits, rows)
    y = scaled(logits, rows)
    for i, p in enumerate(FILTERS):
        assert_same_kept(kept[i], ref[i], y[i], p)


@on_gpu
def test_kept_sets_of_dense_rows_take_the_deep_levels():
    """Rows with more than 4096 tokens in one 1/32-nat bin, or in one value: the select walks
    key and index digits before it can gather."""
    vocab = 49152
    generator = torch.Generator().manual_seed(3)
    narrow = torch.randn(4, vocab, generator=generator) * 1e-3  # all within a few hundredths
    logits = torch.cat([narrow, torch.zeros(3, vocab)]).cuda()
    params = [SamplingParams(top_p=0.9), SamplingParams(top_k=6000),
              SamplingParams(top_k=5000, top_p=0.5), SamplingParams(top_p=0.3, min_p=0.999),
              SamplingParams(top_k=5000), SamplingParams(top_k=30000, top_p=0.2),
              SamplingParams(top_k=1)]  # fmt: skip
    rows = [SamplingRow(p) for p in params]
    kept = CudaSampler(seed=0).kept_mask(logits, rows)
    ref = reference_kept(logits, rows)
    y = scaled(logits, rows)
    for i in range(4):
        assert_same_kept(kept[i], ref[i], y[i], params[i])
    # Ties: the reference keeps as many (in its own order); we keep the lowest indices.
    # Row 5: 6000 of 30000 equal tokens reach 0.2 (float32 cumsum may land one off).
    for i, count in ((4, 5000), (5, 6000), (6, 1)):
        assert int(kept[i].sum()) == count and kept[i, :count].all()
        assert abs(int(ref[i].sum()) - count) <= (1 if i == 5 else 0)


def _kept_ids(logits: list[float], params: SamplingParams) -> list[int]:
    row = torch.tensor([logits]).cuda()
    kept = CudaSampler(seed=0).kept_mask(row, [SamplingRow(params)])[0]
    assert ((kept == 0) | (kept == 1)).all()
    return kept.nonzero().flatten().tolist()


@on_gpu
def test_kept_sets_of_the_torch_tests():
    nucleus = log_probs(NUCLEUS).tolist()
    assert _kept_ids(nucleus, SamplingParams(top_p=0.8)) == [1, 3]
    assert _kept_ids(nucleus, SamplingParams(top_p=0.6)) == [1, 3]
    assert _kept_ids(nucleus, SamplingParams(top_k=2, top_p=0.6)) == [1]
    assert _kept_ids(nucleus, SamplingParams(top_p=1e-9)) == [1]
    assert _kept_ids(nucleus, SamplingParams(min_p=0.2)) == [0, 1, 3]
    assert _kept_ids(nucleus, SamplingParams(temperature=2.0, min_p=0.2)) == [0, 1, 2, 3]
    assert _kept_ids([1.0, 3.0, 3.0, 2.9], SamplingParams(min_p=1.0)) == [1, 2]
    eight = [0.3, 2.0, -1.0, 1.5, 0.0, 1.7, -2.0, 0.9]
    assert _kept_ids(eight, SamplingParams(top_k=3)) == [1, 3, 5]
    # The slack: six of ten equal tokens reach 0.6 exactly; float32 lands a hair either side.
    assert _kept_ids([0.0] * 10, SamplingParams(top_p=0.6)) == [0, 1, 2, 3, 4, 5]
    assert _kept_ids([0.0] * 4, SamplingParams(top_k=1)) == [0]


# --- draws -------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("vocab", [1000, 128256])
def test_draws_stay_in_the_reference_kept_set(vocab):
    logits = random_logits(len(FILTERS), vocab, 3.0, seed=5)
    rows = [SamplingRow(p) for p in FILTERS]
    ref = reference_kept(logits, rows).cpu()
    sampler = CudaSampler(seed=1)
    draws = [[t.token_id for t in sampler(logits, rows)] for _ in range(10)]
    for tokens in draws:
        for i, token in enumerate(tokens):
            assert ref[i, token], f"{FILTERS[i]} drew {token}, outside the kept set"
    assert len({tuple(t) for t in draws}) > 1  # unseeded rows advance between calls


DISTRIBUTIONS = [
    ([0.1, 0.2, 0.3, 0.4], SamplingParams()),
    ([0.5, 0.3, 0.2], SamplingParams(temperature=0.5)),
    ([0.5, 0.3, 0.2], SamplingParams(temperature=2.0)),
    (NUCLEUS, SamplingParams(top_p=0.8)),
    (NUCLEUS, SamplingParams(min_p=0.2)),
    ([0.05, 0.1, 0.15, 0.2, 0.22, 0.28], SamplingParams(temperature=0.8, top_k=4, top_p=0.95)),
]


@on_gpu
@pytest.mark.parametrize("case", range(len(DISTRIBUTIONS)))
@pytest.mark.parametrize("seeded", [False, True], ids=["unseeded", "seeded"])
def test_draw_distribution_matches_reference(case, seeded):
    """20,000 draws of one row (20,000 unseeded rows, or rows of 20,000 seeds) against the
    reference probabilities; the unfiltered, untempered distribution must be rejected."""
    probs, params = DISTRIBUTIONS[case]
    draws = 20_000
    logits = log_probs(probs)
    batch = logits.unsqueeze(0).repeat(draws, 1).cuda()
    if seeded:
        rows = [SamplingRow(dataclasses.replace(params, seed=s)) for s in range(draws)]
    else:
        rows = [SamplingRow(params)] * draws
    tokens = CudaSampler(seed=3)(batch, rows)
    counts = torch.bincount(torch.tensor([t.token_id for t in tokens]), minlength=len(probs))
    filtered = filter_logits((logits / params.temperature).unsqueeze(0), [params])[0]
    expected = torch.softmax(filtered.double(), dim=0)
    kept = expected > 0
    assert (counts[~kept] == 0).all(), f"drew filtered tokens: {counts.tolist()}"
    dof = int(kept.sum()) - 1
    if dof:
        assert chi_square(counts[kept], expected[kept]) < CHI2_TAIL[dof], counts.tolist()
    plain = torch.tensor(probs, dtype=torch.float64)[kept]
    if not torch.allclose(plain / plain.sum(), expected[kept]):  # the same bound rejects it
        assert chi_square(counts[kept], plain / plain.sum()) > CHI2_TAIL[dof]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = int(counts.sum()) * probs
    return float(((counts - expected) ** 2 / expected).sum())


def _seeded_tokens(layout: list[str], steps: int = 24, target_seed: int = 1234) -> list[int]:
    """The target row's tokens over `steps` steps inside a batch laid out as `layout`; every
    row's output grows by its token, so seeded rows draw with a new counter each step."""
    params = {
        "target": SamplingParams(temperature=0.9, top_p=0.95, seed=target_seed),
        "unseeded": SamplingParams(min_p=0.1),
        "greedy": GREEDY,
    }
    rows = [
        SamplingRow(params.get(kind) or SamplingParams(temperature=1.3, top_k=5, seed=n),
                    prompt_token_ids=[1, 2], output_token_ids=[])
        for n, kind in enumerate(layout)
    ]  # fmt: skip
    sampler = CudaSampler(seed=len(layout))
    target_logits = torch.randn(steps, 1000, generator=torch.Generator().manual_seed(7))
    noise = torch.Generator().manual_seed(len(layout) * 31)
    where = layout.index("target")
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(layout), 1000, generator=noise)
        logits[where] = target_logits[step]
        sampled = sampler(logits.cuda(), rows)
        for row, token in zip(rows, sampled, strict=True):
            row.output_token_ids = [*row.output_token_ids, token.token_id]
        tokens.append(sampled[where].token_id)
    return tokens


@on_gpu
def test_seeded_rows_reproduce_whatever_the_batch():
    alone = _seeded_tokens(["target"])
    assert len(set(alone)) > 3  # really sampled
    for layout in (["seeded", "target", "unseeded"],
                   ["unseeded", "greedy", "seeded", "seeded", "target"],
                   ["target", "seeded", "unseeded", "unseeded", "greedy", "seeded"]):  # fmt: skip
        assert _seeded_tokens(layout) == alone, layout
    assert _seeded_tokens(["target"], target_seed=99) != alone


@on_gpu
def test_unseeded_rows_follow_the_sampler_seed():
    logits = random_logits(8, 300, 1.0, seed=0)
    rows = [SamplingRow(SamplingParams()) for _ in range(8)]
    first, second = CudaSampler(seed=42), CudaSampler(seed=42)
    calls = [[t.token_id for t in first(logits, rows)] for _ in range(3)]
    assert calls == [[t.token_id for t in second(logits, rows)] for _ in range(3)]
    assert calls[0] != calls[1]  # the counter advances
    assert [t.token_id for t in CudaSampler(seed=43)(logits, rows)] != calls[0]


@on_gpu
def test_greedy_rows_do_not_shift_unseeded_draws():
    logits = torch.randn(20, 3, 40, generator=torch.Generator().manual_seed(1)).cuda()
    sampled, greedy = SamplingRow(SamplingParams()), SamplingRow(GREEDY)
    alone, mixed = CudaSampler(seed=9), CudaSampler(seed=9)
    alone_ids = [alone(step[:1], [sampled])[0].token_id for step in logits]
    mixed_ids = [
        mixed(step, [greedy, sampled, greedy])[1].token_id for step in logits[:, [1, 0, 2]]
    ]
    assert len(set(alone_ids)) > 3
    assert mixed_ids == alone_ids


@on_gpu
def test_bad_batches_are_refused_and_seeded_rows_need_no_generator():
    with pytest.raises(ValueError, match="2 rows"):
        CudaSampler()(torch.zeros(3, 4).cuda(), [SamplingRow(SamplingParams())] * 2)
    with pytest.raises(ValueError, match="logprobs"):
        CudaSampler()(torch.zeros(1, 4).cuda(), [SamplingRow(SamplingParams(logprobs=21))])
    with pytest.raises(CudaError):
        CudaSampler()(torch.zeros(1, 4, dtype=torch.float16).cuda(), [SamplingRow(GREEDY)])
    [token] = CudaSampler()(torch.zeros(1, 4).cuda(), [SamplingRow(SamplingParams(seed=3))])
    assert 0 <= token.token_id < 4
    assert CudaSampler()(torch.zeros(0, 4).cuda(), []) == []


# --- the engine --------------------------------------------------------------------------------


def _generate(engine, requests: list[Request]) -> dict[str, list[int]]:
    for request in requests:
        engine.add(request)
    tokens = {r.request_id: [] for r in requests}
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


def _check_engine(path, backend):
    """Greedy and seeded requests through Engine(backend=...) with its CudaSampler: they
    reproduce, and greedy equals the torch Sampler on the same logits."""
    from gpu.engine import Engine

    def requests():
        return [
            Request("greedy", [1, 17, 300, 42, 7], SamplingParams(temperature=0.0),
                    max_tokens=12, ignore_eos=True),
            Request("seeded", [1, 5, 99], SamplingParams(temperature=1.0, top_p=0.95, seed=7,
                    logprobs=2), max_tokens=12, ignore_eos=True),
        ]  # fmt: skip

    runs = []
    for _ in range(2):
        engine = Engine(path, backend=backend, kv_blocks=64, block_size=16)
        assert isinstance(engine.sampler, CudaSampler)
        runs.append(_generate(engine, requests()))
    assert runs[0] == runs[1]
    assert len(runs[0]["seeded"]) == 12 and len(set(runs[0]["seeded"])) > 1
    engine = Engine(path, backend=backend, kv_blocks=64, block_size=16)
    engine.sampler = Sampler(seed=0)  # same batches, so the same logits
    assert _generate(engine, requests())["greedy"] == runs[0]["greedy"]


@on_gpu
def test_engine_generates_on_a_synthetic_model(tmp_path):
    from gpu.backends.cuda_backend import CudaBackend
    from loader.synth import SHAPES, write_synthetic_gguf

    shape = dataclasses.replace(SHAPES["smollm2-135m"].with_layers(2), vocab_size=2048)
    path = tmp_path / "smollm2-2l.gguf"
    try:
        write_synthetic_gguf(path, shape, GGMLQuantizationType.Q8_0)
    except ModelNotFoundError:
        pytest.skip("synthetic models take their vocabulary from the default model's file")
    _check_engine(path, CudaBackend(path))


@on_gpu
def test_engine_generates_on_real_smollm2(default_model_path):
    from gpu.backends.cuda_backend import CudaBackend

    with open_gguf(default_model_path) as gguf:
        if not gguf.tensors:
            pytest.skip(f"{default_model_path} holds only a vocabulary")
    _check_engine(default_model_path, CudaBackend(default_model_path))


@on_gpu
def test_launched_calls_read_later_keep_their_own_tokens():
    """The engine launches call t+1 before it reads call t: each call's ids on the device and
    its result read afterwards are its own, and a result read after the call after next (its
    buffers reused) is refused rather than returned wrong."""
    sampler = CudaSampler(seed=0)
    params = SamplingParams(temperature=0.0, logprobs=2)
    calls = [random_logits(3, 5000, 3.0, seed=s) for s in range(3)]
    rows = [SamplingRow(params)] * 3
    first, second = sampler.launch(calls[0], rows), sampler.launch(calls[1], rows)
    for pending, logits in ((second, calls[1]), (first, calls[0])):
        want = logits.argmax(dim=-1)
        assert torch.equal(pending.ids, want) and pending.ids.dtype == torch.int64
        got = pending.result()
        assert [t.token_id for t in got] == want.tolist()
        assert [t.logprobs.top[0][0] for t in got] == want.tolist()
    third, fourth = sampler.launch(calls[2], rows), sampler.launch(calls[0], rows)
    assert [t.token_id for t in fourth.result()] == calls[0].argmax(dim=-1).tolist()
    fifth = sampler.launch(calls[1], rows)
    with pytest.raises(CudaError, match="reused its buffers"):
        third.result()
    assert [t.token_id for t in fifth.result()] == calls[1].argmax(dim=-1).tolist()
    one = sampler.launch(calls[2][:1], rows[:1])  # a single row's id, as batch-1 decode feeds it
    assert one.ids.stride() == (1,) and one.ids.tolist() == [calls[2][0].argmax().item()]


def test_torch_sampler_launch_ids_are_the_result():
    """The torch sampler's launch: ids stay a tensor (the next step's input), read later."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=1))] * 4
    pending = Sampler(seed=0).launch(logits, rows)
    assert pending.ids.dtype == torch.int64 and pending.ids.tolist() == logits.argmax(-1).tolist()
    tokens = pending.result()
    assert [t.token_id for t in tokens] == logits.argmax(-1).tolist()
    assert all(t.logprobs.top[0][0] == t.token_id for t in tokens)
    assert pending.result() is tokens  # read once
