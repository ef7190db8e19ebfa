"""Perplexity of the default model on a public text, as llama.cpp's llama-perplexity computes it.

Runs `iter_perplexity` on the GPL-3 text shipped with Debian (/usr/share/common-licenses) at
ctx 512 and writes the estimate, its error and the wall time to bench/results/. llama.cpp's
CPU build gives 18.39 on the same file and model (docs/anchors.md).

    python bench/perplexity.py [--file PATH] [--ctx 512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from gpu.engine import make_backend  # noqa: E402
from gpu.perplexity import iter_perplexity  # noqa: E402
from loader.gguf_file import open_gguf  # noqa: E402
from loader.registry import resolve_model  # noqa: E402
from tokenizer.tokenizer import GGUFTokenizer  # noqa: E402

LLAMA_CPP_PPL = 18.39


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    gguf = open_gguf(resolve_model(args.model))
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    text = Path(args.file).read_text(encoding="utf-8")
    tokens = tokenizer.encode(text, add_special_tokens=True, parse_special=False)
    backend = make_backend("torch", gguf, dtype=args.dtype)
    start = time.perf_counter()
    estimate = None
    for estimate in iter_perplexity(backend, tokens, args.ctx,
                                    bos_token_id=tokenizer.bos_id if tokenizer.add_bos else None):
        print(f"[{estimate.chunks}/{estimate.total_chunks}] ppl {estimate.ppl:.4f}", flush=True)
    seconds = time.perf_counter() - start
    assert estimate is not None
    print(f"Final estimate: PPL = {estimate.ppl:.4f} +/- {estimate.error:.5f} in {seconds:.1f} s "
          f"({len(tokens)} tokens; llama.cpp CPU: {LLAMA_CPP_PPL})")
    results = {
        "file": args.file, "model": args.model, "ctx": args.ctx, "dtype": args.dtype,
        "tokens": len(tokens), "chunks": estimate.chunks, "ppl": estimate.ppl,
        "error": estimate.error, "seconds": seconds, "llama_cpp_ppl": LLAMA_CPP_PPL,
    }
    print(f"wrote {write_result('perplexity', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
