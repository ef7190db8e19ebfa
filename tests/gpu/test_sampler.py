"""Sampler tests on hand-made distributions: exact values where the math is exact, fixed-seed
draw counts where it is statistical (deterministic, so never flaky)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpu.sampler
from gpu.request import SamplingParams
from gpu.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    filter_logits,
    make_generator,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]

# Probabilities of the nucleus examples, placed out of order so sorting is exercised.
# ids:        0     1     2     3
NUCLEUS = [0.15, 0.5, 0.05, 0.3]


@pytest.fixture(params=[1024, 1, 2], ids=["head-default", "head-1", "head-2"])
def ranking_head(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run a filter test with the CPU ranking head as shipped and cut short (exact fallback)."""
    monkeypatch.setattr(gpu.sampler, "_CPU_RANKING_HEAD", request.param)
    return request.param


def log_probs(probs: list[float], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float().to(device)


def draw_counts(
    logits: torch.Tensor, params: SamplingParams, draws: int, seed: int = 0
) -> list[int]:
    """Sample one row `draws` times as one batch of unseeded rows; counts per token id."""
    sampler = Sampler(seed=seed)
    batch = logits.unsqueeze(0).expand(draws, -1)
    tokens = sampler(batch, [SamplingRow(params) for _ in range(draws)])
    ids = torch.tensor([token.token_id for token in tokens])
    return torch.bincount(ids, minlength=logits.shape[0]).tolist()


def chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_of_penalised_logits(device: str) -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 2.0, 1.0, -5.0]], device=device)
    greedy = SamplingParams(temperature=0.0)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # Row 1: 3.0 was emitted before, halved to 1.5, so 2.0 wins.
    rows = [SamplingRow(greedy), SamplingRow(penalised, prompt_token_ids=[3], output_token_ids=[0])]
    assert [t.token_id for t in Sampler(seed=0)(logits, rows)] == [1, 1]


def test_greedy_draws_no_randomness() -> None:
    sampler = Sampler(seed=0)
    generator = sampler.generator("r", 5, "cpu")
    state = generator.get_state()
    row = SamplingRow(SamplingParams(temperature=0.0, seed=5), request_id="r")
    sampler(torch.randn(1, 16), [row])
    assert torch.equal(generator.get_state(), state)


def test_greedy_rows_do_not_shift_unseeded_draws() -> None:
    logits = torch.randn(20, 3, 40, generator=make_generator(1, "cpu"))
    sampled = SamplingRow(SamplingParams(temperature=1.0))
    greedy = SamplingRow(SamplingParams(temperature=0.0))
    alone, mixed = Sampler(seed=9), Sampler(seed=9)
    alone_ids = [alone(step[:1], [sampled])[0].token_id for step in logits]
    mixed_ids = [
        mixed(step, [greedy, sampled, greedy])[1].token_id for step in logits[:, [1, 0, 2]]
    ]
    assert len(set(alone_ids)) > 3
    assert mixed_ids == alone_ids


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_distribution(temperature: float) -> None:
    probs = [0.5, 0.3, 0.2]
    counts = draw_counts(log_probs(probs), SamplingParams(temperature=temperature), 20_000)
    tempered = [p ** (1 / temperature) for p in probs]
    expected = [p / sum(tempered) for p in tempered]
    # chi-square with 2 degrees of freedom: 13.8 is its 0.1% tail; the untempered
    # distribution must be rejected by far, or the check would prove nothing.
    assert chi_square(counts, expected) < 13.8
    assert chi_square(counts, probs) > 100


def test_temperature_one_matches_model_distribution() -> None:
    probs = [0.1, 0.2, 0.3, 0.4]
    counts = draw_counts(log_probs(probs), SamplingParams(), 20_000, seed=3)
    assert chi_square(counts, probs) < 16.3  # 3 degrees of freedom, 0.1% tail


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_keeps_exactly_k(device: str) -> None:
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5, 0.0, 1.7, -2.0, 0.9]], device=device)
    filtered = filter_logits(logits, [SamplingParams(top_k=3)])
    assert torch.isfinite(filtered).nonzero()[:, 1].tolist() == [1, 3, 5]
    assert torch.equal(filtered[0, [1, 3, 5]], logits[0, [1, 3, 5]])
    counts = draw_counts(logits[0].cpu(), SamplingParams(top_k=3), 3_000)
    assert {i for i, c in enumerate(counts) if c} == {1, 3, 5}


def test_top_p_keeps_minimal_nucleus(ranking_head: int) -> None:
    logits = log_probs(NUCLEUS)
    counts = draw_counts(logits, SamplingParams(top_p=0.8), 20_000)
    # 0.5 + 0.3 reaches 0.8 exactly: only ids 1 and 3, renormalised to 0.625 / 0.375.
    assert counts[0] == counts[2] == 0
    assert chi_square([counts[1], counts[3]], [0.625, 0.375]) < 10.8  # 1 dof, 0.1% tail
    assert draw_counts(logits, SamplingParams(top_p=0.81), 2_000)[0] > 0
    assert draw_counts(logits, SamplingParams(top_p=0.01), 500) == [0, 500, 0, 0]


def test_top_p_boundary_survives_float_rounding(ranking_head: int) -> None:
    # Six of ten equal tokens reach 0.6 exactly; float32 cumsum lands a hair under it.
    uniform = torch.zeros(1, 10)
    assert torch.isfinite(filter_logits(uniform, [SamplingParams(top_p=0.6)])).sum() == 6
    # However small top_p is, the best token stays.
    best = filter_logits(log_probs(NUCLEUS).unsqueeze(0), [SamplingParams(top_p=1e-9)])
    assert torch.isfinite(best).nonzero()[:, 1].tolist() == [1]


def test_top_p_on_a_large_vocabulary_matches_a_float64_reference() -> None:
    # A peaked row (nucleus inside the default head) and a flat one (nucleus past it).
    logits = torch.randn(2, 5000, generator=make_generator(4, "cpu"))
    logits[0] *= 6.0
    kept = torch.isfinite(filter_logits(logits, [SamplingParams(top_p=0.9)] * 2))
    for row, row_kept in zip(logits.double(), kept, strict=True):
        probs, order = torch.softmax(row, dim=0).sort(descending=True)
        size = int((probs.cumsum(0) < 0.9).sum()) + 1
        assert 1 < size < 5000
        assert (
            row_kept.nonzero()[:, 0].sort().values.tolist() == order[:size].sort().values.tolist()
        )
    assert kept[0].sum() < 1024 < kept[1].sum()


def test_top_p_applies_to_top_k_renormalised_distribution(ranking_head: int) -> None:
    logits = log_probs(NUCLEUS).unsqueeze(0)
    # Alone, top_p 0.6 needs 0.5 + 0.3. After top_k 2 the best token has 0.625 >= 0.6.
    assert torch.isfinite(filter_logits(logits, [SamplingParams(top_p=0.6)])).sum() == 2
    both = filter_logits(logits, [SamplingParams(top_k=2, top_p=0.6)])
    assert torch.isfinite(both).nonzero()[:, 1].tolist() == [1]


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    logits = log_probs(NUCLEUS)
    # Threshold 0.2 * 0.5 = 0.1: 0.05 goes, 0.15 and 0.3 stay.
    filtered = filter_logits(logits.unsqueeze(0), [SamplingParams(min_p=0.2)])
    assert torch.isfinite(filtered).nonzero()[:, 1].tolist() == [0, 1, 3]
    counts = draw_counts(logits, SamplingParams(min_p=0.2), 20_000)
    assert counts[2] == 0
    assert (
        chi_square([counts[0], counts[1], counts[3]], [0.15 / 0.95, 0.5 / 0.95, 0.3 / 0.95]) < 13.8
    )


def test_min_p_keeps_tokens_exactly_at_the_threshold() -> None:
    # min_p 1 drops everything below the best, but a tie with the best is not below it.
    tied = torch.tensor([[1.0, 3.0, 3.0, 2.9]])
    kept = torch.isfinite(filter_logits(tied, [SamplingParams(min_p=1.0)]))
    assert kept.nonzero()[:, 1].tolist() == [1, 2]


def test_min_p_uses_temperature_scaled_probabilities() -> None:
    # At temperature 2 the ratio 0.05 / 0.5 becomes sqrt(0.1) = 0.316 > 0.2: 0.05 stays.
    scaled = (log_probs(NUCLEUS) / 2.0).unsqueeze(0)
    assert torch.isfinite(filter_logits(scaled, [SamplingParams(min_p=0.2)])).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rows_with_filters_off_are_untouched(device: str, ranking_head: int) -> None:
    logits = torch.randn(4, 64, generator=make_generator(2, "cpu")).to(device)
    params = [
        SamplingParams(top_k=2),
        SamplingParams(),
        SamplingParams(top_p=0.3, min_p=0.5),
        SamplingParams(top_k=64, top_p=1.0, min_p=0.0),
    ]
    # A dominant token and a tail of tiny ones: a top-p cut at "mass before >= 1" would
    # clip the tail by rounding, so rows with top_p 1 must not be cut at all.
    logits[3, 0] = 40.0
    filtered = filter_logits(logits, params)
    assert torch.equal(filtered[1], logits[1])
    assert torch.equal(filtered[3], logits[3])
    assert torch.isfinite(filtered[0]).sum() == 2
    # And when sampling: the open row still reaches every token of a flat distribution.
    flat = torch.zeros(2, 4)
    rows = [SamplingRow(SamplingParams(top_k=1)), SamplingRow(SamplingParams())] * 500
    tokens = Sampler(seed=0)(flat.repeat(500, 1), rows)
    assert {t.token_id for t in tokens[1::2]} == {0, 1, 2, 3}
    assert len({t.token_id for t in tokens[0::2]}) == 1  # top_k 1 on a tie: one of them


def test_repetition_penalty_hf_rule() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    row = SamplingRow(
        SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 0], output_token_ids=[1, 4]
    )
    # Seen ids 0, 1, 4 (once each, however often): positive halved, negative doubled.
    assert apply_penalties(logits, [row]).tolist() == [[1.0, -2.0, 0.5, -3.0, 2.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, -3.0, 4.0]]  # the caller's tensor is untouched


def test_presence_and_frequency_penalties_count_output_only() -> None:
    logits = torch.zeros(2, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    rows = [
        SamplingRow(params, prompt_token_ids=[3, 3], output_token_ids=[1, 2, 2, 2]),
        SamplingRow(SamplingParams(), prompt_token_ids=[0], output_token_ids=[0, 1]),
    ]
    # id 1: 0.5 + 0.25; id 2: 0.5 + 3 * 0.25; id 3 only in the prompt: untouched.
    assert apply_penalties(logits, rows).tolist() == [
        [0.0, -0.75, -1.25, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
    ]


def test_repetition_then_presence_order() -> None:
    logits = torch.tensor([[3.0, -1.0]])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5)
    row = SamplingRow(params, output_token_ids=[0, 1, 1])
    # id 0: 3 / 1.5 - (1 + 0.5) = 0.5; id 1: -1 * 1.5 - (1 + 2 * 0.5) = -3.5.
    assert apply_penalties(logits, [row]).tolist() == [[0.5, -3.5]]


def test_logprobs_are_log_softmax_of_penalised_logits_before_temperature() -> None:
    raw = [1.0, -0.5, 2.5, 0.25, -2.0, 2.0]
    params = SamplingParams(temperature=0.7, repetition_penalty=1.25, logprobs=3, seed=11)
    row = SamplingRow(params, prompt_token_ids=[2], request_id="r")
    [token] = Sampler(seed=0)(torch.tensor([raw]), [row])
    penalised = list(raw)
    penalised[2] = 2.5 / 1.25
    norm = math.log(sum(math.exp(x) for x in penalised))
    expected = [x - norm for x in penalised]
    assert token.logprobs is not None
    assert token.logprobs.token_id == token.token_id
    assert token.logprobs.logprob == pytest.approx(expected[token.token_id], abs=1e-6)
    # Penalised 2.5 -> 2.0 ties with id 5's 2.0; either order of the tie is best-first.
    assert [i for i, _ in token.logprobs.top] in ([2, 5, 0], [5, 2, 0])
    for token_id, logprob in token.logprobs.top:
        assert logprob == pytest.approx(expected[token_id], abs=1e-6)


def test_logprobs_count_and_absence() -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]] * 3)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logprobs=0)),
        SamplingRow(SamplingParams(temperature=0.0)),
        SamplingRow(SamplingParams(temperature=0.0, logprobs=20)),
    ]
    zero, absent, many = Sampler(seed=0)(logits, rows)
    assert zero.logprobs is not None and zero.logprobs.top == []
    assert zero.logprobs.logprob == pytest.approx(float(torch.log_softmax(logits[0], 0)[2]))
    assert absent.logprobs is None
    assert many.logprobs is not None
    assert [i for i, _ in many.logprobs.top] == [2, 3, 1, 0]  # capped at the vocabulary
    values = [v for _, v in many.logprobs.top]
    assert values == sorted(values, reverse=True)


def _seeded_tokens(
    device: str, steps: int, layout: list[str], target_seed: int = 1234
) -> list[int]:
    """The target row's tokens over `steps` steps inside a batch laid out as `layout`.

    "target" is the seeded row under test; "seeded" rows carry other seeds; "unseeded" and
    "greedy" rows use the engine generator or none. Other rows' logits vary with the layout.
    """
    target_params = SamplingParams(temperature=0.9, top_p=0.95, seed=target_seed)
    rows = []
    for n, kind in enumerate(layout):
        if kind == "target":
            rows.append(SamplingRow(target_params, request_id="target"))
        elif kind == "seeded":
            seeded = SamplingParams(temperature=1.3, top_k=5, seed=n)
            rows.append(SamplingRow(seeded, request_id=f"seeded-{n}"))
        elif kind == "unseeded":
            rows.append(SamplingRow(SamplingParams(min_p=0.1)))
        else:
            rows.append(SamplingRow(SamplingParams(temperature=0.0)))
    sampler = Sampler(seed=len(layout))
    target_logits = torch.randn(steps, 50, generator=make_generator(7, "cpu"))
    noise = make_generator(len(layout) * 31, "cpu")
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(layout), 50, generator=noise)
        logits[layout.index("target")] = target_logits[step]
        sampled = sampler(logits.to(device), rows)
        tokens.append(sampled[layout.index("target")].token_id)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seed_gives_same_tokens_whatever_the_batch(device: str) -> None:
    alone = _seeded_tokens(device, 24, ["target"])
    assert len(set(alone)) > 3  # really sampled, not stuck on one token
    layouts = [
        ["seeded", "target", "unseeded"],
        ["unseeded", "greedy", "seeded", "seeded", "target"],
        ["target", "seeded", "unseeded", "unseeded", "greedy", "seeded"],
    ]
    for layout in layouts:
        assert _seeded_tokens(device, 24, layout) == alone, layout
    assert _seeded_tokens(device, 24, ["target"], target_seed=99) != alone


def test_engine_seed_makes_unseeded_rows_reproducible() -> None:
    logits = torch.randn(8, 30, generator=make_generator(0, "cpu"))
    rows = [SamplingRow(SamplingParams()) for _ in range(8)]
    first = [t.token_id for t in Sampler(seed=42)(logits, rows)]
    assert [t.token_id for t in Sampler(seed=42)(logits, rows)] == first


def test_make_generator_accepts_any_int_seed() -> None:
    for seed in (-1, 0, 2**64 + 5, -(2**70)):
        assert torch.rand(1, generator=make_generator(seed, "cpu")).shape == (1,)
    same = torch.rand(4, generator=make_generator(2**64 + 5, "cpu"))
    assert torch.equal(same, torch.rand(4, generator=make_generator(5, "cpu")))


def test_bad_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        Sampler()(torch.zeros(3, 4), [SamplingRow(SamplingParams())] * 2)
    with pytest.raises(ValueError, match="seed 3 but no request_id"):
        Sampler()(torch.zeros(1, 4), [SamplingRow(SamplingParams(seed=3))])


row_params = st.builds(
    SamplingParams,
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 20),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)


@settings(max_examples=100, deadline=None)
@given(
    vocab_size=st.integers(2, 16),
    params=st.lists(row_params, min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_sampled_ids_survive_the_filters(
    vocab_size: int, params: list[SamplingParams], seed: int, data: st.DataObject
) -> None:
    raw = data.draw(
        st.lists(
            st.lists(st.floats(-20.0, 20.0), min_size=vocab_size, max_size=vocab_size),
            min_size=len(params),
            max_size=len(params),
        )
    )
    logits = torch.tensor(raw)
    rows = [SamplingRow(p) for p in params]
    tokens = Sampler(seed=seed)(logits, rows)
    temperature = torch.tensor([p.temperature for p in params]).unsqueeze(1)
    scaled = logits / temperature
    filtered = filter_logits(scaled, params)
    probs = torch.softmax(filtered, dim=-1)
    # Ranking only a short head (with its fallback) must keep exactly what the full ranking
    # keeps, up to which of several tied logits fill the last places.
    with mock.patch.object(gpu.sampler, "_CPU_RANKING_HEAD", data.draw(st.integers(1, 4))):
        from_head = filter_logits(scaled, params)
    for full_row, head_row in zip(filtered, from_head, strict=True):
        assert torch.equal(full_row.sort().values, head_row.sort().values)
    for i, (p, token) in enumerate(zip(params, tokens, strict=True)):
        assert probs[i, token.token_id] > 0
        kept = torch.isfinite(filtered[i])
        assert scaled[i][kept].max() == scaled[i].max()
        if p.top_k:
            assert kept.sum() <= p.top_k
        # The kept set is a top slice: nothing dropped beats anything kept.
        if not kept.all():
            assert scaled[i][~kept].max() <= scaled[i][kept].min()
        ratio = torch.exp(scaled[i][kept].double() - scaled[i].max().double())
        assert (ratio >= p.min_p - 1e-5).all()
        if p.top_k in (0,) and p.top_p == 1.0 and p.min_p == 0.0:
            assert torch.equal(filtered[i], scaled[i])
