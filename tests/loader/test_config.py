"""Model config from metadata: the real SmolLM2 file, each architecture, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from loader.config import SUPPORTED_ARCHITECTURES, read_config
from loader.errors import GGUFError
from loader.gguf_file import open_gguf

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 64, 4, 2, 96, 128


def write_tiny_model(path, arch="llama", *, drop=(), extra_meta=None, overrides=None,
                     tensor_type=None):
    """A one-layer model of `arch` with tiny shapes, written with gguf's own writer."""
    head_dim = HIDDEN // HEADS
    q, kv = HIDDEN, KV_HEADS * head_dim
    shapes = {  # torch order (outermost first)
        "token_embd.weight": (VOCAB, HIDDEN),
        "output_norm.weight": (HIDDEN,),
        "output.weight": (VOCAB, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.attn_output.weight": (HIDDEN, q),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
    }
    if arch == "phi3":
        shapes["blk.0.attn_qkv.weight"] = (q + 2 * kv, HIDDEN)
        shapes["blk.0.ffn_up.weight"] = (2 * FFN, HIDDEN)
    else:
        shapes |= {
            "blk.0.attn_q.weight": (q, HIDDEN),
            "blk.0.attn_k.weight": (kv, HIDDEN),
            "blk.0.attn_v.weight": (kv, HIDDEN),
            "blk.0.ffn_gate.weight": (FFN, HIDDEN),
            "blk.0.ffn_up.weight": (FFN, HIDDEN),
        }
    if arch == "qwen2":
        shapes |= {"blk.0.attn_q.bias": (q,), "blk.0.attn_k.bias": (kv,),
                   "blk.0.attn_v.bias": (kv,)}
    shapes |= overrides or {}
    writer = GGUFWriter(str(path), arch)
    meta = {
        f"{arch}.block_count": 1,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.context_length": 256,
        f"{arch}.rope.freq_base": 10000.0,
    }
    meta |= extra_meta or {}
    for key, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name in drop:
            continue
        data = rng.standard_normal(shape).astype(np.float32)
        if tensor_type is not None and name == "blk.0.ffn_down.weight":
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            raw = np.zeros((shape[0], shape[1] // block_size * type_size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_real_default_model_config(default_model_path):
    with open_gguf(default_model_path) as gguf:
        config = read_config(gguf)
    assert config.architecture == "llama"
    assert (config.n_layers, config.hidden_size, config.ffn_size) == (30, 576, 1536)
    assert (config.n_heads, config.n_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152
    assert config.context_length == 8192
    assert config.rope.base == 100000.0 and config.rope.dim == 64 and not config.rope.neox
    assert config.rms_eps == pytest.approx(1e-5)
    assert config.tied_embeddings and not config.qkv_bias and not config.fused_qkv
    assert len(config.tensor_shapes) == 2 + 30 * 9


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_each_architecture(tmp_path, arch):
    with open_gguf(write_tiny_model(tmp_path / "m.gguf", arch)) as gguf:
        config = read_config(gguf)
    assert config.architecture == arch
    assert config.q_size == HIDDEN and config.kv_size == KV_HEADS * HIDDEN // HEADS
    assert config.qkv_bias == (arch == "qwen2")
    assert config.fused_qkv == config.fused_gate_up == (arch == "phi3")
    assert config.rope.neox == (arch != "llama")
    assert not config.tied_embeddings


def test_tied_embeddings_and_llama3_rope(tmp_path):
    path = write_tiny_model(
        tmp_path / "m.gguf", drop=("output.weight",),
        extra_meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
        overrides={"rope_freqs.weight": (HIDDEN // HEADS // 2,)},
    )
    with open_gguf(path) as gguf:
        config = read_config(gguf)
    assert config.tied_embeddings
    assert config.rope.scaling_type == "linear" and config.rope.scaling_factor == 4.0
    assert config.rope.freq_factors_tensor == "rope_freqs.weight"


def test_unsupported_architecture_lists_supported(tmp_path):
    with open_gguf(write_tiny_model(tmp_path / "m.gguf", "gemma")) as gguf:
        with pytest.raises(GGUFError, match="unsupported architecture 'gemma'.*llama, qwen2, phi3"):
            read_config(gguf)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"drop": ("blk.0.attn_k.weight",)}, "tensor 'blk.0.attn_k.weight' is missing"),
        ({"overrides": {"blk.0.ffn_up.weight": (FFN + 32, HIDDEN)}}, "ffn_up.weight' has dims"),
        ({"extra_meta": {"llama.attention.head_count_kv": 3}}, "not a multiple of head_count_kv"),
        ({"extra_meta": {"llama.block_count": 0}}, "block_count' is 0"),
        ({"extra_meta": {"llama.block_count": 1 << 20}},
         "block_count is 1048576 but tensor 'blk.1048575.attn_norm.weight' is missing"),
        ({"extra_meta": {"llama.rope.freq_base": "big"}}, "rope.freq_base' has type STRING"),
        ({"extra_meta": {"llama.rope.scaling.type": "longrope"}}, "rope.scaling.type 'longrope'"),
        ({"extra_meta": {"llama.vocab_size": 7}}, "vocab_size 7 differs"),
        ({"drop": ("token_embd.weight",)}, "token_embd.weight' is missing"),
    ],
)
def test_inconsistent_models_refused(tmp_path, kwargs, message):
    with open_gguf(write_tiny_model(tmp_path / "m.gguf", **kwargs)) as gguf:
        with pytest.raises(GGUFError, match=message):
            read_config(gguf)


def test_unsupported_tensor_type_named(tmp_path):
    path = write_tiny_model(tmp_path / "m.gguf", tensor_type=GGMLQuantizationType.IQ4_NL)
    with open_gguf(path) as gguf:
        with pytest.raises(GGUFError, match="'blk.0.ffn_down.weight' has type IQ4_NL"):
            read_config(gguf)
