"""cuda-python driver API: context, modules, functions and launches on torch's current stream.

torch owns device memory and streams; kernels get `data_ptr()`s. Each launch site owns a
`LaunchSite`: the kernel's argument values live in ctypes cells allocated once, next to the
void*[] array that points at them, so a launch writes a few numbers and calls cuLaunchKernel
(10-13 µs of host time on the lent H100's host, docs/anchors.md). cuLaunchKernel copies the
arguments when it is called, so a site may be reused at once, inside CUDA-graph capture too.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gpu.cuda.errors import CudaError, check_driver
from gpu.cuda.launch import STATIC_SHARED_LIMIT, LaunchConfig
from gpu.cuda.nvrtc import KernelImage

_state = threading.local()
_lock = threading.Lock()
_initialised = False

# Argument kinds a kernel parameter can have, as ctypes cells.
_CELL_TYPES = {"ptr": ctypes.c_uint64, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
               "f32": ctypes.c_float}  # fmt: skip


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - cuda-python is a dependency
        raise CudaError(f"cuda-python is not installed: {exc}") from None
    return driver


def ensure_context() -> None:
    """Initialise the driver and make torch's primary context current on this thread.

    torch uses the device's primary context; retaining it (rather than creating our own) means
    our modules and torch's allocations live in one context. Checked once per thread.
    """
    global _initialised
    if getattr(_state, "ready", False):
        return
    if not torch.cuda.is_available():
        raise CudaError("no CUDA device: torch.cuda.is_available() is False")
    driver = _driver()
    with _lock:
        if not _initialised:
            try:
                check_driver(driver.cuInit(0), "cuInit")
            except RuntimeError as exc:  # cuda.pathfinder could not find libcuda
                raise CudaError(
                    f"cuInit failed: the CUDA driver library is missing: {exc}"
                ) from None
            _initialised = True
    torch.cuda.init()
    index = torch.cuda.current_device()
    context = check_driver(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if int(context) == 0:
        device = check_driver(driver.cuDeviceGet(index), "cuDeviceGet")
        context = check_driver(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        check_driver(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    _state.ready = True


def device_arch() -> str:
    """The current device's compute capability as an NVRTC arch: 'sm_90' on an H100."""
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def multiprocessor_count() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


class Module:
    """A loaded CUBIN/PTX image; `function(name)` looks up an `extern "C"` kernel."""

    def __init__(self, image: KernelImage, name: str = "module") -> None:
        ensure_context()
        driver = _driver()
        # cuda-python quirk: `image` is taken as a host address; a numpy view of the bytes gives
        # one (the driver copies the image, so the view need only outlive the call). PTX must
        # be NUL-terminated; nvrtc.py keeps the NUL that nvrtcGetPTX writes.
        data = np.frombuffer(image.code, dtype=np.uint8)
        self.handle = check_driver(
            driver.cuModuleLoadData(data.ctypes.data), f"cuModuleLoadData({name})"
        )
        self.name = name
        self._functions: dict[str, object] = {}

    def function(self, kernel_name: str) -> object:
        if kernel_name not in self._functions:
            self._functions[kernel_name] = check_driver(
                _driver().cuModuleGetFunction(self.handle, kernel_name.encode()),
                f"cuModuleGetFunction({self.name}: {kernel_name})",
            )
        return self._functions[kernel_name]


_streams: dict[int, object] = {}


# torch's raw current-stream handle without building a torch.cuda.Stream object (what triton
# uses): torch.cuda.current_stream() costs several µs of host time per launch on the device's host.
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream() -> object:
    """torch's current stream as a driver CUstream (the wrappers are cached per handle)."""
    if _raw_current_stream is not None:
        handle = _raw_current_stream(torch.cuda.current_device())
    else:
        handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        stream = _streams[handle] = _driver().CUstream(handle)
    return stream


@functools.cache
def _supports_programmatic(index: int) -> bool:
    """Programmatic dependent launch needs compute capability 9.0 (Hopper) or later."""
    return torch.cuda.get_device_capability(index)[0] >= 9


@contextlib.contextmanager
def programmatic_launches(enabled: bool = True) -> Iterator[None]:
    """Launch sites whose kernels wait on their grid dependency (gpu/kernels/grid_dependency.cuh)
    launch with PROGRAMMATIC_STREAM_SERIALIZATION inside this block, on devices that have it: a
    kernel may then start while the one before it finishes, and its prologue (weight prefetch,
    launch latency) hides under that kernel's tail. Torch's stream capture turns these into
    programmatic graph edges. Scoped to this thread; the decode step uses it."""
    before = getattr(_state, "programmatic", False)
    _state.programmatic = enabled and _supports_programmatic(torch.cuda.current_device())
    try:
        yield
    finally:
        _state.programmatic = before


def _programmatic_config() -> object:
    """A CUlaunchConfig carrying the programmatic-serialization attribute (grid set per launch)."""
    driver = _driver()
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    config = driver.CUlaunchConfig()
    config.attrs = [attribute]
    config.numAttrs = 1
    return config


class LaunchSite:
    """One call site of one kernel: argument cells and their pointer array, built once.

    `programmatic`: the kernel waits on its grid dependency before touching anything an earlier
    kernel wrote (grid_dependency.cuh), so it may be launched early inside programmatic_launches().
    """

    def __init__(
        self, function: object, arg_kinds: Sequence[str], name: str, programmatic: bool = False
    ) -> None:
        try:
            self._cells = [_CELL_TYPES[kind]() for kind in arg_kinds]
        except KeyError as exc:
            raise CudaError(f"{name}: unknown argument kind {exc.args[0]!r}") from None
        self._pointers = (ctypes.c_void_p * len(self._cells))(
            *(ctypes.addressof(cell) for cell in self._cells)
        )
        self._params = ctypes.addressof(self._pointers)
        self._function = function
        self.name = name
        self.programmatic = programmatic
        self._config_ex: object | None = None
        self._shared_allowed = STATIC_SHARED_LIMIT

    def _allow_shared(self, nbytes: int) -> None:
        """Over 48 KiB of dynamic shared memory a kernel must opt in (cuFuncSetAttribute), once
        per size it grows to; the driver refuses sizes the device lacks (a CudaError)."""
        driver = _driver()
        attribute = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        check_driver(driver.cuFuncSetAttribute(self._function, attribute, nbytes),
                     f"cuFuncSetAttribute({self.name}, {nbytes} bytes of shared memory)")
        self._shared_allowed = nbytes

    def launch(self, config: LaunchConfig, *args: int | float) -> None:
        """Launch on torch's current stream; pointers are passed as ints (0 for null)."""
        if len(args) != len(self._cells):
            raise CudaError(f"{self.name}: {len(args)} arguments for {len(self._cells)} parameters")
        for cell, value in zip(self._cells, args, strict=True):
            cell.value = value
        gx, gy, gz = config.grid
        bx, by, bz = config.block
        if config.shared_mem > self._shared_allowed:
            self._allow_shared(config.shared_mem)
        if self.programmatic and getattr(_state, "programmatic", False):
            ex = self._config_ex
            if ex is None:
                ex = self._config_ex = _programmatic_config()
            ex.gridDimX, ex.gridDimY, ex.gridDimZ = gx, gy, gz
            ex.blockDimX, ex.blockDimY, ex.blockDimZ = bx, by, bz
            ex.sharedMemBytes = config.shared_mem
            ex.hStream = current_stream()
            check_driver(
                _driver().cuLaunchKernelEx(ex, self._function, self._params, 0),
                f"cuLaunchKernelEx({self.name})",
            )
            return
        check_driver(
            _driver().cuLaunchKernel(
                self._function, gx, gy, gz, bx, by, bz, config.shared_mem, current_stream(),
                self._params, 0,
            ),
            f"cuLaunchKernel({self.name})",
        )  # fmt: skip


def memcpy_async(dst: int, src: int, nbytes: int) -> None:
    """Copy `nbytes` between two addresses (device or pinned host: unified addressing picks the
    direction) on torch's current stream. One driver call: ~4x less host time than
    Tensor.copy_ on the device's host (bench/host_step.py); the caller vouches for the sizes."""
    driver = _driver()
    check_driver(
        driver.cuMemcpyAsync(driver.CUdeviceptr(dst), driver.CUdeviceptr(src), nbytes,
                             current_stream()),
        "cuMemcpyAsync",
    )  # fmt: skip


class StreamEvent:
    """A driver event without timing, recorded on torch's current stream: torch.cuda.Event's
    record and synchronize cost several times the host time of these two calls."""

    def __init__(self) -> None:
        ensure_context()
        driver = _driver()
        flags = driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
        self._event = check_driver(driver.cuEventCreate(flags), "cuEventCreate")

    def record(self) -> None:
        check_driver(_driver().cuEventRecord(self._event, current_stream()), "cuEventRecord")

    def synchronize(self) -> None:
        check_driver(_driver().cuEventSynchronize(self._event), "cuEventSynchronize")

    def __del__(self) -> None:
        event, self._event = getattr(self, "_event", None), None
        if event is not None:
            try:
                _driver().cuEventDestroy(event)
            except Exception:  # noqa: BLE001 - interpreter shutdown: the context may be gone
                pass



class DriverUploader:
    """`gpu.batch.DeviceUploader` through the driver: one cuMemcpyAsync, a `StreamEvent` fence."""

    @staticmethod
    def copy(dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        memcpy_async(dst_ptr, src_ptr, nbytes)

    @staticmethod
    def fence() -> StreamEvent:
        return StreamEvent()
