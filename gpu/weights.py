"""A model's weights from a GGUF file as dense torch tensors, one small dataclass per layer.

Every tensor is dequantised with `loader.quants.dequantize` on the target device, then cast to
the compute dtype (float32 by default, bfloat16 optional). Norm weights and RoPE factors stay
float32 because norms and rotations are computed in float32. The loader prints nothing; a
`progress(bytes_done, bytes_total)` callback, called after each tensor, lets a CLI draw a bar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gpu.int8_linear import Int8Weight
from loader.config import ModelConfig
from loader.gguf_file import GGUFFile
from loader.quants import dequantize

ProgressCallback = Callable[[int, int], None]


@dataclass(slots=True)
class LayerWeights:
    """One transformer block. Linear weights are [out_features, in_features] like nn.Linear.

    Q/K/V are one matrix and gate/up are one matrix, fused at load whatever the file stores:
    on the CPU one larger matmul beats three (or two) small ones at batch 1, where the call
    overhead and the re-read of the activations dominate.
    """

    attn_norm: torch.Tensor  # [hidden] float32
    wqkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]: Q rows, then K rows, then V rows
    bqkv: torch.Tensor | None  # [q_size + 2 * kv_size] (qwen2), else None
    wo: torch.Tensor  # [hidden, q_size]
    ffn_norm: torch.Tensor  # [hidden] float32
    w_gate_up: torch.Tensor  # [2 * ffn, hidden]: gate rows first, then up rows
    w_down: torch.Tensor  # [hidden, ffn]


@dataclass(slots=True)
class ModelWeights:
    """All weights of one model on one device; `output` is `token_embd` itself when tied."""

    token_embd: torch.Tensor  # [vocab, hidden]
    output_norm: torch.Tensor  # [hidden] float32
    output: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    rope_freq_factors: torch.Tensor | None  # [rope.dim / 2] float32 (Llama 3.1 `rope_freqs`)

    def nbytes(self) -> int:
        """Bytes the weights take on the device (a tied output counted once)."""
        tensors = {id(t): t for t in self._tensors()}
        return sum(
            t.nbytes() if isinstance(t, Int8Weight) else t.numel() * t.element_size()
            for t in tensors.values()
        )

    def _tensors(self) -> list[torch.Tensor]:
        out = [self.token_embd, self.output_norm, self.output]
        for layer in self.layers:
            out += [layer.attn_norm, layer.wqkv, layer.wo, layer.ffn_norm, layer.w_gate_up]
            out += [layer.w_down] + ([layer.bqkv] if layer.bqkv is not None else [])
        return out


class _Reader:
    """Dequantises named tensors onto a device and reports progress in file bytes."""

    def __init__(
        self,
        file: GGUFFile,
        names: list[str],
        device: torch.device,
        progress: ProgressCallback | None,
    ) -> None:
        self.file = file
        self.device = device
        self.progress = progress
        self.bytes_total = sum(file.tensor(name).nbytes for name in names)
        self.bytes_done = 0

    def read(self, name: str) -> torch.Tensor:
        """float32 tensor of the file's torch shape (GGUF dims reversed), on the device."""
        info = self.file.tensor(name)
        # The memory map is read-only and torch wants writable memory: copy the raw bytes once
        # (they are the small, quantised form), then dequantise where the weights will live.
        raw = torch.from_numpy(np.array(self.file.tensor_data(name))).to(self.device)
        weights = dequantize(raw, info.ggml_type, info.shape)
        self.bytes_done += info.nbytes
        if self.progress is not None:
            self.progress(self.bytes_done, self.bytes_total)
        return weights


def load_weights(
    file: GGUFFile,
    config: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: ProgressCallback | None = None,
) -> ModelWeights:
    """Dequantise every tensor `config` names into `dtype` on `device`, fusing QKV and gate·up.

    `dtype=torch.int8` keeps the linear matrices as `Int8Weight` (per-row int8) and everything
    else, the embedding table included (it is only gathered from), in bfloat16.
    """
    factors = config.rope.freq_factors_tensor
    names = list(config.tensor_shapes) + ([factors] if factors else [])
    reader = _Reader(file, names, torch.device(device), progress)
    int8 = dtype == torch.int8
    dense_dtype = torch.bfloat16 if int8 else dtype

    def matrix(name: str) -> torch.Tensor:
        return reader.read(name).to(dense_dtype)

    def packed(weight: torch.Tensor) -> torch.Tensor | Int8Weight:
        return Int8Weight.quantize(weight) if int8 else weight

    def norm(name: str) -> torch.Tensor:
        return reader.read(name)

    layers = []
    for i in range(config.n_layers):
        blk = f"blk.{i}"
        if config.fused_qkv:
            # phi3 ships attn_qkv already fused, rows Q then K then V (HF's qkv_proj layout).
            wqkv = matrix(f"{blk}.attn_qkv.weight")
            bqkv = matrix(f"{blk}.attn_qkv.bias") if config.qkv_bias else None
        else:
            # Cast each part before concatenating, so the float32 peak is one part, not three.
            wqkv = torch.cat([matrix(f"{blk}.attn_{p}.weight") for p in "qkv"])
            bqkv = None
            if config.qkv_bias:
                bqkv = torch.cat([matrix(f"{blk}.attn_{p}.bias") for p in "qkv"])
        if config.fused_gate_up:
            # phi3's ffn_up holds [gate; up] stacked on the output dim: HF Phi3MLP chunks
            # gate_up_proj's output as (gate, up) and llama.cpp's fused swiglu applies SiLU to
            # the first half, so the file already matches our gate-then-up layout.
            w_gate_up = matrix(f"{blk}.ffn_up.weight")
        else:
            w_gate_up = torch.cat(
                [matrix(f"{blk}.ffn_gate.weight"), matrix(f"{blk}.ffn_up.weight")]
            )
        layers.append(
            LayerWeights(
                attn_norm=norm(f"{blk}.attn_norm.weight"),
                wqkv=packed(wqkv),
                bqkv=bqkv,
                wo=packed(matrix(f"{blk}.attn_output.weight")),
                ffn_norm=norm(f"{blk}.ffn_norm.weight"),
                w_gate_up=packed(w_gate_up),
                w_down=packed(matrix(f"{blk}.ffn_down.weight")),
            )
        )
    token_embd = matrix("token_embd.weight")
    return ModelWeights(
        token_embd=token_embd,
        output_norm=norm("output_norm.weight"),
        output=packed(token_embd if config.tied_embeddings else matrix("output.weight")),
        layers=layers,
        rope_freq_factors=norm(factors) if factors else None,
    )
