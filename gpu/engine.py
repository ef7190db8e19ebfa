"""The inference engine: token ids in, token ids out, many requests at once.

    engine = Engine("smollm2-135m")                    # or a path, a GGUFFile, a Backend
    engine.add(Request("r1", prompt_token_ids=[...], max_tokens=64))
    while engine.has_work():
        for out in engine.step():                       # StepOutput per request that moved
            ...                                         # out.new_token_ids, out.finish_reason
    engine.pop_events()                                 # evictions / preemptions to narrate

One `step()` = schedule (decodes, prefill chunks, admissions within the token budget and the
KV pool) -> one forward call over the packed batch -> sample on the backend's device -> only
token ids (and requested logprobs) come back. Aborts and finishes free KV at once; a request
with a `session_id` leaves its full blocks pinned for the session's next turn.

Overlap (on by default): when every running sequence decodes and no waiting request can be
admitted, a step first launches the *next* decode step, fed by this step's token ids still on
the device, and only then reads this step's ids. The device never idles while the host reads
ids, checks stops, streams and packs: at batch 1 that idle time was 230-320 µs per token on the
H100's host (bench/NOTES.md, session 5). The next step is what the scheduler would pick (same
sequences, order, positions and blocks); a sequence that stops on this step's token has its
next-step row dropped unread (its KV write lands in blocks it frees), and a waiting request
gets its freed place one step later. Rows with penalties need every output id on the host, and
a waiting request with room to be admitted (fewer than `max_num_seqs` running) needs the
scheduler: those steps run without overlap. Greedy and seeded rows give the same tokens
either way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu.backends.base import Backend
from gpu.batch import BatchPacker, ForwardBatch
from gpu.events import EngineEvent
from gpu.kv_cache import KVCache, chain_key
from gpu.request import Request, RequestError, StepOutput
from gpu.sampler import PendingTokens, SamplingRow, make_generator
from gpu.scheduler import Schedule, Scheduler
from gpu.sequence import Sequence, SequenceStatus
from loader.gguf_file import GGUFFile, open_gguf
from loader.registry import resolve_model

# End-of-generation token ids a GGUF may declare; any of them stops a request (unless
# ignore_eos). Chat models often end turns with EOT (<|eot_id|>, <|im_end|>) rather than EOS.
_STOP_TOKEN_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)
DEFAULT_CPU_KV_BYTES = 1 << 30
# On a GPU the pool takes this share of the memory free after the weights, minus a reserve
# for activations, the prefill scratch and CUDA graphs; `kv_blocks` (--kv-blocks) overrides.
GPU_KV_FRACTION = 0.9
GPU_RESERVE_BYTES = 2 << 30


@dataclass(slots=True)
class _Launched:
    """A forward pass and its sampling, launched and not read yet."""

    items: list[tuple[Sequence, int]]  # (sequence, new tokens) in batch order
    sampled: list[Sequence]  # the sequences whose token this step chooses, in `tokens` order
    tokens: PendingTokens


def stop_token_ids_of(gguf: GGUFFile) -> frozenset[int]:
    """EOS/EOT/EOM ids declared in the file's metadata."""
    meta = gguf.metadata
    return frozenset(meta.get_int(key) for key in _STOP_TOKEN_KEYS if key in meta)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def make_backend(
    kind: str, gguf: GGUFFile, progress: Callable | None = None, dtype: str = "float32"
) -> Backend:
    """Build a backend by name: `torch` (reference, CPU), `cuda` (our kernels; needs a GPU) or
    `auto` (cuda when torch sees a GPU, else torch).

    `dtype` is the weights' compute type on the torch backend: float32 is the reference;
    bfloat16 halves the bytes read per token (decode is memory-bound) at a small accuracy cost;
    int8 (per-row weight-only, bfloat16 activations) halves them again.
    """
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        from gpu.backends.cuda_backend import CudaBackend

        return CudaBackend(gguf, progress=progress)
    if kind in ("auto", "torch"):
        from gpu.backends.torch_backend import TorchBackend

        return TorchBackend(gguf, progress=progress, dtype=DTYPES[dtype])
    raise RequestError(f"unknown backend {kind!r}; available: auto, torch, cuda")


def default_kv_blocks(backend: Backend, block_size: int) -> int:
    """KV pool size when none is given: 1 GiB on the CPU; on a GPU, what is free after the
    weights were loaded, less a reserve for activations, scratch and CUDA graphs."""
    per_block = backend.kv_bytes_per_block(block_size)
    if backend.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(backend.device)
        budget = int(free * GPU_KV_FRACTION) - GPU_RESERVE_BYTES
    else:
        budget = DEFAULT_CPU_KV_BYTES
    if budget < per_block:
        raise RequestError(
            f"no memory left for a KV cache on {backend.device}: {budget} bytes free after the "
            f"weights, one block needs {per_block}"
        )
    return budget // per_block


class Engine:
    """Continuous-batching engine over one model; see the module docstring for the loop.

    Not thread-safe: one thread drives add/step/abort (the worker's loop does).
    """

    def __init__(
        self,
        model: str | os.PathLike | GGUFFile,
        *,
        backend: str | Backend = "auto",
        kv_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_batch_tokens: int = 512,
        max_sessions: int = 1024,
        session_ttl_s: float = 1800.0,
        seed: int | None = None,
        progress: Callable | None = None,
        dtype: str = "float32",
        overlap: bool = True,
    ) -> None:
        gguf = model if isinstance(model, GGUFFile) else open_gguf(_model_path(model))
        self.backend = backend if isinstance(backend, Backend) else make_backend(
            backend, gguf, progress, dtype
        )
        self.config = self.backend.config
        self.eos_token_ids = stop_token_ids_of(gguf)
        if kv_blocks is None:
            kv_blocks = default_kv_blocks(self.backend, block_size)
        self.backend.allocate_kv(kv_blocks, block_size)
        self.kv = KVCache(
            kv_blocks, block_size, max_sessions=max_sessions, session_ttl_s=session_ttl_s
        )
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens
        )
        # Longest sequence the engine can hold: the model's context, or the whole pool.
        self.max_model_len = min(self.config.context_length, kv_blocks * block_size)
        self.sampler = self.backend.make_sampler(seed)
        self._packer = BatchPacker(self.backend.device)
        self._sequences: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._arrivals = itertools.count()
        self.overlap = overlap  # launch the next decode step before reading this one's ids
        self._in_flight: _Launched | None = None  # launched by the last step(), read by the next
        self.overlapped_steps = 0  # steps launched ahead of the previous step's read

    # ----- requests ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; raises `RequestError` if it can never run."""
        if request.request_id in self._sequences:
            raise RequestError(f"request {request.request_id!r} is already in the engine")
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise RequestError(f"request {request.request_id!r}: empty prompt")
        if len(prompt) >= self.max_model_len:
            raise RequestError(
                f"request {request.request_id!r}: prompt of {len(prompt)} tokens does not fit "
                f"the context of {self.max_model_len} tokens"
            )
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError(
                f"request {request.request_id!r}: token ids must be in [0, {vocab})"
            )
        if request.max_tokens < 1:
            raise RequestError(f"request {request.request_id!r}: max_tokens must be >= 1")
        request.sampling.validate()
        generator = None
        if request.sampling.seed is not None:
            generator = make_generator(request.sampling.seed, self.backend.device)
        seq = Sequence(
            request=request,
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            generator=generator,
            arrival=next(self._arrivals),
        )
        self._sequences[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV; its `abort` output comes with the next step."""
        seq = self._sequences.get(request_id)
        if seq is None or seq.status == SequenceStatus.FINISHED:
            return False
        self.scheduler.finish(seq, "abort")
        self._aborted.append(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted) or self._in_flight is not None

    # ----- sessions and stats -----------------------------------------------------------------

    def end_session(self, session_id: str) -> bool:
        """Free the blocks a session holds; False if the engine holds no such session."""
        return self.kv.end_session(session_id)

    def pop_events(self) -> list[EngineEvent]:
        """Evictions, expiries and preemptions since the last call, oldest first."""
        events, self.kv.events = self.kv.events, []
        return events

    def stats(self) -> dict[str, int]:
        return {
            "kv_blocks_total": self.kv.num_blocks,
            "kv_blocks_used": self.kv.num_used,
            "kv_blocks_cached": self.kv.num_cached,
            "block_size": self.kv.block_size,
            "sessions": len(self.kv.sessions),
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }

    # ----- the step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one forward pass over what the scheduler picks; outputs of requests that moved.

        With overlap, the pass whose outputs this returns may have been launched by the previous
        call, and this call may leave the next one launched (module docstring)."""
        outputs = [self._final_output(seq) for seq in self._aborted]
        for seq in self._aborted:
            self._sequences.pop(seq.request_id, None)
        self._aborted = []
        self.kv.expire_sessions()
        launched, self._in_flight = self._in_flight, None
        if launched is None:
            schedule = self.scheduler.schedule()
            if not schedule:
                if self.scheduler.waiting and not self.scheduler.running:
                    # Nothing runs and the head of the queue cannot be admitted even then: the
                    # pool cannot hold it. End it rather than wait forever.
                    seq = self.scheduler.waiting[0]
                    self.scheduler.finish(seq, "length")
                    outputs.append(self._final_output(seq))
                return outputs
            sampled = [seq for seq, n in schedule.items if seq.num_computed + n == seq.num_tokens]
            rows = [self._sampling_row(seq) for seq in sampled]
            launched = self._launch(schedule.items, sampled, rows, self._build_batch(schedule))
        if self.overlap:
            self._in_flight = self._launch_next(launched)
        try:
            outputs.extend(self._read(launched))
        except BaseException:
            # The step launched ahead took its ids from the one that failed to read: drop it
            # too. Neither was counted, so the next step recomputes from the last read token.
            self._in_flight = None
            raise
        return outputs

    def _launch(
        self, items: list[tuple[Sequence, int]], sampled: list[Sequence],
        rows: list[SamplingRow], batch: ForwardBatch,
    ) -> _Launched:  # fmt: skip
        """The forward pass and the sampling of its `sampled` sequences, nothing read back."""
        logits = self.backend.forward(batch)
        return _Launched(items, sampled, self.sampler.launch(logits, rows))

    def _read(self, launched: _Launched) -> list[StepOutput]:
        """Wait for a launched step's tokens; count its KV, append its tokens, check stops.
        Rows of sequences that finished meanwhile (a stop on the previous step, an abort) are
        dropped: their KV went to blocks they have freed."""
        tokens = launched.tokens.result()
        for seq, n in launched.items:
            if seq.status == SequenceStatus.RUNNING:
                seq.num_computed += n
                self._register_full_blocks(seq)
        outputs = []
        for seq, token in zip(launched.sampled, tokens, strict=True):
            if seq.status == SequenceStatus.RUNNING:
                outputs.append(self._append_token(seq, token.token_id, token.logprobs))
        return outputs

    def _launch_next(self, launched: _Launched) -> _Launched | None:
        """Launch the decode step that follows `launched` before its tokens are read, fed by its
        token ids on the device; None where that step would not be what the scheduler picks (a
        partial prefill chunk, a waiting request with room to admit it, no room for a block) or
        needs ids the host has not read (penalties). Its sequences are those of `launched` still
        running, less those that stop on length with the pending token."""
        running = self.scheduler.running
        if not launched.sampled:
            return None
        if self.scheduler.waiting and len(running) < self.scheduler.max_num_seqs:
            return None  # the scheduler would admit it this step: let it
        # With max_num_seqs running, the scheduler admits nobody: under a full load the steps
        # overlap too. A sequence that stops on the pending token frees its place a step later.
        if len(launched.sampled) != len(launched.items):
            return None  # a prefill chunk that samples nothing: its next chunk is no decode
        index = {id(seq): i for i, seq in enumerate(launched.sampled)}
        if any(id(seq) not in index for seq in running):
            return None  # a running sequence outside this step (token budget)
        size = self.kv.block_size
        rows: list[int] = []
        for seq in running:
            request = seq.request
            if _needs_output_ids(request.sampling):
                return None
            # After the pending token: num_tokens + 1 tokens, that token at index num_tokens.
            if (seq.num_output_tokens + 1 >= request.max_tokens
                    or seq.num_tokens + 1 >= self.max_model_len):  # fmt: skip
                continue  # it stops on length with the pending token
            need = seq.num_tokens // size + 1 - len(seq.block_table)
            if need > 0:
                blocks = self.kv.allocate(need)
                if blocks is None:
                    return None  # the scheduler would preempt: let it
                seq.block_table.extend(blocks)
            rows.append(index[id(seq)])
        if not rows or len(rows) > self.scheduler.max_batch_tokens:
            return None
        seqs = [launched.sampled[i] for i in rows]
        ids = launched.tokens.ids
        if rows != list(range(ids.shape[0])):
            ids = ids[torch.tensor(rows, device=ids.device)]
        batch = self._pack_decode(seqs)
        batch.token_ids = ids  # the pending tokens, still on the device
        sampling = [self._sampling_row(seq, pending=1) for seq in seqs]
        self.overlapped_steps += 1
        return self._launch([(seq, 1) for seq in seqs], seqs, sampling, batch)

    def _pack_decode(self, seqs: list[Sequence]) -> ForwardBatch:
        """One decode token per sequence, the pending one (index num_tokens); its id is a
        placeholder here, for the caller to replace with the device tensor."""
        size = self.kv.block_size
        positions = [seq.num_tokens for seq in seqs]
        slots = [seq.block_table[p // size] * size + p % size
                 for seq, p in zip(seqs, positions, strict=True)]  # fmt: skip
        n = len(seqs)
        return self._packer.pack(
            [0] * n, positions, slots, [1] * n, [p + 1 for p in positions],
            [seq.block_table for seq in seqs], list(range(n)),
        )  # fmt: skip

    def _build_batch(self, schedule: Schedule) -> ForwardBatch:
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        size = self.kv.block_size
        for seq, n in schedule.items:
            start = seq.num_computed
            token_ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // size] * size + p % size for p in range(start, start + n))
            context_lens.append(start + n)
            query_lens.append(n)
            if start + n == seq.num_tokens:
                logits_indices.append(len(token_ids) - 1)
        tables = [seq.block_table for seq, _ in schedule.items]
        return self._packer.pack(
            token_ids, positions, slots, query_lens, context_lens, tables, logits_indices
        )

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Make every newly completed block of the sequence findable by its prefix key."""
        size = self.kv.block_size
        full = seq.num_computed // size
        while len(seq.block_keys) < full:
            i = len(seq.block_keys)
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            key = chain_key(seq.block_keys[-1] if seq.block_keys else 0, tokens)
            seq.block_keys.append(key)
            self.kv.register(seq.block_table[i], key, tokens)

    def _sampling_row(self, seq: Sequence, pending: int = 0) -> SamplingRow:
        """Parameters and the ids that penalties read. Without penalties only the count of output
        ids is read (a seeded row's draw key, `pending` tokens not yet read included): a range
        stands in, no list is copied per step. Rows with penalties have no pending tokens."""
        params = seq.request.sampling
        if not _needs_output_ids(params):
            return SamplingRow(params, (), range(seq.num_output_tokens + pending), seq.generator)
        if pending:
            raise ValueError("a row with penalties cannot sample ahead of a read")
        return SamplingRow(
            params=params,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids,
            generator=seq.generator,
        )

    def _append_token(self, seq: Sequence, token_id: int, logprobs) -> StepOutput:
        seq.token_ids.append(token_id)
        request = seq.request
        reason = None
        if token_id in request.stop_token_ids or (
            not request.ignore_eos and token_id in self.eos_token_ids
        ):
            reason = "stop"
        elif seq.num_output_tokens >= request.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        output = StepOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            logprobs=[logprobs] if logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if reason is not None:
            self.scheduler.finish(seq, reason)
            output.finish_reason = reason
            self._sequences.pop(seq.request_id, None)
        return output

    def _final_output(self, seq: Sequence) -> StepOutput:
        self._sequences.pop(seq.request_id, None)
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=[],
            num_cached_tokens=seq.num_cached_tokens,
            finish_reason=seq.finish_reason,
        )


def _needs_output_ids(params) -> bool:
    """Penalties read every id so far on the host: such a row cannot sample ahead of a read."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)  # fmt: skip


def _model_path(model: str | os.PathLike) -> Path:
    return resolve_model(str(model))
