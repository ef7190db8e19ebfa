"""Decode inputs into the CUDA graphs' static buffers in one launch (gpu/kernels/decode_inputs.cu).

Staging a graphed step with torch would take five copies and fills, each costing tens of µs of
host time on the lent machine's host, while the GPU waits for them; one cuLaunchKernel does the
same work (bench/NOTES.md, "Kernel notes").
"""

from __future__ import annotations

import torch

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, pointer

THREADS = 128
_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "ptr", "ptr", "ptr", "ptr", "ptr", "i32", "i32")


def stage_launch_config(n_seqs: int, bucket: int) -> LaunchConfig:
    """One CTA per row of the bucket: the batch's n_seqs rows, then the padding rows."""
    if not 1 <= n_seqs <= bucket:
        raise CudaError(f"stage_decode_inputs: {n_seqs} sequences in a bucket of {bucket}")
    return LaunchConfig((bucket, 1, 1), (THREADS, 1, 1))


class DecodeInputStager:
    """Owns the static buffers: rows int64 [4, cap] (ids, positions, slots, context lengths) and
    tables int32 [cap, table_width]; `stage` fills their first `bucket` rows from a batch."""

    def __init__(self, cap: int, table_width: int, device: torch.device) -> None:
        self.cap, self.table_width = cap, table_width
        self.rows = torch.zeros(4, cap, dtype=torch.int64, device=device)
        self.tables = torch.zeros(cap, table_width, dtype=torch.int32, device=device)
        self.reset()
        self._rows_ptr, self._tables_ptr = self.rows.data_ptr(), self.tables.data_ptr()
        self._site = launch_site("decode_inputs.cu", "stage_decode_inputs", _ARG_KINDS)

    def reset(self) -> None:
        """Every row a padding row (slot -1: no KV write; one token of context in block 0)."""
        self.rows.zero_()
        self.rows[2].fill_(-1)
        self.rows[3].fill_(1)
        self.tables[:, 0] = 0

    def stage(
        self,
        bucket: int,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_lens: torch.Tensor,
        block_tables: torch.Tensor,
    ) -> None:
        n = token_ids.shape[0]
        if bucket > self.cap:
            raise CudaError(f"stage_decode_inputs: bucket {bucket} over the {self.cap} rows")
        if block_tables.dim() != 2 or block_tables.shape[0] != n:
            raise CudaError(f"stage_decode_inputs: block tables {tuple(block_tables.shape)} "
                            f"for {n} sequences")  # fmt: skip
        width = block_tables.shape[1]
        if width > self.table_width:
            raise CudaError(f"stage_decode_inputs: {width} table columns, the graphs hold "
                            f"{self.table_width}")  # fmt: skip
        for field in (positions, slot_mapping, context_lens):
            if field.shape[0] != n:
                raise CudaError(f"stage_decode_inputs: a field of {field.shape[0]} for {n} rows")
        self._site.launch(
            stage_launch_config(n, bucket),
            self._rows_ptr,
            self.cap,
            self._tables_ptr,
            self.table_width,
            pointer(token_ids, "stage token_ids", torch.int64),
            pointer(positions, "stage positions", torch.int64),
            pointer(slot_mapping, "stage slot_mapping", torch.int64),
            pointer(context_lens, "stage context_lens", torch.int64),
            pointer(block_tables.contiguous(), "stage block_tables", torch.int32),
            width,
            n,
        )
