"""Read a GGUF file by memory map, validating every count, length, offset and type before use.

A GGUF file comes from anywhere, so nothing in it is trusted: each count is checked against the
bytes that remain before anything is allocated from it, each string length against the end of
the file, each tensor's type, dimensions, offset and size against the data section. A malformed
file raises `GGUFError` with a one-line reason that names the field; it never reads out of
bounds and never loops longer than the file is long.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
then kv_count (key, u32 value type, value), then tensor_count (name, u32 n_dims, u64 dims[n_dims],
u32 ggml type, u64 offset), then padding to `general.alignment` (default 32), then tensor data.
Tensor offsets are relative to the start of the data section.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from loader.errors import GGUFError
from loader.metadata import Metadata

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# No real tensor has a dimension near these; they only keep arithmetic on crafted values sane.
MAX_DIM = 1 << 40
MAX_ELEMENTS = 1 << 48
MAX_ALIGNMENT = 1 << 20
# Far above any real file (~1k tensors, ~50 metadata keys, vocabularies up to ~260k tokens),
# low enough that a crafted file cannot make parsing take seconds.
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_STRING_ARRAY = 1 << 22

_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
_VALUE_TYPES = {int(t): t for t in GGUFValueType}
_GGML_TYPES = {int(t): t for t in GGMLQuantizationType}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Smallest possible encodings, used to bound counts by the bytes that remain.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


@dataclass(slots=True, frozen=True)
class TensorInfo:
    """One tensor's header entry; `dims` in GGUF order (innermost first), `offset` from the
    start of the data section."""

    name: str
    dims: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The torch shape (outermost first): GGUF dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    __slots__ = ("view", "pos", "size")

    def __init__(self, view: memoryview, pos: int = 0) -> None:
        self.view = view
        self.pos = pos
        self.size = len(view)

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > self.size - self.pos:
            raise GGUFError(
                f"truncated file: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"only {self.size - self.pos} remain"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.view, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.view, self.pos)
        self.pos += 8
        return value

    def scalar(self, value_type: GGUFValueType, what: str) -> Any:
        fmt = _SCALAR_FORMATS[value_type]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += size
        if value_type == GGUFValueType.BOOL:
            if value > 1:
                raise GGUFError(f"{what}: bool value {value} is neither 0 nor 1")
            return bool(value)
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"{what} length")
        if length > self.size - self.pos:
            raise GGUFError(
                f"{what}: string length {length} runs past the end of the file "
                f"(offset {self.pos}, {self.size - self.pos} bytes remain)"
            )
        start = self.pos
        self.pos += length
        try:
            return str(self.view[start : self.pos], "utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what}: string at offset {start} is not valid UTF-8") from exc


class GGUFFile:
    """A parsed, validated GGUF file: `metadata`, `tensors` (by name, in file order), raw data.

    Tensor data stays in the memory map; `tensor_data(name)` returns a zero-copy uint8 view.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.file_size = self.path.stat().st_size
        except OSError as exc:
            raise GGUFError(f"{self.path}: cannot open: {exc.strerror}") from exc
        except ValueError as exc:  # e.g. an embedded NUL byte in the path
            raise GGUFError(f"{self.path}: cannot open: {exc}") from exc
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a regular file")
        if self.file_size < 4 + 4 + 8 + 8:
            raise GGUFError(
                f"{self.path}: truncated file: {self.file_size} bytes is shorter than a GGUF header"
            )
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise GGUFError(f"{self.path}: cannot map file: {exc}") from exc
        try:
            self._parse(memoryview(self._map))
        except GGUFError as exc:
            raise GGUFError(f"{self.path}: {exc}") from None

    def _parse(self, view: memoryview) -> None:
        cur = _Cursor(view)
        magic = bytes(view[:4])
        cur.pos = 4
        if magic != GGUF_MAGIC:
            raise GGUFError(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}: not a GGUF file")
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFError(
                f"unsupported GGUF version {self.version}{hint}; supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        tensor_count = cur.u64("tensor_count")
        kv_count = cur.u64("kv_count")
        if kv_count > cur.remaining() // _MIN_KV_BYTES:
            raise GGUFError(
                f"kv_count {kv_count} cannot fit in the {cur.remaining()} bytes that remain"
            )
        if kv_count > MAX_KV:
            raise GGUFError(f"kv_count {kv_count} is more than {MAX_KV}")
        self.metadata = Metadata(self._read_metadata(cur, kv_count))
        if tensor_count > cur.remaining() // _MIN_TENSOR_INFO_BYTES:
            raise GGUFError(
                f"tensor_count {tensor_count} cannot fit in the {cur.remaining()} bytes that remain"
            )
        if tensor_count > MAX_TENSORS:
            raise GGUFError(f"tensor_count {tensor_count} is more than {MAX_TENSORS}")
        self.alignment = self._read_alignment()
        infos = []
        names: set[str] = set()
        for i in range(tensor_count):
            info = self._read_tensor_info(cur, i)
            if info.name in names:
                raise GGUFError(f"duplicate tensor name {info.name!r}")
            names.add(info.name)
            infos.append(info)
        self.data_offset = _align(cur.pos, self.alignment)
        if infos and self.data_offset > self.file_size:
            raise GGUFError(
                f"truncated file: data section would start at {self.data_offset}, "
                f"past the end ({self.file_size} bytes)"
            )
        self.tensors = self._check_tensor_layout(infos)

    def _read_metadata(self, cur: _Cursor, kv_count: int) -> dict[str, tuple[Any, Any]]:
        entries: dict[str, tuple[Any, Any]] = {}
        for i in range(kv_count):
            key = cur.string(f"metadata key #{i}")
            if not key:
                raise GGUFError(f"metadata key #{i} is empty")
            if key in entries:
                raise GGUFError(f"duplicate metadata key {key!r}")
            value_type = self._value_type(cur.u32(f"type of {key!r}"), key)
            entries[key] = self._read_value(cur, value_type, key)
        return entries

    @staticmethod
    def _value_type(raw: int, key: str) -> GGUFValueType:
        value_type = _VALUE_TYPES.get(raw)
        if value_type is None:
            raise GGUFError(f"metadata {key!r}: unknown value type id {raw}")
        return value_type

    def _read_value(self, cur: _Cursor, value_type: GGUFValueType, key: str) -> tuple[Any, Any]:
        """Returns (type descriptor, value); arrays are described as (ARRAY, element type)."""
        if value_type == GGUFValueType.STRING:
            return value_type, cur.string(f"metadata {key!r}")
        if value_type != GGUFValueType.ARRAY:
            return value_type, cur.scalar(value_type, f"metadata {key!r}")
        elem_type = self._value_type(cur.u32(f"element type of {key!r}"), key)
        count = cur.u64(f"element count of {key!r}")
        if elem_type == GGUFValueType.ARRAY:
            raise GGUFError(f"metadata {key!r}: nested arrays are not supported")
        if elem_type == GGUFValueType.STRING:
            if count > cur.remaining() // 8:
                raise GGUFError(
                    f"metadata {key!r}: string array count {count} cannot fit in the "
                    f"{cur.remaining()} bytes that remain"
                )
            if count > MAX_STRING_ARRAY:
                raise GGUFError(
                    f"metadata {key!r}: string array count {count} is more than {MAX_STRING_ARRAY}"
                )
            what = f"metadata {key!r} element"
            return (value_type, elem_type), [cur.string(what) for _ in range(count)]
        dtype = np.dtype(_NUMPY_DTYPES[elem_type])
        if count > cur.remaining() // dtype.itemsize:
            raise GGUFError(
                f"metadata {key!r}: array of {count} {elem_type.name} runs past the end of the file"
            )
        values = np.frombuffer(cur.view, dtype=dtype, count=count, offset=cur.pos).copy()
        cur.pos += count * dtype.itemsize
        if elem_type == GGUFValueType.BOOL:
            if values.size and values.max() > 1:
                raise GGUFError(f"metadata {key!r}: bool array holds values other than 0 and 1")
            values = values.astype(bool)
        return (value_type, elem_type), values

    def _read_alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return GGUF_DEFAULT_ALIGNMENT
        alignment = self.metadata.get_int("general.alignment")
        if alignment <= 0 or alignment & (alignment - 1) or alignment > MAX_ALIGNMENT:
            raise GGUFError(
                f"general.alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}"
            )
        return alignment

    def _read_tensor_info(self, cur: _Cursor, index: int) -> TensorInfo:
        name = cur.string(f"tensor #{index} name")
        where = f"tensor {name!r}"
        n_dims = cur.u32(f"{where} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"{where}: n_dims {n_dims} is outside 1..{MAX_DIMS}")
        dims = tuple(cur.u64(f"{where} dim {d}") for d in range(n_dims))
        n_elements = 1
        for d, size in enumerate(dims):
            if not 1 <= size <= MAX_DIM:
                raise GGUFError(f"{where}: dimension {d} is {size}, outside 1..{MAX_DIM}")
            n_elements *= size
        if n_elements > MAX_ELEMENTS:
            raise GGUFError(f"{where}: {n_elements} elements is more than {MAX_ELEMENTS}")
        raw_type = cur.u32(f"{where} type")
        ggml_type = _GGML_TYPES.get(raw_type)
        if ggml_type is None or ggml_type not in GGML_QUANT_SIZES:
            raise GGUFError(f"{where}: unknown ggml type id {raw_type}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if dims[0] % block_size:
            raise GGUFError(
                f"{where}: row length {dims[0]} is not a multiple of the {ggml_type.name} "
                f"block size {block_size}"
            )
        offset = cur.u64(f"{where} offset")
        nbytes = n_elements // block_size * type_size
        return TensorInfo(name, dims, ggml_type, offset, nbytes)

    def _check_tensor_layout(self, infos: list[TensorInfo]) -> dict[str, TensorInfo]:
        data_size = self.file_size - self.data_offset
        tensors: dict[str, TensorInfo] = {}
        for info in infos:
            if info.offset % self.alignment:
                raise GGUFError(
                    f"tensor {info.name!r}: offset {info.offset} is not aligned to "
                    f"{self.alignment} bytes"
                )
            if info.offset + info.nbytes > data_size:
                raise GGUFError(
                    f"tensor {info.name!r}: data [{info.offset}, {info.offset + info.nbytes}) "
                    f"runs past the end of the data section ({data_size} bytes)"
                )
            tensors[info.name] = info
        by_offset = sorted(infos, key=lambda t: t.offset)
        for prev, nxt in zip(by_offset, by_offset[1:], strict=False):
            if nxt.offset < prev.offset + prev.nbytes:
                raise GGUFError(
                    f"tensors {prev.name!r} and {nxt.name!r} overlap "
                    f"(offsets {prev.offset} and {nxt.offset})"
                )
        return tensors

    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes as a zero-copy uint8 view of the mapped file."""
        info = self.tensor(name)
        if self._map is None:
            raise GGUFError(f"{self.path}: file is closed")
        start = self.data_offset + info.offset
        return self._map[start : start + info.nbytes]

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        """Drop the memory map (views handed out keep their own reference)."""
        self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file; raises `GGUFError` with a one-line reason if malformed."""
    return GGUFFile(path)
