"""CudaError, and the two checks that turn every driver/NVRTC return code into one.

cuda-python returns `(status, *values)` tuples instead of raising; every call in gpu/cuda goes
through `check_driver` or `check_nvrtc`, which name the call and the error (name and string).
"""

from __future__ import annotations

from typing import Any

from jobs.errors import OrcdError


class CudaError(OrcdError):
    """A CUDA driver or NVRTC call failed, or a kernel cannot be built or launched as asked."""


def _unpack(values: tuple[Any, ...]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def check_driver(result: tuple[Any, ...], call: str) -> Any:
    """Return the values of a `cuda.bindings.driver` result; raise CudaError naming `call`."""
    from cuda.bindings import driver

    status, *values = result
    if status != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(status)
        _, text = driver.cuGetErrorString(status)
        name = name.decode() if name else getattr(status, "name", str(status))
        text = text.decode() if text else "no description"
        raise CudaError(f"{call} failed: {name}: {text}")
    return _unpack(tuple(values))


def check_nvrtc(result: tuple[Any, ...], call: str, log: str = "") -> Any:
    """Return the values of a `cuda.bindings.nvrtc` result; raise CudaError naming `call`
    (with the compile log, when there is one)."""
    from cuda.bindings import nvrtc

    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(status)
        message = f"{call} failed: {status.name}: {text.decode() if text else 'no description'}"
        if log:
            message += "\n" + log
        raise CudaError(message)
    return _unpack(tuple(values))
