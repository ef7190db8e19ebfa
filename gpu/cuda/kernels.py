"""The kernel files, their per-file compile options, and their loaded modules (one per file per
process, compiled for the current device through the on-disk cache)."""

from __future__ import annotations

import functools

from gpu.cuda.driver import LaunchSite, Module, device_arch
from gpu.cuda.nvrtc import KERNEL_DIR, compile_file

# Fast math only where its approximations are harmless: exp in softmax and SiLU. RoPE needs
# accurate sin/cos of large angles; the rest gains nothing from it.
KERNEL_OPTIONS: dict[str, tuple[str, ...]] = {
    "activation.cu": ("--use_fast_math",),
    "attention.cu": ("--use_fast_math",),
    "decode_inputs.cu": (),
    "embedding.cu": (),
    "matvec.cu": (),
    "norm.cu": (),
    "prefill_attention.cu": ("--use_fast_math",),
    "rope_kv.cu": (),
    "sampling.cu": (),
}

# Files whose every kernel calls grid_dependency_sync()/wait before its first dependent access
# (grid_dependency.cuh): their launch sites may launch programmatically (driver.LaunchSite).
PROGRAMMATIC_FILES = frozenset(
    {"activation.cu", "attention.cu", "embedding.cu", "matvec.cu", "norm.cu", "rope_kv.cu"}
)


def kernel_files() -> list[str]:
    """Every .cu under gpu/kernels (each must have an entry in KERNEL_OPTIONS)."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


@functools.cache
def module(filename: str) -> Module:
    image = compile_file(filename, device_arch(), KERNEL_OPTIONS[filename])
    return Module(image, filename)


def launch_site(filename: str, kernel_name: str, arg_kinds: tuple[str, ...]) -> LaunchSite:
    """A fresh launch site for `kernel_name` of `filename` (each call site keeps its own)."""
    return LaunchSite(module(filename).function(kernel_name), arg_kinds, kernel_name,
                      programmatic=filename in PROGRAMMATIC_FILES)  # fmt: skip
