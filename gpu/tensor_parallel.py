"""Tensor-parallel sharding arithmetic: which rows and columns of each weight a rank holds.

Pure functions of a model's sizes, no torch: the torch backend's shards (and later the CUDA
backend's) are cut by these numbers. For TP = N, rank r holds:

- attention: whole KV heads `[r*K/N, (r+1)*K/N)` and the query heads that read them
  (GQA: query head h reads KV head h // (H/K), so those are `[r*H/N, (r+1)*H/N)`); the fused
  QKV weight is column-parallel (its output rows for those heads), the KV cache holds only those
  KV heads, and O is row-parallel (its input columns for those query heads), then all-reduce;
- MLP: gate and up column-parallel over `[r*F/N, (r+1)*F/N)`, down row-parallel, all-reduce;
- embedding and LM head: vocabulary rows `[r*S, min((r+1)*S, V))` with S = ceil(V/N); the
  embedding lookup is an all-reduce of each rank's rows (zero for ids it does not hold), the
  logits a gather of padded [T, S] slices.

N must divide the KV heads (whole heads per rank) and the FFN width; anything else is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from jobs.errors import OrcdError


class TensorParallelError(OrcdError):
    """A tensor-parallel size that cannot shard the model, or a rank that failed."""


class ModelSizes(Protocol):
    """What sharding needs of a model: `loader.config.ModelConfig` and `loader.synth.ModelShape`
    both satisfy it."""

    name: str
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    ffn_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int: ...


@dataclass(slots=True, frozen=True)
class Span:
    """Indices `[start, stop)` along one dimension."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def shifted(self, offset: int) -> Span:
        return Span(self.start + offset, self.stop + offset)

    def scaled(self, factor: int) -> Span:
        """The span in units `factor` times smaller (heads -> rows of head_dim each)."""
        return Span(self.start * factor, self.stop * factor)


@dataclass(slots=True, frozen=True)
class ShardPlan:
    """One rank's share of every sharded dimension, and the weight rows/columns that follow."""

    rank: int
    world_size: int
    n_heads: int  # the model's, not the rank's
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    q_heads: Span
    kv_heads: Span
    ffn: Span
    vocab: Span
    vocab_shard_size: int  # ceil(vocab / N): every rank's logits are padded to this for the gather

    @property
    def local_heads(self) -> int:
        return self.q_heads.size

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads.size

    def qkv_rows(self) -> tuple[Span, Span, Span]:
        """Output rows of the fused [Q; K; V] weight (and bias) this rank holds, in that order."""
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        return (
            self.q_heads.scaled(self.head_dim),
            self.kv_heads.scaled(self.head_dim).shifted(q_size),
            self.kv_heads.scaled(self.head_dim).shifted(q_size + kv_size),
        )

    def gate_up_rows(self) -> tuple[Span, Span]:
        """Output rows of the fused [gate; up] weight this rank holds."""
        return self.ffn, self.ffn.shifted(self.ffn_size)

    def o_columns(self) -> Span:
        """Input columns of the attention output weight (row-parallel, then all-reduce)."""
        return self.q_heads.scaled(self.head_dim)

    def down_columns(self) -> Span:
        """Input columns of the down weight (row-parallel, then all-reduce)."""
        return self.ffn


def _even(total: int, world_size: int, rank: int) -> Span:
    share = total // world_size
    return Span(rank * share, (rank + 1) * share)


def check_tensor_parallel(sizes: ModelSizes, world_size: int) -> None:
    """Refuse a TP size that does not give every rank whole KV heads and an equal FFN share."""
    if world_size < 1:
        raise TensorParallelError(f"tensor-parallel size must be at least 1, got {world_size}")
    if sizes.n_kv_heads % world_size:
        raise TensorParallelError(
            f"{sizes.name}: tensor-parallel size {world_size} does not divide its "
            f"{sizes.n_kv_heads} KV heads (each rank needs whole KV heads); possible sizes: "
            f"{', '.join(str(n) for n in divisors(sizes.n_kv_heads))}"
        )
    if sizes.ffn_size % world_size:
        raise TensorParallelError(
            f"{sizes.name}: tensor-parallel size {world_size} does not divide its FFN width "
            f"{sizes.ffn_size}"
        )
    if sizes.vocab_size < world_size:
        raise TensorParallelError(
            f"{sizes.name}: vocabulary of {sizes.vocab_size} is smaller than the "
            f"tensor-parallel size {world_size}"
        )


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shard_plan(sizes: ModelSizes, world_size: int, rank: int) -> ShardPlan:
    """Rank `rank`'s share of a model split `world_size` ways (see the module docstring)."""
    check_tensor_parallel(sizes, world_size)
    if not 0 <= rank < world_size:
        raise TensorParallelError(f"rank {rank} is outside 0..{world_size - 1}")
    vocab_shard = -(-sizes.vocab_size // world_size)
    return ShardPlan(
        rank=rank,
        world_size=world_size,
        n_heads=sizes.n_heads,
        n_kv_heads=sizes.n_kv_heads,
        head_dim=sizes.head_dim,
        ffn_size=sizes.ffn_size,
        vocab_size=sizes.vocab_size,
        q_heads=_even(sizes.n_heads, world_size, rank),
        kv_heads=_even(sizes.n_kv_heads, world_size, rank),
        ffn=_even(sizes.ffn_size, world_size, rank),
        vocab=Span(
            min(rank * vocab_shard, sizes.vocab_size),
            min((rank + 1) * vocab_shard, sizes.vocab_size),
        ),
        vocab_shard_size=vocab_shard,
    )
