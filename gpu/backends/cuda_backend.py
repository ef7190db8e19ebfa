"""The CUDA backend: quantised weights on the GPU, our NVRTC kernels, CUDA graphs for decode.

Decode steps (every sequence has one new token) run our kernels only: embedding lookup, then per
layer RMSNorm -> fused QKV matvec (+ qwen2 bias) -> RoPE + paged KV write -> paged decode
attention -> O matvec with the residual add in its epilogue -> RMSNorm -> fused gate·up matvec
with SiLU·up in its epilogue -> down matvec with the residual add; then the final norm and the
LM head matvec.
(Folding the norms into the matvecs was tried and measured slower on the 8B shape: bench/NOTES.md.)
They are captured as one CUDA graph per batch-size bucket (1, 2, 4, ... padded) and attention
split count, and replayed; padding rows write no KV (slot -1) and their logits are dropped.
The matrix products run on one of two kernels, chosen by `matmul` (MATMUL_MODES):
"matvec" (float32 x, the weights read once per 8 sequences), "tensor-cores" (tcmm.cu: the
weights read once per 64 sequences, x rounded to fp16, mma.sync) at every batch size, or
"auto": the matvec below TC_MIN_BATCH sequences and the tensor cores from it. The first two
are batch-invariant (one kernel at every batch size: a sequence's logits are bit-identical
whatever else is in the batch); "auto" is not (a sequence's logits depend on which side of the
crossover its batch falls).

Prefill chunks and mixed batches take the prefill path: up to TC_PREFILL_MAX_TOKENS tokens
(TC_PREFILL_MAX_TOKENS_SMALL on small models), a decode's tensor-core layers (`_tc_layers`)
with our prefill attention; longer, each layer's weights are dequantised into an fp16 scratch
for torch.matmul (cuBLAS), where a big GEMM wins. Attention is our causal flash-attention
kernel over the paged KV (prefill_attention.cu: GQA, cached prefix, tensor cores); norms,
RoPE + KV write, SiLU, the final norm and the LM head run our kernels too. The KV pool is
fp16; the residual stream, norms, matvec sums and attention are float32; logits are float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpu.backends.base import Backend, model_source
from gpu.backends.torch_backend import KVNotAllocatedError
from gpu.batch import ForwardBatch
from gpu.cuda.activation import SiluMul
from gpu.cuda.attention import PARTITION_TOKENS, DecodeAttention
from gpu.cuda.decode_inputs import DecodeInputStager
from gpu.cuda.driver import ensure_context, multiprocessor_count, programmatic_launches
from gpu.cuda.embedding import DequantRows
from gpu.cuda.errors import CudaError
from gpu.cuda.norm import RMSNorm
from gpu.cuda.prefill_attention import PrefillAttention, padded_head_dim
from gpu.cuda.qweights import ProgressCallback, load_quant_weights
from gpu.cuda.rope_kv import RopeKVWrite
from gpu.cuda.sampling import CudaSampler
from gpu.cuda.tcmm import TcWorkspace, ToHalf
from gpu.rope import Rotary
from loader.gguf_file import GGUFFile

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MATMUL_MODES = ("matvec", "tensor-cores", "auto")
# "auto" by default: on the H200 (2026-12-07, bench/results/tcmm-20261207-0543-h200.json) a
# tcmm launch at 64 sequences took 4-11x less than the matvec's eight launches on the 8B
# shapes, while at one sequence it took 2.3-2.8x more (latency-bound: bench/NOTES.md). Until
# tcmm is as fast at one sequence, the default trades batch invariance for both speeds; the
# batch-invariant modes stay a flag away.
DEFAULT_MATMUL = "auto"
# "auto": the smallest batch that takes the tensor cores. At 8 tcmm beats the matvec on every
# 8B Q4_0 shape (H100, 2026-12-07: gate.up 50.4 vs 163.1 us, down 29.1 vs 143.5); the 8B step
# at 8 sequences went from 526 tok/s (matvec, 2026-11-25) to 1,603. Models with a hidden size
# below TC_SMALL_HIDDEN have matrices too small for a tcmm launch to pay at 8 or 16: SmolLM2-135M
# (576) Q4_1 decode, matvec against tcmm (8 warps a CTA), H100, 2026-12-07 15:08 UTC, one call
# (bench/results/gpu_decode-20261207-15085*-h100.json): 16 sequences 7,036 vs 5,697 tok/s,
# 32: 7,938 vs 9,895, 64: 8,551 vs 11,981, 128: 20,105 vs 20,115. They switch at
# TC_MIN_BATCH_SMALL.
TC_MIN_BATCH = 8
TC_SMALL_HIDDEN = 2048
TC_MIN_BATCH_SMALL = 32
# Prefill and mixed batches of up to this many tokens run their matrix products on the tensor
# cores too (the workspace is sized for it); longer ones dequantise each matrix for cuBLAS.
# 64: tcmm at 256 tokens cost ~1 ms a layer on 8B Q4_0 (H200), more than the whole 512-token
# prefill's 0.85 ms a layer through the scratch; at 64 it is ~0.35 ms.
TC_PREFILL_MAX_TOKENS = 64
# Below TC_SMALL_HIDDEN, every batch up to the engine's token budget (512): a small model's
# prefill step is host-bound, and the dequantise + cuBLAS path launches about twice as many
# kernels a layer. SmolLM2-135M Q4_1, H100, 2026-12-07 15:09-15:11 UTC, limit 64 against 512 in
# one warm machine: pp256 10,094 vs 18,472 tok/s, pp512 20,330 vs 36,214 (36,000 in the
# other runs of that call); the engine alone under bench/worker_loop.py's load (real CUDA
# engine, 64 / 128 clients) 4,704 vs 5,594 and 6,912 vs 8,621 tok/s.
TC_PREFILL_MAX_TOKENS_SMALL = 512
# A/B override of TC_PREFILL_MAX_TOKENS for benchmarks (bench/decode.py records it), up to the
# engine's token budget: the tensor-core workspace is sized for it.
TC_PREFILL_ENV = "ORCD_TC_PREFILL_MAX_TOKENS"
KV_DTYPE = torch.float16


def tc_prefill_max_tokens(hidden_size: int) -> int:
    """The longest batch (in tokens) whose matrix products the prefill path runs on tcmm, for a
    model's hidden size."""
    value = os.environ.get(TC_PREFILL_ENV, "")
    if not value:
        small = hidden_size < TC_SMALL_HIDDEN
        return TC_PREFILL_MAX_TOKENS_SMALL if small else TC_PREFILL_MAX_TOKENS
    if not value.isdigit():
        raise CudaError(f"{TC_PREFILL_ENV}={value!r}: want a token count")
    return int(value)


def auto_tc_min_batch(hidden_size: int) -> int:
    """The decode batch from which `auto` takes the tensor cores, for a model's hidden size."""
    return TC_MIN_BATCH if hidden_size >= TC_SMALL_HIDDEN else TC_MIN_BATCH_SMALL


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


def _split_level(max_context: int) -> int:
    """log2 of the attention splits a decode graph is captured for: the power of two at or
    above the context's PARTITION_TOKENS partitions."""
    return (-(-max_context // PARTITION_TOKENS) - 1).bit_length()


class CudaBackend(Backend):
    """One model on one CUDA device, weights quantised as in the file."""

    name = "cuda"

    def __init__(
        self,
        gguf_file_or_path: GGUFFile | str | os.PathLike,
        device: torch.device | str = "cuda",
        progress: ProgressCallback | None = None,
        use_graphs: bool = True,
        programmatic: bool = True,
        matmul: str = DEFAULT_MATMUL,
    ) -> None:
        ensure_context()
        with model_source(gguf_file_or_path) as (file, self.config):
            padded_head_dim(self.config.head_dim, tensor_cores=True)  # before minutes of loading
            self.device = torch.device(device)
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            with torch.inference_mode():
                self.weights = load_quant_weights(file, self.config, self.device, progress)
        c = self.config
        rotary = Rotary(c.rope, self.weights.rope_freq_factors, self.device)
        self.inv_freq = rotary.inv_freq.float().contiguous()
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)
        self.silu = SiluMul(c.ffn_size)
        self.embed = DequantRows(self.weights.token_embd.ggml_type, c.hidden_size)
        self.rope_kv = RopeKVWrite(
            c.n_heads, c.n_kv_heads, c.head_dim, c.rope.dim, c.rope.neox, KV_DTYPE
        )
        self.use_graphs = use_graphs
        if matmul not in MATMUL_MODES:
            raise CudaError(f"unknown matmul mode {matmul!r}; available: {', '.join(MATMUL_MODES)}")
        self.matmul = matmul
        self.batch_invariant = matmul != "auto"
        # Decode batches of at least this many sequences take the tensor cores.
        self.tc_min_batch = {"matvec": 1 << 30, "tensor-cores": 1,
                             "auto": auto_tc_min_batch(c.hidden_size)}[matmul]
        self.tc_prefill_max_tokens = tc_prefill_max_tokens(c.hidden_size)
        sm_count = multiprocessor_count()
        for linear in self.weights.linears():
            linear.tensor_core(sm_count)
        self.to_half = ToHalf()
        self._tc_workspace: TcWorkspace | None = None  # sized by allocate_kv
        # Gate and up of two types stay parts: those layers need the [n, 2 ffn] buffer and SiLU.
        self._fused_silu = all(layer.gate_up.interleaved for layer in self.weights.layers)
        # Decode kernels launch programmatically on Hopper (driver.programmatic_launches): each
        # one's prologue overlaps the previous one's tail. False: plain stream order (A/B runs).
        self.programmatic = programmatic
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._inputs: DecodeInputStager | None = None  # the graphs' static inputs
        self._logits: torch.Tensor | None = None  # the graphs' static output

    # ----- KV pool ------------------------------------------------------------------------------

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        return 2 * block_size * c.n_kv_heads * c.head_dim * KV_DTYPE.itemsize * c.n_layers

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, block_size, c.n_kv_heads, c.head_dim)
        self.kv_cache = [
            (torch.zeros(shape, dtype=KV_DTYPE, device=self.device),
             torch.zeros(shape, dtype=KV_DTYPE, device=self.device))
            for _ in range(c.n_layers)
        ]  # fmt: skip
        self.block_size = block_size
        self.attention = DecodeAttention(c.n_heads, c.n_kv_heads, c.head_dim, block_size, KV_DTYPE)
        self.prefill_attention = PrefillAttention(
            c.n_heads, c.n_kv_heads, c.head_dim, block_size, KV_DTYPE
        )
        # Widest block table a sequence can need; graphs index tables of exactly this width.
        self._table_width = -(-min(c.context_length, num_blocks * block_size) // block_size)
        n = BATCH_BUCKETS[-1]
        if self.matmul != "matvec":  # split-K partials: ~38 MB on the 8B shape, only if used
            rows = max(n, self.tc_prefill_max_tokens)
            needs = [op.workspace_needs(rows) for lin in self.weights.linears() for op in lin.tc]
            self._tc_workspace = TcWorkspace.sized(
                max(p for p, _ in needs), max(t for _, t in needs), self.device
            )
        self._inputs = DecodeInputStager(n, self._table_width, self.device)
        self._logits = torch.zeros(n, c.vocab_size, dtype=torch.float32, device=self.device)
        self._graphs.clear()

    # ----- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if not self.kv_cache:
            raise KVNotAllocatedError("cuda backend: forward called before allocate_kv")
        if any(n != 1 for n in batch.query_lens):
            return self._prefill(batch)
        n = batch.num_seqs
        max_context = max(batch.context_lens_host)
        if self.use_graphs and _bucket(n, BATCH_BUCKETS) is not None:
            return self._decode_graphed(batch, max_context)
        logits = torch.empty(n, self.config.vocab_size, dtype=torch.float32, device=self.device)
        self._decode(logits, batch.token_ids, batch.positions, batch.slot_mapping,
                     batch.context_lens, batch.block_tables, max_context)  # fmt: skip
        return logits[batch.logits_indices]

    def _decode(
        self, logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
        slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
        max_context: int,
    ) -> None:  # fmt: skip
        """One token per sequence through our kernels only (graph-capturable: no host syncs)."""
        c, w = self.config, self.weights
        n = token_ids.shape[0]

        def buffer(width: int) -> torch.Tensor:
            return torch.empty(n, width, dtype=torch.float32, device=self.device)

        hidden, x = buffer(c.hidden_size), buffer(c.hidden_size)
        qkv, attn = buffer(c.q_size + 2 * c.kv_size), buffer(c.q_size)
        act = buffer(c.ffn_size)
        gate_up = None if self._fused_silu else buffer(2 * c.ffn_size)
        self.embed.lookup(hidden, w.token_embd.raw, token_ids)  # after torch's input copies
        with programmatic_launches(self.programmatic):
            if n >= self.tc_min_batch:
                x16, act16 = self._half_input(n), self._half_input(n)

                def attend(attn, qkv, k_cache, v_cache):
                    self.rope_kv(qkv, positions, slot_mapping, self.inv_freq, k_cache, v_cache)
                    self.attention(attn, qkv, k_cache, v_cache, block_tables, context_lens,
                                   max_context)  # fmt: skip

                self._tc_layers(hidden, x16, act16, qkv, attn, act, gate_up, attend)
                self.norm(x16, hidden, w.output_norm)
                w.output.tc_matmul(logits, x16, self._tc_workspace)
                return
            for layer, (k_cache, v_cache) in zip(w.layers, self.kv_cache, strict=True):
                self.norm(x, hidden, layer.attn_norm)
                layer.qkv.matvec(qkv, x)
                self.rope_kv(qkv, positions, slot_mapping, self.inv_freq, k_cache, v_cache)
                self.attention(attn, qkv, k_cache, v_cache, block_tables, context_lens, max_context)
                layer.wo.matvec(hidden, attn, residual=True)
                self.norm(x, hidden, layer.ffn_norm)
                if layer.gate_up.interleaved:  # SiLU in the matvec's epilogue
                    layer.gate_up.swiglu(act, x)
                else:
                    layer.gate_up.matvec(gate_up, x)
                    self.silu(act, gate_up)
                layer.down.matvec(hidden, act, residual=True)
            self.norm(x, hidden, w.output_norm)
            w.output.matvec(logits, x)

    # ----- tensor-core matrix products ------------------------------------------------------

    def _half_input(self, n: int) -> torch.Tensor:
        """The tensor cores' fp16 input for n rows, as wide as the widest x (16-byte rows)."""
        c = self.config
        width = -(-max(c.hidden_size, c.q_size, c.ffn_size) // 8) * 8
        return torch.empty(n, width, dtype=torch.float16, device=self.device)

    def _tc_layers(self, hidden: torch.Tensor, x16: torch.Tensor, act16: torch.Tensor,
                   qkv: torch.Tensor, attn: torch.Tensor, act: torch.Tensor,
                   gate_up: torch.Tensor | None,
                   attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
                   ) -> None:  # fmt: skip
        """Every layer with its matrix products on the tensor cores, over `hidden` in place:
        decode steps (graphed) and short prefill chunks alike; `attend(attn, qkv, k, v)` does
        RoPE, the KV write and attention. The norms write x16 themselves and the SwiGLU
        epilogue writes act16: the attention output is the only input rounded apart."""
        c, ws = self.config, self._tc_workspace
        for layer, (k_cache, v_cache) in zip(self.weights.layers, self.kv_cache, strict=True):
            self.norm(x16, hidden, layer.attn_norm)
            layer.qkv.tc_matmul(qkv, x16, ws)
            attend(attn, qkv, k_cache, v_cache)
            self.to_half(x16, attn, c.q_size)
            layer.wo.tc_matmul(hidden, x16, ws, residual=True)
            self.norm(x16, hidden, layer.ffn_norm)
            if layer.gate_up.interleaved:
                layer.gate_up.tc_swiglu(act16, x16, ws)
            else:
                layer.gate_up.tc_matmul(gate_up, x16, ws)
                self.silu(act, gate_up)
                self.to_half(act16, act, c.ffn_size)
            layer.down.tc_matmul(hidden, act16, ws, residual=True)

    @torch.inference_mode()
    def prepare_decode(self, max_seqs: int, max_context: int,
                       progress: Callable[[int, int], None] | None = None) -> int:  # fmt: skip
        """Capture every decode graph that steps of up to `max_seqs` sequences and `max_context`
        tokens can use: one per (batch bucket, power-of-two count of attention splits). Captured
        on first use instead, each stalls every running sequence for the capture (tens of ms);
        a serving run that grows its batch and contexts meets dozens of them (the ITL tail).
        Before any step runs: the static inputs are reset to padding rows (no KV write)."""
        if not (self.use_graphs and self.kv_cache):
            return 0
        top = _bucket(min(max_seqs, BATCH_BUCKETS[-1]), BATCH_BUCKETS)
        context = min(max_context, self._table_width * self.block_size)
        keys = [(bucket, 1 << level) for bucket in BATCH_BUCKETS if bucket <= top
                for level in range(_split_level(context) + 1)]  # fmt: skip
        todo = [key for key in keys if key not in self._graphs]
        self._inputs.reset()
        for done, (bucket, splits) in enumerate(todo):
            self._graph(bucket, splits)
            if progress is not None:
                progress(done + 1, len(todo))
        return len(todo)

    def _graph(self, bucket: int, splits: int) -> torch.cuda.CUDAGraph:
        """The decode graph of a batch bucket and attention split count, captured on first use
        over the static inputs as they are staged."""
        graph = self._graphs.get((bucket, splits))
        if graph is None:
            graph_context = min(splits * PARTITION_TOKENS, self._table_width * self.block_size)
            graph = self._graphs[(bucket, splits)] = self._capture(bucket, graph_context)
        return graph

    def _decode_graphed(self, batch: ForwardBatch, max_context: int) -> torch.Tensor:
        """Stage the inputs into the static buffers (one launch, padding rows included), replay
        the bucket's graph (captured on first use). Host time here is idle GPU time: the engine
        waits for each step's ids (bench/host_step.py)."""
        n = batch.num_seqs
        bucket = _bucket(n, BATCH_BUCKETS)
        splits = 1 << _split_level(max_context)
        self._inputs.stage(bucket, batch.token_ids, batch.positions, batch.slot_mapping,
                           batch.context_lens, batch.block_tables)  # fmt: skip
        self._graph(bucket, splits).replay()
        if batch.logits_indices.shape[0] == n:  # every row (indices are ascending and unique)
            return self._logits[:n]
        return self._logits[:n][batch.logits_indices]

    def _capture(self, bucket: int, max_context: int) -> torch.cuda.CUDAGraph:
        rows, tables = self._inputs.rows, self._inputs.tables
        args = (self._logits[:bucket], rows[0, :bucket], rows[1, :bucket], rows[2, :bucket],
                rows[3, :bucket], tables[:bucket], max_context)  # fmt: skip
        # Warm up outside the capture (modules load, sites build); it computes this very step,
        # so running it twice writes the same KV values.
        self._decode(*args)
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode(*args)
        return graph

    # ----- the prefill path (dequantise + cuBLAS) ---------------------------------------------

    def _prefill(self, batch: ForwardBatch) -> torch.Tensor:
        """Any batch with a prompt chunk: dequantise-to-fp16 + cuBLAS, our flash attention over
        the paged KV (prefill_attention.cu)."""
        c, w = self.config, self.weights
        n = batch.num_tokens
        hidden = torch.empty(n, c.hidden_size, dtype=torch.float32, device=self.device)
        act = torch.empty(n, c.ffn_size, dtype=torch.float32, device=self.device)
        attn = torch.empty(n, c.q_size, dtype=torch.float32, device=self.device)
        self.embed.lookup(hidden, w.token_embd.raw, batch.token_ids)
        # Up to tc_prefill_max_tokens tokens (mixed batches, short chunks) on the tensor cores:
        # no fp16 copy of any weight, and half the launches of the path below.
        if self.matmul != "matvec" and n <= self.tc_prefill_max_tokens:

            def attend(attn, qkv, k_cache, v_cache):
                self.rope_kv(qkv, batch.positions, batch.slot_mapping, self.inv_freq, k_cache,
                             v_cache)  # fmt: skip
                self.prefill_attention(attn, qkv, k_cache, v_cache, batch.block_tables,
                                       batch.query_start, batch.context_lens, batch.query_lens,
                                       batch.context_lens_host)  # fmt: skip

            qkv = torch.empty(n, c.q_size + 2 * c.kv_size, dtype=torch.float32,
                              device=self.device)  # fmt: skip
            gate_up = None if self._fused_silu else torch.empty(
                n, 2 * c.ffn_size, dtype=torch.float32, device=self.device)
            self._tc_layers(hidden, self._half_input(n), self._half_input(n), qkv, attn, act,
                            gate_up, attend)  # fmt: skip
            return self._prefill_logits(batch, hidden)
        x = torch.empty_like(hidden)
        for layer, (k_cache, v_cache) in zip(w.layers, self.kv_cache, strict=True):
            self.norm(x, hidden, layer.attn_norm)
            qkv = F.linear(x.half(), layer.qkv.dense()).float()
            if layer.qkv.bias is not None:
                qkv += layer.qkv.bias
            self.rope_kv(qkv, batch.positions, batch.slot_mapping, self.inv_freq, k_cache, v_cache)
            self.prefill_attention(attn, qkv, k_cache, v_cache, batch.block_tables,
                                   batch.query_start, batch.context_lens, batch.query_lens,
                                   batch.context_lens_host)  # fmt: skip
            hidden += F.linear(attn.half(), layer.wo.dense()).float()
            self.norm(x, hidden, layer.ffn_norm)
            gate_up = F.linear(x.half(), layer.gate_up.dense()).float()
            self.silu(act, gate_up, interleaved=layer.gate_up.interleaved)
            hidden += F.linear(act.half(), layer.down.dense()).float()
        return self._prefill_logits(batch, hidden)

    def _prefill_logits(self, batch: ForwardBatch, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows that want them (the last token of each finished prompt chunk
        and each decode), through the final norm and the LM head's matvec."""
        c, w = self.config, self.weights
        rows = hidden[batch.logits_indices].contiguous()
        if rows.shape[0] == 0:  # a prompt chunk that is not the prompt's end: no logits wanted
            return torch.empty(0, c.vocab_size, dtype=torch.float32, device=self.device)
        x = torch.empty_like(rows)
        self.norm(x, rows, w.output_norm)
        logits = torch.empty(rows.shape[0], c.vocab_size, dtype=torch.float32, device=self.device)
        w.output.matvec(logits, x)
        return logits

    # ----- sampling -----------------------------------------------------------------------------

    def make_sampler(self, seed: int | None) -> CudaSampler:
        """Our sampling kernel (gpu/cuda/sampling.py): one CTA per row, one sync per step; seeded
        rows key its counter-based hash, so it keeps no per-request state."""
        return CudaSampler(seed)
