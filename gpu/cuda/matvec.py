"""Quantised matrix x vector(s) (gpu/kernels/matvec.cu): y[b] = W x[b] (+ bias) (+ residual).

Weights stay in the GGUF block layout exactly as stored (a copy of the file's bytes, no
repacking): one CTA per ROWS_PER_CTA output rows reads the rows' blocks, several threads per
block so that loads are contiguous, each x value loaded once for all of the CTA's rows; the legacy 18/22/34-byte blocks are read with 2-byte loads, the K-quants
and F16/BF16 rows with 8- and 16-byte loads. Up to 8
sequences share each read of the weights; the kernel is instantiated for 1, 2, 4 and 8 and the
smallest that fits is launched.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from gpu.cuda.driver import LaunchSite
from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, pointer, row_stride
from loader.quants import row_nbytes

_T = GGMLQuantizationType

# The one dispatch table: GGML type -> (kernel name stem, columns must be a multiple of).
MATVEC_TYPES: dict[GGMLQuantizationType, tuple[str, int]] = {
    _T.F16: ("f16", 8),
    _T.BF16: ("bf16", 8),
    _T.Q4_0: ("q4_0", 32),
    _T.Q4_1: ("q4_1", 32),
    _T.Q5_0: ("q5_0", 32),
    _T.Q5_1: ("q5_1", 32),
    _T.Q8_0: ("q8_0", 32),
    _T.Q4_K: ("q4_k", 256),
    _T.Q5_K: ("q5_k", 256),
    _T.Q6_K: ("q6_k", 256),
}
MATVEC_WARPS = 4  # matvec.cu: one CTA of this many warps per ROWS_PER_CTA output rows
BATCH_VARIANTS = (1, 2, 4, 8)  # the MAXB instantiations
ROWS_VARIANTS = (2, 4)  # the ROWS instantiations
# Rows per CTA by batch variant: the faster of 2 and 4 in a sweep on the H100 (2026-11-25, 8B
# shapes); 4 unless a type's own table says otherwise.
ROWS_PER_CTA: dict[int, int] = {1: 4, 2: 4, 4: 4, 8: 4}
ROWS_PER_CTA_BY_STEM: dict[str, dict[int, int]] = {
    "q4_0": {1: 4, 2: 2, 4: 4, 8: 4},
    "q5_0": {1: 2, 2: 2, 4: 2, 8: 4},
    "q8_0": {1: 2, 2: 2, 4: 4, 8: 4},
}
MAX_SEQS = BATCH_VARIANTS[-1]
_ARG_KINDS = ("ptr", "i32", "ptr", "i64", "ptr", "i32", "i32", "i32", "i32", "ptr", "ptr", "i32")


def matvec_launch_config(n_rows: int, n_seqs: int, stem: str = "") -> tuple[LaunchConfig, int, int]:
    """(config, batch variant, rows per CTA): one CTA of MATVEC_WARPS warps per few rows."""
    if n_rows < 1:
        raise CudaError(f"matvec: {n_rows} output rows")
    if not 1 <= n_seqs <= MAX_SEQS:
        raise CudaError(f"matvec: {n_seqs} sequences; one launch takes 1 to {MAX_SEQS}")
    variant = next(b for b in BATCH_VARIANTS if b >= n_seqs)
    rows = ROWS_PER_CTA_BY_STEM.get(stem, ROWS_PER_CTA)[variant]
    return LaunchConfig((-(-n_rows // rows), 1, 1), (32 * MATVEC_WARPS, 1, 1)), variant, rows


class MatVec:
    """One weight's matrix-vector product: a launch site per batch variant, built on first use."""

    def __init__(self, ggml_type: GGMLQuantizationType | int, n_rows: int, n_cols: int) -> None:
        qtype = GGMLQuantizationType(ggml_type)
        if qtype not in MATVEC_TYPES:
            raise CudaError(f"matvec: no kernel for {qtype.name} weights")
        self.stem, multiple = MATVEC_TYPES[qtype]
        if n_cols < multiple or n_cols % multiple:
            raise CudaError(
                f"matvec {qtype.name}: {n_cols} columns is not a multiple of {multiple}"
            )
        self.ggml_type, self.n_rows, self.n_cols = qtype, n_rows, n_cols
        self.row_bytes = row_nbytes(qtype, n_cols)
        self._sites: dict[tuple[int, int], LaunchSite] = {}

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y[b, :n_rows] = weight @ x[b, :n_cols] (+ bias) (+ residual[b]); residual may be y."""
        n_seqs = x.shape[0]
        config, variant, rows = matvec_launch_config(self.n_rows, n_seqs, self.stem)
        if x.shape[1] < self.n_cols or y.shape[0] != n_seqs or y.shape[1] < self.n_rows:
            raise CudaError(
                f"matvec: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit "
                f"{self.n_rows}x{self.n_cols} for {n_seqs} sequences"
            )
        if weight.numel() != self.n_rows * self.row_bytes:
            raise CudaError(
                f"matvec: weight has {weight.numel()} bytes, {self.n_rows} rows of "
                f"{self.ggml_type.name} need {self.n_rows * self.row_bytes}"
            )
        if residual is not None and (
            residual.shape[0] != n_seqs or residual.shape[1] < self.n_rows
        ):
            raise CudaError(f"matvec: residual {tuple(residual.shape)} does not match y")
        if bias is not None and bias.numel() != self.n_rows:
            raise CudaError(f"matvec: bias has {bias.numel()} values for {self.n_rows} rows")
        site = self._sites.get((variant, rows))
        if site is None:
            name = f"matvec_{self.stem}_b{variant}_r{rows}"
            site = self._sites[variant, rows] = launch_site("matvec.cu", name, _ARG_KINDS)
        site.launch(
            config,
            pointer(y, "matvec y", torch.float32),
            row_stride(y, "matvec y"),
            pointer(weight.view(-1), "matvec weight", torch.uint8, align=16),
            self.row_bytes,
            pointer(x, "matvec x", torch.float32, align=16),
            row_stride(x, "matvec x", multiple=4),
            n_seqs,
            self.n_rows,
            self.n_cols,
            pointer(bias, "matvec bias", torch.float32, optional=True),
            pointer(residual, "matvec residual", torch.float32, optional=True),
            0 if residual is None else row_stride(residual, "matvec residual"),
        )
        return y
