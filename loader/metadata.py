"""Typed access to GGUF metadata: a key read with the wrong type is a `GGUFError`, not a crash.

Values are stored with the GGUF type they had in the file. Scalars come back as Python values,
numeric arrays as numpy arrays, string arrays as lists of str.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from gguf import GGUFValueType

from loader.errors import GGUFError

_INT_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
_FLOAT_TYPES = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})
_MISSING = object()


def type_name(value_type: Any) -> str:
    """`UINT32`, or `ARRAY[STRING]` for arrays."""
    if isinstance(value_type, tuple):
        return f"ARRAY[{value_type[1].name}]"
    return value_type.name


class Metadata:
    """Read-only mapping of metadata keys to values, with typed getters that validate."""

    def __init__(self, entries: dict[str, tuple[Any, Any]]) -> None:
        self._entries = entries

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def value_type(self, key: str) -> Any:
        return self._entries[key][0]

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The value as stored, whatever its type."""
        if key not in self._entries:
            return self._missing(key, default)
        return self._entries[key][1]

    def _lookup(self, key: str, default: Any, accepted: frozenset, expected: str) -> Any:
        if key not in self._entries:
            return self._missing(key, default)
        value_type, value = self._entries[key]
        if value_type not in accepted:
            raise GGUFError(
                f"metadata {key!r} has type {type_name(value_type)}, expected {expected}"
            )
        return value

    @staticmethod
    def _missing(key: str, default: Any) -> Any:
        if default is _MISSING:
            raise GGUFError(f"required metadata key {key!r} is missing")
        return default

    def get_int(self, key: str, default: Any = _MISSING) -> int:
        return self._lookup(key, default, _INT_TYPES, "an integer")

    def get_float(self, key: str, default: Any = _MISSING) -> float:
        value = self._lookup(key, default, _FLOAT_TYPES | _INT_TYPES, "a number")
        return value if value is None else float(value)

    def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        return self._lookup(key, default, frozenset({GGUFValueType.BOOL}), "BOOL")

    def get_str(self, key: str, default: Any = _MISSING) -> str:
        return self._lookup(key, default, frozenset({GGUFValueType.STRING}), "STRING")

    def get_str_list(self, key: str, default: Any = _MISSING) -> list[str]:
        accepted = frozenset({(GGUFValueType.ARRAY, GGUFValueType.STRING)})
        return self._lookup(key, default, accepted, "ARRAY[STRING]")

    def get_int_array(self, key: str, default: Any = _MISSING) -> np.ndarray:
        accepted = frozenset((GGUFValueType.ARRAY, t) for t in _INT_TYPES)
        return self._lookup(key, default, accepted, "an integer array")

    def get_float_array(self, key: str, default: Any = _MISSING) -> np.ndarray:
        accepted = frozenset((GGUFValueType.ARRAY, t) for t in _FLOAT_TYPES | _INT_TYPES)
        value = self._lookup(key, default, accepted, "a number array")
        return value if value is None else np.asarray(value, dtype=np.float32)
