"""Random but valid tensor data for a synthetic GGUF, one ggml type at a time.

Quantised tensors are composed block by block from random bits and random fp16 scales, not
quantised from floats (gguf.quants has no K-quant quantiser, and its others would take an hour
for 8B). Each tensor has its own generator (`tensor_rng`), so its bytes depend only on the seed,
its name, its type and its dims.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from loader.synth_specs import TensorSpec

_T = GGMLQuantizationType

# Values generated per step: bounds the temporaries. Part of the format of a seed's stream, so
# changing it changes every file's bytes.
_CHUNK_ELEMENTS = 1 << 22

# Block layouts are ggml's (ggml-common.h), little-endian. Every quant bit is uniformly random;
# only the scales are chosen: fp16, positive or of random sign like llama.cpp's own, each block's
# scale drawn from base * U(0.5, 1.5) so that a kernel reading the wrong block's scale is caught.
# `base` is std / rms(integer factor): the mean square of each type's integer factor is below,
# for uniform q on n levels its variance (n^2 - 1) / 12, plus the square of any off-centre mean.

_JITTER_MS = 13 / 12  # E[u^2] for u ~ U(0.5, 1.5)
_KSC = (32, 59)  # Q4_K/Q5_K 6-bit sub-block scales; mins are the scale +- 4, still within 6 bits
_Q6SC = (64, 127)  # Q6_K int8 sub-block scale magnitudes


def _mean_square(lo: int, hi: int) -> float:
    """E[k^2] for k uniform on the integers lo..hi."""
    k = np.arange(lo, hi + 1, dtype=np.float64)
    return float(np.mean(k * k))


def _block_dtype(*fields: tuple) -> np.dtype:
    return np.dtype([(name, kind, (count,)) if count > 1 else (name, kind)
                     for name, kind, count in fields])  # fmt: skip


_BLOCKS: dict[GGMLQuantizationType, np.dtype] = {
    _T.Q4_0: _block_dtype(("d", "<f2", 1), ("qs", "u1", 16)),
    _T.Q4_1: _block_dtype(("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", 16)),
    _T.Q5_0: _block_dtype(("d", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", 16)),
    _T.Q5_1: _block_dtype(("d", "<f2", 1), ("m", "<f2", 1), ("qh", "u1", 4), ("qs", "u1", 16)),
    _T.Q8_0: _block_dtype(("d", "<f2", 1), ("qs", "i1", 32)),
    _T.Q4_K: _block_dtype(("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12),
                          ("qs", "u1", 128)),
    _T.Q5_K: _block_dtype(("d", "<f2", 1), ("dmin", "<f2", 1), ("scales", "u1", 12),
                          ("qh", "u1", 32), ("qs", "u1", 128)),
    _T.Q6_K: _block_dtype(("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16),
                          ("d", "<f2", 1)),
}  # fmt: skip
# Mean square of the integer factor multiplying d, per type (see the comment above).
_FACTOR_MS: dict[GGMLQuantizationType, float] = {
    _T.Q4_0: _mean_square(-8, 7),  # q - 8
    _T.Q5_0: _mean_square(-16, 15),  # q - 16
    _T.Q8_0: _mean_square(-127, 127),  # llama.cpp never writes -128
    _T.Q4_1: (16**2 - 1) / 12 + 1 / 3,  # q - 7.5 - e, e ~ U(-1, 1) moves the min off-centre
    _T.Q5_1: (32**2 - 1) / 12 + 1 / 3,  # q - 15.5 - e
    # sc * (q - 7.5) - 7.5 * (m - sc), with the min m = sc + j, j uniform on -4..4
    _T.Q4_K: _mean_square(*_KSC) * (16**2 - 1) / 12 + 7.5**2 * _mean_square(-4, 4),
    _T.Q5_K: _mean_square(*_KSC) * (32**2 - 1) / 12 + 15.5**2 * _mean_square(-4, 4),
    _T.Q6_K: _mean_square(*_Q6SC) * _mean_square(-32, 31),  # sc * (q - 32)
}


def _random_scales(rng: np.random.Generator, n: int, base: float, signed: bool) -> np.ndarray:
    scales = base * (rng.random(n, dtype=np.float32) + np.float32(0.5))
    if signed:
        scales = np.where(rng.integers(0, 2, n, dtype=np.uint8) == 1, -scales, scales)
    return scales


def _bits(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (n, width), dtype=np.uint8)


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into Q4_K/Q5_K's 12 bytes (get_scale_min_k4 in reverse):
    bytes 0-3 scales 0-3 (low 6 bits) with the top 2 bits of scales 4-7, bytes 4-7 the same for
    mins, bytes 8-11 the low nibbles of scales 4-7 and, above them, of mins 4-7."""
    packed = np.empty((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((mins[:, 4:] & 0xF) << 4)
    return packed


def random_blocks(
    qtype: GGMLQuantizationType, n_blocks: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    """`n_blocks` valid random blocks of a quantised type whose values have std about `std` and
    mean about 0, as a (n_blocks, type_size) uint8 array."""
    blocks = np.empty(n_blocks, dtype=_BLOCKS[qtype])
    base = std / math.sqrt(_FACTOR_MS[qtype] * _JITTER_MS)
    if qtype == _T.Q8_0:
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=True)
        blocks["qs"] = rng.integers(-127, 128, (n_blocks, 32), dtype=np.int8)
    elif qtype in (_T.Q4_0, _T.Q5_0):
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=True)
    elif qtype in (_T.Q4_1, _T.Q5_1):
        d = _random_scales(rng, n_blocks, base, signed=False)
        centre = 7.5 if qtype == _T.Q4_1 else 15.5
        blocks["d"] = d
        blocks["m"] = -d * (centre + 2 * rng.random(n_blocks, dtype=np.float32) - 1)
    elif qtype in (_T.Q4_K, _T.Q5_K):
        d = _random_scales(rng, n_blocks, base, signed=False)
        sc = rng.integers(_KSC[0], _KSC[1] + 1, (n_blocks, 8), dtype=np.uint8)
        mins = (sc + rng.integers(-4, 5, (n_blocks, 8), dtype=np.int8)).astype(np.uint8)
        blocks["d"] = d
        blocks["dmin"] = d * (7.5 if qtype == _T.Q4_K else 15.5)
        blocks["scales"] = _pack_k_scales(sc, mins)
    elif qtype == _T.Q6_K:
        blocks["d"] = _random_scales(rng, n_blocks, base, signed=False)
        magnitude = rng.integers(_Q6SC[0], _Q6SC[1] + 1, (n_blocks, 16), dtype=np.int8)
        negative = rng.integers(0, 2, (n_blocks, 16), dtype=np.uint8) == 1
        blocks["scales"] = np.where(negative, -magnitude, magnitude)
    for field in ("ql", "qh", "qs"):  # the quant bits proper, all uniformly random
        if field in blocks.dtype.names and blocks.dtype[field].base == np.uint8:
            blocks[field] = _bits(rng, n_blocks, blocks.dtype[field].shape[0])
    return blocks.view(np.uint8).reshape(n_blocks, -1)


def _random_floats(
    qtype: GGMLQuantizationType, n: int, std: float, rng: np.random.Generator
) -> np.ndarray:
    values = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
    if qtype == _T.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype == _T.BF16:  # round to nearest even on the upper 16 bits (values are finite)
        bits = values.view(np.uint32)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    return values.view(np.uint8)


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """The generator for one tensor: keyed by name, so no tensor depends on the others."""
    entropy = np.random.SeedSequence([seed, zlib.crc32(name.encode())])
    return np.random.Generator(np.random.PCG64(entropy))


def random_tensor(spec: TensorSpec, seed: int) -> np.ndarray:
    """A tensor's bytes, generated in fixed-size chunks of whole rows into one buffer."""
    if spec.kind == "norm":
        return np.ones(spec.dims, dtype=np.float32).view(np.uint8).reshape(-1)
    rng = tensor_rng(seed, spec.name)
    row_length, n_rows = spec.dims[0], math.prod(spec.dims[1:])
    block_size, type_size = GGML_QUANT_SIZES[spec.ggml_type]
    out = np.empty((n_rows, row_length // block_size * type_size), dtype=np.uint8)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // row_length)
    for start in range(0, n_rows, rows_per_chunk):
        rows = out[start : start + rows_per_chunk]
        n = rows.shape[0] * row_length
        if spec.ggml_type in _BLOCKS:
            chunk = random_blocks(spec.ggml_type, n // block_size, spec.std, rng)
        else:
            chunk = _random_floats(spec.ggml_type, n, spec.std, rng)
        rows[...] = chunk.reshape(rows.shape)
    return out.reshape(-1)
