"""The CUDA backend against the torch backend (float32, CPU) on the same GGUF files (run on the
device: `pytest -m gpu tests/gpu/test_cuda_backend.py -s` prints the max relative errors).

Synthetic 2-layer models of every matvec type and of each architecture; prompt chunks take the
prefill path (fp16 GEMM), single tokens the kernel path (float32 sums, fp16 KV). Decode
must be batch-invariant and graphs must replay exactly what eager launches compute.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType

from gpu.batch import ForwardBatch
from loader.synth import SHAPES, write_synthetic_gguf
from tests.gpu.packed_batch import packed_batch
from tests.measured import MEASURED

pytestmark = pytest.mark.gpu
_T = GGMLQuantizationType

BLOCK_SIZE = 16
BLOCKS_PER_SEQ = 8
PREFILL_TOL = 2e-2  # fp16 weights and activations in the prefill GEMM path, fp16 KV
DECODE_TOL = 1e-2  # float32 matvec, fp16 KV written by the prefill


@pytest.fixture(scope="module", autouse=True)
def _device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def make_batch(seqs: list[tuple[int, list[int], int]], device: str) -> ForwardBatch:
    return packed_batch(seqs, BLOCK_SIZE, BLOCKS_PER_SEQ, device)


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over rows of |ours - ref| / |ref| (2-norms)."""
    assert not torch.isnan(ours).any()
    diff = (ours.double().cpu() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1)
    return float(diff.max())


def synthetic(tmp_path_factory, shape_name: str, quant: _T, vocab: int = 2048):
    shape = dataclasses.replace(SHAPES[shape_name].with_layers(2), vocab_size=vocab)
    path = tmp_path_factory.mktemp("synth") / f"{shape_name}-{quant.name}.gguf"
    write_synthetic_gguf(path, shape, quant)
    return path


def both(path, **kwargs):
    from gpu.backends.cuda_backend import CudaBackend
    from gpu.backends.torch_backend import TorchBackend

    ref = TorchBackend(path)
    ours = CudaBackend(path, **kwargs)
    for backend in (ref, ours):
        backend.allocate_kv(4 * BLOCKS_PER_SEQ, BLOCK_SIZE)
    return ours, ref


def compare(ours, ref, label: str) -> tuple[float, float]:
    """Prefill two prompts (one split in two chunks), then 4 decode steps of both sequences."""
    gen = torch.Generator().manual_seed(0)
    vocab = ref.config.vocab_size
    a = torch.randint(0, vocab, (37,), generator=gen).tolist()
    b = torch.randint(0, vocab, (20,), generator=gen).tolist()
    steps = [[(0, a[:30], 0), (1, b, 0)], [(0, a[30:], 30)]]
    prefill_err = 0.0
    for seqs in steps:
        got = ours.forward(make_batch(seqs, "cuda"))
        want = ref.forward(make_batch(seqs, "cpu"))
        prefill_err = max(prefill_err, max_rel_error(got, want))
    decode_err = 0.0
    lens = [37, 20]
    for step in range(4):
        tokens = torch.randint(0, vocab, (2,), generator=gen).tolist()
        seqs = [(i, [tokens[i]], lens[i] + step) for i in range(2)]
        got = ours.forward(make_batch(seqs, "cuda"))
        want = ref.forward(make_batch(seqs, "cpu"))
        decode_err = max(decode_err, max_rel_error(got, want))
    print(f"\n[cuda vs torch] {label}: max rel error prefill {prefill_err:.2e}, "
          f"decode {decode_err:.2e}")  # fmt: skip
    return prefill_err, decode_err


LLAMA_TYPES = [_T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q4_K, _T.Q5_K,
               _T.Q6_K, _T.F32]  # fmt: skip
CASES = [("smollm2-135m", t) for t in LLAMA_TYPES] + [
    ("qwen2-0.5b", _T.Q8_0), ("qwen2-0.5b", _T.Q4_K), ("phi3-mini", _T.Q4_0),
]


@pytest.mark.parametrize(("shape_name", "quant"), CASES, ids=lambda v: getattr(v, "name", v))
def test_logits_match_torch_backend(tmp_path_factory, record_property, shape_name, quant):
    path = synthetic(tmp_path_factory, shape_name, quant)
    ours, ref = both(path)
    prefill_err, decode_err = compare(ours, ref, f"{shape_name} {quant.name}")
    record_property(MEASURED, f"max rel error prefill {prefill_err:.2e}, decode {decode_err:.2e}")
    assert prefill_err <= PREFILL_TOL
    assert decode_err <= DECODE_TOL


@pytest.mark.parametrize("limit", ["64", "512"])
@pytest.mark.parametrize("quant", [_T.Q4_0, _T.Q4_K, _T.Q6_K, _T.F16], ids=lambda t: t.name)
def test_long_prefill_on_either_path_matches_torch_backend(tmp_path_factory, monkeypatch, quant,
                                                           limit):
    """A 350-token mixed batch (two prompts, one with a cached prefix, and a decode) with the
    tensor-core prefill limit at 64 (dequantise + cuBLAS) and at 512 (`_tc_layers`, the
    workspace sized for it): logits as the torch backend's, then decodes on top of its KV."""
    monkeypatch.setenv("ORCD_TC_PREFILL_MAX_TOKENS", limit)
    path = synthetic(tmp_path_factory, "smollm2-135m", quant)
    ours, ref = both(path)
    assert ours.tc_prefill_max_tokens == int(limit)
    gen = torch.Generator().manual_seed(5)
    vocab = ref.config.vocab_size
    a = torch.randint(0, vocab, (120,), generator=gen).tolist()
    b = torch.randint(0, vocab, (110,), generator=gen).tolist()
    c = torch.randint(0, vocab, (2,), generator=gen).tolist()
    steps = [[(2, c, 0)], [(0, a[:100], 0), (1, b, 0), (2, c[1:], 1)], [(0, a[100:], 100)]]
    errors = []
    for seqs in steps:
        got = ours.forward(make_batch(seqs, "cuda"))
        want = ref.forward(make_batch(seqs, "cpu"))
        errors.append(max_rel_error(got, want))
    tokens = torch.randint(0, vocab, (3,), generator=gen).tolist()
    seqs = [(0, [tokens[0]], 120), (1, [tokens[1]], 110), (2, [tokens[2]], 2)]
    got = ours.forward(make_batch(seqs, "cuda"))
    decode_err = max_rel_error(got, ref.forward(make_batch(seqs, "cpu")))
    assert max(errors) <= PREFILL_TOL, errors
    assert decode_err <= PREFILL_TOL, decode_err


@pytest.mark.parametrize("matmul", ["tensor-cores", "auto", "matvec"])
@pytest.mark.parametrize("quant", LLAMA_TYPES, ids=lambda t: t.name)
def test_decode_of_64_sequences_matches_torch_backend(tmp_path_factory, quant, matmul):
    """64 sequences decode together and one alone, in each matmul mode (auto: the tensor cores
    for the 64, the matvec alone): logits as the torch backend's."""
    from gpu.backends.cuda_backend import CudaBackend
    from gpu.backends.torch_backend import TorchBackend

    path = synthetic(tmp_path_factory, "smollm2-135m", quant)
    ours, ref = CudaBackend(path, matmul=matmul), TorchBackend(path)
    n = 64
    for backend in (ours, ref):
        backend.allocate_kv(n * BLOCKS_PER_SEQ, BLOCK_SIZE)
    gen = torch.Generator().manual_seed(3)
    vocab = ref.config.vocab_size
    prompts = [torch.randint(0, vocab, (3 + i % 5,), generator=gen).tolist() for i in range(n)]
    for first in range(0, n, 16):  # prefill, 16 sequences per call
        seqs = [(i, prompts[i], 0) for i in range(first, first + 16)]
        ours.forward(make_batch(seqs, "cuda"))
        ref.forward(make_batch(seqs, "cpu"))
    err = 0.0
    for step in range(2):
        tokens = torch.randint(0, vocab, (n,), generator=gen).tolist()
        for group in (list(range(n)), [5]):
            seqs = [(i, [tokens[i]], len(prompts[i]) + step) for i in group]
            got = ours.forward(make_batch(seqs, "cuda")).clone()
            want = ref.forward(make_batch(seqs, "cpu"))
            err = max(err, max_rel_error(got, want))
    assert err <= DECODE_TOL, err


@pytest.mark.parametrize("matmul", ["matvec", "tensor-cores"])
def test_decode_is_batch_invariant_and_graphs_replay_eager(tmp_path_factory, matmul):
    """A sequence's decode logits are bit-identical alone, in a batch of 3 (bucket 4, padded),
    with graphs or without, with programmatic launches (Hopper) or plain stream order, in both
    batch-invariant matmul modes."""
    from gpu.backends.cuda_backend import CudaBackend

    path = synthetic(tmp_path_factory, "smollm2-135m", _T.Q4_K)
    modes = ((True, True), (False, True), (True, False))  # (graphs, programmatic)
    backends = [CudaBackend(path, use_graphs=g, programmatic=p, matmul=matmul) for g, p in modes]
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (40, 3, 100)]
    results = []
    for backend in backends:
        backend.allocate_kv(4 * BLOCKS_PER_SEQ, BLOCK_SIZE)
        for seq, prompt in enumerate(prompts):
            backend.forward(make_batch([(seq, prompt, 0)], "cuda"))
        for cached in range(2):  # two steps: the second replays the captured graphs
            together = backend.forward(
                make_batch([(s, [7 + s], len(p) + cached) for s, p in enumerate(prompts)], "cuda")
            ).clone()  # decode logits are a view of the graphs' buffer until the next forward
            alone = [
                backend.forward(make_batch([(s, [7 + s], len(p) + cached)], "cuda"))[0].clone()
                for s, p in enumerate(prompts)
            ]
            for s in range(3):
                assert torch.equal(together[s], alone[s])
            results.append(together)
    for mode in range(1, len(modes)):
        assert torch.equal(results[0], results[2 * mode])
        assert torch.equal(results[1], results[2 * mode + 1])


def test_decode_graphs_captured_ahead_equal_graphs_captured_on_first_use(tmp_path_factory):
    """prepare_decode captures every (batch bucket, split count) graph before any step, with
    no KV written (the cache stays zero); the steps after it capture nothing more and give
    the bits of graphs captured on first use."""
    from gpu.backends.cuda_backend import CudaBackend

    path = synthetic(tmp_path_factory, "smollm2-135m", _T.Q4_0)
    ahead, lazy = CudaBackend(path), CudaBackend(path)
    for backend in (ahead, lazy):
        backend.allocate_kv(4 * BLOCKS_PER_SEQ, BLOCK_SIZE)
    progress = []
    count = ahead.prepare_decode(3, BLOCKS_PER_SEQ * BLOCK_SIZE,
                                 lambda done, total: progress.append((done, total)))  # fmt: skip
    assert count == 3 * 2  # buckets 1, 2, 4 x splits 1, 2 (128 tokens: two 64-token splits)
    assert progress[-1] == (count, count) and len(ahead._graphs) == count
    assert all(not k.any() and not v.any() for k, v in ahead.kv_cache)
    assert ahead.prepare_decode(3, BLOCKS_PER_SEQ * BLOCK_SIZE) == 0  # nothing left to capture
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (40, 3, 90)]
    results = []
    for backend in (ahead, lazy):
        for seq, prompt in enumerate(prompts):
            backend.forward(make_batch([(seq, prompt, 0)], "cuda"))
        steps = []
        for cached in range(2):
            steps.append(backend.forward(make_batch(
                [(s, [7 + s], len(p) + cached) for s, p in enumerate(prompts)], "cuda")).clone())
            steps.append(backend.forward(make_batch([(1, [9], len(prompts[1]) + cached + 1)],
                                                    "cuda")).clone())  # fmt: skip
        results.append(steps)
    assert len(ahead._graphs) == count  # every step replayed a graph captured ahead
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)


def test_engine_steps_launched_ahead_with_prefill_match_sync(tmp_path_factory):
    """The engine on the CUDA backend (prefill_ahead on by default there): prompts in chunks of
    a 32-token budget, requests arriving while steps are in flight, a CUDA graph per decode
    bucket; the same greedy tokens as without overlap, every block back, and steps launched
    ahead that carried prefill chunks or admissions."""
    from gpu.backends.cuda_backend import CudaBackend
    from gpu.engine import Engine
    from gpu.request import Request, SamplingParams

    path = synthetic(tmp_path_factory, "smollm2-135m", _T.Q4_0)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist()
               for n in (70, 5, 33, 100, 12, 48)]  # fmt: skip
    results, prefill_ahead = [], []
    for overlap in (True, False):
        engine = Engine(path, backend=CudaBackend(path), kv_blocks=64, max_batch_tokens=32,
                        overlap=overlap)  # fmt: skip
        assert engine.prefill_ahead
        tokens: dict[str, list[int]] = {}
        pending = list(enumerate(prompts))
        steps = 0
        while pending or engine.has_work():
            if pending and steps % 3 == 0:  # an arrival every third step, steps in flight
                i, prompt = pending.pop(0)
                engine.add(Request(f"r{i}", prompt, SamplingParams(temperature=0.0),
                                   max_tokens=6 + i, ignore_eos=True))  # fmt: skip
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            steps += 1
            ahead = engine._in_flight
            prefill_ahead.append(ahead is not None and any(
                n > 1 or seq.num_computed == 0 for seq, n in ahead.schedule.items))  # fmt: skip
        results.append(tokens)
        assert engine.stats().kv_blocks_used == 0
    assert results[0] == results[1]
    assert [len(results[0][f"r{i}"]) for i in range(6)] == [6 + i for i in range(6)]
    assert any(prefill_ahead)


def test_engine_batched_equals_unbatched(tmp_path_factory):
    from gpu.backends.cuda_backend import CudaBackend
    from gpu.engine import Engine
    from gpu.request import Request, SamplingParams

    path = synthetic(tmp_path_factory, "smollm2-135m", _T.Q8_0)
    backend = CudaBackend(path)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (5, 33, 17, 60)]

    def run(batched: bool) -> dict[str, list[int]]:
        engine = Engine(path, backend=backend, kv_blocks=64, block_size=BLOCK_SIZE)
        requests = [Request(f"r{i}", prompt_token_ids=p, max_tokens=16, ignore_eos=True,
                            sampling=SamplingParams(temperature=0.0))
                    for i, p in enumerate(prompts)]  # fmt: skip
        tokens = {r.request_id: [] for r in requests}
        for request in requests if batched else []:
            engine.add(request)
        pending = [] if batched else list(requests)
        while engine.has_work() or pending:
            if not engine.has_work():
                engine.add(pending.pop(0))
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return tokens

    assert run(batched=True) == run(batched=False)


def test_real_smollm2_greedy_tokens_match(default_model_path):
    """32 greedy steps on the real file: the CUDA backend's tokens equal the torch backend's."""
    from gpu.backends.cuda_backend import CudaBackend
    from gpu.backends.torch_backend import TorchBackend
    from gpu.engine import Engine
    from gpu.request import Request, SamplingParams

    outputs = []
    for backend in (TorchBackend(default_model_path), CudaBackend(default_model_path)):
        engine = Engine(default_model_path, backend=backend, kv_blocks=64, block_size=BLOCK_SIZE)
        prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28]
        engine.add(Request("r", prompt_token_ids=prompt, max_tokens=32, ignore_eos=True,
                           sampling=SamplingParams(temperature=0.0)))  # fmt: skip
        tokens = []
        while engine.has_work():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        outputs.append(tokens)
    print(f"\n[cuda vs torch] SmolLM2 greedy: {outputs[1]}")
    assert outputs[0] == outputs[1]
