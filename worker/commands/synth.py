"""`orcd synth --shape NAME --quant TYPE --out PATH`: a GGUF with a real model's shapes, random
weights and a working tokenizer, for testing at sizes we cannot ship."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

from loader.synth import FILE_TYPES, SHAPES, parse_quant, plan_tensors, write_synthetic_gguf


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="model to copy")
    parser.add_argument(
        "--quant", required=True, type=str.upper, choices=[t.name for t in FILE_TYPES],
        help="type of the embedding, output and linear weights (norms and biases stay F32)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="path of the .gguf file to write")
    parser.add_argument(
        "--seed", type=_at_least(0), default=0,
        help="random seed; the same seed writes the same bytes (default: 0)",
    )  # fmt: skip
    parser.add_argument(
        "--layers", type=_at_least(1),
        help="number of blocks, overriding the model's (for small test files)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    shape = SHAPES[args.shape]
    if args.layers is not None:
        shape = shape.with_layers(args.layers)
    quant = parse_quant(args.quant)
    total = sum(spec.nbytes for spec in plan_tensors(shape, quant))
    show = not args.quiet and sys.stderr.isatty()
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=args.out,
              file=sys.stderr, disable=not show) as bar:  # fmt: skip
        specs = write_synthetic_gguf(args.out, shape, quant, seed=args.seed, progress=bar.update)
    types = Counter(spec.ggml_type.name for spec in specs if spec.kind == "weight")
    mix = ", ".join(f"{n} {name}" for name, n in types.most_common())
    print(
        f"wrote {args.out}: {shape.name}, {shape.n_layers} layers, {len(specs)} tensors "
        f"({mix} weights), {total / 2**30:.2f} GiB of tensor data"
    )
    return 0
