"""Vectorised torch dequantisers for the GGUF tensor types orcd supports.

This is the reference our CUDA kernels are tested against, so it favours being plainly
right over being fast: every type decodes bit-for-bit like `gguf.quants.dequantize` (same
float32 operations in the same order, no fused multiply-adds; F32/F16/BF16 for every bit
pattern, the quantised types for any finite scales). It uses torch ops only, so it runs on
whichever device the raw bytes live on, CPU or CUDA, with the same bits on both.

Layouts follow ggml's block structs (ggml-common.h); a GGUF tensor is its rows of blocks laid
end to end, and multi-byte fields are little-endian, which is what `Tensor.view(dtype)` reads on
every host we run on (x86-64, aarch64, NVIDIA GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

from loader.errors import GGUFError

_T = GGMLQuantizationType

_BlockDecoder = Callable[[torch.Tensor], torch.Tensor]


def _type(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(ggml_type)
    except ValueError:
        raise GGUFError(f"unknown GGML tensor type id {ggml_type!r}") from None


def row_nbytes(ggml_type: GGMLQuantizationType | int, n_cols: int) -> int:
    """Bytes one row of `n_cols` elements takes; works for any type gguf knows a size for."""
    qtype = _type(ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_cols < 0 or n_cols % block_size:
        raise GGUFError(
            f"row of {n_cols} elements is not a whole number of {qtype.name} blocks "
            f"({block_size} elements each)"
        )
    return n_cols // block_size * type_size


def tensor_nbytes(ggml_type: GGMLQuantizationType | int, shape: Sequence[int]) -> int:
    """Bytes a tensor of torch `shape` (outermost first, blocks along the last dim) takes."""
    if len(shape) == 0:
        raise GGUFError("tensor shape must have at least one dimension")
    if any(d < 0 for d in shape):
        raise GGUFError(f"negative dimension in tensor shape {tuple(shape)}")
    return row_nbytes(ggml_type, shape[-1]) * math.prod(shape[:-1])


# --- helpers -----------------------------------------------------------------------------------


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32 of shape (n_blocks, 1)."""
    # clone() gives a fresh, contiguous, 0-offset buffer, so the 2-byte view is always legal
    # (the raw bytes of a block field are neither contiguous nor 2-aligned in general).
    field = blocks[:, offset : offset + 2].clone(memory_format=torch.contiguous_format)
    return field.view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k): all low nibbles first, then all high nibbles."""
    return (qs.unsqueeze(-2) >> _shifts([0, 4], qs.device).view(2, 1)) & 0x0F


def _bits(bytes_: torch.Tensor, width: int) -> torch.Tensor:
    """(..., k) bytes -> (..., 8 // width, k) fields of `width` bits, lowest bits first."""
    shifts = _shifts(range(0, 8, width), bytes_.device).view(-1, 1)
    return (bytes_.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _flat_bits(bytes_: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) single bits, bit j of byte i at position 8i + j."""
    shifts = _shifts(range(8), bytes_.device)
    return ((bytes_.unsqueeze(-1) >> shifts) & 1).flatten(1)


# --- the 32-element legacy quants ------------------------------------------------------------
# Each block holds 32 weights; the 4-bit nibbles are stored as qs[i] = w[i] | w[i + 16] << 4.


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q4_0 { half d; uint8 qs[16]; }: w = d * (q - 8)
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).flatten(1).to(torch.float32) - 8
    return d * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q4_1 { half d; half m; uint8 qs[16]; }: w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).flatten(1).to(torch.float32)
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    # qh is a little-endian uint32 whose bit i is bit 4 of weight i; reading it bytewise
    # (bit j of byte k is weight 8k + j) avoids 32-bit unsigned ops torch lacks on CUDA.
    return _flat_bits(qh) << 4


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q5_0 { half d; uint8 qh[4]; uint8 qs[16]; }: w = d * (q - 16)
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:]).flatten(1) | _q5_high(blocks[:, 2:6])
    return d * (q.to(torch.float32) - 16)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q5_1 { half d; half m; uint8 qh[4]; uint8 qs[16]; }: w = d * q + m
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:]).flatten(1) | _q5_high(blocks[:, 4:8])
    return d * q.to(torch.float32) + m


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q8_0 { half d; int8 qs[32]; }: w = q * d
    d = _f16(blocks, 0)
    q = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return q * d


# --- K-quants: 256-element super-blocks ---------------------------------------------------------


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q2_K { uint8 scales[16]; uint8 qs[64]; half d; half dmin; }
    # scales[j]: low nibble scales, high nibble mins of the 16-weight sub-block j.
    # Each 128-weight half h reads its own 32 qs bytes four times, 2 bits at a time:
    # weight 128h + 32s + l = (qs[32h + l] >> 2s) & 3.
    n = blocks.shape[0]
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    q = _bits(blocks[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).view(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q3_K { uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; half d; }
    n = blocks.shape[0]
    hmask, qs, packed = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    # 16 six-bit scales: scale j takes its low 4 bits from nibble (j // 8) of byte j % 8 and its
    # high 2 bits from bit pair (j // 4) of byte 8 + j % 4; stored with an offset of 32.
    low = _nibbles(packed[:, :8]).reshape(n, 16)
    high = _bits(packed[:, 8:], 2).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.float32) - 32
    dl = (d * sc).view(n, 16, 1)
    # Low 2 bits as in Q2_K; the high bit of weight 32s + l is bit s of hmask[l], and a *clear*
    # bit means "subtract 4" (q = low - 4 * (1 - bit)).
    ql = _bits(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).to(torch.int16)
    qh = _bits(hmask, 1).reshape(n, 16, 16).to(torch.int16)
    q = (ql - ((qh ^ 1) << 2)).to(torch.float32)
    return (dl * q).view(n, QK_K)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins (get_scale_min_k4).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3 likewise; for j = 4..7 the
    low 4 bits sit in byte 8 + (j - 4) (scale in the low nibble, min in the high) and the top 2
    bits are the spare top bits of bytes j - 4 (scale) and j (min).
    """
    sc_lo, mn_lo, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=1)
    mn = torch.cat([mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)], dim=1)
    return sc, mn


def _k4_scales(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-weight (scale, min) for Q4_K/Q5_K as float32 of shape (n, 8, 1) each."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    return (
        (d * sc.to(torch.float32)).view(n, 8, 1),
        (dmin * mn.to(torch.float32)).view(n, 8, 1),
    )


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q4_K { half d; half dmin; uint8 scales[12]; uint8 qs[128]; }
    # Each 32-byte chunk c of qs holds sub-block 2c in its low nibbles and 2c + 1 in its high.
    n = blocks.shape[0]
    scale, mn = _k4_scales(blocks)
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).to(torch.float32)
    return (scale * q - mn).view(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q5_K { half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; }
    # Low nibbles as in Q4_K; bit 4 of weight 32s + l is bit s of qh[l].
    n = blocks.shape[0]
    scale, mn = _k4_scales(blocks)
    ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48], 1)
    q = (ql | (qh << 4)).to(torch.float32)
    return (scale * q - mn).view(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # struct block_q6_K { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }
    # Per 128-weight half h: ql[64h .. 64h+63] gives weights 0-63 of the half in its low
    # nibbles and 64-127 in its high nibbles; qh[32h + l] gives bits 4-5 of weights
    # l, l + 32, l + 64, l + 96 (2 bits each, lowest first). Weights are stored + 32.
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.float32) - 32).view(n, 16, 16)
    scales = blocks[:, 192:208].view(torch.int8).to(torch.float32)
    d = _f16(blocks, 208)
    return ((d * scales).view(n, 16, 1) * q).view(n, QK_K)


_BLOCK_DECODERS: dict[GGMLQuantizationType, _BlockDecoder] = {
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q8_0: _q8_0,
    _T.Q2_K: _q2_k,
    _T.Q3_K: _q3_k,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

_FLOAT_TYPES = frozenset({_T.F32, _T.F16, _T.BF16})

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = _FLOAT_TYPES | frozenset(_BLOCK_DECODERS)


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View contiguous 1-D bytes as `dtype`, copying first if the storage offset is misaligned."""
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype)


def _widen_f16(bits: torch.Tensor) -> torch.Tensor:
    """fp16 bit patterns (int16) -> float32, keeping every NaN's sign and payload as numpy does.

    The hardware cast is exact for everything else, but NaNs differ by device: x86 (F16C) sets
    the quiet bit of a signalling NaN and CUDA turns every NaN into 0x7FFFFFFF. So NaNs are
    rebuilt from the bits: sign, all-ones exponent, the 10 payload bits moved up by 13.
    """
    widened = bits.view(torch.float16).to(torch.float32)
    b = bits.to(torch.int32)  # sign-extended, so bit 31 is the fp16 sign
    is_nan = ((b & 0x7C00) == 0x7C00) & ((b & 0x03FF) != 0)
    nan_bits = (b & -(2**31)) | 0x7F800000 | ((b & 0x03FF) << 13)
    return torch.where(is_nan, nan_bits.view(torch.float32), widened)


def _decode_float(raw: torch.Tensor, qtype: GGMLQuantizationType) -> torch.Tensor:
    if qtype == _T.F32:
        return _reinterpret(raw, torch.float32).clone()
    if qtype == _T.F16:
        return _widen_f16(_reinterpret(raw, torch.int16))
    # BF16 is the top half of a float32: widen the bits, shift them up, reinterpret.
    return (_reinterpret(raw, torch.int16).to(torch.int32) << 16).view(torch.float32)


def dequantize(
    raw: torch.Tensor, ggml_type: GGMLQuantizationType | int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode a tensor's bytes, exactly as stored in the GGUF file, into float32 of `shape`.

    `raw` is 1-D uint8 on any device; the result is a new tensor on the same device. `shape`
    is the torch shape (GGUF dims reversed); its last dim must be whole blocks.
    """
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise TypeError(f"raw must be a 1-D uint8 tensor, got {raw.dtype} of {raw.dim()} dims")
    qtype = _type(ggml_type)
    if qtype not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor type {qtype.name} is not supported by orcd")
    shape = tuple(int(d) for d in shape)
    expected = tensor_nbytes(qtype, shape)
    if raw.numel() != expected:
        raise GGUFError(
            f"{qtype.name} tensor of shape {shape} needs {expected} bytes, got {raw.numel()}"
        )
    raw = raw.contiguous()
    if qtype in _FLOAT_TYPES:
        return _decode_float(raw, qtype).view(shape)
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.view(expected // type_size, type_size)
    return _BLOCK_DECODERS[qtype](blocks).reshape(shape)
