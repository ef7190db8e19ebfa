"""The kernel files, their per-file compile options, and their loaded modules (one per file per
process, compiled for the current device through the on-disk cache)."""

from __future__ import annotations

import functools
import os
import re

from gpu.cuda.driver import LaunchSite, Module, device_arch
from gpu.cuda.errors import CudaError
from gpu.cuda.nvrtc import KERNEL_DIR, compile_file

# Fast math only where its approximations are harmless: exp in softmax and SiLU. RoPE needs
# accurate sin/cos of large angles; the rest gains nothing from it.
KERNEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "activation.cu": ("--use_fast_math",),
    "bandwidth.cu": (),
    "attention.cu": ("--use_fast_math",),
    "decode_inputs.cu": (),
    "embedding.cu": (),
    "matvec.cu": (),
    "norm.cu": (),
    "prefill_attention.cu": ("--use_fast_math",),
    "rope_kv.cu": (),
    "sampling.cu": (),
    "tcmm.cu": (),
}

# Files whose every kernel calls grid_dependency_sync()/wait before its first dependent access
# (grid_dependency.cuh): their launch sites may launch programmatically (driver.LaunchSite).
PROGRAMMATIC_FILES = frozenset(
    {"activation.cu", "attention.cu", "embedding.cu", "matvec.cu", "norm.cu", "rope_kv.cu",
     "tcmm.cu"}
)


# Compile-time constants a benchmark may override for an A/B run without editing the source,
# e.g. ORCD_KERNEL_DEFINES="matvec.cu:MATVEC_PREFETCH_BYTES=8192". Each is `#ifndef`-guarded
# in its file (a CPU test checks), the override is a -D option (so the on-disk cache keys on
# it), and bench/decode.py records the variable in its JSON. Unset, the source's values hold.
TUNING_ENV = "ORCD_KERNEL_DEFINES"
TUNABLES: dict[str, frozenset[str]] = {
    "matvec.cu": frozenset({"MATVEC_PREFETCH_BYTES"}),
    "tcmm.cu": frozenset({"TC_UNROLL"}),
    "attention.cu": frozenset({"ATTN_MIN_BLOCKS"}),
}
_TUNING_ITEM = re.compile(r"^([\w.]+\.cu):([A-Z][A-Z0-9_]*)=(-?[0-9]+)$")


def tuning_options(filename: str, spec: str | None = None) -> tuple[str, ...]:
    """The -D options that `spec` (default: $ORCD_KERNEL_DEFINES; space-separated
    FILE:NAME=INTEGER items) sets for `filename`. Anything malformed or not in TUNABLES is an
    error: a mistyped override must not run the default kernel under a variant's name."""
    spec = os.environ.get(TUNING_ENV, "") if spec is None else spec
    options = []
    for item in spec.split():
        match = _TUNING_ITEM.match(item)
        if match is None:
            raise CudaError(f"{TUNING_ENV}: {item!r} is not FILE.cu:NAME=INTEGER")
        file, name, value = match.groups()
        if name not in TUNABLES.get(file, ()):
            known = ", ".join(f"{f}:{n}" for f, names in TUNABLES.items() for n in sorted(names))
            raise CudaError(f"{TUNING_ENV}: {file}:{name} is not tunable (tunable: {known})")
        if file == filename:
            options.append(f"-D{name}={value}")
    return tuple(options)


def kernel_files() -> list[str]:
    """Every .cu under gpu/kernels (each must have an entry in KERNEL_OPTIONS)."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@functools.cache
def module(filename: str) -> Module:
    options = KERNEL_OPTIONS[filename] + tuning_options(filename)
    image = compile_file(filename, device_arch(), options)
    return Module(image, filename)


def launch_site(filename: str, kernel_name: str, arg_kinds: tuple[str, ...]) -> LaunchSite:
    """A fresh launch site for `kernel_name` of `filename` (each call site keeps its own)."""
    return LaunchSite(module(filename).function(kernel_name), arg_kinds, kernel_name,
                      programmatic=filename in PROGRAMMATIC_FILES)  # fmt: skip
