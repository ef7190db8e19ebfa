"""Malformed GGUF files: every one must raise `GGUFError` naming the bad field, quickly.

Nothing else may escape (no IndexError, struct.error, MemoryError, OverflowError...), and no
open may take long whatever the counts and lengths claim. Files are built byte by byte with
tests.gguf_bytes, which writes any value it is given.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.errors import GGUFError
from loader.gguf_file import open_gguf
from tests.gguf_bytes import (
    ARRAY,
    BOOL,
    F32,
    FLOAT32,
    FLOAT64,
    INT32,
    INT64,
    Q4_1,
    Q4_K,
    Q8_0,
    STRING,
    UINT8,
    UINT32,
    UINT64,
    build,
    kv,
    string,
    tensor_info,
    u32,
    u64,
)

BIG = 2**63
MAX64 = 2**64 - 1
MAX32 = 2**32 - 1
OPEN_TIME_LIMIT_S = 1.0

# The small valid file every case starts from: a few kv entries of different types, two tensors,
# padding before the data, and tensor data running to the very last byte.
BASE_KV_SPECS = [
    ("general.architecture", STRING, "llama"),
    ("llama.block_count", UINT32, 2),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "bc"])),
    ("t.floats", ARRAY, (FLOAT32, [1.0, 2.0])),
    ("t.flag", BOOL, 1),
]
BASE_TENSOR_SPECS = [("a", (8,), F32, 0), ("b", (32, 1), Q8_0, 32)]
BASE_KVS = [kv(*spec) for spec in BASE_KV_SPECS]
BASE_TENSORS = [tensor_info(*spec) for spec in BASE_TENSOR_SPECS]
BASE_DATA = bytes(range(32)) + bytes(range(100, 134))  # a: 32 bytes, b: 34 bytes at 32
BASE = build(BASE_KVS, BASE_TENSORS, BASE_DATA)


def expect_error(path: str | os.PathLike, match: str) -> GGUFError:
    """open_gguf(path) raises GGUFError matching `match`, in one line, within the time limit."""
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=match) as info:
        open_gguf(path)
    elapsed = time.perf_counter() - start
    assert elapsed < OPEN_TIME_LIMIT_S, f"open took {elapsed:.2f} s"
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{Path(path)}: "), message
    return info.value


def write(tmp_path: Path, raw: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(raw)
    return path


def one_tensor(dims, ggml_type=F32, offset=0, *, data: bytes = b"\0" * 64, **kw) -> bytes:
    """A file with BASE's metadata and one tensor named 'w'."""
    return build(BASE_KVS, [tensor_info("w", dims, ggml_type, offset)], data, **kw)


def tensors(*infos, data_size=256, kvs=BASE_KVS, **kw) -> bytes:
    """A file with BASE's metadata and the given (name, dims, type, offset) tensors."""
    return build(kvs, [tensor_info(*info) for info in infos], b"\0" * data_size, **kw)


def kvs_only(*entries: bytes, **kw) -> bytes:
    """A file of just these kv entries, ending right after the last one (no padding)."""
    return build(entries, alignment=1, **kw)


def alignment_file(value_type: int, value) -> bytes:
    return build([*BASE_KVS, kv("general.alignment", value_type, value)], BASE_TENSORS, BASE_DATA)


def tail_past_end(key: bytes, value_type: int, payload: bytes) -> bytes:
    """One kv at the end of the file whose payload is given raw."""
    return kvs_only(string(key) + u32(value_type) + payload)


CASES: dict[str, tuple[bytes, str]] = {
    # --- header ---
    "magic GGUX": (build(magic=b"GGUX"), r"bad magic b'GGUX', expected b'GGUF': not a GGUF file"),
    "magic lowercase": (build(magic=b"gguf"), "bad magic b'gguf'"),
    "magic reversed": (build(magic=b"FUGG"), "bad magic b'FUGG'"),
    "magic zeros": (b"\0" * 64, r"bad magic b'\\x00\\x00\\x00\\x00'"),
    "magic ggml": (b"lmgg" + BASE[4:], "bad magic b'lmgg'"),
    **{
        f"version {v}": (build(BASE_KVS, BASE_TENSORS, BASE_DATA, version=v), msg)
        for v, msg in [
            (0, r"unsupported GGUF version 0; supported: 2, 3"),
            (1, r"unsupported GGUF version 1;"),
            (4, r"unsupported GGUF version 4;"),
            (0x300, r"unsupported GGUF version 768;"),
            (MAX32, r"unsupported GGUF version 4294967295 \(a big-endian file\?\)"),
            (0x03000000, r"unsupported GGUF version 50331648 \(a big-endian file\?\)"),
            (0x02000000, r"unsupported GGUF version 33554432 \(a big-endian file\?\)"),
        ]
    },
    "big-endian file": (
        b"GGUF"
        + struct.pack(">IQQ", 3, 0, 1)
        + struct.pack(">Q", 1)
        + b"k"
        + struct.pack(">I", 4)
        + struct.pack(">I", 7),
        r"unsupported GGUF version 50331648 \(a big-endian file\?\)",
    ),
    **{
        f"kv_count {n}": (
            build(BASE_KVS, BASE_TENSORS, BASE_DATA, kv_count=n),
            rf"kv_count {n} cannot fit in the \d+ bytes that remain",
        )
        for n in (BIG, MAX64, 2**32, 2**40)
    },
    "kv_count one too many": (
        kvs_only(*BASE_KVS, kv_count=len(BASE_KVS) + 1),
        "truncated file: metadata key #5 length needs 8 bytes",
    ),
    **{
        f"tensor_count {n}": (
            build(BASE_KVS, BASE_TENSORS, BASE_DATA, tensor_count=n),
            rf"tensor_count {n} cannot fit in the \d+ bytes that remain",
        )
        for n in (BIG, MAX64, 2**32)
    },
    "tensor_count one too many, nothing after": (
        kvs_only(*BASE_KVS, tensor_count=1),
        "tensor_count 1 cannot fit in the 0 bytes that remain",
    ),
    "tensor_count one too many, data after": (
        build(BASE_KVS, BASE_TENSORS, b"\0" * 256, tensor_count=3),
        "tensor '': n_dims 0 is outside 1..4",  # the zeroed data read as a third tensor info
    ),
    # --- strings past the end of the file ---
    **{
        f"key length {n}": (
            kvs_only(string(b"abc", length=n) + u32(UINT8) + b"\1"),
            rf"metadata key #0: string length {n} runs past the end of the file",
        )
        for n in (BIG, MAX64, 9)  # 9: one byte more than the 8 that remain
    },
    "key length past end, later entry": (
        kvs_only(*BASE_KVS, string(b"k", length=2**40) + u32(UINT8) + b"\1"),
        r"metadata key #5: string length 1099511627776 runs past the end of the file",
    ),
    **{
        f"value length {n}": (
            tail_past_end(b"k", STRING, string(b"abc", length=n)),
            rf"metadata 'k': string length {n} runs past the end of the file",
        )
        for n in (BIG, MAX64, 4)
    },
    "value length field cut": (
        tail_past_end(b"k", STRING, b"\3\0\0"),
        r"truncated file: metadata 'k' length needs 8 bytes",
    ),
    **{
        f"array element length {n}": (
            tail_past_end(
                b"k", ARRAY, u32(STRING) + u64(2) + string("a") + string(b"bc", length=n)
            ),
            rf"metadata 'k' element: string length {n} runs past the end of the file",
        )
        for n in (BIG, MAX64, 3)
    },
    **{
        f"tensor name length {n}": (
            build(
                BASE_KVS, [string(b"w", length=n) + u32(1) + u64(8) + u32(F32) + u64(0)], b"\0" * 32
            ),
            rf"tensor #0 name: string length {n} runs past the end of the file",
        )
        for n in (BIG, MAX64, 2**32)
    },  # fmt: skip
    "tensor name length past end, second tensor": (
        build(BASE_KVS, [BASE_TENSORS[0], string(b"b", length=BIG) + b"\0" * 40], BASE_DATA),
        rf"tensor #1 name: string length {BIG} runs past the end of the file",
    ),
    # --- arrays ---
    **{
        f"array count {n} of {name}": (
            tail_past_end(b"k", ARRAY, u32(elem) + u64(n) + b"\0" * 16),
            rf"metadata 'k': array of {n} {name} runs past the end of the file",
        )
        for (elem, name), n in itertools.product(
            [(UINT8, "UINT8"), (BOOL, "BOOL"), (INT32, "INT32"), (FLOAT64, "FLOAT64")],
            (BIG, MAX64, 17),
        )
    },
    **{
        f"string array count {n}": (
            tail_past_end(b"k", ARRAY, u32(STRING) + u64(n) + string("a") + string("b")),
            rf"metadata 'k': string array count {n} cannot fit in the 18 bytes that remain",
        )
        for n in (BIG, MAX64, 2**32)
    },
    "string array count one too many": (
        tail_past_end(b"k", ARRAY, u32(STRING) + u64(3) + string("a") + string("b") + b"\0" * 6),
        r"truncated file: metadata 'k' element length needs 8 bytes",
    ),
    "array element type cut": (
        tail_past_end(b"k", ARRAY, b"\x08\0"),
        r"truncated file: element type of 'k' needs 4 bytes",
    ),
    "array count cut": (
        tail_past_end(b"k", ARRAY, u32(UINT8) + b"\1\0\0\0"),
        r"truncated file: element count of 'k' needs 8 bytes",
    ),
    "nested array": (
        tail_past_end(b"k", ARRAY, u32(ARRAY) + u64(1) + u32(UINT8) + u64(1) + b"\1"),
        r"metadata 'k': nested arrays are not supported",
    ),
    "nested array, huge count": (
        tail_past_end(b"k", ARRAY, u32(ARRAY) + u64(BIG)),
        r"metadata 'k': nested arrays are not supported",
    ),
    "nested empty array": (
        tail_past_end(b"k", ARRAY, u32(ARRAY) + u64(0)),
        r"metadata 'k': nested arrays are not supported",
    ),
    # --- value types ---
    **{
        f"value type {t}": (
            tail_past_end(b"k", t, b"\0" * 16),
            rf"metadata 'k': unknown value type id {t}",
        )
        for t in (13, 14, 255, 0x0100, MAX32)
    },
    **{
        f"array element type {t}": (
            tail_past_end(b"k", ARRAY, u32(t) + u64(1) + b"\0" * 16),
            rf"metadata 'k': unknown value type id {t}",
        )
        for t in (13, MAX32)
    },
    "value type cut": (
        kvs_only(string("general.name") + b"\4\0"),
        r"truncated file: type of 'general.name' needs 4 bytes",
    ),
    "scalar value cut": (
        tail_past_end(b"k", UINT64, b"\0" * 7),
        r"truncated file: metadata 'k' needs 8 bytes",
    ),
    # --- keys and values ---
    "empty key": (kvs_only(kv("", UINT8, 1)), "metadata key #0 is empty"),
    "duplicate key": (
        build([*BASE_KVS, kv("llama.block_count", UINT32, 3)], BASE_TENSORS, BASE_DATA),
        "duplicate metadata key 'llama.block_count'",
    ),
    "duplicate key, different type": (
        kvs_only(kv("k", UINT8, 1), kv("k", STRING, "x")),
        "duplicate metadata key 'k'",
    ),
    **{
        f"invalid UTF-8 key {bad!r}": (
            kvs_only(kv(b"key" + bad, UINT8, 1)),
            r"metadata key #0: string at offset 32 is not valid UTF-8",
        )
        for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80")
    },
    "invalid UTF-8 value": (
        kvs_only(kv("general.name", STRING, b"caf\xe9")),
        r"metadata 'general.name': string at offset \d+ is not valid UTF-8",
    ),
    "invalid UTF-8 array element": (
        kvs_only(kv("tokenizer.ggml.tokens", ARRAY, (STRING, [b"ok", b"\xfe"]))),
        r"metadata 'tokenizer.ggml.tokens' element: string at offset \d+ is not valid UTF-8",
    ),
    "invalid UTF-8 tensor name": (
        build(BASE_KVS, [tensor_info(b"w\xff", (8,), F32, 0)], b"\0" * 32),
        r"tensor #0 name: string at offset \d+ is not valid UTF-8",
    ),
    **{
        f"bool {v}": (
            kvs_only(kv("t.flag", BOOL, v)),
            rf"metadata 't.flag': bool value {v} is neither",
        )
        for v in (2, 0x80, 0xFF)
    },
    "bool array with 2": (
        kvs_only(kv("t.flags", ARRAY, (BOOL, [0, 1, 2, 1]))),
        "metadata 't.flags': bool array holds values other than 0 and 1",
    ),
    # --- general.alignment ---
    **{
        f"alignment {t} {v}": (
            alignment_file(t, v),
            rf"general.alignment {v} is not a power of two",
        )
        for t, v in [
            (UINT32, 0),
            (UINT32, 3),
            (UINT32, 48),
            (UINT32, 31),
            (UINT32, MAX32),
            (UINT32, 2**21),
            (UINT64, BIG),
            (UINT64, MAX64),
            (INT32, -32),
            (INT64, -BIG),
            (UINT8, 0),
            (UINT8, 255),
        ]
    },  # fmt: skip
    **{
        f"alignment as {name}": (
            alignment_file(t, v),
            rf"metadata 'general.alignment' has type {name}, expected an integer",
        )
        for t, v, name in [
            (STRING, "32", "STRING"),
            (FLOAT32, 32.0, "FLOAT32"),
            (FLOAT64, 32.0, "FLOAT64"),
            (BOOL, 1, "BOOL"),
            (ARRAY, (UINT32, [32]), r"ARRAY\[UINT32\]"),
        ]
    },
    # --- tensor infos ---
    **{
        f"n_dims {n}": (
            build(BASE_KVS, [tensor_info("w", (8,) * min(n, 5), F32, 0, n_dims=n)], b"\0" * 64),
            rf"tensor 'w': n_dims {n} is outside 1\.\.4",
        )
        for n in (0, 5, 16, MAX32)
    },
    **{
        f"dims {dims}": (one_tensor(dims), rf"tensor 'w': dimension {d} is 0, outside")
        for dims, d in [((0,), 0), ((8, 0), 1), ((8, 1, 1, 0), 3)]
    },
    **{
        f"dims {dims}": (
            one_tensor(dims),
            rf"tensor 'w': dimension {d} is {dims[d]}, outside 1\.\.",
        )
        for dims, d in [
            ((BIG,), 0),
            ((MAX64,), 0),
            ((8, BIG), 1),
            ((2**40 + 1,), 0),
            ((1, 1, 1, MAX64), 3),
        ]
    },  # fmt: skip
    **{
        f"elements overflow {dims}": (
            one_tensor(dims),
            rf"tensor 'w': {prod} elements is more than {2**48}",
        )
        for dims, prod in [
            ((2**32, 2**32), 2**64),  # wraps to 0 in 64-bit arithmetic
            ((2**16,) * 4, 2**64),
            ((2**40, 2**40), 2**80),
            ((2**33, 2**33, 2**33), 2**99),
            ((2**24, 2**24, 2), 2**49),
        ]
    },
    "element count in range, bytes far past the end": (
        one_tensor((2**24, 2**24)),
        rf"tensor 'w': data \[0, {2**50}\) runs past the end of the data section \(64 bytes\)",
    ),
    **{
        f"ggml type {t}": (one_tensor((32,), t), rf"tensor 'w': unknown ggml type id {t}")
        for t in (4, 5, 31, 32, 33, 36, 37, 38, 9999, MAX32)
    },
    **{
        f"row length {dims} {name}": (
            one_tensor(dims, t),
            rf"tensor 'w': row length {dims[0]} is not a multiple of the {name} block size {block}",
        )
        for dims, t, name, block in [
            ((16, 2), Q4_1, "Q4_1", 32),
            ((33,), Q8_0, "Q8_0", 32),
            ((128, 2), Q4_K, "Q4_K", 256),
            ((1, 32), Q8_0, "Q8_0", 32),
        ]
    },
    "tensor info shorter than the smallest": (
        build(BASE_KVS, [string("w") + u32(1) + u64(8) + b"\0\0"], alignment=1),
        r"tensor_count 1 cannot fit in the 23 bytes that remain",
    ),
    "tensor type cut": (
        build(BASE_KVS, [string("w" * 20) + u32(1) + u64(8) + b"\0\0"], alignment=1),
        rf"truncated file: tensor '{'w' * 20}' type needs 4 bytes",
    ),
    "tensor offset cut": (
        build(BASE_KVS, [string("w") + u32(1) + u64(8) + u32(F32) + b"\0" * 7], alignment=1),
        r"truncated file: tensor 'w' offset needs 8 bytes",
    ),
    # --- tensor data layout ---
    **{
        f"offset {off}": (
            one_tensor((8,), F32, off),
            rf"tensor 'w': data \[{off}, {off + 32}\) runs past the end of the data section "
            r"\(64 bytes\)",
        )
        for off in (64, 96, 2**32, BIG, MAX64 - 31)  # all multiples of 32
    },
    "tensor one byte past the end": (
        one_tensor((16,), F32, 0, data=b"\0" * 63),
        r"tensor 'w': data \[0, 64\) runs past the end of the data section \(63 bytes\)",
    ),
    "tensor with no data section": (
        one_tensor((8,), F32, 0, data=b""),
        r"tensor 'w': data \[0, 32\) runs past the end of the data section \(0 bytes\)",
    ),
    "second tensor past the end": (
        tensors(("a", (8,), F32, 0), ("b", (32,), F32, 32), data_size=150),
        r"tensor 'b': data \[32, 160\) runs past the end of the data section \(150 bytes\)",
    ),
    **{
        f"misaligned offset {off}": (
            one_tensor((8,), F32, off),
            rf"tensor 'w': offset {off} is not aligned to 32 bytes",
        )
        for off in (1, 4, 16, 31, 33, MAX64)
    },
    "misaligned for custom alignment": (
        tensors(
            ("w", (8,), F32, 32), kvs=[*BASE_KVS, kv("general.alignment", UINT32, 64)], alignment=64
        ),
        r"tensor 'w': offset 32 is not aligned to 64 bytes",
    ),  # fmt: skip
    "same offset": (
        tensors(("a", (8,), F32, 0), ("b", (8,), F32, 0)),
        r"tensors 'a' and 'b' overlap \(offsets 0 and 0\)",
    ),
    "partial overlap": (
        tensors(("a", (16,), F32, 0), ("b", (8,), F32, 32)),
        r"tensors 'a' and 'b' overlap \(offsets 0 and 32\)",
    ),
    "overlap, listed out of order": (
        tensors(("c", (8,), F32, 128), ("b", (8,), F32, 32), ("a", (64,), F32, 0)),
        r"tensors 'a' and 'b' overlap \(offsets 0 and 32\)",
    ),
    "contained tensor": (
        tensors(("big", (32,), F32, 0), ("small", (8,), F32, 64)),
        r"tensors 'big' and 'small' overlap \(offsets 0 and 64\)",
    ),
    "duplicate tensor name": (
        tensors(("a", (8,), F32, 0), ("b", (8,), F32, 32), ("a", (8,), F32, 64)),
        "duplicate tensor name 'a'",
    ),
    "data section starts past the end": (
        build(BASE_KVS, BASE_TENSORS, alignment=1),  # file ends inside the padding
        r"truncated file: data section would start at \d+, past the end \(\d+ bytes\)",
    ),
    # --- short files ---
    "one byte": (b"G", r"truncated file: 1 bytes is shorter than a GGUF header"),
    "magic only": (b"GGUF", r"truncated file: 4 bytes is shorter than a GGUF header"),
    "header minus one byte": (build()[:23], r"23 bytes is shorter than a GGUF header"),
}


@pytest.mark.parametrize(("raw", "match"), list(CASES.values()), ids=list(CASES))
def test_malformed(tmp_path, raw, match):
    expect_error(write(tmp_path, raw), match)


def test_duplicate_tensor_name_reported_before_later_infos(tmp_path):
    infos = [
        tensor_info("a", (8,), F32, 0),
        tensor_info("a", (8,), F32, 32),
        tensor_info("c", (8,), 9999, 64),  # never reached if the duplicate is caught at once
    ]
    expect_error(write(tmp_path, build(BASE_KVS, infos, b"\0" * 96)), "duplicate tensor name 'a'")


def test_base_file_is_valid(tmp_path):
    # The cases above are small edits of BASE, so BASE itself must parse, and must have padding
    # before its data, and data to its last byte.
    f = open_gguf(write(tmp_path, BASE))
    assert list(f.tensors) == ["a", "b"] and len(f.metadata) == len(BASE_KVS)
    assert f.data_offset + f.tensor("b").offset + f.tensor("b").nbytes == len(BASE)
    assert BASE[f.data_offset - 1] == 0 and f.tensor_data("b").tobytes() == BASE_DATA[32:]
    # the truncated-padding case really ends inside the padding
    assert len(CASES["data section starts past the end"][0]) < f.data_offset


def test_every_truncation_of_small_file(tmp_path):
    """Every proper prefix of BASE (which ends with tensor data) is malformed."""
    failures = []
    for n in range(len(BASE)):
        path = write(tmp_path, BASE[:n], f"prefix{n}.gguf")
        start = time.perf_counter()
        try:
            open_gguf(path)
        except GGUFError as exc:
            if "\n" in str(exc) or not str(exc).startswith(f"{path}: "):
                failures.append(f"{n}: badly formed message {exc!r}")
        except Exception as exc:  # noqa: BLE001 - that is the bug being looked for
            failures.append(f"{n}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{n}: prefix parsed")
        if time.perf_counter() - start >= OPEN_TIME_LIMIT_S:
            failures.append(f"{n}: took {time.perf_counter() - start:.2f} s")
        path.unlink()
    assert not failures, "\n".join(failures)


# Prefixes of the real model: a number of bytes, or a section mark (see smollm2_marks) +/- bytes.
SMOLLM2_CUTS = [
    (0, r"0 bytes is shorter than a GGUF header"),
    (4, r"4 bytes is shorter than a GGUF header"),
    (16, r"16 bytes is shorter than a GGUF header"),
    (23, r"23 bytes is shorter than a GGUF header"),
    (24, r"kv_count 33 cannot fit in the 0 bytes that remain"),  # end of header
    (300, r"kv_count 33 cannot fit in the 276 bytes that remain"),
    # inside kv: a key, an array header, array elements, a string value
    ("tokens+20", r"metadata key #24: string length 21 runs past the end of the file"),
    ("tokens+60", r"'tokenizer.ggml.tokens': string array count 49152 cannot fit in the 15 "),
    ("tokens+400000", r"'tokenizer.ggml.tokens' element: string length 14 runs past the end"),
    ("token_type+40", r"truncated file: element type of 'tokenizer.ggml.token_type' needs 4"),
    ("token_type+60", r"'tokenizer.ggml.token_type': array of 49152 INT32 runs past the end"),
    ("merges+40", r"truncated file: element count of 'tokenizer.ggml.merges' needs 8 bytes"),
    ("merges+300000", r"'tokenizer.ggml.merges': string array count 48900 cannot fit"),
    ("merges+500000", r"'tokenizer.ggml.merges' element: string length \d+ runs past the end"),
    ("template+100", r"'tokenizer.chat_template': string length 368 runs past the end"),
    # tensor infos
    ("infos", r"tensor_count 272 cannot fit in the 0 bytes that remain"),  # end of kv
    ("infos+3", r"tensor_count 272 cannot fit in the 3 bytes that remain"),
    ("infos+12000", r"tensor #201 name: string length 22 runs past the end of the file"),
    ("last_info+4", r"truncated file: tensor #271 name length needs 8 bytes"),
    ("last_info+20", r"tensor #271 name: string length 18 runs past the end of the file"),
    ("last_info+30", r"truncated file: tensor 'output_norm.weight' dim 0 needs 8 bytes"),
    ("data-1", r"truncated file: tensor 'output_norm.weight' offset needs 8 bytes"),
    # data
    ("data", r"'token_embd.weight': data \[0, 30081024\) runs past .* \(0 bytes\)"),
    ("data+1000", r"'token_embd.weight': data \[0, 30081024\) runs past .* \(1000 bytes\)"),
    ("half", r"tensor 'blk\.15\.attn_output\.weight': data \[\d+, \d+\) runs past the end"),
    ("end-1", r"'output_norm.weight': data \[96574464, 96576768\) runs past .* \(96576767 "),
]


@pytest.mark.parametrize(("cut", "match"), SMOLLM2_CUTS, ids=[str(c) for c, _ in SMOLLM2_CUTS])
def test_truncated_smollm2(tmp_path, smollm2_path, smollm2_marks, cut, match):
    if isinstance(cut, str):
        base, _, delta = cut.partition("+")
        base, _, minus = base.partition("-")
        cut = smollm2_marks[base] + int(delta or 0) - int(minus or 0)
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(cut))
    assert path.stat().st_size == cut
    expect_error(path, match)


@pytest.fixture(scope="module")
def smollm2_path(default_model_path) -> str:
    return str(default_model_path)


@pytest.fixture(scope="module")
def smollm2_marks(smollm2_path) -> dict[str, int]:
    """Section boundaries of the real file, found by searching for length-prefixed names."""
    size = os.path.getsize(smollm2_path)
    with open(smollm2_path, "rb") as f:
        head = f.read(2 << 20)

    def entry(name: str) -> int:
        at = head.find(string(name))
        assert at > 0, name
        return at

    marks = {
        "tokens": entry("tokenizer.ggml.tokens"),
        "token_type": entry("tokenizer.ggml.token_type"),
        "merges": entry("tokenizer.ggml.merges"),
        "template": entry("tokenizer.chat_template"),
        "infos": entry("token_embd.weight"),
        "last_info": entry("output_norm.weight"),
        "end": size,
        "half": size // 2,
    }
    # the last tensor info is 18-byte name, n_dims 1, one dim, type, offset; data follows it
    # directly in this file (already 32-aligned)
    marks["data"] = marks["last_info"] + 8 + 18 + 4 + 8 + 4 + 8
    assert marks["data"] % 32 == 0
    return marks


# --- paths that are not GGUF files at all ---


def test_empty_file(tmp_path):
    expect_error(write(tmp_path, b""), r"truncated file: 0 bytes is shorter than a GGUF header")


def test_directory(tmp_path):
    expect_error(tmp_path, "not a regular file")


def test_directory_named_like_a_model(tmp_path):
    (tmp_path / "model.gguf").mkdir()
    expect_error(tmp_path / "model.gguf", "not a regular file")


def test_nonexistent_path(tmp_path):
    expect_error(tmp_path / "missing.gguf", "cannot open: No such file or directory")


def test_path_under_a_file(tmp_path):
    expect_error(write(tmp_path, BASE) / "x.gguf", "cannot open: Not a directory")


def test_dangling_symlink(tmp_path):
    (tmp_path / "link.gguf").symlink_to(tmp_path / "missing.gguf")
    expect_error(tmp_path / "link.gguf", "cannot open")


def test_symlink_to_directory(tmp_path):
    (tmp_path / "link.gguf").symlink_to(tmp_path)
    expect_error(tmp_path / "link.gguf", "not a regular file")


def test_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.gguf")
    expect_error(tmp_path / "pipe.gguf", "not a regular file")


def test_device_file():
    expect_error("/dev/zero", "not a regular file")


def test_name_too_long(tmp_path):
    expect_error(tmp_path / ("m" * 300), "cannot open: File name too long")


def test_path_with_nul_byte(tmp_path):
    expect_error(f"{tmp_path}/model\0.gguf", "cannot open")


# --- metadata of the wrong type for keys that are read ---


@pytest.mark.parametrize(
    ("entry", "getter", "match"),
    [
        (kv("general.architecture", UINT32, 1), "get_str", "has type UINT32, expected STRING"),
        (kv("llama.block_count", STRING, "30"), "get_int", "has type STRING, expected an integer"),
        (kv("llama.block_count", FLOAT32, 30.0), "get_int", "has type FLOAT32, expected an int"),
        (kv("llama.rope.freq_base", STRING, "1e4"), "get_float", "has type STRING, expected a nu"),
        (kv("tokenizer.ggml.add_bos_token", UINT8, 1), "get_bool", "has type UINT8, expected BOOL"),
        (kv("tokenizer.ggml.tokens", ARRAY, (INT32, [1])), "get_str_list",
         r"has type ARRAY\[INT32\], expected ARRAY\[STRING\]"),
        (kv("tokenizer.ggml.tokens", STRING, "a b"), "get_str_list",
         r"has type STRING, expected ARRAY\[STRING\]"),
        (kv("tokenizer.ggml.token_type", ARRAY, (FLOAT32, [1.0])), "get_int_array",
         r"has type ARRAY\[FLOAT32\], expected an integer array"),
        (kv("tokenizer.ggml.scores", ARRAY, (STRING, ["x"])), "get_float_array",
         r"has type ARRAY\[STRING\], expected a number array"),
        (kv("tokenizer.ggml.scores", FLOAT32, 0.5), "get_float_array",
         "has type FLOAT32, expected a number array"),
    ],
)  # fmt: skip
def test_metadata_wrong_type(tmp_path, entry, getter, match):
    f = open_gguf(write(tmp_path, build([entry], BASE_TENSORS, BASE_DATA)))
    key = next(iter(f.metadata))
    with pytest.raises(GGUFError, match=rf"metadata '{key}' {match}"):
        getattr(f.metadata, getter)(key)


# --- random damage ---

_VALUES = [0, 1, 2, 3, 4, 5, 9, 13, 31, 33, 0xFF, 2**31, MAX32, 2**32, 2**40, 2**48, BIG, MAX64]
_files = itertools.count()


def _field_starts() -> list[int]:
    """Where BASE's counts, lengths, type ids, dims and offsets start: the places to hit."""
    starts, pos = [4, 8, 16], 24
    for key, value_type, v in BASE_KV_SPECS:
        n = len(key)
        starts += [pos, pos + 8 + n, pos + 12 + n]  # key length, type, value / element type
        if value_type == ARRAY:
            starts.append(pos + 16 + n)  # element count
        pos += len(kv(key, value_type, v))
    for name, dims, ggml_type, offset in BASE_TENSOR_SPECS:
        at_dims = pos + 12 + len(name)
        starts += [pos, at_dims - 4, *range(at_dims, at_dims + 8 * len(dims) + 5, 4)]
        pos += len(tensor_info(name, dims, ggml_type, offset))
    return starts


FIELD_STARTS = _field_starts()


@st.composite
def damaged(draw) -> bytes:
    raw = bytearray(BASE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.sampled_from(FIELD_STARTS) | st.integers(0, len(raw) - 1))
        kind = draw(st.sampled_from(["byte", "bit", "u32", "u64"]))
        if kind == "byte":
            raw[at] = draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        elif kind == "bit":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        else:
            fmt = "<I" if kind == "u32" else "<Q"
            value = draw(st.sampled_from(_VALUES)) & (MAX32 if kind == "u32" else MAX64)
            packed = struct.pack(fmt, value)
            raw[at : at + len(packed)] = packed[: len(raw) - at]
    if draw(st.booleans()):
        del raw[draw(st.integers(0, len(raw))) :]
    return bytes(raw)


@settings(
    max_examples=300,
    deadline=1000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=damaged())
def test_random_damage_parses_or_raises_gguf_error(tmp_path, raw):
    # a fresh name each time: never rewrite a file that an earlier example may still have mapped
    path = write(tmp_path, raw, f"fuzz{next(_files)}.gguf")
    start = time.perf_counter()
    try:
        f = open_gguf(path)
    except GGUFError as exc:
        assert "\n" not in str(exc)
    else:
        # whatever parsed must be usable: every tensor inside the file, every getter typed
        for name, info in f.tensors.items():
            assert f.data_offset + info.offset + info.nbytes <= len(raw)
            assert f.tensor_data(name).size == info.nbytes
        for key in f.metadata:
            for getter in ("get_int", "get_float", "get_bool", "get_str", "get_str_list",
                           "get_int_array", "get_float_array"):  # fmt: skip
                try:
                    getattr(f.metadata, getter)(key)
                except GGUFError:
                    pass
    finally:
        assert time.perf_counter() - start < OPEN_TIME_LIMIT_S
        path.unlink()


# --- counts that fit in the file but no real model has: refused before any long loop ---


def test_tensor_count_over_cap_refused_fast(tmp_path):
    from loader.gguf_file import MAX_TENSORS

    raw = build(tensor_count=MAX_TENSORS + 1) + bytes(40 * (MAX_TENSORS + 1))
    expect_error(write(tmp_path, raw), rf"tensor_count {MAX_TENSORS + 1} is more than")


def test_kv_count_over_cap_refused_fast(tmp_path):
    from loader.gguf_file import MAX_KV

    raw = build(kv_count=MAX_KV + 1) + bytes(16 * (MAX_KV + 1))
    expect_error(write(tmp_path, raw), rf"kv_count {MAX_KV + 1} is more than")
