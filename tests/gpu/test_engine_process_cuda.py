"""The engine in a process of its own (worker/engine_process.py) on the CUDA backend: the
spawned child initialises CUDA itself, captures its decode graphs, and gives the same greedy
tokens as an engine in this process, for requests added while its steps run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType

from gpu.request import Request, SamplingParams
from loader.synth import SHAPES, write_synthetic_gguf

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def run(engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Greedy tokens of every prompt, one request added every other step."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    steps = 0
    while pending or engine.has_work():
        if pending and steps % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add(Request(f"r{i}", prompt, SamplingParams(temperature=0.0),
                               max_tokens=8 + i, ignore_eos=True))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    return tokens


def test_the_engine_process_gives_the_in_process_engines_tokens(tmp_path):
    from worker.engine_process import EngineProcess
    from worker.loaded_model import load_model, prepare_decode

    shape = dataclasses.replace(SHAPES["smollm2-135m"].with_layers(2), vocab_size=2048)
    path = tmp_path / "smol-q4_0.gguf"
    write_synthetic_gguf(path, shape, GGMLQuantizationType.Q4_0)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (40, 7, 90, 16)]
    options = {"name": str(path), "backend": "cuda", "kv_blocks": 64, "max_num_seqs": 8}
    here = load_model(progress=False, **options)
    prepare_decode(here, progress=False)
    expected = run(here.engine, prompts)
    del here
    torch.cuda.empty_cache()
    child = EngineProcess(options, graph_warmup=True)
    try:
        assert child.backend.name == "cuda" and child.prepare_decode() > 0
        assert run(child, prompts) == expected
        assert child.stats().kv_blocks_used == 0
    finally:
        child.close()
