"""`orcd perplexity FILE`: perplexity of a text file, computed as llama.cpp's llama-perplexity."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from gpu.engine import make_backend
from gpu.perplexity import iter_perplexity
from jobs.errors import OrcdError
from loader.gguf_file import open_gguf
from loader.registry import resolve_model
from tokenizer.tokenizer import GGUFTokenizer
from worker.commands.options import add_model_options
from worker.loaded_model import resolve_dtype
from worker.log import configure_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="UTF-8 text file")
    # float32 by default, unlike the serving commands: perplexity is the reference measurement
    # (and what `--dtype auto` was chosen by); `--dtype auto` measures what they serve.
    add_model_options(parser, dtype_default="float32")
    parser.add_argument("--ctx", type=int, default=512, help="chunk length in tokens (512)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    configure_logging()
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OrcdError(f"cannot read {args.file}: {exc}") from exc
    gguf = open_gguf(resolve_model(args.model, args.models_dir))
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    # llama-perplexity tokenizes with add_special=true, parse_special=false.
    tokens = tokenizer.encode(text, add_special_tokens=True, parse_special=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    dtype = resolve_dtype(args.dtype, args.backend)
    backend = make_backend(args.backend, gguf, dtype=dtype, batch_invariant=args.batch_invariant)
    bar = tqdm(total=len(tokens) // args.ctx, unit="chunk", file=sys.stderr,
               disable=args.json and not sys.stderr.isatty())
    estimate = None
    for estimate in iter_perplexity(backend, tokens, args.ctx, bos_token_id=bos):
        bar.update(1)
        bar.set_postfix(ppl=f"{estimate.ppl:.4f}")
    bar.close()
    assert estimate is not None
    if args.json:
        import json

        print(json.dumps({
            "ppl": estimate.ppl, "error": estimate.error, "chunks": estimate.chunks,
            "ctx": args.ctx, "tokens": len(tokens), "tokens_scored": estimate.tokens_scored,
            "backend": backend.name, "dtype": dtype if backend.name == "torch" else None,
        }))
    else:
        print(f"Final estimate: PPL = {estimate.ppl:.4f} +/- {estimate.error:.5f}  "
              f"({estimate.chunks} chunks of {args.ctx}, {len(tokens)} tokens)")
    return 0
