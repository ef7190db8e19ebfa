"""Backends: `torch` (reference, CPU) and `cuda` (NVRTC kernels)."""
