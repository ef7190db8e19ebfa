"""Load a model for serving: resolve the name, build the engine and the tokenizer, show a
progress bar when loading takes more than a second, log the load time.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from gpu.engine import DTYPES, Engine
from loader.gguf_file import open_gguf
from loader.registry import resolve_model
from tokenizer.tokenizer import GGUFTokenizer
from worker.log import get_logger

# What `--dtype auto` (every serving command's default) means on the torch backend: the fastest
# mode whose perplexity stays within 2% of float32. SmolLM2-135M Q4_1 on the GPL-3 text, ctx 512
# (bench/perplexity.py, 2026-12-07): float32 18.300, bfloat16 18.306 (+0.03%), int8 18.451
# (+0.82%); int8 decodes about 4x faster than float32 on this CPU.
AUTO_TORCH_DTYPE = "int8"
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(dtype: str, backend: str = "auto") -> str:
    """The concrete dtype the engine gets for `--dtype` with `--backend`: anything but "auto" as
    given; "auto" is `AUTO_TORCH_DTYPE` where the torch backend will run, and float32 where the
    CUDA backend will (it runs its own kernels on the file's quantised blocks and ignores the
    dtype, which stays the engine's default)."""
    if dtype != "auto":
        return dtype
    if backend == "cuda" or (backend == "auto" and torch.cuda.is_available()):
        return "float32"
    return AUTO_TORCH_DTYPE


@dataclass(slots=True)
class LoadedModel:
    """What every serving command needs: the engine, the tokenizer, and where they came from."""

    name: str
    path: Path
    engine: Engine
    tokenizer: GGUFTokenizer
    load_seconds: float
    dtype: str = "float32"  # the torch backend's weights (the CUDA backend ignores it)


@contextmanager
def _progress_bar(desc: str, unit: str, progress: bool, **options: object):
    """A tqdm bar on stderr (after 1 s, on a terminal, when `progress`), yielded as the
    (done, total) callback the engine's long steps report to."""
    bar = tqdm(total=0, unit=unit, desc=desc, delay=1.0, leave=False, file=sys.stderr,
               disable=not progress or not sys.stderr.isatty(), **options)  # fmt: skip

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield on_progress
    finally:
        bar.close()


def load_model(
    name: str,
    *,
    models_dir: str | os.PathLike | None = None,
    backend: str = "auto",
    dtype: str = "float32",
    kv_blocks: int | None = None,
    progress: bool = True,
    **engine_options: object,
) -> LoadedModel:
    """Resolve `name`, load weights (progress bar on stderr after 1 s), build the tokenizer.

    `dtype` is the torch backend's weight type, "auto" included (see `resolve_dtype`); float32,
    the reference, by default as for `Engine`: the commands pass their `--dtype` (auto)."""
    log = get_logger(model=name)
    dtype = resolve_dtype(dtype, backend)
    path = resolve_model(name, models_dir)
    start = time.perf_counter()
    gguf = open_gguf(path)
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    with _progress_bar(f"Loading {name}", "B", progress, unit_scale=True) as on_progress:
        engine = Engine(gguf, backend=backend, kv_blocks=kv_blocks, progress=on_progress,
                        dtype=dtype, **engine_options)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    on = engine.backend.name + (f" ({dtype})" if engine.backend.name == "torch" else "")
    log.info(
        "model.loaded",
        narration=(
            f"Loaded {name} ({engine.config.architecture}, {engine.config.n_layers} layers) "
            f"on {on} in {seconds:.2f} s; KV pool "
            f"{stats.kv_blocks_total} blocks of {stats.block_size} tokens"
        ),
        seconds=round(seconds, 3),
        backend=engine.backend.name,
        dtype=dtype if engine.backend.name == "torch" else None,
        kv_blocks=stats.kv_blocks_total,
    )
    return LoadedModel(name, path, engine, tokenizer, seconds, dtype)


def prepare_decode(model: LoadedModel, progress: bool = True) -> int:
    """Capture the engine's decode graphs before serving (`Engine.prepare_decode`), with a
    progress bar on a terminal and a log line; returns how many."""
    start = time.perf_counter()
    with _progress_bar(f"Capturing {model.name}'s decode graphs", "graph", progress) as on_progress:
        count = model.engine.prepare_decode(on_progress)
    if count:
        seconds = time.perf_counter() - start
        get_logger(model=model.name).info(
            "model.graphs_captured", graphs=count, seconds=round(seconds, 3),
            narration=f"Captured {count} decode graphs of {model.name} in {seconds:.2f} s "
            f"(batches up to {model.engine.scheduler.max_num_seqs} sequences, contexts up to "
            f"{model.engine.max_model_len} tokens), so no step waits for one while serving",
        )
    return count


def freeze_startup_objects() -> int:
    """Take what exists after start-up (modules, the model, the tokenizer: they live as long as
    the process) out of the cyclic collector's scans; returns how many objects that is.

    With SmolLM2 loaded a full collection walks ~200k objects and takes ~90 ms (this CPU,
    2026-11-25); after the freeze ~0. Python runs one whenever enough objects survive, which in
    a decode loop is a pause of the whole engine: on the GPU host time between steps is idle
    GPU. Garbage is collected first so that no dead cycle is frozen for good."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

