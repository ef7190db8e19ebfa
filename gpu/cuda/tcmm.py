"""Tensor-core matmul over quantised weights (gpu/kernels/tcmm.cu): y[b] = W x[b] for many
sequences per read of the weights, x in fp16.

The weights are the matvec's (same bytes, same layout: GGUF blocks, or Q4_0/Q8_0 repacked by
matvec.pack_rows), so one copy of each matrix serves both kernels. A CTA owns TC_BM rows and up
to 64 sequences (n8 tiles: 1, 2, 4 or 8, the smallest that covers the batch; more sequences
take more CTAs along grid y). K is split over grid z when the row tiles alone would leave the
GPU idle; the split count is a function of the matrix shape and the device, never of the batch,
so a sequence's result does not depend on what else is in the batch (batch invariance).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from gpu.cuda.driver import LaunchSite
from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import launch_site
from gpu.cuda.launch import LaunchConfig, ceil_div, pointer, row_stride
from gpu.cuda.matvec import MATVEC_TYPES, check_product_args, grouped, packed_row_bytes

_T = GGMLQuantizationType

TC_BM = 128  # tcmm.cu TC_BM: weight rows per CTA (4 warps x 2 m16 tiles)
TC_KC = 256  # tcmm.cu TC_KC: K elements per chunk
TC_THREADS = 128
TC_XS = TC_KC + 16  # halves per staged x row
NT_VARIANTS = (1, 2, 4, 8)  # n8 tiles per CTA: 8 to 64 sequences
TILE_SEQS = 8 * NT_VARIANTS[-1]
# Per kernel stem: (bytes of one row's staged chunk, chunk starts 16-byte aligned) -- tcmm.cu Tc<T>.
CHUNK_BYTES: dict[str, tuple[int, bool]] = {
    "f16": (512, True), "bf16": (512, True),
    "q4_0": (144, True), "q4_0x4": (144, True), "q8_0": (272, True),
    "q4_1": (160, False), "q5_0": (176, False), "q5_1": (192, False),
    "q4_k": (144, True), "q5_k": (176, True), "q6_k": (210, False),
}  # fmt: skip
# CTAs the row tiles x K splits aim for, per multiprocessor: enough bytes in flight to keep the
# memory busy at small batches (each CTA has two stages of TC_BM rows' chunks in flight).
CTAS_PER_SM = 2
# A/B override of CTAS_PER_SM for benchmarks (recorded in bench/decode.py's JSON), like
# kernels.TUNING_ENV for compile-time constants; unset, CTAS_PER_SM holds.
CTAS_ENV = "ORCD_TC_CTAS_PER_SM"
# Warps along the sequences for 4+ n tiles (tcmm.cu WN): 1 (4 warps a CTA, each all of the
# CTA's sequences) or 2 (8 warps, each half of them: twice the warps per SM to hide latency,
# twice the dequantisation work). Same bits either way. `ORCD_TC_WARPS_N` overrides.
# 2: H100, 2026-12-07 (bench/results/tcmm-wn*-20261207-1253-h100.json, one call), Q4_0 at 64
# sequences: 4096x4096 51.2 -> 33.6 us, 4096x14336 78.5 -> 62.1, 28672x4096 (one split, 224
# CTAs) 89.8 -> 97.7; at 256: 115.9 -> 87.9, 221.8 -> 198.8, 316.7 -> 323.8. The 8B Q4_0
# decode (same machine): 3,770.9 -> 4,527.1 tok/s at 64 sequences, 5,385.4 -> 5,810.7 at 256.
WARPS_N = 2
WARPS_N_ENV = "ORCD_TC_WARPS_N"
WARPS_N_MIN_TILES = 4  # the _w2 kernels exist for n tiles 4 and 8


def warps_n() -> int:
    value = os.environ.get(WARPS_N_ENV, "")
    if not value:
        return WARPS_N
    if value not in ("1", "2"):
        raise CudaError(f"{WARPS_N_ENV}={value!r}: want 1 or 2")
    return int(value)


def effective_warps_n(wn: int, nt: int) -> int:
    """Warps along the sequences a launch of `nt` n tiles runs with when `wn` is asked."""
    return wn if nt >= WARPS_N_MIN_TILES else 1


def ctas_per_sm() -> int:
    value = os.environ.get(CTAS_ENV, "")
    if not value:
        return CTAS_PER_SM
    if not value.isdigit() or int(value) < 1:
        raise CudaError(f"{CTAS_ENV}={value!r}: want a positive integer")
    return int(value)
_ARG_KINDS = ("ptr", "i32", "ptr", "i64", "ptr", "i32", "i32", "i32", "i32", "ptr", "ptr", "i32",
              "i32", "i32", "ptr", "ptr")
_HALF_ARG_KINDS = ("ptr", "i32", "ptr", "i32", "i32", "i32")
HALF_THREADS = 256


def tc_stem(ggml_type: GGMLQuantizationType | int, n_cols: int) -> str:
    """The kernel stem of a weight type (q4_0x4: the matvec's 4-block group layout)."""
    qtype = GGMLQuantizationType(ggml_type)
    if qtype not in MATVEC_TYPES:
        raise CudaError(f"tcmm: no kernel for {qtype.name} weights")
    return "q4_0x4" if grouped(qtype, n_cols) else MATVEC_TYPES[qtype][0]


def slot_bytes(stem: str) -> int:
    """Shared-memory bytes per weight row per stage (tcmm.cu TcSlot)."""
    chunk, aligned = CHUNK_BYTES[stem]
    return (chunk + (15 if aligned else 31)) // 16 * 16


def shared_bytes(stem: str, nt: int) -> int:
    """Dynamic shared memory of one CTA: two stages of weight rows and of fp16 x."""
    return 2 * TC_BM * slot_bytes(stem) + 2 * nt * 8 * TC_XS * 2


def split_count(n_rows: int, n_cols: int, sm_count: int) -> int:
    """K splits for a matrix: row tiles x splits close to CTAS_PER_SM per SM, every split
    non-empty. Depends on the shape and the device only (batch invariance)."""
    n_chunks = ceil_div(n_cols, TC_KC)
    tiles = ceil_div(n_rows, TC_BM)
    wanted = max(1, min(n_chunks, round(ctas_per_sm() * sm_count / tiles)))
    per_split = ceil_div(n_chunks, wanted)
    return ceil_div(n_chunks, per_split)


def tcmm_launch_config(
    stem: str, n_rows: int, n_cols: int, n_seqs: int, sm_count: int, splits: int | None = None,
    wn: int = 1,
) -> tuple[LaunchConfig, int, int]:
    """(config, n8 tiles per CTA, K splits) for y[:n_seqs] = W x; `splits`: the matrix's
    split_count when the caller already holds it; `wn`: warps along the sequences (1 below
    WARPS_N_MIN_TILES n tiles, whatever is asked)."""
    if n_rows < 1 or n_seqs < 1:
        raise CudaError(f"tcmm: {n_rows} rows, {n_seqs} sequences")
    nt = next((v for v in NT_VARIANTS if 8 * v >= n_seqs), NT_VARIANTS[-1])
    if splits is None:
        splits = split_count(n_rows, n_cols, sm_count)
    grid = (ceil_div(n_rows, TC_BM), ceil_div(n_seqs, 8 * nt), splits)
    threads = TC_THREADS * effective_warps_n(wn, nt)
    return LaunchConfig(grid, (threads, 1, 1), shared_bytes(stem, nt)), nt, splits


@dataclass(slots=True)
class TcWorkspace:
    """Split-K partial sums (float32) and the per-tile tickets (int32, zero between launches:
    the last CTA of a tile resets its own). One per backend, shared by every matmul of a step
    (they run in stream order)."""

    partials: torch.Tensor
    tickets: torch.Tensor

    @classmethod
    def sized(cls, partial_floats: int, tickets: int, device: torch.device) -> TcWorkspace:
        return cls(torch.empty(max(partial_floats, 1), dtype=torch.float32, device=device),
                   torch.zeros(max(tickets, 1), dtype=torch.int32, device=device))  # fmt: skip


class TensorCoreMatmul:
    """One weight's tensor-core product; launch sites per n-tile variant, built on first use."""

    def __init__(self, ggml_type: GGMLQuantizationType | int, n_rows: int, n_cols: int,
                 sm_count: int) -> None:  # fmt: skip
        qtype = GGMLQuantizationType(ggml_type)
        self.stem = tc_stem(qtype, n_cols)
        multiple = MATVEC_TYPES[qtype][1]
        if n_cols % max(multiple, 32):
            raise CudaError(f"tcmm {qtype.name}: {n_cols} columns is not a multiple of 32")
        self.ggml_type, self.n_rows, self.n_cols = qtype, n_rows, n_cols
        self.sm_count = sm_count
        self.row_bytes = packed_row_bytes(qtype, n_cols)
        self.splits = split_count(n_rows, n_cols, sm_count)
        self.wn = warps_n()
        self._sites: dict[int, LaunchSite] = {}
        self._configs: dict[int, tuple[LaunchConfig, int, int]] = {}  # per sequence count

    def workspace_needs(self, max_seqs: int) -> tuple[int, int]:
        """(partial floats, tickets) a launch of up to max_seqs sequences uses."""
        tiles = ceil_div(self.n_rows, TC_BM) * ceil_div(max_seqs, TILE_SEQS)
        partials = self.splits * max_seqs * self.n_rows if self.splits > 1 else 0
        return partials, tiles if self.splits > 1 else 0

    def __call__(
        self,
        y: torch.Tensor,
        x16: torch.Tensor,
        weight: torch.Tensor,
        workspace: TcWorkspace,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        swiglu: bool = False,
    ) -> torch.Tensor:
        """y[b, :n_rows] = weight @ x16[b, :n_cols] (+ bias) (+ residual[b]); residual may be y.
        `swiglu`: rows are interleaved (gate, up) pairs; y[b, :n_rows // 2] = silu(gate) * up,
        float32 or fp16 (y's dtype: the next matmul's input)."""
        y_half = y.dtype == torch.float16
        if y_half and not swiglu:
            raise CudaError("tcmm: an fp16 y is for the SwiGLU epilogue only")
        n_seqs = x16.shape[0]
        launch = self._configs.get(n_seqs)
        if launch is None:
            launch = self._configs[n_seqs] = tcmm_launch_config(
                self.stem, self.n_rows, self.n_cols, n_seqs, self.sm_count, self.splits, self.wn
            )
        config, nt, splits = launch
        check_product_args("tcmm", self.ggml_type, self.n_rows, self.n_cols, self.row_bytes,
                           y, x16, weight, bias, residual, swiglu)  # fmt: skip
        partials, tickets = self.workspace_needs(n_seqs)
        if partials > workspace.partials.numel() or tickets > workspace.tickets.numel():
            raise CudaError(f"tcmm: workspace too small for {n_seqs} sequences of "
                            f"{self.n_rows}x{self.n_cols}")  # fmt: skip
        site = self._sites.get(nt)
        if site is None:
            suffix = "_w2" if effective_warps_n(self.wn, nt) == 2 else ""
            site = self._sites[nt] = launch_site("tcmm.cu", f"tcmm_{self.stem}_n{nt}{suffix}",
                                                 _ARG_KINDS)  # fmt: skip
        site.launch(
            config,
            pointer(y, "tcmm y", y.dtype if y_half else torch.float32),
            row_stride(y, "tcmm y"),
            pointer(weight.view(-1), "tcmm weight", torch.uint8, align=16),
            self.row_bytes,
            pointer(x16, "tcmm x", torch.float16, align=16),
            row_stride(x16, "tcmm x", multiple=8),
            n_seqs,
            self.n_rows,
            self.n_cols,
            pointer(bias, "tcmm bias", torch.float32, optional=True),
            pointer(residual, "tcmm residual", torch.float32, optional=True),
            0 if residual is None else row_stride(residual, "tcmm residual"),
            int(swiglu),
            int(y_half),
            pointer(workspace.partials, "tcmm partials", torch.float32),
            pointer(workspace.tickets, "tcmm tickets", torch.int32),
        )
        return y


class ToHalf:
    """x (float32 rows) -> fp16 rows, the tensor-core matmul's input."""

    def __init__(self) -> None:
        self._site: LaunchSite | None = None

    def __call__(self, out: torch.Tensor, x: torch.Tensor, n_cols: int) -> torch.Tensor:
        n_seqs = x.shape[0]
        if n_cols % 4 or x.shape[1] < n_cols or out.shape[0] < n_seqs or out.shape[1] < n_cols:
            raise CudaError(f"to_half: x {tuple(x.shape)} -> out {tuple(out.shape)}, {n_cols} columns")
        if self._site is None:
            self._site = launch_site("tcmm.cu", "tc_to_half", _HALF_ARG_KINDS)
        grid = (ceil_div(n_cols // 4, HALF_THREADS), n_seqs, 1)
        self._site.launch(
            LaunchConfig(grid, (HALF_THREADS, 1, 1)),
            pointer(out, "to_half out", torch.float16, align=8),
            row_stride(out, "to_half out", multiple=4),
            pointer(x, "to_half x", torch.float32, align=16),
            row_stride(x, "to_half x", multiple=4),
            n_seqs,
            n_cols,
        )
        return out
