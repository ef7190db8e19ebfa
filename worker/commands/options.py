"""Command-line options shared by every command that loads a model."""

from __future__ import annotations

import argparse

from gpu.engine import DTYPES
from loader.registry import DEFAULT_MODEL


def add_model_options(parser: argparse.ArgumentParser, *, engine: bool = True) -> None:
    """--model and --models-dir; with `engine`, also --backend and --dtype."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"a .gguf path or a model name (default: {DEFAULT_MODEL})")
    parser.add_argument("--models-dir", help="directory of NAME.gguf files (or $ORCD_MODELS_DIR)")
    if engine:
        parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda"],
                            help="auto (default: the best available), torch or cuda")
        parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                            help="torch backend weights: float32 (reference, default), "
                                 "bfloat16 (about 2x faster decode on CPU) or int8 "
                                 "(per-row weight-only, about 3x)")
