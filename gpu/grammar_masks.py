"""The token bitmask of a step's grammar-constrained rows, built on the host for one upload.

Only constrained rows get a mask row (the `TokenMask` names them); a batch without one builds
nothing. Two buffers are used in turn (pinned on a GPU, so the upload is one async copy): the
engine fills the mask of step t+1 after reading step t, and step t's upload has finished by
then, while step t+1's may still be in flight when step t+2 is built.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import torch

from gpu.backends.base import TokenMask
from gpu.sequence import Sequence, SequenceStatus
from structured.matcher import bitmask_words, fill_bitmasks


class GrammarMasks:
    """Builds the `TokenMask` of a step from its sampled sequences' matchers; counts the host
    time spent (`fill_s`, over `steps` steps that had constrained rows)."""

    def __init__(self, vocab_size: int, pin: bool) -> None:
        self.words = bitmask_words(vocab_size)
        self._pin = pin
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._turn = 0
        self.fill_s = 0.0
        self.steps = 0

    def build(self, sampled: Seq[Sequence]) -> TokenMask | None:
        """The mask of the running constrained sequences among `sampled` (batch order), or None."""
        constrained = [(i, seq.matcher) for i, seq in enumerate(sampled)
                       if seq.matcher is not None and seq.status == SequenceStatus.RUNNING]  # fmt: skip
        if not constrained:
            return None
        started = time.perf_counter()
        bits = self._buffer(len(constrained))[: len(constrained)]
        fill_bitmasks([(matcher, k) for k, (_, matcher) in enumerate(constrained)], bits.numpy())
        self.fill_s += time.perf_counter() - started
        self.steps += 1
        return TokenMask(bits, tuple(i for i, _ in constrained))

    def _buffer(self, rows: int) -> torch.Tensor:
        self._turn ^= 1
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.shape[0] < rows:
            size = max(rows, 64)
            buffer = torch.zeros(size, self.words, dtype=torch.int32, pin_memory=self._pin)
            self._buffers[self._turn] = buffer
        return buffer
