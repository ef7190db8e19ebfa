"""Load a model for serving: resolve the name, build the engine and the tokenizer, show a
progress bar when loading takes more than a second, log the load time.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gpu.engine import Engine
from loader.gguf_file import open_gguf
from loader.registry import resolve_model
from tokenizer.tokenizer import GGUFTokenizer
from worker.log import get_logger


@dataclass(slots=True)
class LoadedModel:
    """What every serving command needs: the engine, the tokenizer, and where they came from."""

    name: str
    path: Path
    engine: Engine
    tokenizer: GGUFTokenizer
    load_seconds: float


def load_model(
    name: str,
    *,
    models_dir: str | os.PathLike | None = None,
    backend: str = "auto",
    kv_blocks: int | None = None,
    progress: bool = True,
    **engine_options: object,
) -> LoadedModel:
    """Resolve `name`, load weights (progress bar on stderr after 1 s), build the tokenizer."""
    log = get_logger(model=name)
    path = resolve_model(name, models_dir)
    start = time.perf_counter()
    gguf = open_gguf(path)
    tokenizer = GGUFTokenizer.from_metadata(gguf.metadata)
    bar = tqdm(
        total=0, unit="B", unit_scale=True, desc=f"Loading {name}", delay=1.0, leave=False,
        disable=not progress or not sys.stderr.isatty(), file=sys.stderr,
    )

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        engine = Engine(gguf, backend=backend, kv_blocks=kv_blocks, progress=on_progress,
                        **engine_options)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    stats = engine.stats()
    log.info(
        "model.loaded",
        narration=(
            f"Loaded {name} ({engine.config.architecture}, {engine.config.n_layers} layers) "
            f"on {engine.backend.name} in {seconds:.2f} s; KV pool "
            f"{stats.kv_blocks_total} blocks of {stats.block_size} tokens"
        ),
        seconds=round(seconds, 3),
        backend=engine.backend.name,
        kv_blocks=stats.kv_blocks_total,
    )
    return LoadedModel(name, path, engine, tokenizer, seconds)


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

