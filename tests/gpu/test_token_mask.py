"""Grammar token masks in the samplers: the torch Sampler against numpy (CPU), and our CUDA
sampling kernel against the torch Sampler (marked gpu: `pytest -m gpu tests/gpu/test_token_mask.py`
on the device).

A masked row samples only allowed tokens: greedy takes the best allowed one, logprobs are the
log-softmax over the allowed tokens (the constrained distribution), filters and draws see only
them, and the mask comes before penalties (a penalised token that is masked stays out). Rows the
mask does not name are sampled exactly as without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpu.backends.base import SamplingBatchError, TokenMask
from gpu.request import SamplingParams
from gpu.sampler import Sampler, SamplingRow, apply_penalties, filter_logits, unpack_token_mask
from structured import bitmask_words

VOCAB = 49152


def random_mask(rows: list[int], vocab: int, density: float, seed: int) -> TokenMask:
    """A mask allowing about `density` of the tokens of each named row (at least one)."""
    rng = np.random.default_rng(seed)
    allowed = rng.random((len(rows), vocab)) < density
    allowed[:, rng.integers(vocab)] = True
    padded = np.zeros((len(rows), bitmask_words(vocab) * 32), dtype=bool)
    padded[:, :vocab] = allowed
    bits = np.packbits(padded, axis=1, bitorder="little").view(np.int32)
    return TokenMask(torch.from_numpy(bits.copy()), tuple(rows))


def allowed_of(mask: TokenMask, vocab: int) -> np.ndarray:
    """numpy's reading of the bits: the independent reference of unpack_token_mask."""
    bits = mask.bits.numpy().view(np.uint8)
    return np.unpackbits(bits, axis=1, bitorder="little")[:, :vocab].astype(bool)


def masked_logits(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    allowed = torch.from_numpy(allowed_of(mask, logits.shape[1])).to(logits.device)
    out = logits.clone()
    for k, row in enumerate(mask.rows):
        out[row] = logits[row].masked_fill(~allowed[k], float("-inf"))
    return out


ROWS = [
    SamplingRow(SamplingParams(temperature=0.0), request_id="g"),
    SamplingRow(SamplingParams(temperature=0.0, logprobs=5), request_id="gl"),
    SamplingRow(SamplingParams(seed=3, top_k=40), request_id="s"),
    SamplingRow(SamplingParams(seed=4, top_p=0.9, logprobs=2), request_id="sp"),
    SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.5),
                prompt_token_ids=[5, 6], output_token_ids=[7], request_id="rep"),
    SamplingRow(SamplingParams(seed=5, min_p=0.1, presence_penalty=1.0),
                output_token_ids=[1, 2, 2], request_id="pen"),
    SamplingRow(SamplingParams(seed=6), request_id="free"),
]
MASKED = [0, 1, 2, 3, 4, 5]  # row 6 is free


def test_unpack_matches_numpy():
    mask = random_mask([0, 1, 2], 1000, 0.3, seed=1)
    assert (unpack_token_mask(mask.bits, 1000).numpy() == allowed_of(mask, 1000)).all()


def test_torch_sampler_samples_only_allowed_tokens_and_leaves_free_rows_alone():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB, generator=generator) * 4
    mask = random_mask(MASKED, VOCAB, 0.02, seed=2)
    allowed = allowed_of(mask, VOCAB)
    got = Sampler(seed=0)(logits, ROWS, mask)
    plain = Sampler(seed=0)(logits, ROWS)
    for k, row in enumerate(MASKED):
        assert allowed[k, got[row].token_id], row
    # greedy: the best allowed token; logprobs over the allowed tokens only
    reference = np.where(allowed[0], logits[0].numpy(), -np.inf)
    assert got[0].token_id == int(np.argmax(reference))
    lp = logits[1].double().numpy()
    lp = np.where(allowed[1], lp, -np.inf)
    lp = lp - np.log(np.exp(lp[np.isfinite(lp)] - lp.max()).sum()) - lp.max()
    assert got[1].logprobs.logprob == pytest.approx(lp[got[1].token_id], abs=1e-4)
    assert [t for t, _ in got[1].logprobs.top] == np.argsort(-lp, kind="stable")[:5].tolist()
    assert got[6] == plain[6]  # the free row: same draw with or without the others' mask


def test_mask_comes_before_penalties():
    logits = torch.full((1, 16), -1.0)
    logits[0, 3] = 5.0  # the best token, penalised (seen) and masked
    logits[0, 9] = -2.0  # the only allowed one
    rows = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=0.5),
                        prompt_token_ids=[3, 9])]  # fmt: skip
    bits = torch.zeros(1, 1, dtype=torch.int32)
    bits[0, 0] = 1 << 9
    assert Sampler()(logits, rows, TokenMask(bits, (0,)))[0].token_id == 9


def test_bad_masks_are_refused():
    logits = torch.zeros(2, 100)
    rows = [SamplingRow(SamplingParams(temperature=0.0))] * 2
    with pytest.raises(SamplingBatchError, match="want int32"):
        Sampler()(logits, rows, TokenMask(torch.zeros(1, 3, dtype=torch.int32), (0,)))
    with pytest.raises(SamplingBatchError, match="not ascending"):
        Sampler()(logits, rows, TokenMask(torch.zeros(2, 4, dtype=torch.int32), (1, 0)))
    with pytest.raises(SamplingBatchError, match="not ascending"):
        Sampler()(logits, rows, TokenMask(torch.zeros(1, 4, dtype=torch.int32), (2,)))


def test_cuda_records_flag_the_masked_rows_and_their_bitmask_row():
    """The host side of the kernel's mask (CPU): F_MASK and the bitmask row in each masked row's
    record, and the scratch rows the kernel copies a masked row into."""
    from gpu.cuda.sampling import F_MASK, ROW_WORDS, W_FLAGS, W_MASK_ROW, CudaSampler

    records, scratch = CudaSampler(seed=0)._pack(ROWS, VOCAB, {0: 0, 2: 1, 6: 2})
    words = records[: len(ROWS) * ROW_WORDS].reshape(len(ROWS), ROW_WORDS)
    assert [bool(w[W_FLAGS] & F_MASK) for w in words] == [i in (0, 2, 6) for i in range(7)]
    assert words[[0, 2, 6], W_MASK_ROW].tolist() == [0, 1, 2] and scratch
    plain = [SamplingRow(SamplingParams(seed=1))] * 2
    assert CudaSampler(seed=0)._pack(plain, VOCAB, {1: 0})[1]
    assert not CudaSampler(seed=0)._pack(plain, VOCAB, {})[1]


# --- the CUDA kernel against the torch sampler (device) ---------------------------------------


@pytest.fixture(scope="module")
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def on_gpu(test):
    return pytest.mark.gpu(pytest.mark.usefixtures("cuda_device")(test))


def pinned(mask: TokenMask) -> TokenMask:
    return TokenMask(mask.bits.pin_memory(), mask.rows)


@on_gpu
@pytest.mark.parametrize("density", [0.0005, 0.05, 0.9])
def test_cuda_greedy_ids_and_logprobs_equal_torch_with_a_mask(density):
    from gpu.cuda.sampling import CudaSampler

    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(len(ROWS), VOCAB, generator=generator) * 4).cuda()
    mask = pinned(random_mask(MASKED, VOCAB, density, seed=3))
    want = Sampler(seed=0)(logits, ROWS, mask)
    got = CudaSampler(seed=0)(logits, ROWS, mask)
    allowed = allowed_of(mask, VOCAB)
    for k, row in enumerate(MASKED):
        assert allowed[k, got[row].token_id], (row, density)
    for row in (0, 1, 4):  # greedy rows
        assert got[row].token_id == want[row].token_id, row
    # Logprobs are the constrained distribution's: log-softmax over the allowed tokens, at the
    # token each sampler chose (the sampled row 3 draws from the CUDA kernel's own stream).
    constrained = torch.log_softmax(masked_logits(logits, mask), dim=-1)
    for row in (1, 3):
        chosen = got[row].token_id
        assert got[row].logprobs.logprob == pytest.approx(constrained[row, chosen].item(), abs=1e-5)
        assert [t for t, _ in got[row].logprobs.top] == [t for t, _ in want[row].logprobs.top]
    free = CudaSampler(seed=0)(logits, ROWS)  # the free row draws as it does with no mask
    assert got[6].token_id == free[6].token_id


@on_gpu
def test_cuda_kept_sets_with_a_mask_equal_filter_logits_of_masked_logits():
    from gpu.cuda.sampling import CudaSampler

    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(len(ROWS), VOCAB, generator=generator) * 3).cuda()
    mask = pinned(random_mask(MASKED, VOCAB, 0.1, seed=4))
    kept = CudaSampler(seed=0).kept_mask(logits, ROWS, mask)
    masked = masked_logits(logits, mask)
    temperature = torch.tensor([r.params.temperature or 1.0 for r in ROWS]).cuda().unsqueeze(1)
    reference = torch.isfinite(filter_logits(apply_penalties(masked, ROWS) / temperature,
                                             [r.params for r in ROWS]))  # fmt: skip
    for row in (2, 3, 5, 6):  # sampled rows (greedy rows leave the debug mask unwritten)
        assert torch.equal(kept[row].bool(), reference[row]), row


@on_gpu
def test_cuda_seeded_draws_stay_allowed_over_many_calls():
    from gpu.cuda.sampling import CudaSampler

    sampler = CudaSampler(seed=0)
    mask = pinned(random_mask(MASKED, VOCAB, 0.001, seed=5))
    allowed = allowed_of(mask, VOCAB)
    for call in range(50):
        logits = (torch.randn(len(ROWS), VOCAB) * 5).cuda()
        rows = [SamplingRow(r.params, r.prompt_token_ids, [*r.output_token_ids, *range(call)],
                            r.request_id) for r in ROWS]  # fmt: skip
        got = sampler(logits, rows, mask)
        for k, row in enumerate(MASKED):
            assert allowed[k, got[row].token_id], (call, row)
