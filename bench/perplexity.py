"""Perplexity of the default model on a public text, as llama.cpp's llama-perplexity computes it.

Runs `iter_perplexity` on the GPL-3 text shipped with Debian (/usr/share/common-licenses) at
ctx 512 and writes the estimate, its error and the wall time to bench/results/. llama.cpp's
CPU build gives 18.39 on the same file and model (docs/anchors.md).

With several dtypes (`--dtype float32,bfloat16,int8`) each is measured in the same run and
the result also gives each one's change against the first, the criterion of `--dtype auto`
(the fastest torch mode within 2% of float32).

    python bench/perplexity.py [--file PATH] [--ctx 512] [--dtype float32[,bfloat16,int8]]
"""

from __future__ import annotations

import argparse
import os
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


def measure(gguf, tokens: list[int], bos: int | None, ctx: int, dtype: str) -> dict:
    backend = make_backend("torch", gguf, dtype=dtype)
    start = time.perf_counter()
    estimate = None
    for estimate in iter_perplexity(backend, tokens, ctx, bos_token_id=bos):
        print(f"{dtype} [{estimate.chunks}/{estimate.total_chunks}] ppl {estimate.ppl:.4f}",
              flush=True)
    seconds = time.perf_counter() - start
    assert estimate is not None
    print(f"{dtype}: Final estimate: PPL = {estimate.ppl:.4f} +/- {estimate.error:.5f} in "
          f"{seconds:.1f} s ({len(tokens)} tokens; llama.cpp CPU: {LLAMA_CPP_PPL})")
    return {"dtype": dtype, "chunks": estimate.chunks, "ppl": estimate.ppl,
            "error": estimate.error, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--dtype", default="float32",
                        help="a torch dtype, or several separated by commas (default float32)")
    args = parser.parse_args()
    dtypes = args.dtype.split(",")
    gguf = open_gguf(resolve_model(args.model))
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    text = Path(args.file).read_text(encoding="utf-8")
    tokens = tokenizer.encode(text, add_special_tokens=True, parse_special=False)
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    load_before = os.getloadavg()  # 1, 5, 15 min: these machines are shared, times are noisy
    runs = [measure(gguf, tokens, bos, args.ctx, dtype) for dtype in dtypes]
    common = {"file": args.file, "model": args.model, "ctx": args.ctx, "tokens": len(tokens),
              "llama_cpp_ppl": LLAMA_CPP_PPL, "load_avg_before": load_before,
              "load_avg_after": os.getloadavg()}
    if len(runs) == 1:
        results = {**common, **runs[0]}
    else:
        for run in runs:
            run["change_vs_first_pct"] = 100 * (run["ppl"] / runs[0]["ppl"] - 1)
            print(f"{run['dtype']:>9}: PPL {run['ppl']:.4f}  {run['change_vs_first_pct']:+.2f}% "
                  f"vs {runs[0]['dtype']}  ({run['seconds']:.1f} s)")
        results = {**common, "runs": runs}
    print(f"wrote {write_result('perplexity', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
