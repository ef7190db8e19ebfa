"""The torch backend split over N processes with torch.distributed (gloo on the CPU).

`TensorParallelTorchBackend` is rank 0 and a `Backend` like any other: the engine, scheduler and
sampler live in its process. It starts ranks 1..N-1 as processes (`serve_rank`), each loading
only its shard (`gpu.shard_weights`, cut by `gpu.tensor_parallel`). Every call the engine makes
(`allocate_kv`, `forward`) is broadcast to all ranks, then every rank runs the same forward on
its shard: all-reduce after O and down, all-reduce of the vocabulary-split embedding, all-gather
of the vocabulary-split logits.

Failure: a rank that dies closes its gloo connections, so the next collective of every other
rank fails. Rank 0 then stops the remaining ranks and raises `RankLostError` (a
`DeviceLostError`: the worker hands its jobs over and exits non-zero) naming the dead ones; a
worker rank exits non-zero. A rank that never joins is
noticed while rank 0 waits for the group (its exit code is polled).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gpu.backends.base import model_source
from gpu.backends.torch_backend import KVNotAllocatedError, TorchBackend
from gpu.batch import ForwardBatch
from gpu.int8_linear import linear
from gpu.request import DeviceLostError
from gpu.rope import Rotary
from gpu.shard_weights import load_shard_weights
from gpu.tensor_parallel import ShardPlan, TensorParallelError, shard_plan

DEFAULT_TIMEOUT_S = 1800.0  # a collective's limit: covers the slowest rank loading its shard


class RankLostError(TensorParallelError, DeviceLostError):
    """A rank of the group died: nothing more can run, the process must exit and restart (the
    worker hands its jobs over, as for a lost GPU)."""


class TorchShard(TorchBackend):
    """One rank's shard of the model and of the KV pool (its KV heads); `forward` runs the
    collectives of the process group and returns the whole [L, vocab] logits on every rank."""

    name = "torch-tp"

    def __init__(self, gguf_path: str | os.PathLike, plan: ShardPlan, dtype: torch.dtype) -> None:
        with model_source(gguf_path) as (file, self.config):
            self.plan = plan
            self.device = torch.device("cpu")
            self.dtype = torch.bfloat16 if dtype == torch.int8 else dtype
            with torch.inference_mode():
                self.weights = load_shard_weights(file, self.config, plan, dtype)
        self.rotary = Rotary(self.config.rope, self.weights.rope_freq_factors, self.device)
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = 0
        self.n_heads, self.n_kv_heads = plan.local_heads, plan.local_kv_heads

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.plan.vocab
        local_ids = token_ids - vocab.start
        held = (local_ids >= 0) & (local_ids < vocab.size)
        rows = self.weights.token_embd[local_ids.clamp(0, max(vocab.size - 1, 0))].float()
        rows = torch.where(held[:, None], rows, 0.0)
        dist.all_reduce(rows)
        return rows

    def _sum_shards(self, partial: torch.Tensor) -> torch.Tensor:
        partial = partial.float()
        dist.all_reduce(partial)
        return partial

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        local = linear(x, self.weights.output).float()
        local = F.pad(local, (0, plan.vocab_shard_size - local.shape[1]))
        slices = [torch.empty_like(local) for _ in range(plan.world_size)]
        dist.all_gather(slices, local)
        return torch.cat(slices, dim=1)[:, : plan.vocab_size]


def _broadcast(command: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """Rank 0 sends `command` (a method name and its arguments); the others receive it."""
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def join_rank(
    rank: int, world_size: int, init_method: str, gguf_path: str, dtype: torch.dtype,
    threads: int, timeout_s: float,
) -> TorchShard:  # fmt: skip
    """A worker rank's start: join the group, load the shard, meet at the barrier.

    Ctrl-C reaches the whole process group from a terminal: a worker rank ignores it, so rank 0
    decides (it drains, then stops the ranks); SIGTERM still ends it (rank 0's exit sends it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    with model_source(gguf_path) as (_, config):
        plan = shard_plan(config, world_size, rank)
    shard = TorchShard(gguf_path, plan, dtype)
    dist.barrier()
    return shard


def receive_command() -> tuple[Any, ...]:
    return _broadcast(None)


def serve_rank(*args: Any) -> None:
    """A worker rank's life (`join_rank`'s arguments): run rank 0's commands until "stop"."""
    shard = join_rank(*args)
    with torch.inference_mode():
        while (command := receive_command())[0] != "stop":
            getattr(shard, command[0])(*command[1:])
    dist.destroy_process_group()


class TensorParallelTorchBackend(TorchShard):
    """Rank 0 of a TP group: starts the other ranks, broadcasts each call, runs its shard.

    `rank_main` is what the other ranks run (`serve_rank`; tests pass one that fails)."""

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        world_size: int,
        dtype: torch.dtype = torch.float32,
        threads_per_rank: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        rank_main: Callable[..., None] = serve_rank,
    ) -> None:
        gguf_path = str(gguf_path)
        with model_source(gguf_path) as (_, config):
            plan = shard_plan(config, world_size, 0)  # refuses a bad size before any process
        if dist.is_initialized():
            raise TensorParallelError("a torch.distributed group already runs in this process")
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
        self._rendezvous = tempfile.TemporaryDirectory(prefix="orcd-tp-")
        init_method = Path(self._rendezvous.name, "store").as_uri()
        context = mp.get_context("spawn")
        self._ranks = [
            context.Process(
                target=rank_main, name=f"orcd-tp-rank{rank}", daemon=True,
                args=(rank, world_size, init_method, gguf_path, dtype, threads, timeout_s),
            )  # fmt: skip
            for rank in range(1, world_size)
        ]
        for process in self._ranks:
            process.start()
        self._closed = False
        try:
            self._while_ranks_live(
                lambda: dist.init_process_group(
                    "gloo", init_method=init_method, rank=0, world_size=world_size,
                    timeout=timedelta(seconds=timeout_s),
                )  # fmt: skip
            )
            super().__init__(gguf_path, plan, dtype)
            self._while_ranks_live(dist.barrier)
        except BaseException as exc:
            self._fail(exc)

    def _while_ranks_live(self, collective: Callable[[], None]) -> None:
        """Run a blocking group call in a thread, giving up as soon as another rank has died
        (a rank that never joins would otherwise hold rank 0 until the timeout)."""
        errors: list[BaseException] = []

        def run() -> None:
            try:
                collective()
            except BaseException as exc:  # handed to the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=run, name="orcd-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if any(p.exitcode not in (None, 0) for p in self._ranks):
                raise RankLostError("a tensor-parallel rank exited while the group formed")
        if errors:
            raise errors[0]

    def _fail(self, cause: BaseException) -> None:
        """Stop every rank and raise one error naming the ones that died."""
        self._stop_ranks(graceful=False)
        dead = [f"rank {i + 1} (exit {p.exitcode})" for i, p in enumerate(self._ranks)
                if p.exitcode not in (None, 0, -15)]  # fmt: skip
        who = ", ".join(dead) if dead else "no rank exited first"
        raise RankLostError(
            f"tensor-parallel group of {len(self._ranks) + 1} stopped: {who}; rank 0 saw: "
            f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
        ) from cause

    def _stop_ranks(self, graceful: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if graceful:
            _broadcast(("stop",))
        for process in self._ranks:
            process.join(timeout=10 if graceful else 2)
            if process.is_alive():
                process.terminate()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._rendezvous.cleanup()

    def _command(self, name: str, *args: Any) -> Any:
        if self._closed:
            raise RankLostError("tensor-parallel group is closed")
        try:
            _broadcast((name, *args))
            return getattr(super(), name)(*args)
        except Exception as exc:  # noqa: BLE001 - gloo's error when a peer's connection closed,
            # or rank 0 failing where the others go on: either way the ranks' collectives no
            # longer pair up, so the group cannot be trusted with another step.
            self._fail(exc)

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self._command("allocate_kv", num_blocks, block_size)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if not self.kv_cache:  # checked before the ranks are told to run
            raise KVNotAllocatedError("torch-tp backend: forward called before allocate_kv")
        return self._command("forward", batch)

    def close(self) -> None:
        """Stop the other ranks and leave the group (idempotent)."""
        self._stop_ranks(graceful=True)
