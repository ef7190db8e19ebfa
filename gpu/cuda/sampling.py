"""Sampling with our kernel (gpu/kernels/sampling.cu): `CudaSampler` is the torch `Sampler`'s
drop-in on CUDA logits, same semantics (gpu/sampler.py's docstring), one launch and one sync.

Per call the host packs every row's parameters and token ids into one pinned int32 buffer (one
copy to the device), one CTA per row does everything for its row, and the tokens and logprobs
come back in one small pinned buffer. Randomness is our own counter-based hash: a seeded row
draws with key (seed, len(output_token_ids)), so its tokens depend only on its seed and logits;
unseeded rows use the sampler's seed, a per-call counter and their rank among the unseeded rows.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

import numpy as np
import torch

from gpu.backends.base import TokenMask, check_sampling_batch
from gpu.cuda.driver import StreamEvent
from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, pointer, row_stride
from gpu.request import SamplingParams, TokenLogprobs
from gpu.sampler import PendingTokens, SampledToken, SamplingRow

THREADS = 1024  # THREADS in sampling.cu: one CTA per row
MAX_VOCAB = 1 << 22  # the kernel's index digits (2 x 11 bits)
MAX_TOP_LOGPROBS = 20  # MAX_TOP
ROW_WORDS = 16  # int32 words per row record (W_* in sampling.cu)
OUT_WORDS = 44  # token, chosen logprob, top count, 20 (id, logprob) pairs
_ARG_KINDS = ("ptr", "i32", "i32", "ptr", "ptr", "ptr", "ptr", "ptr", "ptr", "i32")

# Row record words and flags (sampling.cu's W_* and F_*).
# tests/test_seams.py checks every one against the kernel's #defines.
(W_FLAGS, W_TEMPERATURE, W_TOP_K, W_TOP_P_LO, W_TOP_P_HI, W_MIN_P, W_REPETITION, W_PRESENCE,
 W_FREQUENCY, W_LOGPROBS, W_KEY_LO, W_KEY_HI, W_IDS_BEGIN, W_IDS_OUTPUT,
 W_IDS_END, W_MASK_ROW) = range(16)  # fmt: skip
F_GREEDY, F_TOP_P, F_TOP_P_BEST, F_MIN_P = 1, 2, 4, 8
F_REPETITION, F_OUTPUT_PENALTIES, F_LOGPROBS, F_MASK = 16, 32, 64, 128
_FLOAT_WORDS = [W_TEMPERATURE, W_MIN_P, W_REPETITION, W_PRESENCE, W_FREQUENCY]

TOP_P_SLACK = np.float32(1e-6)  # gpu/sampler.py's _TOP_P_SLACK, subtracted in float32 as torch does
MASS_ONE = 1 << 56  # the kernel's fixed point for probability mass
_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=256)
def sampling_launch_config(num_rows: int, vocab_size: int) -> LaunchConfig:
    """One CTA of THREADS threads per row; the kernel loops over the row's vocabulary."""
    if num_rows < 1:
        raise CudaError(f"sampling: {num_rows} rows")
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise CudaError(f"sampling: vocabulary of {vocab_size} outside 1..{MAX_VOCAB}")
    return LaunchConfig((num_rows, 1, 1), (THREADS, 1, 1))


def mix64(z: int) -> int:
    """splitmix64's finaliser (the kernel's mix64): a bijection of 64-bit ints."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def draw_key(seed: int, counter: int, stream: int) -> int:
    """A row's 64-bit draw key from a seed (any int, folded to 64 bits as make_generator does),
    a draw counter and a stream id (0 for seeded rows, 1 + rank for unseeded ones)."""
    key = mix64(seed & _MASK64)
    key = mix64((key + (counter & _MASK64)) & _MASK64)
    return mix64((key + stream) & _MASK64)


@functools.lru_cache(maxsize=1024)
def top_p_target(top_p: float) -> int | None:
    """top_p - slack in the kernel's fixed point, as the reference rounds it (float32); None
    when that bound is <= 0 and only the best token stays."""
    bound = np.float32(top_p) - TOP_P_SLACK
    if bound <= 0:
        return None
    return int(float(bound) * MASS_ONE)


class CudaSampler:
    """The torch `Sampler`'s semantics on our kernel (a `TokenSampler`); it keeps no state per
    request: a seeded row's draws key our counter-based hash with its seed and output length.

    `seed` seeds the unseeded rows' draws (None: random); each call advances their counter.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = secrets.randbits(64) if seed is None else seed & _MASK64
        self._calls = 0
        self._site = None
        # Two buffer sets per device, used in turn: the engine launches call t+1 before it reads
        # call t, so call t's pinned records and outputs must survive one more launch.
        self._buffers: dict[tuple[torch.device, int], _Buffers] = {}

    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> list[SampledToken]:
        """Pick one token per row of `logits` [B, V] (float32, CUDA); row i is sampled with
        rows[i]."""
        return self.launch(logits, rows, mask).result()

    def release(self, request_id: str) -> None:
        """Nothing to forget: a request's draws depend only on its seed and output length."""

    def launch(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> PendingTokens:
        """Launch the kernel and the copy back; the tokens are read by `result()`. Read a call's
        result before the call after next: that one reuses its buffers (it raises otherwise).
        `mask` (host bits, pinned) goes up in one copy; its rows are masked in the kernel."""
        return self._run(logits, rows, None, mask)

    def kept_mask(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], mask: TokenMask | None = None
    ) -> torch.Tensor:
        """Debug: [B, V] uint8, 1 where a sampled row's filters keep the token, 0 where they drop
        it; greedy rows stay 2 (unwritten). Draws as a call does (the counter advances)."""
        kept = torch.full(logits.shape, 2, dtype=torch.uint8, device=logits.device)
        self._run(logits, rows, kept, mask).result()
        return kept

    def _run(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow], kept: torch.Tensor | None,
        mask: TokenMask | None,
    ) -> PendingTokens:
        check_sampling_batch(logits, rows, mask)
        num_rows, vocab_size = logits.shape
        device = logits.device
        if num_rows == 0:
            return PendingTokens(torch.empty(0, dtype=torch.int64, device=device), list)
        config = sampling_launch_config(num_rows, vocab_size)
        mask_rows = {row: k for k, row in enumerate(mask.rows)} if mask is not None else {}
        records, needs_scratch = self._pack(rows, vocab_size, mask_rows)
        device_mask = None
        if mask_rows:  # one copy for the batch (pinned host memory: asynchronous)
            device_mask = mask.bits.to(device, non_blocking=True)
        self._calls += 1
        key = (device, self._calls & 1)
        buffers = self._buffers.get(key)
        if buffers is not None:
            # The call before last: its records went up, its outputs came back.
            buffers.copied.synchronize()
        if buffers is None or not buffers.fits(records.size, num_rows):
            buffers = self._buffers[key] = _Buffers(device, records.size, num_rows)
        buffers.generation += 1
        generation = buffers.generation
        buffers.host_records_np[: records.size] = records
        buffers.device_records[: records.size].copy_(
            buffers.host_records[: records.size], non_blocking=True
        )
        work = counts = None
        if needs_scratch:
            work = torch.empty_like(logits, memory_format=torch.contiguous_format)
            counts = torch.empty(logits.shape, dtype=torch.int32, device=device)
        if self._site is None:
            self._site = launch_site("sampling.cu", "sample_rows", _ARG_KINDS)
        self._site.launch(
            config,
            pointer(logits, "sampling logits", torch.float32),
            row_stride(logits, "sampling logits"),
            vocab_size,
            buffers.device_records.data_ptr(),
            0 if work is None else work.data_ptr(),
            0 if counts is None else counts.data_ptr(),
            buffers.device_out.data_ptr(),
            0 if kept is None else pointer(kept, "sampling kept mask", torch.uint8, align=1),
            0 if device_mask is None else device_mask.data_ptr(),
            0 if device_mask is None else device_mask.shape[1],
        )
        # The next step's inputs, dense: a one-row column keeps its stride of OUT_WORDS under
        # a plain .to(), and the decode stager refuses it.
        ids = buffers.device_out[:num_rows, 0].to(torch.int64,
                                                  memory_format=torch.contiguous_format)
        buffers.host_out[:num_rows].copy_(buffers.device_out[:num_rows], non_blocking=True)
        buffers.copied.record()
        params = [row.params for row in rows]

        def read() -> list[SampledToken]:
            if buffers.generation != generation:
                raise CudaError(
                    "sampling: a result read after the call after next reused its buffers"
                )
            buffers.copied.synchronize()
            return _unpack(buffers.host_out_np[:num_rows], params, vocab_size)

        return PendingTokens(ids, read)

    def _pack(
        self, rows: Sequence[SamplingRow], vocab_size: int, mask_rows: dict[int, int]
    ) -> tuple[np.ndarray, bool]:
        """Row records then every row's penalty token ids, as one int32 array (words built as
        Python ints and floats per row, converted by numpy once); whether the kernel needs its
        scratch rows (penalties or a token mask)."""
        words: list[list[int]] = []
        floats: list[tuple[float, ...]] = []
        ids: list[Sequence[int]] = []
        offset = 0
        unseeded = 0
        for index, row in enumerate(rows):
            p = row.params
            flags = F_GREEDY if p.greedy else 0
            mask_row = mask_rows.get(index)
            if mask_row is not None:
                flags |= F_MASK
            top_k = target = key = 0
            if not p.greedy:
                top_k = p.top_k if 0 < p.top_k < vocab_size else 0
                if p.top_p < 1.0 and np.float32(p.top_p) < 1.0:  # as torch's float32 row sees it
                    bound = top_p_target(p.top_p)
                    flags |= F_TOP_P_BEST if bound is None else F_TOP_P
                    target = bound or 0
                if p.min_p > 0.0:
                    flags |= F_MIN_P
                if p.seed is not None:
                    key = draw_key(p.seed, len(row.output_token_ids), 0)
                else:
                    unseeded += 1
                    key = draw_key(self._seed, self._calls, unseeded)
            if p.logprobs is not None:
                flags |= F_LOGPROBS
            begin = output = offset
            if p.repetition_penalty != 1.0:  # over prompt + output ids
                flags |= F_REPETITION
                ids.append(row.prompt_token_ids)
                output += len(row.prompt_token_ids)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:  # over output ids
                flags |= F_OUTPUT_PENALTIES
            offset = output
            if flags & (F_REPETITION | F_OUTPUT_PENALTIES):
                ids.append(row.output_token_ids)
                offset += len(row.output_token_ids)
            words.append([flags, 0, top_k, target & 0xFFFF_FFFF, target >> 32, 0, 0, 0, 0,
                          p.logprobs or 0, key & 0xFFFF_FFFF, key >> 32, begin, output, offset,
                          mask_row or 0])  # fmt: skip
            floats.append((p.temperature, p.min_p, p.repetition_penalty, p.presence_penalty,
                           p.frequency_penalty))  # fmt: skip
        header = np.array(words, dtype=np.uint32)
        header[:, _FLOAT_WORDS] = np.array(floats, dtype=np.float32).view(np.uint32)
        records = header.view(np.int32).reshape(-1)
        if not ids:
            return records, bool(mask_rows)
        token_ids = [np.asarray(seq, dtype=np.int32).reshape(-1) for seq in ids]
        return np.concatenate([records, *token_ids]), True


class _Buffers:
    """Pinned host and device buffers for the records and the outputs, reused across calls."""

    def __init__(self, device: torch.device, record_words: int, num_rows: int) -> None:
        words, rows = max(record_words, 4096), max(num_rows, 64)
        self.host_records = torch.empty(words, dtype=torch.int32, pin_memory=True)
        self.host_records_np = self.host_records.numpy()
        self.device_records = torch.empty(words, dtype=torch.int32, device=device)
        self.host_out = torch.empty(rows, OUT_WORDS, dtype=torch.int32, pin_memory=True)
        self.host_out_np = self.host_out.numpy()
        self.device_out = torch.empty(rows, OUT_WORDS, dtype=torch.int32, device=device)
        self.copied = StreamEvent()  # recorded after the outputs' copy to the host
        self.generation = 0  # calls that used these buffers

    def fits(self, record_words: int, num_rows: int) -> bool:
        return self.host_records.numel() >= record_words and self.host_out.shape[0] >= num_rows


def _unpack(
    out: np.ndarray, params: Sequence[SamplingParams], vocab_size: int
) -> list[SampledToken]:
    floats = out.view(np.float32)
    tokens = out[:, 0].tolist()
    result = []
    for i, (token_id, p) in enumerate(zip(tokens, params, strict=True)):
        logprobs = None
        if p.logprobs is not None:
            count = min(p.logprobs, vocab_size)
            top_ids = out[i, 3 : 3 + 2 * count : 2].tolist()
            top_values = floats[i, 4 : 4 + 2 * count : 2].tolist()
            logprobs = TokenLogprobs(
                token_id=token_id,
                logprob=float(floats[i, 1]),
                top=list(zip(top_ids, top_values, strict=True)),
            )
        result.append(SampledToken(token_id, logprobs))
    return result
