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

Overlap (on by default): a step first launches the *next* step, fed by this step's token ids
still on the device, and only then reads this step's ids, so the device does not idle while the
host reads ids, checks stops, streams and packs (bench/NOTES.md has the measured gap). The
scheduler plans that step (`Scheduler.schedule_ahead`, counting each sequence's tokens in
flight and its pending token): the pending tokens' decodes and, on a GPU (`prefill_ahead`),
the next prefill chunks and the admission of waiting requests too, since under load something
is nearly always waiting or half-prefilled; the engine splices the device ids into the pending
tokens' places. On a CPU backend, whose launch computes the step, a step launched ahead decodes
only, and a step that samples a request's first token is read before anything is launched
ahead: that token would otherwise wait a step more. A sequence that stops on this step's token
has its next-step row dropped unread (its KV write lands in blocks it frees), and its place
goes to a waiting request one step later. Greedy and seeded rows give the same tokens either
way.

Grammars (a request's `grammar`): a request whose grammar still compiles waits outside the
scheduler until its future resolves. Each step, the constrained rows get a token bitmask from
their matchers (gpu/grammar_masks.py), applied by the sampler before penalties; the sampled
token advances the matcher, and a grammar that is complete ends the request with `stop`. A
step launched ahead runs its forward pass at once but samples only after the read, when the
matchers have taken the previous tokens: the host fills the masks while the device runs that
forward pass, so overlap stays on and costs the constrained rows only the mask fill.

Failure isolation (gpu/faults.py): a request whose logits row is not finite (NaN or inf) ends
alone with finish_reason `error` (its row is zeroed before sampling, so the others' draws go
on); an error after which the device cannot be used (a sticky CUDA error) is raised from
`step()` as `DeviceLostError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu.backends.base import Backend
from gpu.batch import BatchPacker, ForwardBatch
from gpu.events import EngineEvent
from gpu.faults import FaultInjector, is_device_lost
from gpu.grammar_masks import GrammarMasks
from gpu.kv_cache import KVCache, chain_key
from gpu.request import DeviceLostError, Request, RequestError, StepOutput
from gpu.sampler import PendingTokens, SamplingRow
from gpu.scheduler import DEFAULT_PRIORITY_AGING_S, Schedule, Scheduler
from gpu.sequence import Sequence, SequenceStatus
from jobs.limits import DEFAULT_SESSION_TTL_S
from jobs.response_format import GrammarError
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
# With nothing else to run, how long a step waits for a compiling grammar before returning.
GRAMMAR_WAIT_S = 0.01


@dataclass(slots=True)
class _Launched:
    """A forward pass and its sampling, launched and not read yet. A step launched ahead with
    constrained rows has `tokens` None until the engine samples it (its masks need the previous
    step's tokens): `logits` and `rows` wait for that."""

    schedule: Schedule  # its sequences, their new tokens, and those it samples (`tokens` order)
    rows: list[SamplingRow]
    logits: torch.Tensor | None = None
    tokens: PendingTokens | None = None
    finite: torch.Tensor | None = None  # per sampled row: its logits were all finite


@dataclass(slots=True, frozen=True)
class EngineStats:
    """The engine's counters at one moment: KV pool, sessions, sequences."""

    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    block_size: int
    sessions: int
    running: int
    waiting: int


def stop_token_ids_of(gguf: GGUFFile) -> frozenset[int]:
    """EOS/EOT/EOM ids declared in the file's metadata."""
    meta = gguf.metadata
    return frozenset(meta.get_int(key) for key in _STOP_TOKEN_KEYS if key in meta)


def check_request(request: Request, duplicate: bool, max_model_len: int, vocab_size: int
                  ) -> None:
    """What `Engine.add` refuses, as `RequestError` (`duplicate`: its id is already in the
    engine); worker/engine_process.py asks the same before a request leaves the worker."""
    rid = request.request_id
    if duplicate:
        raise RequestError(f"request {rid!r} is already in the engine")
    prompt = request.prompt_token_ids
    if not prompt:
        raise RequestError(f"request {rid!r}: empty prompt")
    if len(prompt) >= max_model_len:
        raise RequestError(f"request {rid!r}: prompt of {len(prompt)} tokens does not fit "
                           f"the context of {max_model_len} tokens")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise RequestError(f"request {rid!r}: token ids must be in [0, {vocab_size})")
    if request.max_tokens < 1:
        raise RequestError(f"request {rid!r}: max_tokens must be >= 1")
    request.sampling.validate()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def uses_cuda(kind: str) -> bool:
    """Whether backend `kind` ("auto", "torch" or "cuda") means our CUDA kernels here."""
    return kind == "cuda" or (kind == "auto" and torch.cuda.is_available())


def make_backend(
    kind: str, gguf: GGUFFile, progress: Callable | None = None, dtype: str = "float32",
    matmul: str | None = None, tensor_parallel: int = 1,
) -> Backend:  # fmt: skip
    """Build a backend by name: `torch` (reference, CPU), `cuda` (our kernels; needs a GPU) or
    `auto` (cuda when torch sees a GPU, else torch).

    `dtype` is the weights' compute type on the torch backend: float32 is the reference;
    bfloat16 halves the bytes read per token (decode is memory-bound) at a small accuracy cost;
    int8 (per-row weight-only, bfloat16 activations) halves them again.
    `matmul` (cuda; None: its default): "matvec", "tensor-cores" or "auto", the decode step's
    matrix kernels (gpu/backends/cuda_backend.py MATMUL_MODES); the torch backend has one.
    `tensor_parallel` > 1 splits the torch backend over that many gloo processes
    (gpu/backends/torch_tp.py); the cuda backend has no tensor parallelism yet and refuses it.
    """
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    if tensor_parallel < 1:
        raise RequestError(f"tensor-parallel size must be at least 1, got {tensor_parallel}")
    if tensor_parallel > 1:
        if uses_cuda(kind):
            raise RequestError(
                f"tensor parallelism ({tensor_parallel}) exists only on the torch backend (gloo "
                "processes on the CPU); the cuda backend has no NCCL sharding yet: pass "
                "--backend torch, or --tensor-parallel 1"
            )
        if kind not in ("auto", "torch"):
            raise RequestError(f"unknown backend {kind!r}; available: auto, torch, cuda")
        from gpu.backends.torch_tp import TensorParallelTorchBackend

        return TensorParallelTorchBackend(gguf.path, tensor_parallel, dtype=DTYPES[dtype])
    if uses_cuda(kind):
        from gpu.backends.cuda_backend import CudaBackend

        options = {} if matmul is None else {"matmul": matmul}
        return CudaBackend(gguf, progress=progress, **options)
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
        max_num_seqs: int = 256,
        max_batch_tokens: int = 512,
        max_sessions: int = 1024,
        session_ttl_s: float = DEFAULT_SESSION_TTL_S,
        seed: int | None = None,
        progress: Callable | None = None,
        dtype: str = "float32",
        overlap: bool = True,
        priority_aging_s: float = DEFAULT_PRIORITY_AGING_S,
        check_finite: bool = True,
        faults: FaultInjector | None = None,
        matmul: str | None = None,
        tensor_parallel: int = 1,
        prefill_ahead: bool | None = None,
    ) -> None:
        gguf = model if isinstance(model, GGUFFile) else open_gguf(_model_path(model))
        self.backend = backend if isinstance(backend, Backend) else make_backend(
            backend, gguf, progress, dtype, matmul, tensor_parallel
        )
        self.config = self.backend.config
        self.eos_token_ids = stop_token_ids_of(gguf)
        if kv_blocks is None:
            kv_blocks = default_kv_blocks(self.backend, block_size)
        self.backend.allocate_kv(kv_blocks, block_size)
        self.kv = KVCache(
            kv_blocks, block_size, max_sessions=max_sessions, session_ttl_s=session_ttl_s
        )
        # Longest sequence the engine can hold: the model's context, or the whole pool.
        self.max_model_len = min(self.config.context_length, kv_blocks * block_size)
        self.scheduler = Scheduler(
            self.kv, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
            max_model_len=self.max_model_len, priority_aging_s=priority_aging_s,
        )
        self.sampler = self.backend.make_sampler(seed)
        self._packer = BatchPacker(self.backend.device, self.backend.uploader())
        self._sequences: dict[str, Sequence] = {}
        self._aborted: list[Sequence] = []
        self._compiling: list[Sequence] = []  # waiting for their grammar's future
        self.masks = GrammarMasks(self.config.vocab_size, pin=self.backend.device.type == "cuda")
        self.overlap = overlap  # launch the next decode step before reading this one's ids
        # A CPU backend computes at launch: a step launched ahead of a read delays its tokens
        # by a step, so one that samples a request's first token is read first (TTFT).
        self._synchronous = self.backend.device.type == "cpu"
        # Whether a step launched ahead also admits waiting requests and runs prefill chunks.
        # On a GPU it does: under load (a queue worker at 64 jobs) something waits or is in
        # the middle of its prompt most steps, and a step that cannot be launched ahead leaves
        # the device idle while the host reads, streams and packs. On the CPU, where a launch
        # computes, a prefill launched ahead only delays the decodes' tokens.
        self.prefill_ahead = not self._synchronous if prefill_ahead is None else prefill_ahead
        self._in_flight: _Launched | None = None  # launched by the last step(), read by the next
        self.overlapped_steps = 0  # steps launched ahead of the previous step's read
        self.launched_steps = 0  # forward passes launched
        self.prefill_steps = 0  # of which with a prompt chunk (not a CUDA graph's decode)
        self.check_finite = check_finite  # end a request whose logits row is NaN/inf alone
        self.faults = faults if faults is not None else FaultInjector.from_env()
        self._lost: DeviceLostError | None = None  # sticky: every later step raises it

    # ----- requests ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; raises `RequestError` if it can never run."""
        check_request(request, request.request_id in self._sequences, self.max_model_len,
                      self.config.vocab_size)
        prompt = list(request.prompt_token_ids)
        seq = Sequence(request=request, token_ids=prompt, num_prompt_tokens=len(prompt))
        self._sequences[request.request_id] = seq
        if isinstance(request.grammar, Future):
            self._compiling.append(seq)
        else:
            seq.matcher = request.grammar
            self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Stop a request now and free its KV; its output, with `reason` as its finish reason
        (`abort`, or `deadline` for a request past its deadline), comes with the next step."""
        seq = self._sequences.get(request_id)
        if seq is None or seq.status == SequenceStatus.FINISHED:
            return False
        if seq in self._compiling:  # never reached the scheduler
            self._compiling.remove(seq)
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        else:
            self.scheduler.finish(seq, reason)
        self._aborted.append(seq)
        return True

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or bool(self._aborted) or bool(self._compiling)
                or self._in_flight is not None)  # fmt: skip

    # ----- sessions and stats -----------------------------------------------------------------

    def end_session(self, session_id: str) -> bool:
        """Free the blocks a session holds; False if the engine holds no such session."""
        return self.kv.end_session(session_id)

    @property
    def session_ttl_s(self) -> float:
        """How long an idle session keeps its KV (the worker's routing keys live as long)."""
        return self.kv.session_ttl_s

    def session_ids(self) -> list[str]:
        """The sessions holding KV here, least recently used first."""
        return list(self.kv.sessions)

    def pop_events(self) -> list[EngineEvent]:
        """Evictions, expiries and preemptions since the last call, oldest first."""
        return self.kv.pop_events()

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_total=self.kv.num_blocks,
            kv_blocks_used=self.kv.num_used,
            kv_blocks_cached=self.kv.num_cached,
            block_size=self.kv.block_size,
            sessions=len(self.kv.sessions),
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
        )

    def waiting_fits(self) -> bool:
        """Every waiting request fits in the running set and the free KV pool (True when none
        waits): they wait only for the token budget of the next steps (prefill chunks), not
        for memory. Counted only while something waits: the worker asks every iteration."""
        scheduler = self.scheduler
        if not scheduler.waiting:
            return True
        if len(scheduler.running) + len(scheduler.waiting) > scheduler.max_num_seqs:
            return False
        return self.prompt_blocks_wanted() <= self.kv.num_free

    def prompt_blocks_wanted(self) -> int:
        """KV blocks the prompts still need: the waiting requests' whole prompts (cached
        prefixes not deducted: an upper bound) and what running ones in the middle of their
        prefill have yet to allocate."""
        size = self.kv.block_size
        waiting = sum(-(-seq.num_tokens // size) for seq in self.scheduler.waiting)
        return waiting + sum(max(0, -(-seq.num_tokens // size) - len(seq.block_table))
                             for seq in self.scheduler.running)

    def prepare_decode(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Build now what decode steps up to `max_num_seqs` sequences and the longest sequence
        would otherwise build on first use, in the middle of serving (the CUDA backend's
        graphs, `Backend.prepare_decode`); returns how many. Call before the first step."""
        return self.backend.prepare_decode(self.scheduler.max_num_seqs, self.max_model_len,
                                           progress)  # fmt: skip

    # ----- the step ---------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one forward pass over what the scheduler picks; outputs of requests that moved.

        With overlap, the pass whose outputs this returns may have been launched by the previous
        call, and this call may leave the next one launched (module docstring). Raises
        `DeviceLostError`, then on every later call, once the device cannot be used."""
        if self._lost is not None:
            raise self._lost
        try:
            self.faults.on_step()
            return self._step()
        except Exception as exc:
            if not is_device_lost(exc):
                raise
            lost = exc if isinstance(exc, DeviceLostError) else DeviceLostError(
                f"device {self.backend.device} is unusable: {type(exc).__name__}: {exc}")
            self._lost = lost
            raise lost from (None if lost is exc else exc)

    def _step(self) -> list[StepOutput]:
        outputs = [self._final_output(seq) for seq in self._aborted]
        self._aborted = []
        outputs += self._admit_compiled()
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
            launched = self._launch(schedule, self._build_batch(schedule))
        if self.overlap and not (self._synchronous and _samples_first_token(launched)):
            self._in_flight = self._launch_ahead(launched)
        try:
            outputs.extend(self._read(launched))
            if self._in_flight is not None and self._in_flight.tokens is None:
                self._sample(self._in_flight)  # its masks needed the tokens just read
        except BaseException:
            # The step launched ahead took its ids from the one that failed to read: drop it
            # too. Neither was counted, so the next step recomputes from the last read token.
            if self._in_flight is not None:
                _settle(self._in_flight.schedule)
            self._in_flight = None
            raise
        return outputs

    def _launch(self, schedule: Schedule, batch: ForwardBatch, ahead: bool = False) -> _Launched:
        """The forward pass and the sampling of the scheduled sequences, nothing read back. A
        step launched `ahead` with constrained rows is sampled later (`_sample`)."""
        rows = [self._sampling_row(seq) for seq in schedule.sampled]
        self.launched_steps += 1
        self.prefill_steps += schedule.num_tokens > len(schedule.items)
        logits = self.backend.forward(batch)
        if self.faults.nan_requests:
            self.faults.poison(logits, [seq.request_id for seq in schedule.sampled])
        launched = _Launched(schedule, rows, logits)
        if not (ahead and any(seq.matcher is not None for seq in schedule.sampled)):
            self._sample(launched)
        for seq, n in schedule.items:
            seq.num_in_flight += n
        for seq in schedule.sampled:
            seq.num_pending += 1
        return launched

    def _sample(self, launched: _Launched) -> None:
        """Sample a launched forward pass, constrained rows under their grammar's mask."""
        logits, rows = launched.logits, launched.rows
        if self.check_finite:
            # One reduction on the device, read with the ids. Where a row is drawn at random,
            # a bad row is zeroed so that the sampler (a multinomial refuses NaN) serves the
            # others; greedy rows only take an argmax.
            finite = torch.isfinite(logits).all(dim=-1)
            if not all(row.params.greedy for row in rows):
                # The CUDA backend's logits are inference tensors (its forward runs in
                # inference mode): an in-place write to them is allowed only inside it.
                with torch.inference_mode():
                    logits.masked_fill_(~finite.unsqueeze(-1), 0.0)
            if finite.device.type != "cpu":
                # Into pinned memory before the sampler's own copy back, on the same stream:
                # once its ids are read, so is this, and no later step is waited for (a plain
                # .tolist() at the read would wait for the step launched ahead).
                host = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
                finite = host.copy_(finite, non_blocking=True)
            launched.finite = finite
        mask = self.masks.build(launched.schedule.sampled)
        launched.tokens = self.sampler.launch(logits, rows, mask)
        launched.logits = None

    def _admit_compiled(self) -> list[StepOutput]:
        """Hand the requests whose grammar has compiled to the scheduler; a grammar that failed
        ends its request with `error`. With nothing else to do, wait a little for one."""
        if not self._compiling:
            return []
        if not (self.scheduler.has_work() or self._in_flight is not None):
            wait([seq.request.grammar for seq in self._compiling], GRAMMAR_WAIT_S,
                 FIRST_COMPLETED)  # fmt: skip
        outputs, compiling = [], []
        for seq in self._compiling:
            future = seq.request.grammar
            if not future.done():
                compiling.append(seq)
                continue
            try:
                seq.matcher = future.result()
            except Exception as exc:  # noqa: BLE001 - a failed compile ends this request only
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, "error"
                seq.error = str(exc)
                outputs.append(self._final_output(seq))
                continue
            self.scheduler.add(seq)
        self._compiling = compiling
        return outputs

    def _read(self, launched: _Launched) -> list[StepOutput]:
        """Wait for a launched step's tokens; count its KV, append its tokens, check stops.
        Rows of sequences that finished meanwhile (a stop on the previous step, an abort) are
        dropped: their KV went to blocks they have freed."""
        schedule = launched.schedule
        try:
            tokens = launched.tokens.result()
            finite = launched.finite.tolist() if launched.finite is not None else None
        finally:
            _settle(schedule)
        for seq, n in schedule.items:
            if seq.status == SequenceStatus.RUNNING:
                seq.num_computed += n
                self._register_full_blocks(seq)
        outputs = []
        for i, (seq, token) in enumerate(zip(schedule.sampled, tokens, strict=True)):
            if seq.status != SequenceStatus.RUNNING:
                continue
            if finite is not None and not finite[i]:
                outputs.append(self._fail(seq, "its logits are not finite (NaN or inf)"))
            else:
                outputs.append(self._append_token(seq, token.token_id, token.logprobs))
        return outputs

    def _fail(self, seq: Sequence, why: str) -> StepOutput:
        """End one request with finish_reason `error`; the others go on."""
        self.scheduler.finish(seq, "error")
        seq.error = f"request {seq.request_id!r}: {why}"
        output = self._final_output(seq)
        output.engine_fault = True
        return output

    def _launch_ahead(self, launched: _Launched) -> _Launched | None:
        """Launch the step the scheduler plans ahead of `launched`'s read, its pending tokens
        spliced in from the device; None where the scheduler plans none."""
        schedule = self.scheduler.schedule_ahead(prefill=self.prefill_ahead)
        if schedule is None:
            return None
        row_of = {id(seq): i for i, seq in enumerate(launched.schedule.sampled)}
        # The places in the packed batch of the pending tokens (a decode's one token, after
        # any prefill chunks packed before it) and the rows of `launched`'s ids they take.
        places, rows, place = [], [], 0
        for seq, n in schedule.items:
            place += n
            if seq.num_pending:
                places.append(place - 1)
                rows.append(row_of[id(seq)])
        ids = launched.tokens.ids
        decodes_only = place == len(places)
        identity = rows == list(range(ids.shape[0]))
        # The index rides in the batch's own upload: a tensor built from a list here would be
        # a pageable copy, which waits for the step in flight.
        splice = [] if decodes_only and identity else places + rows
        batch = self._build_batch(schedule, splice)
        if decodes_only:  # the ids are the batch's tokens
            batch.token_ids = ids if identity else ids[batch.splice[len(rows):]]
        elif rows:
            batch.token_ids[batch.splice[: len(rows)]] = ids[batch.splice[len(rows):]]
        self.overlapped_steps += 1
        return self._launch(schedule, batch, ahead=True)

    def _build_batch(self, schedule: Schedule, splice: list[int] = ()) -> ForwardBatch:
        """The packed batch of a schedule; a pending token's id is a placeholder (0) for the
        caller to replace with the device's (`splice`: the index it needs, ForwardBatch)."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        query_lens: list[int] = []
        logits_indices: list[int] = []
        size = self.kv.block_size
        for seq, n in schedule.items:
            start = seq.num_computed + seq.num_in_flight
            known = seq.token_ids[start : start + n]
            token_ids.extend(known)
            if len(known) < n:
                token_ids.extend([0] * (n - len(known)))
            positions.extend(range(start, start + n))
            table = seq.block_table
            slots.extend(table[p // size] * size + p % size for p in range(start, start + n))
            context_lens.append(start + n)
            query_lens.append(n)
            if start + n == seq.num_tokens + seq.num_pending:
                logits_indices.append(len(token_ids) - 1)
        tables = [seq.block_table for seq, _ in schedule.items]
        return self._packer.pack(
            token_ids, positions, slots, query_lens, context_lens, tables, logits_indices, splice
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

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        """Parameters and the ids that penalties read. Without penalties only the count of output
        ids is read (a seeded row's draw key, its pending tokens included): a range stands in,
        no list is copied per step. Rows with penalties are never sampled ahead of a read."""
        params = seq.request.sampling
        if not params.needs_output_ids:
            return SamplingRow(params, (), range(seq.num_output_tokens + seq.num_pending),
                               seq.request_id)  # fmt: skip
        if seq.num_pending:
            raise ValueError("a row with penalties cannot sample ahead of a read")
        return SamplingRow(
            params=params,
            prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            output_token_ids=seq.output_token_ids,
            request_id=seq.request_id,
        )

    def _append_token(self, seq: Sequence, token_id: int, logprobs) -> StepOutput:
        seq.token_ids.append(token_id)
        request = seq.request
        reason = self._grammar_end(seq, token_id)
        if reason is None and (token_id in request.stop_token_ids or (
            not request.ignore_eos and token_id in self.eos_token_ids
        )):
            reason = "stop"
        elif reason is None and seq.reaches_length(self.max_model_len):
            reason = "length"
        output = StepOutput(
            request_id=seq.request_id,
            new_token_ids=[token_id],
            logprobs=[logprobs] if logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
        )
        if reason is not None:
            self.scheduler.finish(seq, reason)
            output.finish_reason, output.error = reason, seq.error
            self._forget(seq)
        return output

    @staticmethod
    def _grammar_end(seq: Sequence, token_id: int) -> str | None:
        """Advance a constrained sequence's matcher: `stop` when its grammar is complete (no
        token may follow), `error` when the matcher fails; None otherwise."""
        if seq.matcher is None:
            return None
        try:
            seq.matcher.consume(token_id)
        except GrammarError as exc:
            seq.error = str(exc)
            return "error"
        return "stop" if seq.matcher.finished else None

    def _forget(self, seq: Sequence) -> None:
        """A finished sequence leaves the engine, and its random state the sampler."""
        self._sequences.pop(seq.request_id, None)
        self.sampler.release(seq.request_id)

    def _final_output(self, seq: Sequence) -> StepOutput:
        self._forget(seq)
        return StepOutput(
            request_id=seq.request_id,
            new_token_ids=[],
            num_cached_tokens=seq.num_cached_tokens,
            finish_reason=seq.finish_reason,
            error=seq.error,
        )


def _samples_first_token(launched: _Launched) -> bool:
    return any(not seq.num_output_tokens for seq in launched.schedule.sampled)


def _settle(schedule: Schedule) -> None:
    """A launched step is read (or dropped): its tokens are no longer in flight or pending."""
    for seq, n in schedule.items:
        seq.num_in_flight -= n
    for seq in schedule.sampled:
        seq.num_pending -= 1


def _model_path(model: str | os.PathLike) -> Path:
    return resolve_model(str(model))
