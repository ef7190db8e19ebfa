"""loader.gguf_file parses valid GGUF files: a hand-built one field by field, and the real default
model against gguf's own reader. Malformed files are in test_gguf_malformed.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from loader.errors import GGUFError
from loader.gguf_file import GGUFFile, TensorInfo, open_gguf
from tests.gguf_bytes import (
    ARRAY,
    BOOL,
    F16,
    F32,
    FLOAT32,
    FLOAT64,
    INT8,
    INT16,
    INT32,
    INT64,
    Q4_1,
    Q8_0,
    STRING,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    build,
    kv,
    nbytes,
    pattern,
    place,
    tensor_info,
)

V = GGUFValueType

# key -> (GGUF type id, value as written, type the parser must report, value it must return)
METADATA = {
    "general.architecture": (STRING, "llama", V.STRING, "llama"),
    "general.name": (STRING, "tïny ✓ model", V.STRING, "tïny ✓ model"),
    "general.empty": (STRING, "", V.STRING, ""),
    "t.u8": (UINT8, 255, V.UINT8, 255),
    "t.i8": (INT8, -128, V.INT8, -128),
    "t.u16": (UINT16, 65535, V.UINT16, 65535),
    "t.i16": (INT16, -32768, V.INT16, -32768),
    "t.u32": (UINT32, 2**32 - 1, V.UINT32, 2**32 - 1),
    "t.i32": (INT32, -(2**31), V.INT32, -(2**31)),
    "t.u64": (UINT64, 2**64 - 1, V.UINT64, 2**64 - 1),
    "t.i64": (INT64, -(2**63), V.INT64, -(2**63)),
    "t.f32": (FLOAT32, 1e-5, V.FLOAT32, float(np.float32(1e-5))),
    "t.f64": (FLOAT64, math.pi, V.FLOAT64, math.pi),
    "t.true": (BOOL, 1, V.BOOL, True),
    "t.false": (BOOL, 0, V.BOOL, False),
}
ARRAYS = {
    "t.ints": (INT32, [1, -2, 3]),
    "t.u64s": (UINT64, [0, 2**64 - 1]),
    "t.floats": (FLOAT32, [0.5, -1.25, 3.0]),
    "t.bools": (BOOL, [1, 0, 1]),
    "t.strings": (STRING, ["a", "", "ünï", "merges x"]),
    "t.empty": (UINT8, []),
    "t.empty_strings": (STRING, []),
}
# name -> (GGUF dims, ggml type); the 4-D one checks that shape is dims reversed
TENSORS = {
    "token_embd.weight": ((4, 3), F32),
    "blk.0.attn_q.weight": ((32, 2), Q8_0),
    "output_norm.weight": ((8,), F16),
    "blk.0.ffn_up.weight": ((64, 1, 2, 3), Q4_1),
}


def tiny_file(alignment: int | None = 64, version: int = 3) -> tuple[bytes, list[int]]:
    """The hand-built model: every metadata type, four tensors; returns (file, data offsets)."""
    kvs = [kv(k, t, v) for k, (t, v, _, _) in METADATA.items()]
    kvs += [kv(k, ARRAY, spec) for k, spec in ARRAYS.items()]
    if alignment is not None:
        kvs.append(kv("general.alignment", UINT32, alignment))
    align = alignment or 32
    blobs = [pattern(nbytes(dims, t), seed=i) for i, (dims, t) in enumerate(TENSORS.values())]
    offsets, data = place(blobs, align)
    infos = [
        tensor_info(name, dims, t, off)
        for (name, (dims, t)), off in zip(TENSORS.items(), offsets, strict=True)
    ]
    return build(kvs, infos, data, alignment=align, version=version), offsets


def write(tmp_path, raw: bytes, name: str = "model.gguf"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("alignment", [64, None, 32, 256])
def test_tiny_file_layout(tmp_path, alignment):
    raw, offsets = tiny_file(alignment)
    with open_gguf(write(tmp_path, raw)) as f:
        assert isinstance(f, GGUFFile)
        assert f.version == 3
        assert f.file_size == len(raw)
        assert f.alignment == (alignment or 32)
        assert f.data_offset % f.alignment == 0
        # data starts right after the tensor infos, padded: what `build` wrote with empty data
        assert f.data_offset == len(raw) - (offsets[-1] + nbytes(*list(TENSORS.values())[-1]))
        assert list(f.tensors) == list(TENSORS)  # file order
        for i, (name, (dims, ggml_type)) in enumerate(TENSORS.items()):
            info = f.tensor(name)
            assert info == TensorInfo(
                name, dims, GGMLQuantizationType(ggml_type), offsets[i], nbytes(dims, ggml_type)
            )
            assert info.shape == tuple(reversed(dims))
            assert info.n_elements == math.prod(dims)
            data = f.tensor_data(name)
            assert data.dtype == np.uint8 and data.shape == (info.nbytes,)
            assert data.tobytes() == pattern(info.nbytes, seed=i)
            start = f.data_offset + info.offset
            assert data.tobytes() == raw[start : start + info.nbytes]


def test_tiny_file_shapes(tmp_path):
    raw, _ = tiny_file()
    f = open_gguf(write(tmp_path, raw))
    assert f.tensor("token_embd.weight").shape == (3, 4)
    assert f.tensor("blk.0.ffn_up.weight").shape == (3, 2, 1, 64)
    assert f.tensor("blk.0.ffn_up.weight").nbytes == 64 * 6 // 32 * 20
    assert f.tensor("blk.0.attn_q.weight").nbytes == 2 * 34
    with pytest.raises(GGUFError, match="no tensor named 'missing'"):
        f.tensor("missing")
    with pytest.raises(GGUFError, match="no tensor named"):
        f.tensor_data("missing")


def test_tiny_file_metadata(tmp_path):
    raw, _ = tiny_file()
    md = open_gguf(write(tmp_path, raw)).metadata
    assert list(md) == [*METADATA, *ARRAYS, "general.alignment"]
    assert len(md) == len(METADATA) + len(ARRAYS) + 1
    for key, (_, _, value_type, expected) in METADATA.items():
        assert md.value_type(key) == value_type, key
        got = md.raw(key)
        assert got == expected and type(got) is type(expected), key
    for key, (elem_type, items) in ARRAYS.items():
        assert md.value_type(key) == (V.ARRAY, V(elem_type)), key
        got = md.raw(key)
        if elem_type == STRING:
            assert got == items
        else:
            assert isinstance(got, np.ndarray) and got.tolist() == [
                bool(x) if elem_type == BOOL else x for x in items
            ], key
    assert md.get_int("general.alignment") == 64
    assert md.get_str("general.name") == "tïny ✓ model"
    assert md.get_int("t.i64") == -(2**63)
    assert md.get_int("t.u64") == 2**64 - 1
    assert md.get_float("t.f64") == math.pi
    assert md.get_float("t.f32") == pytest.approx(1e-5)
    assert md.get_float("t.u8") == 255.0  # integers are numbers too
    assert md.get_bool("t.true") is True and md.get_bool("t.false") is False
    assert md.get_str_list("t.strings") == ["a", "", "ünï", "merges x"]
    assert md.get_str_list("t.empty_strings") == []
    ints = md.get_int_array("t.ints")
    assert ints.dtype == np.int32 and ints.tolist() == [1, -2, 3]
    assert md.get_int_array("t.u64s").tolist() == [0, 2**64 - 1]
    assert md.get_int_array("t.empty").size == 0
    floats = md.get_float_array("t.floats")
    assert floats.dtype == np.float32 and floats.tolist() == [0.5, -1.25, 3.0]
    assert md.get_float_array("t.ints").tolist() == [1.0, -2.0, 3.0]
    assert md.raw("t.bools").dtype == np.bool_
    assert "t.u8" in md and "nope" not in md


@pytest.mark.parametrize(
    ("getter", "key", "message"),
    [
        ("get_int", "general.architecture", "'general.architecture' has type STRING, expected an "),
        ("get_int", "t.f32", "'t.f32' has type FLOAT32, expected an integer"),
        ("get_int", "t.true", "'t.true' has type BOOL, expected an integer"),
        ("get_int", "t.ints", r"'t.ints' has type ARRAY\[INT32\], expected an integer"),
        ("get_float", "general.name", "'general.name' has type STRING, expected a number"),
        ("get_float", "t.true", "'t.true' has type BOOL, expected a number"),
        ("get_float", "t.floats", r"has type ARRAY\[FLOAT32\], expected a number"),
        ("get_bool", "t.u8", "'t.u8' has type UINT8, expected BOOL"),
        ("get_bool", "t.bools", r"has type ARRAY\[BOOL\], expected BOOL"),
        ("get_str", "t.u32", "'t.u32' has type UINT32, expected STRING"),
        ("get_str", "t.strings", r"has type ARRAY\[STRING\], expected STRING"),
        ("get_str_list", "t.ints", r"has type ARRAY\[INT32\], expected ARRAY\[STRING\]"),
        ("get_str_list", "general.name", r"has type STRING, expected ARRAY\[STRING\]"),
        ("get_int_array", "t.floats", r"has type ARRAY\[FLOAT32\], expected an integer array"),
        ("get_int_array", "t.strings", r"has type ARRAY\[STRING\], expected an integer array"),
        ("get_int_array", "t.u32", "has type UINT32, expected an integer array"),
        ("get_float_array", "t.strings", r"has type ARRAY\[STRING\], expected a number array"),
        ("get_float_array", "t.bools", r"has type ARRAY\[BOOL\], expected a number array"),
        ("get_float_array", "t.f32", "has type FLOAT32, expected a number array"),
    ],
)
def test_getter_wrong_type(tmp_path, getter, key, message):
    md = open_gguf(write(tmp_path, tiny_file()[0])).metadata
    with pytest.raises(GGUFError, match=message):
        getattr(md, getter)(key)
    with pytest.raises(GGUFError, match=message):  # a default does not excuse a wrong type
        getattr(md, getter)(key, None)


@pytest.mark.parametrize(
    "getter",
    ["get_int", "get_float", "get_bool", "get_str", "get_str_list", "get_int_array",
     "get_float_array", "raw"],
)  # fmt: skip
def test_getter_missing_key(tmp_path, getter):
    md = open_gguf(write(tmp_path, tiny_file()[0])).metadata
    with pytest.raises(GGUFError, match="required metadata key 'llama.nope' is missing"):
        getattr(md, getter)("llama.nope")
    assert getattr(md, getter)("llama.nope", None) is None


@pytest.mark.parametrize(
    ("getter", "default"),
    [("get_int", 7), ("get_float", 0.5), ("get_bool", True), ("get_str", "x"),
     ("get_str_list", ["a"]), ("get_int_array", np.array([1, 2])), ("raw", 7)],
)  # fmt: skip
def test_getter_default(tmp_path, getter, default):
    md = open_gguf(write(tmp_path, tiny_file()[0])).metadata
    assert np.array_equal(getattr(md, getter)("llama.nope", default), default)


@pytest.mark.parametrize(
    "default",
    [
        np.array([0.5, 2.0]),
        [0.5, 2.0],
    ],
)
def test_get_float_array_default(tmp_path, default):
    md = open_gguf(write(tmp_path, tiny_file()[0])).metadata
    assert np.array_equal(md.get_float_array("llama.nope", default), [0.5, 2.0])


def test_version_2_parses(tmp_path):
    raw, _ = tiny_file(version=2)
    f = open_gguf(write(tmp_path, raw))
    assert f.version == 2 and len(f.tensors) == len(TENSORS)


def test_header_only_file_parses(tmp_path):
    f = open_gguf(write(tmp_path, build()))
    assert f.version == 3 and len(f.tensors) == 0 and len(f.metadata) == 0


def test_metadata_only_file_parses(tmp_path):
    # no tensors: the file may end right after the metadata, with no padding
    raw = build([kv("a", STRING, "x"), kv("b", ARRAY, (UINT8, []))], alignment=1)
    f = open_gguf(write(tmp_path, raw))
    assert f.tensors == {} and f.metadata.get_str("a") == "x"
    assert f.metadata.get_int_array("b").size == 0


def test_accepts_str_path_and_pathlike(tmp_path):
    path = write(tmp_path, tiny_file()[0])
    assert len(open_gguf(str(path)).tensors) == len(TENSORS)
    assert len(open_gguf(os.fspath(path)).tensors) == len(TENSORS)


def test_tensor_data_survives_close(tmp_path):
    f = open_gguf(write(tmp_path, tiny_file()[0]))
    data = f.tensor_data("token_embd.weight")
    f.close()
    assert data.tobytes() == pattern(48, seed=0)


# --- the real default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(default_model_path, smollm2_reader):
    return open_gguf(str(default_model_path)), smollm2_reader


SMOLLM2_READER = pytest.mark.xdist_group("smollm2-reader")  # one parse: tests/conftest.py


@SMOLLM2_READER
def test_smollm2_counts(smollm2):
    f, reader = smollm2
    assert f.version == 3
    assert len(f.tensors) == 272
    assert len(f.metadata) == 33
    theirs = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(f.metadata) == theirs
    assert f.data_offset == reader.data_offset
    assert f.alignment == 32


@SMOLLM2_READER
def test_smollm2_metadata_matches_reader(smollm2):
    f, reader = smollm2
    for key in f.metadata:
        field = reader.fields[key]
        value_type = f.metadata.value_type(key)
        expected_type = tuple(field.types) if field.types[0] == V.ARRAY else field.types[0]
        assert value_type == expected_type, key
        ours = f.metadata.raw(key)
        ours = ours.tolist() if isinstance(ours, np.ndarray) else ours
        assert ours == field.contents(), key
    md = f.metadata
    assert md.get_str("general.architecture") == "llama"
    assert md.get_int("llama.block_count") == 30
    assert md.get_float("llama.rope.freq_base") == 100000.0
    assert len(md.get_str_list("tokenizer.ggml.tokens")) == 49152
    assert md.get_bool("tokenizer.ggml.add_bos_token") is False
    with pytest.raises(GGUFError, match="'llama.block_count' has type UINT32, expected STRING"):
        md.get_str("llama.block_count")


@SMOLLM2_READER
def test_smollm2_tensors_match_reader(smollm2):
    f, reader = smollm2
    assert list(f.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        info = f.tensors[rt.name]
        assert info.dims == tuple(int(d) for d in rt.shape), rt.name
        assert info.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name
        assert info.ggml_type == rt.tensor_type, rt.name
        assert f.data_offset + info.offset == rt.data_offset, rt.name
        assert info.nbytes == rt.n_bytes, rt.name
        assert info.n_elements == rt.n_elements, rt.name
    types = {info.ggml_type for info in f.tensors.values()}
    assert types == {GGMLQuantizationType.F32, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0}


@SMOLLM2_READER
def test_smollm2_tensor_data_matches_reader(smollm2):
    f, reader = smollm2
    picks = {0, 1, len(reader.tensors) // 2, len(reader.tensors) - 1}
    picks |= {i for i, t in enumerate(reader.tensors) if t.tensor_type == Q8_0}
    for i in sorted(picks):
        rt = reader.tensors[i]
        ours = f.tensor_data(rt.name)
        theirs = np.asarray(rt.data).view(np.uint8).reshape(-1)
        assert ours.shape == (rt.n_bytes,), rt.name
        assert np.array_equal(ours, theirs), rt.name
    last = f.tensors[reader.tensors[-1].name]
    assert f.data_offset + last.offset + last.nbytes == f.file_size
