"""Tokenizer speed: ours against transformers' tokenizer for the same GGUF, in the same run.

Generates a few MB of mixed English-like prose and source code in memory (seeded, nothing
downloaded), encodes it document by document on one thread and as one batch (`tokenizers`
spreads a batch over all cores), with ours and with transformers' `AutoTokenizer` loaded from
the same GGUF, and prints MB/s for both. Also times building our tokenizer from the default
model and from a 150,000-token vocabulary (the default one grown, written to a temp dir).
Goals (issue 3): ours at least as fast as transformers; the 150k build under one second.

    python bench/tokenizer.py [--mb 4] [--repeat 3] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.results_io import write_result  # noqa: E402
from loader.registry import resolve_model  # noqa: E402
from tests.tokenizer.gguf_tokenizers import write_padded_vocab  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big "
    "inference quantization attention transformer gradient tokenizer latency throughput kernel"
).split()
CODE_TEMPLATES = [
    'def {f}({a}, {b}=None):\n    """{doc}."""\n    if {b} is None:\n        {b} = {n}\n'
    "    return [{a}[i] * {b} for i in range({n2}) if i % {k} == 0]\n\n",
    "function {f}({a}, {b}) {{\n  const {c} = {a}.map((x) => x + {n});\n"
    "  return {c}.filter((x) => x > {b}).length; // {doc}\n}}\n\n",
    "static int {f}(const int *{a}, size_t {b}) {{\n    int {c} = 0;\n"
    "    for (size_t i = 0; i < {b}; ++i) {{ {c} += {a}[i] << {k}; }}\n"
    "    return {c} ^ 0x{n:x};\n}}\n\n",
    "class {F}:\n    def __init__(self, {a}: int = {n}) -> None:\n        self.{a} = {a}\n"
    '        self.{c} = {{"{b}": [{n}, {n2}, {k}], "doc": "{doc}"}}\n\n',
    "SELECT {a}, COUNT(*) AS {c} FROM {b} WHERE {a} >= {n} GROUP BY {a} ORDER BY {c} DESC;\n",
]


def make_documents(total_bytes: int, seed: int = 0) -> list[str]:
    """Documents of 1-6 KB, about 60% prose and 40% code, until `total_bytes` of UTF-8."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(WORDS))]  # Zipf-like word frequencies

    def sentence() -> str:
        words = rng.choices(WORDS, weights, k=rng.randint(6, 24))
        return " ".join(words).capitalize() + rng.choice([".", ".", ".", "?", "!", ","])

    def ident() -> str:
        return "_".join(rng.choices(WORDS[:120], k=rng.randint(1, 3)))

    documents, size = [], 0
    while size < total_bytes:
        target = rng.randint(1000, 6000)
        parts: list[str] = []
        length = 0
        prose = rng.random() < 0.6
        while length < target:
            if prose:
                part = " ".join(sentence() for _ in range(rng.randint(2, 6))) + "\n\n"
            else:
                part = rng.choice(CODE_TEMPLATES).format(
                    f=ident(), F=ident().title().replace("_", ""), a=ident(), b=ident(),
                    c=ident(), doc=sentence(), n=rng.randint(0, 10**6), n2=rng.randint(0, 999),
                    k=rng.randint(1, 9),
                )  # fmt: skip
            parts.append(part)
            length += len(part)
        document = "".join(parts)
        documents.append(document)
        size += len(document.encode("utf-8"))
    return documents


def best_of(repeat: int, function: Callable[[], object]) -> tuple[float, list[float]]:
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        timings.append(time.perf_counter() - start)
    return min(timings), timings


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text to encode")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    path = resolve_model(args.model)
    documents = make_documents(int(args.mb * 1e6))
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)

    build_default, build_default_all = best_of(args.repeat, lambda: load_tokenizer(path))
    with tempfile.TemporaryDirectory() as tmp:
        big = write_padded_vocab(Path(tmp) / "vocab150k.gguf", path, 150_000)
        build_150k, build_150k_all = best_of(args.repeat, lambda: load_tokenizer(big))
    start = time.perf_counter()
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    build_reference = time.perf_counter() - start
    ours = load_tokenizer(path)

    runs = {
        "ours_single": lambda: [ours.encode(d) for d in documents],
        "transformers_single": lambda: [reference(d)["input_ids"] for d in documents],
        "ours_batch": lambda: ours.encode_batch(documents),
        "transformers_batch": lambda: reference(documents)["input_ids"],
    }
    speeds = {}
    for name, run in runs.items():
        run()  # warm up
        seconds, _ = best_of(args.repeat, run)
        speeds[name] = n_bytes / seconds / 1e6
    ours_ids = ours.encode_batch(documents)
    same = sum(a == b for a, b in zip(ours_ids, reference(documents)["input_ids"], strict=True))

    results = {
        "model": str(path.name),
        "text_bytes": n_bytes,
        "documents": len(documents),
        "tokens": sum(map(len, ours_ids)),
        "documents_with_identical_ids": same,
        "encode_mb_per_s": speeds,
        "build_s": {
            "ours_default_model": build_default,
            "ours_default_model_all": build_default_all,
            "ours_150k_vocab": build_150k,
            "ours_150k_vocab_all": build_150k_all,
            "transformers_default_model": build_reference,
        },
        "goals": {"build_150k_s": 1.0, "ours_at_least_transformers": True},
        "commit_full": git_head(),
    }
    print(f"{n_bytes / 1e6:.2f} MB in {len(documents)} documents, {results['tokens']:,} tokens "
          f"({same}/{len(documents)} documents with identical ids to transformers)")  # fmt: skip
    print("encode MB/s            ours   transformers")
    for mode in ("single", "batch"):
        print(f"  {mode:<18} {speeds[f'ours_{mode}']:7.2f}  {speeds[f'transformers_{mode}']:7.2f}")
    print(f"build default model    ours {build_default * 1e3:7.1f} ms "
          f"(transformers {build_reference * 1e3:.0f} ms)")  # fmt: skip
    print(f"build 150k vocabulary  ours {build_150k * 1e3:7.1f} ms (goal < 1000 ms)")
    print(f"  wrote {write_result('tokenizer', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
