"""The torch backend against transformers loading the same GGUF, and its RoPE against formulas.

transformers is an independent implementation of all three architectures that reads GGUF files
itself (its own dequantiser, its own undoing of llama.cpp's Q/K permutation), so agreement to
1e-3 on every logit means our weights, layout, RoPE ordering, attention and paged KV are right.
Batches are built by hand with a trivial block allocation: sequence i owns blocks
[i * BLOCKS_PER_SEQ, (i + 1) * BLOCKS_PER_SEQ).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from gpu.backends.torch_backend import KVNotAllocatedError, TorchBackend
from gpu.batch import ForwardBatch
from gpu.rope import RopeNotSupportedError, Rotary, check_rope_supported
from loader.config import RopeConfig
from loader.registry import resolve_model
from loader.synth import SHAPES, write_synthetic_gguf
from tests.hf_gguf import parse_once

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 16
BLOCKS_PER_SEQ = 8  # 128 tokens per sequence
NUM_SEQS = 4
ATOL = 1e-3  # the bar: max abs logit difference against transformers in float32
# Synthetic files: real head layouts (qwen2: 14 heads over 2 KV heads, biases; phi3: head_dim
# 96, fused tensors), 2 layers, a cut vocabulary and Q8_0 so the file builds and loads in
# seconds (F16 dequantises much more slowly in both our loader and transformers').
SYNTH = {"qwen2": ("qwen2-0.5b", 8192), "phi3": ("phi3-mini", 4096)}


@dataclass(slots=True)
class Chunk:
    """New tokens of one sequence in a batch, after `num_cached` tokens already in its KV."""

    seq: int
    token_ids: list[int]
    num_cached: int = 0


def make_batch(chunks: list[Chunk], all_logits: bool = True) -> ForwardBatch:
    """Pack chunks into a ForwardBatch; logits for every row, or for each chunk's last row."""
    token_ids, positions, slots, logits_indices = [], [], [], []
    query_start, context_lens, block_tables = [0], [], []
    for chunk in chunks:
        blocks = list(range(chunk.seq * BLOCKS_PER_SEQ, (chunk.seq + 1) * BLOCKS_PER_SEQ))
        start = query_start[-1]
        for j, token in enumerate(chunk.token_ids):
            pos = chunk.num_cached + j
            token_ids.append(token)
            positions.append(pos)
            slots.append(blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        query_start.append(start + len(chunk.token_ids))
        context_lens.append(chunk.num_cached + len(chunk.token_ids))
        n_used = -(-context_lens[-1] // BLOCK_SIZE)
        block_tables.append(blocks[:n_used] + [-1] * (BLOCKS_PER_SEQ - n_used))
        wanted = range(start, query_start[-1]) if all_logits else [query_start[-1] - 1]
        logits_indices.extend(wanted)
    return ForwardBatch(
        token_ids=torch.tensor(token_ids),
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_start=torch.tensor(query_start),
        context_lens=torch.tensor(context_lens),
        block_tables=torch.tensor(block_tables, dtype=torch.int32),
        logits_indices=torch.tensor(logits_indices),
        query_lens=[len(c.token_ids) for c in chunks],
        context_lens_host=context_lens,
    )


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@dataclass(slots=True)
class Pair:
    """Our backend and transformers' model, both loaded from one GGUF file."""

    ours: TorchBackend
    hf: torch.nn.Module

    def hf_logits(self, token_ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return self.hf(torch.tensor([token_ids])).logits[0].float()


def _load_pair(path, ours: TorchBackend | None = None) -> Pair:
    ours = ours or TorchBackend(path)
    ours.allocate_kv(NUM_SEQS * BLOCKS_PER_SEQ, BLOCK_SIZE)
    with parse_once():  # the config and the weights read one parse of the file
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return Pair(ours, hf.eval())


# Under pytest-xdist each model's tests run on one worker, which loads the pair once.
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.xdist_group(
    f"pair-{name}")) for name in ("smollm2", "qwen2", "phi3")])
def pair(request, tmp_path_factory) -> Pair:
    if request.param == "smollm2":
        return _load_pair(resolve_model("smollm2-135m"), request.getfixturevalue("smollm2_backend"))
    shape_name, vocab = SYNTH[request.param]
    shape = dataclasses.replace(SHAPES[shape_name].with_layers(2), vocab_size=vocab)
    path = tmp_path_factory.mktemp("synth") / f"{shape_name}.gguf"
    write_synthetic_gguf(path, shape, GGMLQuantizationType.Q8_0)
    return _load_pair(path)


@pytest.fixture
def smollm2(smollm2_backend) -> TorchBackend:
    """The session's SmolLM2 backend with a fresh pool of NUM_SEQS * BLOCKS_PER_SEQ blocks."""
    smollm2_backend.allocate_kv(NUM_SEQS * BLOCKS_PER_SEQ, BLOCK_SIZE)
    return smollm2_backend


def test_synthetic_files_exercise_bias_fused_and_neox(pair):
    config = pair.ours.config
    expected = {
        "llama": dict(qkv_bias=False, fused_qkv=False, fused_gate_up=False, neox=False),
        "qwen2": dict(qkv_bias=True, fused_qkv=False, fused_gate_up=False, neox=True),
        "phi3": dict(qkv_bias=False, fused_qkv=True, fused_gate_up=True, neox=True),
    }[config.architecture]
    got = dict(
        qkv_bias=config.qkv_bias,
        fused_qkv=config.fused_qkv,
        fused_gate_up=config.fused_gate_up,
        neox=config.rope.neox,
    )
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("length", [5, 17, 40])
def test_prompt_logits_match_transformers(pair, length):
    vocab = pair.ours.config.vocab_size
    prompt = random_ids(length, vocab, seed=length)
    ours = pair.ours.forward(make_batch([Chunk(seq=0, token_ids=prompt)]))
    want = pair.hf_logits(prompt)
    assert ours.shape == want.shape == (length, vocab)
    assert (ours - want).abs().max().item() < ATOL


@pytest.mark.slow
def test_decode_steps_match_transformers(pair):
    """Prefill, then 16 greedy tokens one forward each through the paged cache; transformers
    sees the whole final sequence in one pass, and every step's logits must agree."""
    prompt = random_ids(11, pair.ours.config.vocab_size, seed=7)
    step_logits = [pair.ours.forward(make_batch([Chunk(1, prompt)], all_logits=False))]
    tokens = list(prompt)
    for _ in range(16):
        tokens.append(int(step_logits[-1][0].argmax()))
        batch = make_batch([Chunk(1, tokens[-1:], num_cached=len(tokens) - 1)])
        step_logits.append(pair.ours.forward(batch))
    ours = torch.cat(step_logits)
    want = pair.hf_logits(tokens)[len(prompt) - 1 :]
    assert ours.shape == want.shape == (17, pair.ours.config.vocab_size)
    assert (ours - want).abs().max().item() < ATOL


# Forwards of different batch shapes round differently (matmul blocking differs with the row
# count), so "equal" below is float32 noise: measured up to 1.02e-4 (2026-11-25, 2-core CPU) on
# logits of magnitude ~30 (3e-6 relative), several times under the transformers bar.
SAME = 3e-4


def test_packed_batch_equals_each_alone(smollm2):
    vocab = smollm2.config.vocab_size
    prompt_a, prompt_b = random_ids(12, vocab, seed=1), random_ids(29, vocab, seed=2)
    cached_c = random_ids(20, vocab, seed=3)
    smollm2.forward(make_batch([Chunk(2, cached_c)]))  # sequence 2 has 20 tokens cached
    next_c = [17]
    packed = smollm2.forward(
        make_batch([Chunk(0, prompt_a), Chunk(1, prompt_b), Chunk(2, next_c, num_cached=20)])
    )
    alone = torch.cat(
        [
            smollm2.forward(make_batch([Chunk(0, prompt_a)])),
            smollm2.forward(make_batch([Chunk(1, prompt_b)])),
            smollm2.forward(make_batch([Chunk(2, next_c, num_cached=20)])),
        ]
    )
    assert packed.shape == (12 + 29 + 1, vocab)
    assert (packed - alone).abs().max().item() < SAME


def test_packed_batch_only_computes_wanted_logits(smollm2):
    prompts = [random_ids(n, smollm2.config.vocab_size, seed=n) for n in (3, 9)]
    every = smollm2.forward(make_batch([Chunk(0, prompts[0]), Chunk(1, prompts[1])]))
    last = smollm2.forward(
        make_batch([Chunk(0, prompts[0]), Chunk(1, prompts[1])], all_logits=False)
    )
    assert last.shape == (2, smollm2.config.vocab_size)
    assert (last - every[[2, 11]]).abs().max().item() < SAME


def test_chunked_prefill_equals_whole_prefill(smollm2):
    prompt = random_ids(40, smollm2.config.vocab_size, seed=40)
    whole = smollm2.forward(make_batch([Chunk(0, prompt)]))
    chunks = [
        smollm2.forward(make_batch([Chunk(3, prompt[start:stop], num_cached=start)]))
        for start, stop in ((0, 13), (13, 27), (27, 40))
    ]
    assert (torch.cat(chunks) - whole).abs().max().item() < SAME


def test_bfloat16_weights_stay_close_to_float32(smollm2):
    backend = TorchBackend(resolve_model("smollm2-135m"), dtype=torch.bfloat16)
    backend.allocate_kv(BLOCKS_PER_SEQ, BLOCK_SIZE)
    assert backend.kv_cache[0][0].dtype == torch.bfloat16
    assert backend.weights.nbytes() < 0.51 * smollm2.weights.nbytes()
    prompt = random_ids(24, smollm2.config.vocab_size, seed=24)
    want = smollm2.forward(make_batch([Chunk(0, prompt)]))
    got = backend.forward(make_batch([Chunk(0, prompt)]))
    assert got.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits up to ~30 move by tenths (measured 0.5-0.7).
    error = (got - want).abs().max().item()
    assert error < 1.5
    # Where bf16 picks another token, float32 rates that token within the error of its own pick.
    picked = want.gather(1, got.argmax(-1, keepdim=True))[:, 0]
    assert (want.max(-1).values - picked).max().item() <= 2 * error


def test_int8_weights_stay_close_to_float32(smollm2):
    """Per-row int8 weights (the fastest CPU mode): logits near float32's, and where the
    greedy pick differs float32 rates the int8 pick within the measured error of its own."""
    from gpu.int8_linear import Int8Weight

    backend = TorchBackend(resolve_model("smollm2-135m"), dtype=torch.int8)
    backend.allocate_kv(BLOCKS_PER_SEQ, BLOCK_SIZE)
    assert isinstance(backend.weights.layers[0].wqkv, Int8Weight)
    assert backend.kv_cache[0][0].dtype == torch.bfloat16
    assert backend.weights.nbytes() < 0.8 * 0.5 * smollm2.weights.nbytes()
    prompt = random_ids(24, smollm2.config.vocab_size, seed=25)
    want = smollm2.forward(make_batch([Chunk(0, prompt)]))
    got = backend.forward(make_batch([Chunk(0, prompt)]))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    error = (got - want).abs().max().item()
    assert error < 2.5
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.75
    picked = want.gather(1, got.argmax(-1, keepdim=True))[:, 0]
    assert (want.max(-1).values - picked).max().item() <= 2 * error


def test_int8_quantisation_is_exact_per_row():
    from gpu.int8_linear import Int8Weight, linear

    weight = torch.randn(37, 64)
    packed = Int8Weight.quantize(weight)
    restored = packed.values.float() * packed.scales.float()[:, None]
    step = packed.scales.float()[:, None]
    # Half a step of rounding, plus the bfloat16 rounding of the scale times up to 127 steps.
    assert ((restored - weight).abs() <= (0.5 + 127 * 2**-8) * step).all()
    assert (packed.values.abs().amax(dim=1) >= 126).all()  # each row uses its full range
    x = torch.randn(3, 64)
    expected = x.bfloat16().float() @ restored.T
    assert torch.allclose(linear(x, packed).float(), expected, rtol=2e-2, atol=5e-2)


def test_kv_pool_shape_and_bytes(smollm2):
    c = smollm2.config
    k_cache, v_cache = smollm2.kv_cache[0]
    assert len(smollm2.kv_cache) == c.n_layers
    assert k_cache.shape == v_cache.shape == (32, BLOCK_SIZE, c.n_kv_heads, c.head_dim)
    pool_bytes = sum(k.nbytes + v.nbytes for k, v in smollm2.kv_cache)
    assert smollm2.kv_bytes_per_block(BLOCK_SIZE) * 32 == pool_bytes


def test_fresh_backend_reports_progress_ties_output_and_needs_a_kv_pool():
    reports = []
    backend = TorchBackend(
        resolve_model("smollm2-135m"), progress=lambda done, total: reports.append((done, total))
    )
    dones = [done for done, _ in reports]
    assert len(reports) == len(backend.config.tensor_shapes)  # one call per tensor read
    assert dones == sorted(dones) and dones[-1] == reports[0][1]
    assert backend.weights.output is backend.weights.token_embd  # tied: one tensor, not a copy
    with pytest.raises(KVNotAllocatedError, match="allocate_kv"):
        backend.forward(make_batch([Chunk(0, [1, 2, 3])]))


# --- RoPE against an independent formula ------------------------------------------------------


def _rope_reference(
    x: torch.Tensor, positions: torch.Tensor, rope: RopeConfig, factors: torch.Tensor | None
) -> torch.Tensor:
    """Rotate each pair as a complex number by pos / scale * base^(-2i/dim) / factor_i, in
    float64; pairs are (2i, 2i+1) for normal ordering, (i, i + dim/2) for NeoX."""
    x = x.double()
    dim, half = rope.dim, rope.dim // 2
    i = torch.arange(half, dtype=torch.float64)
    freq = rope.base ** (-2 * i / dim)
    if factors is not None:
        freq = freq / factors.double()
    scale = rope.scaling_factor if rope.scaling_type == "linear" else 1.0
    angle = positions.double()[:, None, None] / scale * freq  # [T, 1, half]
    if rope.neox:
        pairs = torch.complex(x[..., :half], x[..., half:dim])
    else:
        pairs = torch.complex(x[..., 0:dim:2], x[..., 1:dim:2])
    turned = pairs * torch.polar(torch.ones_like(angle), angle)
    out = x.clone()
    if rope.neox:
        out[..., :half], out[..., half:dim] = turned.real, turned.imag
    else:
        out[..., 0:dim:2], out[..., 1:dim:2] = turned.real, turned.imag
    return out


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize(
    ("scaling", "with_factors", "rope_dim"),
    [("none", False, 64), ("linear", False, 64), ("none", True, 64), ("linear", True, 32)],
)
def test_rope_matches_rotation_formula(neox, scaling, with_factors, rope_dim):
    rope = RopeConfig(
        base=500000.0,
        dim=rope_dim,
        neox=neox,
        scaling_type=scaling,
        scaling_factor=4.0 if scaling == "linear" else 1.0,
    )
    generator = torch.Generator().manual_seed(0)
    factors = 1 + 7 * torch.rand(rope_dim // 2, generator=generator) if with_factors else None
    x = torch.randn(6, 3, 64, generator=generator)
    positions = torch.tensor([0, 1, 5, 100, 1000, 4095])
    rotary = Rotary(rope, factors)
    got = rotary.apply(x, *rotary.cos_sin(positions))
    want = _rope_reference(x, positions, rope, factors)
    # float32 angles of positions up to 4095: a few ulps of 4095 rad ~ 1e-3 relative phase.
    assert (got.double() - want).abs().max().item() < 2e-3
    if rope_dim < 64:
        assert torch.equal(got[..., rope_dim:], x[..., rope_dim:])


def test_normal_rope_on_llama_cpp_rows_is_neox_on_hf_rows():
    """llama.cpp's converter interleaves each head's Q/K rows (HF row i and i + d/2 become
    adjacent); adjacent-pair RoPE on those rows equals HF's halves RoPE on the original rows."""
    head_dim = 64
    hf_rows = torch.randn(5, 2, head_dim, generator=torch.Generator().manual_seed(1))
    # HF order (halves) -> GGUF order (pairs): row 2i + j of GGUF is row j * d/2 + i of HF.
    gguf_rows = hf_rows.view(5, 2, 2, head_dim // 2).transpose(-1, -2).reshape(5, 2, head_dim)
    positions = torch.tensor([0, 3, 17, 250, 2000])
    normal = Rotary(RopeConfig(base=10000.0, dim=head_dim, neox=False))
    neox = Rotary(RopeConfig(base=10000.0, dim=head_dim, neox=True))
    got = normal.apply(gguf_rows, *normal.cos_sin(positions))
    want = neox.apply(hf_rows, *neox.cos_sin(positions))
    want_in_gguf_order = want.view(5, 2, 2, head_dim // 2).transpose(-1, -2).reshape(got.shape)
    assert torch.allclose(got, want_in_gguf_order, atol=1e-6)


def _write_tiny_llama3(path, freq_factors: np.ndarray, linear_factor: float) -> None:
    """One llama layer of hidden 64 (4 heads of 16, 2 KV heads) with `rope_freqs` and linear
    RoPE scaling in its metadata; weights random."""
    hidden, kv, ffn, vocab = 64, 32, 96, 128
    writer = GGUFWriter(str(path), "llama")
    for key, number in {"block_count": 1, "embedding_length": hidden, "feed_forward_length": ffn,
                        "attention.head_count": 4, "attention.head_count_kv": 2,
                        "context_length": 256}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", number)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("llama.rope.scaling.type", "linear")
    writer.add_float32("llama.rope.scaling.factor", linear_factor)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
              "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}  # fmt: skip
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))
    writer.add_tensor("rope_freqs.weight", freq_factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_backend_reads_rope_freqs_and_linear_scaling_from_the_file(tmp_path):
    factors = np.linspace(1.0, 8.0, 8)
    _write_tiny_llama3(tmp_path / "tiny.gguf", factors, linear_factor=2.0)
    backend = TorchBackend(tmp_path / "tiny.gguf")
    assert backend.config.rope.freq_factors_tensor == "rope_freqs.weight"
    i = torch.arange(8, dtype=torch.float64)
    want = 500000.0 ** (-2 * i / 16) / torch.from_numpy(factors) / 2.0
    assert torch.allclose(backend.rotary.inv_freq.double(), want, rtol=1e-6)
    backend.allocate_kv(NUM_SEQS * BLOCKS_PER_SEQ, BLOCK_SIZE)
    logits = backend.forward(make_batch([Chunk(0, [3, 1, 4, 1, 5])]))
    assert logits.shape == (5, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (
            RopeConfig(10000.0, 64, True, scaling_type="yarn", scaling_factor=4.0),
            "yarn rope scaling not supported yet",
        ),
        (
            RopeConfig(10000.0, 64, True, long_factors_tensor="rope_factors_long.weight"),
            "LongRoPE",
        ),
    ],
)
def test_unsupported_rope_is_refused(rope, message):
    with pytest.raises(RopeNotSupportedError, match=message):
        check_rope_supported(rope, "m")
    with pytest.raises(RopeNotSupportedError, match=message):
        Rotary(rope)


@pytest.mark.slow
@pytest.mark.parametrize(
    "question",
    ["What is the capital of France?", "Write a short poem about rain.",
     "Explain what a hash table is."],
)
def test_engine_greedy_32_tokens_equal_transformers_generate(pair, question):
    """The whole engine (scheduler, paged KV, sampler) continues a chat prompt exactly as
    transformers' greedy `generate` does, 32 tokens, on the real SmolLM2 file.

    transformers' greedy pick after every prefix of prompt + our tokens comes from one causal
    forward (teacher forcing): it equals our token at every step exactly when transformers'
    own token-by-token greedy loop (no EOS stop) would produce our 32 tokens, by induction
    over the steps, at 1/32 of the cost of running that loop."""
    from gpu.engine import Engine
    from gpu.request import Request, SamplingParams
    from tokenizer.tokenizer import load_tokenizer

    if pair.ours.config.architecture != "llama":
        pytest.skip("the real-file check runs on SmolLM2")
    path = resolve_model("smollm2-135m")
    _, prompt = load_tokenizer(path).encode_chat([{"role": "user", "content": question}])
    engine = Engine(path, backend=pair.ours, kv_blocks=16)
    engine.add(Request("q", prompt, SamplingParams(temperature=0.0), max_tokens=32,
                       ignore_eos=True))
    ours = [t for _ in range(40) for out in engine.step() for t in out.new_token_ids]
    pair.ours.allocate_kv(NUM_SEQS * BLOCKS_PER_SEQ, BLOCK_SIZE)  # give the fixture its pool back
    assert len(ours) == 32
    # Row i: transformers' logits after prompt + ours[:i], i.e. its greedy step i if steps
    # 0..i-1 agreed with ours.
    want = pair.hf_logits(list(prompt) + ours[:-1])[len(prompt) - 1 :].argmax(-1).tolist()
    assert ours == want
