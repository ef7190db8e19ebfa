"""The reference backend: the whole forward pass of llama, qwen2 and phi3 in plain torch.

Every CUDA kernel is tested against this file, so it reads top to bottom like the model:
embedding, then per layer RMSNorm → fused QKV (+ qwen2 bias) → RoPE → write K/V into the
paged cache → attention per sequence over its block table → output projection → residual →
RMSNorm → fused gate·up → SwiGLU → down → residual; then the final norm and the LM head on
the rows whose logits are wanted. Matmuls run in the weight dtype (bfloat16 matmuls
accumulate in float32 on the CPU) and the KV cache is stored in it; the residual stream,
norms, RoPE and attention are float32 whatever the weight dtype. Logits come back float32.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gpu.backends.base import Backend, model_source
from gpu.batch import ForwardBatch
from gpu.int8_linear import linear
from gpu.rope import Rotary
from gpu.sampler import Sampler
from gpu.weights import ProgressCallback, load_weights
from jobs.errors import OrcdError
from loader.gguf_file import GGUFFile


class KVNotAllocatedError(OrcdError):
    """`forward` was called before `allocate_kv`."""


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm in float32: x * rsqrt(mean(x²) + eps) * weight.

    torch's fused kernel gives bit-identical results to those four ops on the CPU, in one call.
    """
    return F.rms_norm(x.float(), weight.shape, weight, eps)


class TorchBackend(Backend):
    """One model on one torch device (CPU in practice); float32 by default, bfloat16 optional."""

    name = "torch"

    def __init__(
        self,
        gguf_file_or_path: GGUFFile | str | os.PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: ProgressCallback | None = None,
    ) -> None:
        with model_source(gguf_file_or_path) as (file, self.config):
            self.device = torch.device(device)
            # Activations and the KV cache: the weights' dtype, bfloat16 for int8 weights.
            self.dtype = torch.bfloat16 if dtype == torch.int8 else dtype
            with torch.inference_mode():
                self.weights = load_weights(file, self.config, self.device, dtype, progress)
        self.rotary = Rotary(self.config.rope, self.weights.rope_freq_factors, self.device)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        # The heads this process computes: all of them here, a tensor-parallel shard's share in
        # `gpu.backends.torch_tp`, which also overrides the three collective points below.
        self.n_heads, self.n_kv_heads = self.config.n_heads, self.config.n_kv_heads

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.config
        per_layer = 2 * block_size * self.n_kv_heads * c.head_dim * self.dtype.itemsize
        return per_layer * c.n_layers

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        c = self.config
        shape = (num_blocks, block_size, self.n_kv_heads, c.head_dim)
        self.kv_cache = [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(c.n_layers)
        ]
        self.block_size = block_size

    @torch.inference_mode()
    def make_sampler(self, seed: int | None) -> Sampler:
        """Torch ops on the logits' device (the reference sampler)."""
        return Sampler(seed)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if not self.kv_cache:
            raise KVNotAllocatedError("torch backend: forward called before allocate_kv")
        c, w = self.config, self.weights
        n_tokens, n_heads, n_kv_heads = batch.num_tokens, self.n_heads, self.n_kv_heads
        q_size, kv_size = n_heads * c.head_dim, n_kv_heads * c.head_dim
        cos, sin = self.rotary.cos_sin(batch.positions)
        hidden = self._embed(batch.token_ids)  # the float32 residual stream, [T, h]
        for layer, (k_cache, v_cache) in zip(w.layers, self.kv_cache, strict=True):
            x = rms_norm(hidden, layer.attn_norm, c.rms_eps).to(self.dtype)
            qkv = linear(x, layer.wqkv, layer.bqkv)
            # Q and K heads are adjacent columns of the fused output: rotate them in one call.
            qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
            qk = self.rotary.apply(qk.view(n_tokens, n_heads + n_kv_heads, c.head_dim), cos, sin)
            q, k = qk.split([n_heads, n_kv_heads], dim=1)
            v = v.view(n_tokens, n_kv_heads, c.head_dim)
            # Pool viewed as flat slots (block * block_size + offset): one scatter per layer.
            k_cache.view(-1, n_kv_heads, c.head_dim).index_copy_(0, batch.slot_mapping, k)
            v_cache.view(-1, n_kv_heads, c.head_dim).index_copy_(0, batch.slot_mapping, v)
            attn = self._attention(q, k_cache, v_cache, batch)
            hidden = hidden + self._sum_shards(linear(attn.view(n_tokens, q_size), layer.wo))
            x = rms_norm(hidden, layer.ffn_norm, c.rms_eps).to(self.dtype)
            gate, up = linear(x, layer.w_gate_up).chunk(2, dim=-1)
            hidden = hidden + self._sum_shards(linear(F.silu(gate) * up, layer.w_down))
        x = rms_norm(hidden[batch.logits_indices], w.output_norm, c.rms_eps).to(self.dtype)
        return self._lm_head(x)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The tokens' embedding rows as float32 [T, hidden]."""
        return self.weights.token_embd[token_ids].float()

    def _sum_shards(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel matmul's output as float32: here already whole, nothing to sum."""
        return partial.float()

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits [L, vocab] of the final-normed rows."""
        return linear(x, self.weights.output).float()

    def _attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Causal GQA attention of each sequence's new queries over its whole cached context.

        q is [T, n_heads, head_dim]; returns the same shape. A sequence with `query_len` new
        tokens and `context_len` tokens in cache has its queries at positions
        context_len - query_len ... context_len - 1; query at position p sees keys 0..p.
        """
        out = torch.empty_like(q)
        start = 0
        for i, (query_len, context_len) in enumerate(
            zip(batch.query_lens, batch.context_lens_host, strict=True)
        ):
            n_blocks = -(-context_len // self.block_size)
            blocks = batch.block_tables[i, :n_blocks].long()
            # [n_blocks, block_size, kv_heads, dim] -> [1, kv_heads, context_len, dim]
            keys = k_cache[blocks].flatten(0, 1)[:context_len].transpose(0, 1)[None]
            values = v_cache[blocks].flatten(0, 1)[:context_len].transpose(0, 1)[None]
            queries = q[start : start + query_len].transpose(0, 1)[None]  # [1, heads, len, dim]
            mask = None
            if 1 < query_len < context_len:
                # SDPA's is_causal aligns the mask top-left; with a cached prefix the queries
                # sit at the bottom-right, so build it: key j visible to query i iff j <= p_i.
                query_pos = torch.arange(context_len - query_len, context_len, device=q.device)
                key_pos = torch.arange(context_len, device=q.device)
                mask = key_pos[None, :] <= query_pos[:, None]
            # Each KV head serves n_heads / n_kv_heads consecutive query heads (enable_gqa).
            # Computed in float32 whatever the cache dtype: it is more precise, and torch's CPU
            # flash kernel is several times faster on 4-D float32 than on bfloat16 (or 3-D).
            attn = F.scaled_dot_product_attention(
                queries.float(),
                keys.float(),
                values.float(),
                attn_mask=mask,
                is_causal=query_len > 1 and query_len == context_len,
                enable_gqa=True,
            )
            out[start : start + query_len] = attn[0].transpose(0, 1)
            start += query_len
        return out
