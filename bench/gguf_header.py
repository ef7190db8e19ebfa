"""Parse-and-validate time of a GGUF header with a 150k-token vocabulary: ours vs gguf's reader.

Writes a file whose metadata is the size of a large real vocabulary (150,000 tokens and
merges, token types, a chat template) and one small tensor, then times `open_gguf` (full
validation) and `gguf.GGUFReader` on it in the same run. Goal: well under one second.

    python bench/gguf_header.py [--tokens N] [--repeat R]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from loader.gguf_file import open_gguf  # noqa: E402


def write_vocab_file(path: Path, n_tokens: int) -> None:
    writer = GGUFWriter(str(path), "llama")
    tokens = [f"tok{i}_\u0120piece" for i in range(n_tokens)]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * n_tokens)
    writer.add_token_merges([f"t{i} o{i}" for i in range(n_tokens - 256)])
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def timed(fn, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.gguf"
        write_vocab_file(path, args.tokens)
        size = path.stat().st_size
        ours = timed(lambda: open_gguf(path).close(), args.repeat)
        reference = timed(lambda: GGUFReader(str(path)), args.repeat)
    results = {
        "tokens": args.tokens,
        "file_bytes": size,
        "orcd_open_gguf_s": {"median": statistics.median(ours), "all": ours},
        "gguf_reader_s": {"median": statistics.median(reference), "all": reference},
        "goal_s": 1.0,
    }
    print(f"GGUF header with {args.tokens:,} tokens + merges ({size / 1e6:.1f} MB of metadata)")
    print(f"  orcd open_gguf (validated)  median {statistics.median(ours) * 1e3:8.1f} ms")
    print(f"  gguf.GGUFReader (reference) median {statistics.median(reference) * 1e3:8.1f} ms")
    print(f"  wrote {write_result('gguf_header', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
