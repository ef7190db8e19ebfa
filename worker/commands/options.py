"""Command-line options shared by every command that loads a model."""

from __future__ import annotations

import argparse

from loader.registry import DEFAULT_MODEL
from worker.loaded_model import AUTO_TORCH_DTYPE, DTYPE_CHOICES


def add_backend_options(parser: argparse.ArgumentParser, *, dtype_default: str = "auto") -> None:
    """--backend and --dtype (`worker.loaded_model.resolve_dtype` turns "auto" into a dtype)."""
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"],
                        help="auto (default: the best available), torch or cuda")
    parser.add_argument("--dtype", default=dtype_default, choices=list(DTYPE_CHOICES),
                        help=f"torch backend weights (default: {dtype_default}): auto "
                             f"({AUTO_TORCH_DTYPE} on the torch backend, the fastest mode within "
                             "2%% of float32's perplexity), float32 (the reference), bfloat16 "
                             "(about 2x faster decode on CPU) or int8 (per-row weight-only, "
                             "bfloat16 activations, about 4x); the cuda backend ignores it")
    parser.add_argument("--matmul", choices=["matvec", "tensor-cores", "auto"], default=None,
                        help="cuda backend's matrix kernels: auto (the default: the float32 "
                             "matvec below 8 sequences, tensor cores from 8; the only mode in "
                             "which a sequence's tokens may depend on what else runs), matvec "
                             "(float32, weights read once per 8 sequences) or tensor-cores "
                             "(fp16 inputs, weights read once per 64 sequences)")


def add_model_options(parser: argparse.ArgumentParser, *, engine: bool = True,
                      dtype_default: str = "auto") -> None:
    """--model and --models-dir; with `engine`, also --backend and --dtype."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a .gguf path or a model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--models-dir", help="directory of NAME.gguf files (or $ORCD_MODELS_DIR)")
    if engine:
        add_backend_options(parser, dtype_default=dtype_default)
