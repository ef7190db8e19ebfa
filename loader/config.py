"""Model configuration per architecture, read from GGUF metadata and checked against the tensors.

Three families are supported: `llama` (SmolLM2, Llama 2/3, TinyLlama, Mistral), `qwen2` (biases
on Q/K/V) and `phi3` (fused QKV and fused gate·up tensors). Everything the engine needs to
know about a model's shape lives here, so that backends never read metadata themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loader.errors import GGUFError
from loader.gguf_file import GGUFFile
from loader.quants import SUPPORTED_TYPES

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "phi3")
# RoPE ordering: llama.cpp permutes Q/K rows of `llama` models at conversion so that adjacent
# pairs (x[2i], x[2i+1]) rotate together ("normal"); qwen2 and phi3 keep HF's halves layout
# (x[i], x[i + d/2]), which llama.cpp calls NeoX.
_NEOX_ROPE = {"llama": False, "qwen2": True, "phi3": True}
_MAX_COUNT = 1 << 20  # no real model has a million layers, heads or ffn width


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `freq_factors` is Llama 3.1's `rope_freqs` tensor, if any."""

    base: float
    dim: int
    neox: bool
    scaling_type: str = "none"  # none | linear | yarn
    scaling_factor: float = 1.0
    original_context_length: int = 0
    freq_factors_tensor: str | None = None
    long_factors_tensor: str | None = None  # Phi-3 LongRoPE: recorded, refused by the engine


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of one model, independent of how its weights are stored."""

    architecture: str
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope: RopeConfig
    tied_embeddings: bool
    qkv_bias: bool
    fused_qkv: bool
    fused_gate_up: bool
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim


def _positive(file: GGUFFile, key: str, default: int | None = None) -> int:
    value = file.metadata.get_int(key) if default is None else file.metadata.get_int(key, default)
    if not 0 < value <= _MAX_COUNT:
        raise GGUFError(f"{file.path}: metadata {key!r} is {value}, outside 1..{_MAX_COUNT}")
    return value


def read_config(file: GGUFFile) -> ModelConfig:
    """Build and validate the config of a parsed GGUF; raises `GGUFError` naming what is wrong."""
    meta = file.metadata
    arch = meta.get_str("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{file.path}: unsupported architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _positive(file, f"{arch}.embedding_length")
    n_heads = _positive(file, f"{arch}.attention.head_count")
    n_kv_heads = _positive(file, f"{arch}.attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        raise GGUFError(
            f"{file.path}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
        )
    if f"{arch}.attention.key_length" not in meta and hidden % n_heads:
        raise GGUFError(
            f"{file.path}: embedding_length {hidden} is not a multiple of head_count {n_heads}"
        )
    head_dim = _positive(file, f"{arch}.attention.key_length", hidden // n_heads)
    if meta.get_int(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{file.path}: attention.value_length differs from key_length")
    embd = file.tensors.get("token_embd.weight")
    if embd is None or len(embd.dims) != 2:
        raise GGUFError(f"{file.path}: tensor 'token_embd.weight' is missing or not 2-D")
    vocab = embd.dims[1]
    if f"{arch}.vocab_size" in meta and meta.get_int(f"{arch}.vocab_size") != vocab:
        raise GGUFError(
            f"{file.path}: {arch}.vocab_size {meta.get_int(f'{arch}.vocab_size')} differs from "
            f"token_embd.weight rows {vocab}"
        )
    config = ModelConfig(
        architecture=arch,
        name=meta.get_str("general.name", file.path.stem),
        n_layers=_positive(file, f"{arch}.block_count"),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_size=_positive(file, f"{arch}.feed_forward_length"),
        vocab_size=vocab,
        context_length=_positive(file, f"{arch}.context_length"),
        rms_eps=meta.get_float(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope=_read_rope(file, arch, head_dim),
        tied_embeddings="output.weight" not in file.tensors,
        qkv_bias="blk.0.attn_q.bias" in file.tensors or "blk.0.attn_qkv.bias" in file.tensors,
        fused_qkv="blk.0.attn_qkv.weight" in file.tensors,
        fused_gate_up="blk.0.ffn_gate.weight" not in file.tensors,
    )
    if not 0 < config.rms_eps < 1:
        raise GGUFError(f"{file.path}: layer_norm_rms_epsilon {config.rms_eps} is outside (0, 1)")
    # A crafted block_count must not make us build millions of expected names: the last
    # block's norm must exist before anything else is checked.
    last_block = f"blk.{config.n_layers - 1}.attn_norm.weight"
    if last_block not in file.tensors:
        raise GGUFError(
            f"{file.path}: block_count is {config.n_layers} but tensor {last_block!r} is missing"
        )
    shapes = expected_tensor_shapes(config)
    _check_tensors(file, shapes)
    return replace(config, tensor_shapes=shapes)


def _read_rope(file: GGUFFile, arch: str, head_dim: int) -> RopeConfig:
    meta = file.metadata
    dim = meta.get_int(f"{arch}.rope.dimension_count", head_dim)
    if not 0 < dim <= head_dim or dim % 2:
        raise GGUFError(f"{file.path}: rope.dimension_count {dim} must be even and <= {head_dim}")
    base = meta.get_float(f"{arch}.rope.freq_base", 10000.0)
    if not base > 1.0:
        raise GGUFError(f"{file.path}: rope.freq_base {base} must be greater than 1")
    scaling_type = meta.get_str(f"{arch}.rope.scaling.type", "none")
    factor = meta.get_float(f"{arch}.rope.scaling.factor", 0.0)
    if scaling_type == "none" and f"{arch}.rope.scale_linear" in meta:
        scaling_type, factor = "linear", meta.get_float(f"{arch}.rope.scale_linear")
    if scaling_type not in ("none", "linear", "yarn"):
        raise GGUFError(
            f"{file.path}: rope.scaling.type {scaling_type!r} is not one of none, linear, yarn"
        )
    if scaling_type != "none" and not factor > 0:
        raise GGUFError(f"{file.path}: rope.scaling.factor {factor} must be positive")
    freq_factors = "rope_freqs.weight" if "rope_freqs.weight" in file.tensors else None
    if freq_factors and file.tensors[freq_factors].dims != (dim // 2,):
        raise GGUFError(
            f"{file.path}: rope_freqs.weight has dims {file.tensors[freq_factors].dims}, "
            f"expected ({dim // 2},)"
        )
    long_factors = "rope_factors_long.weight"
    return RopeConfig(
        base=base,
        dim=dim,
        neox=_NEOX_ROPE[arch],
        scaling_type=scaling_type,
        scaling_factor=factor if scaling_type != "none" else 1.0,
        original_context_length=meta.get_int(f"{arch}.rope.scaling.original_context_length", 0),
        freq_factors_tensor=freq_factors,
        long_factors_tensor=long_factors if long_factors in file.tensors else None,
    )


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by GGUF name, with its GGUF dims (innermost first)."""
    h, q, kv, ffn = config.hidden_size, config.q_size, config.kv_size, config.ffn_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (h, config.vocab_size),
        "output_norm.weight": (h,),
    }
    if not config.tied_embeddings:
        shapes["output.weight"] = (h, config.vocab_size)
    for i in range(config.n_layers):
        blk = f"blk.{i}"
        shapes[f"{blk}.attn_norm.weight"] = (h,)
        shapes[f"{blk}.ffn_norm.weight"] = (h,)
        shapes[f"{blk}.attn_output.weight"] = (q, h)
        shapes[f"{blk}.ffn_down.weight"] = (ffn, h)
        if config.fused_qkv:
            shapes[f"{blk}.attn_qkv.weight"] = (h, q + 2 * kv)
            if config.qkv_bias:
                shapes[f"{blk}.attn_qkv.bias"] = (q + 2 * kv,)
        else:
            shapes[f"{blk}.attn_q.weight"] = (h, q)
            shapes[f"{blk}.attn_k.weight"] = (h, kv)
            shapes[f"{blk}.attn_v.weight"] = (h, kv)
            if config.qkv_bias:
                shapes[f"{blk}.attn_q.bias"] = (q,)
                shapes[f"{blk}.attn_k.bias"] = (kv,)
                shapes[f"{blk}.attn_v.bias"] = (kv,)
        if config.fused_gate_up:
            shapes[f"{blk}.ffn_up.weight"] = (h, 2 * ffn)
        else:
            shapes[f"{blk}.ffn_gate.weight"] = (h, ffn)
            shapes[f"{blk}.ffn_up.weight"] = (h, ffn)
    return shapes


def _check_tensors(file: GGUFFile, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor is present, has the expected dims, and a type we can compute with."""
    for name, info in file.tensors.items():
        if info.ggml_type not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{file.path}: tensor {name!r} has type {info.ggml_type.name}, which orcd does not "
                f"support (supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
            )
    for name, dims in shapes.items():
        info = file.tensors.get(name)
        if info is None:
            raise GGUFError(f"{file.path}: tensor {name!r} is missing")
        if info.dims != dims:
            raise GGUFError(f"{file.path}: tensor {name!r} has dims {info.dims}, expected {dims}")
