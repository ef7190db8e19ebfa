"""Batched sampling on the logits' own device: one token id per row, plus logprobs on request.

Order, as HF transformers and vLLM apply it:
  0. a grammar's token mask (rows that have one): disallowed tokens become -inf, which every
     later step keeps at -inf (so logprobs describe the constrained distribution);
  1. penalties on the raw logits: repetition (HF rule, prompt + output tokens), then presence
     and frequency (OpenAI rule, output tokens only);
  2. logprobs (when asked) = log_softmax of these penalised logits, before temperature and
     filters: they describe the model's (penalised) distribution whatever the temperature, and
     a greedy token is always the top-1 logprob;
  3. greedy rows (temperature 0) take the argmax of the penalised logits, drawing no randomness;
  4. the other rows: temperature, then top-k, top-p (on the top-k-renormalised distribution),
     min-p, then one draw.

The draw is an exponential race, `argmax(probs / E)` with `E = -log(U)`, U uniform per token:
exact sampling from `probs` that needs no cumulative sum. A seeded row draws its U from its
request's own generator, which the sampler makes from the seed on the request's first draw and
keeps until `release(request_id)`, so its tokens depend only on its seed and logits, never on
the rest of the batch; unseeded rows share the sampler's engine generator. Everything stays on
the device except the chosen ids and the requested logprobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gpu.backends.base import (
    PendingTokens,
    SampledToken,
    SamplingBatchError,
    SamplingRow,
    TokenMask,
    check_sampling_batch,
)
from gpu.request import SamplingParams, TokenLogprobs

__all__ = ["PendingTokens", "SampledToken", "Sampler", "SamplingRow", "TokenMask",
           "apply_token_mask", "make_generator"]

# A nucleus whose mass reaches top_p within float32 rounding of a softmax + cumsum counts as
# reaching it: without this slack, ten tokens of 0.1 with top_p 0.6 keep seven, not six.
_TOP_P_SLACK = 1e-6

# On CPU a full descending sort of a 49k-token row costs ~5 ms, a topk of its best 1024 ~0.3 ms;
# top-p alone ranks that head and sorts the whole row only when the nucleus reaches past it.
# Elsewhere a full sort is cheap, and avoids the host reading the data to decide.
_CPU_RANKING_HEAD = 1024


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` seeded with `seed` (any Python int; folded into 64 bits)."""
    generator = torch.Generator(device=_resolve(torch.device(device)))
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class Sampler:
    """Samples a batch of rows on the logits' device (the `TokenSampler` of the torch backend);
    unseeded rows share one engine generator, seeded ones each have their request's own.

    `seed` seeds the engine generator (None: nondeterministic), one per device, made lazily.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._engine_generators: dict[torch.device, torch.Generator] = {}
        self._request_generators: dict[str, torch.Generator] = {}

    def generator(self, request_id: str, seed: int, device: torch.device | str) -> torch.Generator:
        """The request's generator: made from `seed` on `device` at its first draw, then the
        same object (its state is the request's random stream) until `release`."""
        generator = self._request_generators.get(request_id)
        if generator is None:
            generator = self._request_generators[request_id] = make_generator(seed, device)
        return generator

    def release(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> list[SampledToken]:
        """Pick one token per row of `logits` [B, V] (float32); row i is sampled with rows[i]."""
        return self.launch(logits, rows, mask).result()

    def launch(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> PendingTokens:
        """Choose the tokens (and their logprobs) on the device without reading them back."""
        _check_batch(logits, rows, mask)
        logits = apply_penalties(apply_token_mask(logits.float(), mask), rows)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            token_ids[index] = logits[index].argmax(dim=-1)
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            token_ids[index] = self._sample(logits[index], [rows[i] for i in sampled])
        wanted = _logprob_tensors(logits, token_ids, rows)
        params = [row.params for row in rows]

        def read() -> list[SampledToken]:
            chosen = token_ids.tolist()
            logprobs = _read_logprobs(wanted, chosen, params)
            return [
                SampledToken(token_id, row_logprobs)
                for token_id, row_logprobs in zip(chosen, logprobs, strict=True)
            ]

        return PendingTokens(token_ids, read)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, filters, then the exponential race; returns [S] token ids on device."""
        temperature = _row_tensor([row.params.temperature for row in rows], logits)
        filtered = filter_logits(logits / temperature, [row.params for row in rows])
        probs = torch.softmax(filtered, dim=-1)
        uniform = torch.empty_like(probs)
        unseeded = []
        for i, row in enumerate(rows):
            if row.params.seed is None:
                unseeded.append(i)
            else:
                generator = self.generator(row.request_id, row.params.seed, probs.device)
                uniform[i] = torch.rand(probs.shape[1], generator=generator, device=probs.device)
        if unseeded:
            index = torch.tensor(unseeded, device=probs.device)
            uniform[index] = torch.rand(
                len(unseeded),
                probs.shape[1],
                generator=self._engine_generator(probs.device),
                device=probs.device,
            )
        # U = 0 would make E infinite and a kept token's score 0, tying with filtered tokens.
        exponential = -torch.log(uniform.clamp_(min=torch.finfo(uniform.dtype).tiny))
        return (probs / exponential).argmax(dim=-1)

    def _engine_generator(self, device: torch.device) -> torch.Generator:
        generator = self._engine_generators.get(device)
        if generator is None:
            if self._seed is None:
                generator = torch.Generator(device=device)
                generator.seed()
            else:
                generator = make_generator(self._seed, device)
            self._engine_generators[device] = generator
        return generator


def apply_token_mask(logits: torch.Tensor, mask: TokenMask | None) -> torch.Tensor:
    """The logits with each masked row's disallowed tokens at -inf (a new tensor; the same one
    when there is no mask). One upload of the bits for the batch."""
    if mask is None or not mask.rows:
        return logits
    allowed = unpack_token_mask(mask.bits.to(logits.device, non_blocking=True), logits.shape[1])
    if len(mask.rows) == logits.shape[0]:
        return logits.masked_fill(~allowed, float("-inf"))
    index = torch.tensor(mask.rows, device=logits.device)
    masked = logits.clone()
    masked[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return masked


def unpack_token_mask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[C, words] int32 bitmask -> [C, vocab_size] bool, through a table of each byte's 8 bits
    (little-endian words: byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7)."""
    table = _BYTE_BITS.get(bits.device)
    if table is None:
        values = torch.arange(256, device=bits.device).unsqueeze(1)
        table = _BYTE_BITS[bits.device] = ((values >> torch.arange(8, device=bits.device)) & 1
                                           ).bool()  # fmt: skip
    unpacked = table[bits.contiguous().view(torch.uint8).long()]
    return unpacked.reshape(bits.shape[0], -1)[:, :vocab_size]


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (HF), then presence/frequency (OpenAI) penalties; a new tensor if any apply.

    Rows whose penalties are neutral get penalty 1 / 0 and no token ids, so they stay bit-exact.
    """
    wants_repetition = any(row.params.repetition_penalty != 1.0 for row in rows)
    wants_output = any(
        row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0 for row in rows
    )
    if not (wants_repetition or wants_output):
        return logits
    vocab_size = logits.shape[1]
    if wants_repetition:
        seen_ids = [
            [*row.prompt_token_ids, *row.output_token_ids]
            if row.params.repetition_penalty != 1.0
            else []
            for row in rows
        ]
        seen = _token_counts(seen_ids, vocab_size, logits) > 0
        penalty = _row_tensor([row.params.repetition_penalty for row in rows], logits)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if wants_output:
        output_ids = [
            row.output_token_ids
            if row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0
            else []
            for row in rows
        ]
        counts = _token_counts(output_ids, vocab_size, logits)
        presence = _row_tensor([row.params.presence_penalty for row in rows], logits)
        frequency = _row_tensor([row.params.frequency_penalty for row in rows], logits)
        logits = logits - (presence * (counts > 0) + frequency * counts)
    return logits


def filter_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then min-p on temperature-scaled logits; dropped tokens become -inf.

    Row i uses params[i]; a row whose filters are off comes back bit-identical, whatever the
    other rows ask for. The best token always stays.
    """
    vocab_size = logits.shape[1]
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    top_p = [p.top_p for p in params]
    use_ranking = any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p)
    use_min_p = any(p.min_p > 0.0 for p in params)
    if not (use_ranking or use_min_p):
        return logits
    keep = torch.ones_like(logits, dtype=torch.bool)
    if use_ranking:
        keep &= _ranked_keep(logits, top_k, top_p, _ranking_head(logits, top_k, top_p))
    if use_min_p:
        # p_i >= min_p * p_max  <=>  exp(l_i - l_max) >= min_p, whatever the normaliser: so
        # min-p after top-k and top-p (which never drop the best token) is this mask ANDed in.
        ratio_to_best = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        keep &= ratio_to_best >= _row_tensor([p.min_p for p in params], logits)
    return logits.masked_fill(~keep, float("-inf"))


def _ranking_head(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> int:
    """How many best tokens per row to rank: enough for every top-k, a guess for top-p alone."""
    vocab_size = logits.shape[1]
    widest_k = max((k for k in top_k if k < vocab_size), default=1)
    top_p_alone = any(p < 1.0 and k == vocab_size for k, p in zip(top_k, top_p, strict=True))
    if not top_p_alone:
        return widest_k
    if logits.device.type != "cpu":
        return vocab_size
    return min(vocab_size, max(widest_k, _CPU_RANKING_HEAD))


def _ranked_keep(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], head: int
) -> torch.Tensor:
    """The top-k and top-p mask, from the `head` best tokens of each row ranked by one topk.

    Falls back to ranking whole rows when a top-p row without top-k has its nucleus reach past
    the head; both rankings give the same mask (same probabilities, same prefix sums).
    """
    vocab_size = logits.shape[1]
    values, ids = logits.topk(head, dim=-1)  # sorted best first; head == vocab: a full sort
    ranks = torch.arange(head, device=logits.device)
    k = torch.tensor(top_k, device=logits.device).unsqueeze(1)
    keep_ranked = ranks < k
    if any(p < 1.0 for p in top_p):
        # Probabilities renormalised over each row's top-k (over the whole row without one);
        # the top-k normaliser reads the same widest_k values whatever the head.
        widest_k = max((kk for kk in top_k if kk < vocab_size), default=1)
        head_k = values[:, :widest_k].masked_fill(~keep_ranked[:, :widest_k], float("-inf"))
        normaliser = torch.where(
            k.squeeze(1) < vocab_size,
            torch.logsumexp(head_k, dim=-1),
            torch.logsumexp(logits, dim=-1),
        ).unsqueeze(1)
        probs = torch.exp(values - normaliser).masked_fill(~keep_ranked, 0.0)
        cumulative = probs.cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=1)
        p = _row_tensor(top_p, logits)
        if head < vocab_size:
            short = (k == vocab_size) & (p < 1.0) & (cumulative[:, -1:] < p - _TOP_P_SLACK)
            if bool(short.any()):
                return _ranked_keep(logits, top_k, top_p, vocab_size)
        keep_ranked &= (mass_before < p - _TOP_P_SLACK) | (p >= 1.0)
    keep_ranked[:, 0] = True
    # Past the head: dropped for rows that rank (their kept set fits the head), kept otherwise.
    unranked = (k == vocab_size) & (_row_tensor(top_p, logits) >= 1.0)
    keep = unranked.expand(-1, vocab_size).clone()
    return keep.scatter_(1, ids, keep_ranked)


@dataclass(slots=True)
class _LogprobTensors:
    """Device tensors of the rows that asked for logprobs, computed before the logits change."""

    rows: list[int]  # indices of those rows in the batch
    chosen: torch.Tensor  # [W] the chosen token's logprob
    top_values: torch.Tensor | None = None  # [W, max_top]
    top_ids: torch.Tensor | None = None
    counts: list[int] = field(default_factory=list)  # top-n each row asked for


def _logprob_tensors(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> _LogprobTensors | None:
    """The chosen token's logprob and the top-n, from the penalised logits (module docstring)."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return None
    index = torch.tensor(wanted, device=logits.device)
    logprobs = torch.log_softmax(logits[index], dim=-1)
    chosen = logprobs.gather(1, token_ids[index].unsqueeze(1)).squeeze(1)
    counts = [rows[i].params.logprobs or 0 for i in wanted]
    result = _LogprobTensors(wanted, chosen, counts=counts)
    max_top = min(max(counts), logits.shape[1])
    if max_top > 0:
        result.top_values, result.top_ids = logprobs.topk(max_top, dim=-1)
    return result


def _read_logprobs(
    wanted: _LogprobTensors | None, chosen_ids: Sequence[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """TokenLogprobs per row (None where a row asked for none), read from the device tensors."""
    result: list[TokenLogprobs | None] = [None] * len(params)
    if wanted is None:
        return result
    chosen = wanted.chosen.tolist()
    top_values: list[list[float]] = [[] for _ in wanted.rows]
    top_ids: list[list[int]] = [[] for _ in wanted.rows]
    if wanted.top_values is not None:
        top_values, top_ids = wanted.top_values.tolist(), wanted.top_ids.tolist()
    for n, (i, count) in enumerate(zip(wanted.rows, wanted.counts, strict=True)):
        result[i] = TokenLogprobs(
            token_id=chosen_ids[i],
            logprob=chosen[n],
            top=list(zip(top_ids[n][:count], top_values[n][:count], strict=True)),
        )
    return result


def _token_counts(
    token_ids: Sequence[Sequence[int]], vocab_size: int, like: torch.Tensor
) -> torch.Tensor:
    """[B, V] occurrence counts of each row's ids: scatter_add over ids padded with V."""
    width = max((len(ids) for ids in token_ids), default=0)
    padded = [[*ids, *([vocab_size] * (width - len(ids)))] for ids in token_ids]
    index = torch.tensor(padded, dtype=torch.long, device=like.device).reshape(len(padded), width)
    counts = torch.zeros(len(padded), vocab_size + 1, dtype=like.dtype, device=like.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=like.dtype))
    return counts[:, :vocab_size]


def _row_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameters as a [B, 1] column on `like`'s device and dtype."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _check_batch(
    logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None
) -> None:
    check_sampling_batch(logits, rows, mask)
    for i, row in enumerate(rows):
        if row.params.seed is not None and row.request_id is None:
            raise SamplingBatchError(
                f"row {i} has seed {row.params.seed} but no request_id to keep its random state"
            )


def _resolve(device: torch.device) -> torch.device:
    """`cuda` as `cuda:N` of the current device: a CUDA generator reports no index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
