"""Compile gpu/kernels/*.cu with NVRTC to CUBIN (PTX where NVRTC cannot target the arch),
cached on disk.

Runs without a GPU: NVRTC is a plain library (the nvidia-cuda-nvrtc wheel in CI;
cuda-bindings finds it through cuda.pathfinder, site-packages first, then the system). The cache
key is sha256 over the source, every header it includes, the options, the target and NVRTC's
version, so any change to any of them compiles afresh; entries are written atomically.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gpu.cuda.errors import CudaError, check_nvrtc

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
# NVRTC quirk: it rejects -O3 (it always optimises); -default-device lets helpers omit
# __device__. Per-file extras (--use_fast_math) live in gpu/cuda/kernels.py.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "-default-device")

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True, slots=True)
class KernelImage:
    """A compiled module: CUBIN bytes, or NUL-terminated PTX for the driver to JIT."""

    code: bytes
    kind: str  # "cubin" or "ptx"
    target: str  # "sm_90" (cubin) or "compute_90" (ptx)
    key: str


@dataclass(slots=True)
class CompileStats:
    """Counters the tests read to prove that a second compile is a cache hit."""

    compiled: int = 0
    cache_hits: int = 0


stats = CompileStats()


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    major, minor = check_nvrtc(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def supported_archs() -> tuple[int, ...]:
    """Compute capabilities (major * 10 + minor) this NVRTC can emit CUBIN for."""
    from cuda.bindings import nvrtc

    return tuple(
        int(a) for a in check_nvrtc(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    )


def parse_arch(arch: str | int | tuple[int, int]) -> int:
    """'sm_90', 'sm_90a', 90 or (9, 0) -> 90."""
    if isinstance(arch, tuple):
        return arch[0] * 10 + arch[1]
    if isinstance(arch, int):
        return arch
    match = re.fullmatch(r"(?:sm_|compute_)?(\d+)a?", arch)
    if not match:
        raise CudaError(f"cannot read a GPU architecture from {arch!r} (expected e.g. 'sm_90')")
    return int(match.group(1))


def choose_target(arch: int, supported: Iterable[int]) -> tuple[str, str]:
    """(target, kind): CUBIN for the arch itself when NVRTC supports it; else PTX for the newest
    supported arch below it, which the driver JIT-compiles (a GPU newer than the NVRTC)."""
    supported = sorted(supported)
    if arch in supported:
        return f"sm_{arch}", "cubin"
    older = [a for a in supported if a < arch]
    if not older:
        raise CudaError(
            f"NVRTC supports no architecture at or below sm_{arch} (it has {supported})"
        )
    return f"compute_{older[-1]}", "ptx"


def included_headers(source: str, kernel_dir: Path = KERNEL_DIR) -> dict[str, str]:
    """Every `#include "name"` reachable from `source`, read from `kernel_dir`, by name."""
    headers: dict[str, str] = {}
    pending = _INCLUDE.findall(source)
    while pending:
        name = pending.pop()
        if name in headers:
            continue
        path = kernel_dir / name
        if not path.is_file():
            raise CudaError(f"kernel header {name!r} not found in {kernel_dir}")
        headers[name] = path.read_text()
        pending.extend(_INCLUDE.findall(headers[name]))
    return dict(sorted(headers.items()))


def cache_key(
    source: str,
    headers: Mapping[str, str],
    options: Iterable[str],
    target: str,
    version: tuple[int, int],
) -> str:
    digest = hashlib.sha256()
    for part in (source, *(f"{n}\0{t}" for n, t in sorted(headers.items())), *options, target,
                 f"nvrtc {version[0]}.{version[1]}"):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0\1")  # separator: no two different part lists hash alike
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("ORCD_KERNEL_CACHE") or Path.home() / ".cache" / "orcd" / "kernels")


def compile_source(
    source: str,
    name: str,
    headers: Mapping[str, str],
    arch: str | int | tuple[int, int],
    options: Iterable[str] = (),
) -> KernelImage:
    """Compile one translation unit (or take it from the cache). Raises CudaError with the log."""
    target, kind = choose_target(parse_arch(arch), supported_archs())
    all_options = (*BASE_OPTIONS, *options, f"--gpu-architecture={target}")
    key = cache_key(source, headers, all_options, target, nvrtc_version())
    path = cache_dir() / f"{Path(name).stem}-{target}-{key[:32]}.{kind}"
    if path.is_file():
        stats.cache_hits += 1
        return KernelImage(path.read_bytes(), kind, target, key)
    code = _compile(source, name, headers, all_options, kind)
    stats.compiled += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(code)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    return KernelImage(code, kind, target, key)


def compile_file(
    filename: str,
    arch: str | int | tuple[int, int],
    options: Iterable[str] = (),
    kernel_dir: Path = KERNEL_DIR,
) -> KernelImage:
    """Compile gpu/kernels/`filename` with the headers it includes."""
    path = kernel_dir / filename
    if not path.is_file():
        raise CudaError(f"kernel source {filename!r} not found in {kernel_dir}")
    source = path.read_text()
    return compile_source(source, filename, included_headers(source, kernel_dir), arch, options)


def _compile(
    source: str, name: str, headers: Mapping[str, str], options: tuple[str, ...], kind: str
) -> bytes:
    from cuda.bindings import nvrtc

    # Headers are handed to NVRTC by name (no include path): exactly what the key hashed.
    program = check_nvrtc(
        nvrtc.nvrtcCreateProgram(
            source.encode(), name.encode(), len(headers),
            [text.encode() for text in headers.values()], [n.encode() for n in headers],
        ),
        "nvrtcCreateProgram",
    )  # fmt: skip
    try:
        encoded = [o.encode() for o in options]
        status = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        check_nvrtc(status, f"nvrtcCompileProgram({name}, {' '.join(options)})", _log(program))
        if kind == "cubin":
            size = check_nvrtc(nvrtc.nvrtcGetCUBINSize(program), "nvrtcGetCUBINSize")
            buffer = _out_buffer(size)
            check_nvrtc(nvrtc.nvrtcGetCUBIN(program, buffer), "nvrtcGetCUBIN")
        else:
            # The PTX size counts its terminating NUL, which cuModuleLoadData needs.
            size = check_nvrtc(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
            buffer = _out_buffer(size)
            check_nvrtc(nvrtc.nvrtcGetPTX(program, buffer), "nvrtcGetPTX")
        if not buffer:
            raise CudaError(f"NVRTC produced an empty {kind} for {name}")
        return bytes(buffer)
    finally:
        check_nvrtc(nvrtc.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")


def _out_buffer(size: int) -> bytearray:
    """A fresh writable buffer for NVRTC to fill.

    Never `b" " * size`: NVRTC writes into the buffer it is given, and for size 1 (an empty
    log is one NUL byte) that expression returns CPython's shared one-byte `b" "` object, so
    every b" " in the process became b"\x00" (tokenizers then decoded spaces as NULs).
    """
    return bytearray(size)


def _log(program: object) -> str:
    from cuda.bindings import nvrtc

    size = check_nvrtc(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
    buffer = _out_buffer(size)
    check_nvrtc(nvrtc.nvrtcGetProgramLog(program, buffer), "nvrtcGetProgramLog")
    return buffer.rstrip(b"\0").decode(errors="replace").strip()
