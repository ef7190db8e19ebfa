"""Quantised matrix x vector(s) (gpu/kernels/matvec.cu): y[b] = W x[b] (+ bias) (+ residual).

Weights stay in the GGUF block layout as stored, except Q4_0 and Q8_0: their 18/34-byte blocks
leave the quants 2-byte aligned, so `pack_rows` repacks them once at load into per-row quants then
scales (layout in quant_blocks.cuh), read with aligned 4-/8-byte loads; Q4_0 rows of a multiple
of 128 columns also put each lane's slices of 4 blocks together (`grouped`: one 16-byte load,
the q4_0x4 kernels). One CTA per ROWS_PER_CTA output rows reads the rows' blocks, several
threads per block so that loads are contiguous, each x value loaded once for all of the CTA's
rows; Q5_0 blocks are read with 2-byte loads, the K-quants and F16/BF16 rows with 8- and 16-byte
loads. Up to 8 sequences share each read of the weights; the kernel is instantiated for 1, 2, 4
and 8 and the smallest that fits is launched. `swiglu` makes the epilogue write silu(gate) * up
of interleaved gate/up rows.
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
# Rows per CTA by batch variant: the faster of 2 and 4 on the 8B shapes (bench/NOTES.md, "Kernel
# notes"); 4 unless a type's own table says otherwise.
ROWS_PER_CTA: dict[int, int] = {1: 4, 2: 4, 4: 4, 8: 4}
ROWS_PER_CTA_BY_STEM: dict[str, dict[int, int]] = {
    "q4_0": {1: 4, 2: 2, 4: 4, 8: 4},
    "q4_0x4": {1: 4, 2: 2, 4: 4, 8: 4},
    "q5_0": {1: 2, 2: 2, 4: 2, 8: 4},
    "q8_0": {1: 2, 2: 2, 4: 4, 8: 4},
}
# Long rows at batch 1 (n_cols >= LONG_ROW_COLS): 2 rows per CTA, twice the CTAs, each with
# fewer serial iterations, for q4_0x4 only: 4 rows stay faster on its 4096-column rows (the LM
# head among them), and F16 at 2 rows is faster alone but not inside the decode step
# (bench/NOTES.md, "Kernel notes").
LONG_ROW_COLS = 8192
LONG_ROW_ROWS: dict[str, int] = {"q4_0x4": 2}
MAX_SEQS = BATCH_VARIANTS[-1]
# Types matvec.cu reads repacked (quant_blocks.cuh Packed<T>): quant bytes per 32-element block.
PACKED_QUANT_BYTES: dict[GGMLQuantizationType, int] = {_T.Q4_0: 16, _T.Q8_0: 32}
PACKED_ROW_ALIGN = 16  # packed rows are padded to this, so every row's quants start 16-aligned
# Q4_0 rows of a multiple of GROUP_COLS columns also interleave their quants in groups of 4 blocks:
# lane j's 4-byte slices of the 4 blocks lie together (one 16-byte load; matvec.cu q4_0x4).
GROUP_BLOCKS = 4
GROUP_COLS = 32 * GROUP_BLOCKS
_SCALE_BYTES = 2  # one fp16 d per block
_ARG_KINDS = ("ptr", "i32", "ptr", "i64", "ptr", "i32", "i32", "i32", "i32", "ptr", "ptr", "i32",
              "i32")


def grouped(ggml_type: GGMLQuantizationType | int, n_cols: int) -> bool:
    """Whether pack_rows also interleaves this matrix's quants in groups of 4 blocks."""
    return GGMLQuantizationType(ggml_type) == _T.Q4_0 and n_cols % GROUP_COLS == 0


def _group_order(quants: torch.Tensor, n_rows: int, to_grouped: bool) -> torch.Tensor:
    """[n_rows, n_blocks * 8] int16 quant words: block-major <-> lane-major within each group of
    4 blocks (a lane's slice is 2 words of each block)."""
    g = quants.reshape(n_rows, -1, GROUP_BLOCKS, 4, 2)  # (row, group, block, lane, word)
    if not to_grouped:
        g = quants.reshape(n_rows, -1, 4, GROUP_BLOCKS, 2)  # (row, group, lane, block, word)
    return g.transpose(2, 3).reshape(n_rows, -1)


def packed_row_bytes(ggml_type: GGMLQuantizationType | int, n_cols: int) -> int:
    """Bytes of one row in the layout matvec reads: padded for packed types, else the GGUF size."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in PACKED_QUANT_BYTES:
        return row_nbytes(qtype, n_cols)
    n_blocks = row_nbytes(qtype, n_cols) // (PACKED_QUANT_BYTES[qtype] + _SCALE_BYTES)
    unpadded = n_blocks * (PACKED_QUANT_BYTES[qtype] + _SCALE_BYTES)
    return -(-unpadded // PACKED_ROW_ALIGN) * PACKED_ROW_ALIGN


def _packed_shape(
    qtype: GGMLQuantizationType, n_cols: int, nbytes: int, what: str
) -> tuple[int, int, int, int]:
    """(rows, blocks per row, quant words per block, padding words per row) of `nbytes` bytes.

    pack_rows/unpack_rows move 2-byte words (every field is a whole number of them): half the
    elements of a byte-wise copy."""
    quant_bytes = PACKED_QUANT_BYTES[qtype]
    row_bytes, stride = row_nbytes(qtype, n_cols), packed_row_bytes(qtype, n_cols)
    per_row = row_bytes if what == "pack_rows" else stride
    if nbytes % per_row:
        raise CudaError(f"{what} {qtype.name}: {nbytes} bytes is not whole rows")
    n_blocks = row_bytes // (quant_bytes + _SCALE_BYTES)
    return nbytes // per_row, n_blocks, quant_bytes // 2, (stride - row_bytes) // 2


def pack_rows(
    raw: torch.Tensor, ggml_type: GGMLQuantizationType | int, n_cols: int
) -> torch.Tensor:
    """GGUF rows (uint8, whole rows) -> the layout matvec reads; `raw` itself if not a packed type.

    Per row: every block's quant bytes in block order (Q4_0 rows of a multiple of 128 columns:
    in groups of 4 blocks, lane-major, see `grouped`), then every block's fp16 scale, then zero
    padding to PACKED_ROW_ALIGN. Runs on the tensor's device (CPU or GPU)."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in PACKED_QUANT_BYTES:
        return raw
    n_rows, n_blocks, quant_words, pad = _packed_shape(qtype, n_cols, raw.numel(), "pack_rows")
    blocks = raw.contiguous().view(torch.int16).reshape(n_rows, n_blocks, 1 + quant_words)
    quants = blocks[:, :, 1:].reshape(n_rows, n_blocks * quant_words)
    if grouped(qtype, n_cols):
        quants = _group_order(quants, n_rows, to_grouped=True)
    parts = [
        quants,
        blocks[:, :, 0],
        blocks.new_zeros(n_rows, pad),
    ]
    return torch.cat(parts, dim=1).view(torch.uint8).reshape(-1)


def unpack_rows(
    packed: torch.Tensor, ggml_type: GGMLQuantizationType | int, n_cols: int
) -> torch.Tensor:
    """The inverse of pack_rows: the GGUF bytes of the same rows (tests check the layout loses
    nothing with it; the prefill reads the matvec layout itself: embedding.cu)."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in PACKED_QUANT_BYTES:
        return packed
    n_rows, n_blocks, quant_words, _ = _packed_shape(qtype, n_cols, packed.numel(), "unpack_rows")
    rows = packed.contiguous().view(torch.int16).reshape(n_rows, -1)
    quants = rows[:, : n_blocks * quant_words]
    if grouped(qtype, n_cols):
        quants = _group_order(quants, n_rows, to_grouped=False)
    quants = quants.reshape(n_rows, n_blocks, quant_words)
    scales = rows[:, n_blocks * quant_words : n_blocks * (quant_words + 1)].unsqueeze(2)
    return torch.cat([scales, quants], dim=2).view(torch.uint8).reshape(-1)


def matvec_launch_config(
    n_rows: int, n_seqs: int, stem: str = "", n_cols: int = 0
) -> tuple[LaunchConfig, int, int]:
    """(config, batch variant, rows per CTA): one CTA of MATVEC_WARPS warps per few rows. A row's
    arithmetic does not depend on the rows per CTA, so these choices keep batch invariance."""
    if n_rows < 1:
        raise CudaError(f"matvec: {n_rows} output rows")
    if not 1 <= n_seqs <= MAX_SEQS:
        raise CudaError(f"matvec: {n_seqs} sequences; one launch takes 1 to {MAX_SEQS}")
    variant = next(b for b in BATCH_VARIANTS if b >= n_seqs)
    rows = ROWS_PER_CTA_BY_STEM.get(stem, ROWS_PER_CTA)[variant]
    if variant == 1 and n_cols >= LONG_ROW_COLS and stem in LONG_ROW_ROWS:
        rows = LONG_ROW_ROWS[stem]
    return LaunchConfig((-(-n_rows // rows), 1, 1), (32 * MATVEC_WARPS, 1, 1)), variant, rows


def check_product_args(
    what: str, ggml_type: GGMLQuantizationType, n_rows: int, n_cols: int, row_bytes: int,
    y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor | None, swiglu: bool,
) -> None:  # fmt: skip
    """The shape checks of a matrix product launch (the matvec's and tcmm's): y[b] = W x[b]
    (+ bias) (+ residual[b]), or SwiGLU of interleaved (gate, up) rows into y[b, :n_rows // 2]."""
    n_seqs = x.shape[0]
    n_out = n_rows // 2 if swiglu else n_rows
    if swiglu and (n_rows % 2 or bias is not None or residual is not None):
        raise CudaError(f"{what} swiglu: {n_rows} rows (must be even), no bias/residual")
    if x.shape[1] < n_cols or y.shape[0] != n_seqs or y.shape[1] < n_out:
        raise CudaError(
            f"{what}: x {tuple(x.shape)} / y {tuple(y.shape)} do not fit "
            f"{n_rows}x{n_cols} for {n_seqs} sequences"
        )
    if weight.numel() != n_rows * row_bytes:
        raise CudaError(
            f"{what}: weight has {weight.numel()} bytes, {n_rows} rows of "
            f"{ggml_type.name} (matvec layout) need {n_rows * row_bytes}"
        )
    if residual is not None and (residual.shape[0] != n_seqs or residual.shape[1] < n_rows):
        raise CudaError(f"{what}: residual {tuple(residual.shape)} does not match y")
    if bias is not None and bias.numel() != n_rows:
        raise CudaError(f"{what}: bias has {bias.numel()} values for {n_rows} rows")


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
        if grouped(qtype, n_cols):
            self.stem = "q4_0x4"  # the 4-block group layout of pack_rows
        self.ggml_type, self.n_rows, self.n_cols = qtype, n_rows, n_cols
        self.row_bytes = packed_row_bytes(qtype, n_cols)  # of `weight` as __call__ takes it
        self._sites: dict[tuple[int, int], LaunchSite] = {}

    def pack(self, raw: torch.Tensor) -> torch.Tensor:
        """This weight's GGUF bytes in the layout __call__ reads (pack_rows)."""
        return pack_rows(raw, self.ggml_type, self.n_cols)

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        swiglu: bool = False,
    ) -> torch.Tensor:
        """y[b, :n_rows] = weight @ x[b, :n_cols] (+ bias) (+ residual[b]); residual may be y.

        `weight` is in the matvec layout: `self.pack(gguf_bytes)` (the GGUF bytes themselves for
        types that are not repacked). `swiglu`: the rows are interleaved (gate, up) pairs and
        y[b, :n_rows // 2] = silu(gate) * up is written instead (no bias or residual)."""
        n_seqs = x.shape[0]
        config, variant, rows = matvec_launch_config(self.n_rows, n_seqs, self.stem, self.n_cols)
        check_product_args("matvec", self.ggml_type, self.n_rows, self.n_cols, self.row_bytes,
                           y, x, weight, bias, residual, swiglu)  # fmt: skip
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
            int(swiglu),
        )
        return y
