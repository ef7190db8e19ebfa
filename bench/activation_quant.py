"""What rounding the matmul inputs costs in accuracy, measured on the CPU with the torch reference.

The tensor-core matmul (gpu/kernels/tcmm.cu) rounds each matmul's input x to fp16; the int8
route for issue 14 (bench/NOTES.md, "Tensor-core matmul", session 13) would quantise x to int8
per 32-element block with a float scale (as llama.cpp's q8_1 does) and multiply integers. The
weights are the same either way, so the difference from the reference is x's rounding alone.
This runs the torch backend (float32 weights as dequantised: the reference) with every
matmul's x first rounded one way, on llama.cpp's perplexity chunks of a text, and reports
against unrounded x: perplexity, the mean KL divergence of the next-token distributions, the
largest logit difference and how often the top token agrees. Modes: `fp16` (today's tcmm),
`int8` (int8 per 32-block, scale = max |x| / 127, round to nearest: an int8 mma computes
exactly the float product of these values, up to the float summation order) and `int8-row`
(one scale per row of x, for comparison).

    python bench/activation_quant.py [--model smollm2-135m] [--ctx 512] [--chunks 8]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gpu.backends.torch_backend as torch_backend  # noqa: E402
from bench.results_io import write_result  # noqa: E402
from gpu.engine import make_backend  # noqa: E402
from gpu.perplexity import scored_chunks  # noqa: E402
from loader.gguf_file import open_gguf  # noqa: E402
from loader.registry import resolve_model  # noqa: E402
from tokenizer.tokenizer import GGUFTokenizer  # noqa: E402

BLOCK = 32  # elements per int8 scale: one GGUF legacy block, a K-quant sub-block


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """x with each run of `block` elements of a row rounded to int8 x (max |x| / 127)."""
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"{cols} columns are not whole blocks of {block}")
    blocks = x.float().reshape(rows, cols // block, block)
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, torch.round(blocks / scale.clamp_min(1e-30)), 0.0).clamp(-127, 127)
    return (q * scale).reshape(rows, cols).to(x.dtype)


ROUNDINGS = {
    "fp16": lambda x: x.half().to(x.dtype),
    "int8": lambda x: int8_blocks(x, BLOCK),
    "int8-row": lambda x: int8_blocks(x, x.shape[1]),
}


def measure(backend, tokens, ctx, chunks, bos, rounding: str | None,
            reference: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor]]:
    original = torch_backend.linear
    if rounding is not None:
        round_x = ROUNDINGS[rounding]
        torch_backend.linear = lambda x, w, b=None: original(round_x(x), w, b)
    start = time.perf_counter()
    try:
        nll = kl = 0.0
        count = agree = 0
        max_diff = 0.0
        kept = []
        scored = islice(scored_chunks(backend, tokens, ctx, bos_token_id=bos), chunks)
        for i, (logits, targets) in enumerate(scored):
            logits = logits.double()
            logprobs = torch.log_softmax(logits, dim=-1)
            nll -= float(logprobs.gather(1, targets[:, None]).sum())
            count += len(targets)
            if reference is None:
                kept.append(logprobs)
                continue
            ref = reference[i]
            kl += float((ref.exp() * (ref - logprobs)).sum())
            agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
            shift = (logits - logits.mean(-1, keepdim=True)) - (ref - ref.mean(-1, keepdim=True))
            max_diff = max(max_diff, float(shift.abs().max()))
    finally:
        torch_backend.linear = original
    row = {"x": rounding or "float32", "ppl": math.exp(nll / count), "tokens_scored": count,
           "seconds": round(time.perf_counter() - start, 1)}
    if reference is not None:
        row.update(mean_kl=kl / count, top1_agreement=agree / count,
                   max_centred_logit_diff=max_diff)
    return row, kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default="/usr/share/common-licenses/GPL-3")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8, help="perplexity chunks (default 8)")
    parser.add_argument("--modes", default="fp16,int8,int8-row")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in ROUNDINGS]
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(ROUNDINGS)}")
    gguf = open_gguf(resolve_model(args.model))
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    tokens = tokenizer.encode(Path(args.file).read_text(encoding="utf-8"),
                              add_special_tokens=True, parse_special=False)
    chunks = min(args.chunks, len(tokens) // args.ctx)
    if chunks < 1:
        parser.error(f"the text has {len(tokens)} tokens: not one chunk of {args.ctx}")
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    backend = make_backend("torch", gguf, dtype="float32")
    reference, kept = measure(backend, tokens, args.ctx, chunks, bos, None, None)
    rows = [reference]
    print(f"float32 x: ppl {reference['ppl']:.4f} ({reference['tokens_scored']} tokens)", flush=True)
    for mode in modes:
        row, _ = measure(backend, tokens, args.ctx, chunks, bos, mode, kept)
        row["ppl_change_pct"] = 100 * (row["ppl"] / reference["ppl"] - 1)
        rows.append(row)
        print(f"{mode:>9} x: ppl {row['ppl']:.4f} ({row['ppl_change_pct']:+.3f}%), mean KL "
              f"{row['mean_kl']:.2e}, top-1 agreement {100 * row['top1_agreement']:.2f}%, "
              f"max centred logit diff {row['max_centred_logit_diff']:.3f}", flush=True)
    path = write_result("activation_quant", {"model": args.model, "file": args.file,
                                             "ctx": args.ctx, "chunks": chunks, "block": BLOCK,
                                             "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
