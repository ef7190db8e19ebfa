"""Rows of a quantised matrix as float32 (gpu/kernels/embedding.cu): the token-embedding lookup
and a plain dequantise of consecutive rows, as float32 or fp16 (the scratch of the
dequantise-then-GEMM prefill path)."""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride
from gpu.cuda.matvec import PACKED_QUANT_BYTES, grouped, packed_row_bytes
from loader.quants import row_nbytes

_T = GGMLQuantizationType
DEQUANT_TYPES: dict[GGMLQuantizationType, tuple[str, int]] = {
    _T.F32: ("f32", 32),
    _T.F16: ("f16", 32),
    _T.BF16: ("bf16", 32),
    _T.Q4_0: ("q4_0", 32),
    _T.Q4_1: ("q4_1", 32),
    _T.Q5_0: ("q5_0", 32),
    _T.Q5_1: ("q5_1", 32),
    _T.Q8_0: ("q8_0", 32),
    _T.Q4_K: ("q4_k", 256),
    _T.Q5_K: ("q5_k", 256),
    _T.Q6_K: ("q6_k", 256),
}
_ARG_KINDS = ("ptr", "i32", "ptr", "i64", "ptr", "i64", "i32")
_HALF_ARG_KINDS = ("ptr", "i32", "ptr", "i64", "i64", "i32")


def dequant_rows_launch_config(n_rows: int, n_cols: int) -> LaunchConfig:
    """One CTA per output row, a thread per 32-element group (up to 256, looping beyond)."""
    if n_rows < 1 or n_cols < 32:
        raise CudaError(f"dequant_rows: {n_rows} rows of {n_cols}")
    threads = min(256, ceil_div(n_cols // 32, 32) * 32)
    return LaunchConfig((n_rows, 1, 1), (threads, 1, 1))


class DequantRows:
    """Decode whole rows of one GGUF matrix of `n_cols` columns, bit-exact with loader/quants.

    `matvec_layout`: the table is in the matvec layout (gpu/cuda/matvec.py pack_rows) rather
    than GGUF blocks; for the fp16 `rows` of the types that layout repacks (Q4_0, Q8_0), so
    the prefill reads the weights as they are stored on the GPU."""

    def __init__(
        self, ggml_type: GGMLQuantizationType | int, n_cols: int, matvec_layout: bool = False
    ) -> None:
        qtype = GGMLQuantizationType(ggml_type)
        if qtype not in DEQUANT_TYPES:
            raise CudaError(f"dequant_rows: no kernel for {qtype.name}")
        stem, multiple = DEQUANT_TYPES[qtype]
        if n_cols % multiple or n_cols == 0:
            raise CudaError(
                f"dequant_rows {qtype.name}: {n_cols} columns not a multiple of {multiple}"
            )
        self.ggml_type, self.n_cols = qtype, n_cols
        self.row_bytes = row_nbytes(qtype, n_cols)
        self._half_name = f"dequant_rows_half_{stem}"
        self._site = None
        self.matvec_layout = matvec_layout and qtype in PACKED_QUANT_BYTES
        if self.matvec_layout:
            self.row_bytes = packed_row_bytes(qtype, n_cols)
            packed_stem = "q4_0x4" if grouped(qtype, n_cols) else stem
            self._half_name = f"dequant_rows_half_packed_{packed_stem}"
        else:
            self._site = launch_site("embedding.cu", f"dequant_rows_{stem}", _ARG_KINDS)
        self._half_site = None

    def lookup(self, out: torch.Tensor, table: torch.Tensor, row_ids: torch.Tensor) -> torch.Tensor:
        """out[i] = row row_ids[i] of table (int64 ids, e.g. token ids)."""
        return self._launch(out, table, row_ids, 0, row_ids.shape[0])

    def rows(self, out: torch.Tensor, table: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """out[i] = row first_row + i of table, for every row of out (float32, or float16:
        the float32 values rounded as torch's .half() rounds them)."""
        if out.dtype != torch.float16:
            return self._launch(out, table, None, first_row, out.shape[0])
        if self._half_site is None:
            self._half_site = launch_site("embedding.cu", self._half_name, _HALF_ARG_KINDS)
        head = self._checked_args(out, table, None, first_row, out.shape[0])
        self._half_site.launch(*head, first_row, self.n_cols)
        return out

    def _checked_args(
        self, out: torch.Tensor, table: torch.Tensor, row_ids: torch.Tensor | None,
        first_row: int, n_rows: int,
    ) -> tuple:  # fmt: skip
        """Checks, then (config, out, out stride, table, row bytes): both kernels' first args."""
        if out.shape[0] != n_rows or out.shape[1] < self.n_cols:
            raise CudaError(f"dequant_rows: out {tuple(out.shape)} for {n_rows} rows")
        if table.numel() % self.row_bytes:
            raise CudaError(f"dequant_rows: table of {table.numel()} bytes is not whole rows")
        if row_ids is None and first_row + n_rows > table.numel() // self.row_bytes:
            raise CudaError(f"dequant_rows: rows {first_row}..{first_row + n_rows} out of range")
        half = out.dtype == torch.float16
        return (
            dequant_rows_launch_config(n_rows, self.n_cols),
            pointer(out, "dequant_rows out", torch.float16 if half else torch.float32, align=16),
            row_stride(out, "dequant_rows out", multiple=8 if half else 4),
            pointer(table.view(-1), "dequant_rows table", torch.uint8, align=16),
            self.row_bytes,
        )

    def _launch(
        self, out: torch.Tensor, table: torch.Tensor, row_ids: torch.Tensor | None,
        first_row: int, n_rows: int,
    ) -> torch.Tensor:  # fmt: skip
        if self._site is None:
            raise CudaError("dequant_rows: the matvec layout is read only into fp16 rows")
        head = self._checked_args(out, table, row_ids, first_row, n_rows)
        row_ids_ptr = pointer(row_ids, "dequant_rows row_ids", torch.int64, optional=True)
        self._site.launch(*head, row_ids_ptr, first_row, self.n_cols)
        return out
