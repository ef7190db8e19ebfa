"""loader.quants must decode every supported type bit-for-bit like gguf's numpy reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.errors import GGUFError
from loader.quants import SUPPORTED_TYPES, dequantize, row_nbytes, tensor_nbytes

Q = GGMLQuantizationType

# Byte offsets of the fp16 fields (d, m, dmin) inside one block of each quantised type.
FP16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q8_0: (0,),
    Q.Q2_K: (80, 82),
    Q.Q3_K: (108,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
ALL_TYPES = (*FLOAT_TYPES, *FP16_FIELDS)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def _shapes(qtype: GGMLQuantizationType) -> list[tuple[int, ...]]:
    bs = max(GGML_QUANT_SIZES[qtype][0], 32)
    return [(bs,), (1, 2 * bs), (7, 3 * bs), (2, 3, bs), (5, 16 * bs)]


def _random_scales(rng: np.random.Generator, n: int) -> np.ndarray:
    """Finite fp16 values over many magnitudes (fp16 subnormals included), both signs."""
    mags = 10.0 ** rng.uniform(-6.0, 2.0, n)
    return (rng.standard_normal(n) * mags).astype(np.float16)


def _random_raw(qtype: GGMLQuantizationType, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if qtype in FLOAT_TYPES:
        values = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32)
        if qtype == Q.F16:
            return values.astype(np.float16).view(np.uint8)
        if qtype == Q.BF16:
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return values.view(np.uint8)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n // block_size, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scales = _random_scales(rng, blocks.shape[0])
        blocks[:, off : off + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType, shape) -> torch.Tensor:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, shape[-1] // block_size * type_size)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, qtype))).reshape(
        shape
    )


def _assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Stricter than torch.equal: -0.0 != 0.0 and NaN payloads must match."""
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def _check(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...], device="cpu"):
    got = dequantize(torch.from_numpy(raw.copy()).to(device), qtype, shape)
    assert got.device.type == device
    _assert_bits_equal(got.cpu(), _reference(raw, qtype, shape))


def test_supported_types_are_exactly_the_tested_ones():
    assert SUPPORTED_TYPES == frozenset(ALL_TYPES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matches_gguf_reference(qtype, device):
    for i, shape in enumerate(_shapes(qtype)):
        raw = _random_raw(qtype, shape, seed=0x5EED + 97 * int(qtype) + i)
        _check(raw, qtype, shape, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_pass_any_bit_pattern_through(qtype, device):
    # Random bytes include infinities, NaNs (signalling too) and subnormals; NaN sign and
    # payload must come through as numpy gives them, which the plain torch casts do not.
    raw = np.random.default_rng(20240611 + int(qtype)).integers(0, 256, 4096 * 4, dtype=np.uint8)
    n = raw.size // GGML_QUANT_SIZES[qtype][1]
    want = _reference(raw, qtype, (16, n // 16))
    assert want.isnan().any()
    got = dequantize(torch.from_numpy(raw).to(device), qtype, want.shape)
    _assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_every_f16_bit_pattern(device):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8)
    _check(raw, Q.F16, (1 << 16,), device)


@settings(max_examples=40, deadline=None)
@given(
    qtype=st.sampled_from([Q.Q5_0, Q.Q3_K, Q.Q4_K, Q.Q6_K]),
    n_blocks=st.integers(1, 4),
    data=st.data(),
)
def test_random_blocks_hypothesis(qtype, n_blocks, data):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = bytearray(
        data.draw(st.binary(min_size=n_blocks * type_size, max_size=n_blocks * type_size))
    )
    finite_f16 = st.floats(width=16, allow_nan=False, allow_infinity=False)
    for b in range(n_blocks):
        for off in FP16_FIELDS[qtype]:
            at = b * type_size + off
            blocks[at : at + 2] = np.float16(data.draw(finite_f16)).tobytes()
    _check(np.frombuffer(bytes(blocks), dtype=np.uint8), qtype, (n_blocks * block_size,))


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_misaligned_and_noncontiguous_raw(qtype):
    shape = (3, max(GGML_QUANT_SIZES[qtype][0], 32))
    raw = _random_raw(qtype, shape, seed=77 + int(qtype))
    want = _reference(raw, qtype, shape)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw)
    _assert_bits_equal(dequantize(buf[1:], qtype, shape), want)  # storage offset 1
    spread = torch.zeros(2 * raw.size, dtype=torch.uint8)
    spread[::2] = torch.from_numpy(raw)
    _assert_bits_equal(dequantize(spread[::2], qtype, shape), want)  # stride 2


def test_f32_result_does_not_alias_raw():
    raw = torch.from_numpy(np.float32([1.0, 2.0]).view(np.uint8).copy())
    out = dequantize(raw, Q.F32, (2,))
    raw.zero_()
    assert out.tolist() == [1.0, 2.0]


def test_integer_type_id_and_empty_tensor():
    raw = _random_raw(Q.Q4_K, (256,), seed=5)
    _assert_bits_equal(
        dequantize(torch.from_numpy(raw), int(Q.Q4_K), (256,)), _reference(raw, Q.Q4_K, (256,))
    )
    empty = dequantize(torch.empty(0, dtype=torch.uint8), Q.Q4_0, (0, 64))
    assert empty.shape == (0, 64) and empty.dtype == torch.float32


@pytest.mark.parametrize("delta", [-1, 1, -34])
def test_length_mismatch_raises(delta):
    good = tensor_nbytes(Q.Q8_0, (4, 64))
    with pytest.raises(GGUFError, match="Q8_0"):
        dequantize(torch.zeros(good + delta, dtype=torch.uint8), Q.Q8_0, (4, 64))


def test_row_not_whole_blocks_raises():
    with pytest.raises(GGUFError, match="Q4_K"):
        dequantize(torch.zeros(144, dtype=torch.uint8), Q.Q4_K, (1, 255))


def test_unsupported_and_unknown_types_raise():
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,))
    with pytest.raises(GGUFError, match="9999"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (1,))


def test_raw_must_be_1d_uint8():
    with pytest.raises(TypeError):
        dequantize(torch.zeros(4, dtype=torch.int8), Q.F32, (1,))
    with pytest.raises(TypeError):
        dequantize(torch.zeros(1, 4, dtype=torch.uint8), Q.F32, (1,))


def test_nbytes_helpers():
    assert row_nbytes(Q.Q8_0, 576) == 18 * 34
    assert row_nbytes(Q.F16, 3) == 6
    assert row_nbytes(Q.Q6_K, 512) == 2 * 210
    assert row_nbytes(Q.IQ2_XXS, 256) == 66  # sizes work for any type gguf knows
    assert tensor_nbytes(Q.Q4_1, (1536, 576)) == 1536 * 18 * 20
    assert tensor_nbytes(Q.F32, (576,)) == 576 * 4
    with pytest.raises(GGUFError, match="Q4_0"):
        row_nbytes(Q.Q4_0, 48)
    with pytest.raises(GGUFError):
        tensor_nbytes(Q.F32, ())


@pytest.fixture(scope="module")
def model_reader(smollm2_reader) -> gguf.GGUFReader:
    return smollm2_reader


@pytest.mark.xdist_group("smollm2-reader")  # one parse of the file: tests/conftest.py
@pytest.mark.parametrize(
    "name", ["blk.0.ffn_up.weight", "token_embd.weight", "blk.0.attn_norm.weight"]
)
def test_real_model_tensor(model_reader, name):
    tensor = next(t for t in model_reader.tensors if t.name == name)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1)
    want = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
    got = dequantize(torch.from_numpy(raw.copy()), tensor.tensor_type, shape)
    _assert_bits_equal(got, want.reshape(shape))
