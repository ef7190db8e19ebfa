"""Build GGUF files byte by byte for tests.

Nothing here validates: every count, length, type id, dimension and offset is written exactly as
given, so a test can build a deliberately broken file as easily as a good one. Each helper returns
`bytes`; `build` glues header, kv entries, tensor infos, padding and data together.

    data_offsets, data = place([blob_a, blob_b])
    raw = build(
        [kv("general.architecture", STRING, "llama"), kv("n", ARRAY, (UINT32, [1, 2]))],
        [tensor_info("a", (4,), F32, data_offsets[0]), tensor_info("b", (8,), F32, data_offsets[1])],
        data,
    )
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value type ids.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = (
    range(13)
)
# A few ggml tensor type ids.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K = 0, 1, 2, 3, 8, 12

_SCALAR = {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
    FLOAT32: "<f", BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d",
}  # fmt: skip


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def string(text: str | bytes, length: int | None = None) -> bytes:
    """u64 length + bytes; `length` overrides the written length (the bytes stay as given)."""
    data = text.encode() if isinstance(text, str) else text
    return u64(len(data) if length is None else length) + data


def array(elem_type: int, items: Sequence[Any], count: int | None = None) -> bytes:
    """An ARRAY value's payload: u32 element type, u64 count (overridable), the elements."""
    n = len(items) if count is None else count
    return u32(elem_type) + u64(n) + b"".join(value(elem_type, item) for item in items)


def value(value_type: int, v: Any) -> bytes:
    """A value's payload for a type id: STRING takes str/bytes, ARRAY takes (elem_type, items),
    scalars take a number; `bytes` given for any other type are written as they are."""
    if value_type == STRING:
        return string(v)
    if isinstance(v, bytes):
        return v
    if value_type == ARRAY:
        return array(*v)
    return struct.pack(_SCALAR[value_type], v)


def kv(key: str | bytes, value_type: int, v: Any) -> bytes:
    """One metadata entry; `v` as for `value` (pass bytes for a hand-made payload)."""
    return string(key) + u32(value_type) + value(value_type, v)


def tensor_info(
    name: str | bytes, dims: Sequence[int], ggml_type: int, offset: int, n_dims: int | None = None
) -> bytes:
    """One tensor info; `n_dims` overrides the written count (the dims stay as given)."""
    n = len(dims) if n_dims is None else n_dims
    return string(name) + u32(n) + b"".join(map(u64, dims)) + u32(ggml_type) + u64(offset)


def header(tensor_count: int, kv_count: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + u32(version) + u64(tensor_count) + u64(kv_count)


def padding(offset: int, alignment: int = 32) -> bytes:
    return b"\0" * (-offset % alignment)


def build(
    kvs: Iterable[bytes] = (),
    tensors: Iterable[bytes] = (),
    data: bytes = b"",
    *,
    alignment: int = 32,
    version: int = 3,
    magic: bytes = b"GGUF",
    tensor_count: int | None = None,
    kv_count: int | None = None,
) -> bytes:
    """A whole file; counts default to the number of entries given, padding to `alignment`."""
    kvs, tensors = list(kvs), list(tensors)
    head = header(
        len(tensors) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
        version,
        magic,
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + padding(len(body), alignment) + data


def place(blobs: Iterable[bytes], alignment: int = 32) -> tuple[list[int], bytes]:
    """Lay tensor blobs out back to back, each aligned: (offsets, data section)."""
    offsets, data = [], b""
    for blob in blobs:
        data += padding(len(data), alignment)
        offsets.append(len(data))
        data += blob
    return offsets, data


def nbytes(dims: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor of this type and GGUF dims (the row length must fill whole blocks)."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    n = 1
    for d in dims:
        n *= d
    return n // block * type_size


def pattern(n: int, seed: int = 0) -> bytes:
    """n deterministic, non-repeating-looking bytes for tensor data."""
    return bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(n))
