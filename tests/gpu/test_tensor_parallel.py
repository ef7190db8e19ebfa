"""The sharding arithmetic for TP = 2, 4, 8 on real model shapes, against a brute-force owner
of every row: each weight row belongs to the rank holding its head (or FFN unit, or token);
and each rank's weights read from the file equal the same rows/columns of the whole model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as _T

from gpu.shard_weights import load_shard_weights
from gpu.tensor_parallel import Span, TensorParallelError, shard_plan
from gpu.weights import load_weights
from loader.config import read_config
from loader.gguf_file import open_gguf
from loader.synth import SHAPES, write_synthetic_gguf

# (shape, TP size) -> refused? smollm2 has 3 KV heads, qwen2-0.5b 2, llama3-8b 8.
CASES = [(name, n) for name in ("llama3-8b", "qwen2-0.5b", "smollm2-135m") for n in (2, 4, 8)]


def owned_rows(spans: list[Span]) -> list[int]:
    return [i for span in spans for i in range(span.start, span.stop)]


@pytest.mark.parametrize(("name", "world_size"), CASES)
def test_every_row_has_exactly_the_owner_its_head_says(name, world_size):
    shape = SHAPES[name]
    if shape.n_kv_heads % world_size:
        with pytest.raises(TensorParallelError, match=f"does not divide its {shape.n_kv_heads} KV"):
            shard_plan(shape, world_size, 0)
        return
    plans = [shard_plan(shape, world_size, r) for r in range(world_size)]
    d, h, k = shape.head_dim, shape.n_heads, shape.n_kv_heads
    group = h // k
    kv_per_rank = k // world_size

    # The reference owner of each row of the fused [Q; K; V] weight, from the head it feeds.
    def qkv_owner(row: int) -> int:
        if row < h * d:
            return (row // d // group) // kv_per_rank  # a query head follows its KV head
        kv_head = (row - h * d) // d % k
        return kv_head // kv_per_rank

    qkv_rows = h * d + 2 * k * d
    seen: dict[int, int] = {}
    for plan in plans:
        for row in owned_rows(list(plan.qkv_rows())):
            assert row not in seen, f"row {row} given to ranks {seen[row]} and {plan.rank}"
            seen[row] = plan.rank
        # GQA: every query head of the rank reads a KV head of the same rank.
        for q_head in range(plan.q_heads.start, plan.q_heads.stop):
            assert plan.kv_heads.start <= q_head // group < plan.kv_heads.stop
        assert plan.local_heads == h // world_size and plan.local_kv_heads == kv_per_rank
        assert plan.o_columns() == plan.qkv_rows()[0]  # O reads exactly the rank's Q heads
        assert plan.down_columns() == plan.gate_up_rows()[0]
    assert seen == {row: qkv_owner(row) for row in range(qkv_rows)}

    ffn = shape.ffn_size
    gate_up = {row: plan.rank for plan in plans for row in owned_rows(list(plan.gate_up_rows()))}
    assert gate_up == {row: (row % ffn) // (ffn // world_size) for row in range(2 * ffn)}

    vocab = [t for plan in plans for t in range(plan.vocab.start, plan.vocab.stop)]
    assert vocab == list(range(shape.vocab_size))
    assert all(p.vocab.size <= p.vocab_shard_size for p in plans)
    assert plans[0].vocab_shard_size * world_size >= shape.vocab_size


def test_llama3_8b_at_tp8_holds_one_kv_head_and_its_four_query_heads_per_rank():
    plan = shard_plan(SHAPES["llama3-8b"], 8, 5)
    assert (plan.kv_heads, plan.q_heads) == (Span(5, 6), Span(20, 24))
    assert plan.qkv_rows() == (Span(2560, 3072), Span(4096 + 640, 4096 + 768),
                               Span(5120 + 640, 5120 + 768))  # fmt: skip
    assert plan.ffn == Span(5 * 1792, 6 * 1792)
    assert plan.vocab == Span(5 * 16032, 6 * 16032)


def test_refusals_name_the_model_and_the_sizes_that_work():
    with pytest.raises(TensorParallelError, match=r"smollm2-135m.*possible sizes: 1, 3"):
        shard_plan(SHAPES["smollm2-135m"], 2, 0)
    with pytest.raises(TensorParallelError, match="possible sizes: 1, 2$"):
        shard_plan(SHAPES["qwen2-0.5b"], 4, 0)
    with pytest.raises(TensorParallelError, match="at least 1"):
        shard_plan(SHAPES["llama3-8b"], 0, 0)
    with pytest.raises(TensorParallelError, match="rank 2 is outside 0..1"):
        shard_plan(SHAPES["llama3-8b"], 2, 2)
    assert shard_plan(SHAPES["smollm2-135m"], 3, 2).q_heads == Span(6, 9)


# Narrowed copies of real layouts, small enough to load whole in a second: phi3's fused QKV and
# gate·up with head_dim 96; qwen2's biases at Q4_K, where 2432-wide halves of the 4864 FFN are
# not whole 256-blocks (down is cut after dequantising) and 896-wide rows fall back to Q5_0.
PHI3 = dataclasses.replace(SHAPES["phi3-mini"], hidden_size=768, n_heads=8, n_kv_heads=8,
                           ffn_size=1024, vocab_size=1027).with_layers(1)  # fmt: skip
QWEN2 = dataclasses.replace(SHAPES["qwen2-0.5b"], vocab_size=1024).with_layers(1)


@pytest.mark.parametrize(
    ("shape", "quant", "world_size"), [(PHI3, _T.Q8_0, 4), (QWEN2, _T.Q4_K, 2)],
    ids=["phi3-q8_0-tp4", "qwen2-q4_k-tp2"],
)  # fmt: skip
def test_each_rank_loads_exactly_its_rows_and_columns_of_the_whole_model(
    tmp_path, shape, quant, world_size
):
    path = tmp_path / "model.gguf"
    write_synthetic_gguf(path, shape, quant)
    with open_gguf(path) as file:
        config = read_config(file)
        whole = load_weights(file, config)
        for rank in range(world_size):
            plan = shard_plan(config, world_size, rank)
            shard = load_shard_weights(file, config, plan)
            layer, full = shard.layers[0], whole.layers[0]
            rows = [i for s in plan.qkv_rows() for i in range(s.start, s.stop)]
            assert torch.equal(layer.wqkv, full.wqkv[rows])
            if config.qkv_bias:
                assert torch.equal(layer.bqkv, full.bqkv[rows])
            gate_up = [i for s in plan.gate_up_rows() for i in range(s.start, s.stop)]
            assert torch.equal(layer.w_gate_up, full.w_gate_up[gate_up])
            o, down = plan.o_columns(), plan.down_columns()
            assert torch.equal(layer.wo, full.wo[:, o.start : o.stop])
            assert torch.equal(layer.w_down, full.w_down[:, down.start : down.stop])
            assert torch.equal(layer.attn_norm, full.attn_norm)
            vocab = slice(plan.vocab.start, plan.vocab.stop)
            assert torch.equal(shard.token_embd, whole.token_embd[vocab])
            assert torch.equal(shard.output, whole.output[vocab])
