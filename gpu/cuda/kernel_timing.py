"""Per-kernel device time on the GPU machine: `python -m gpu.cuda.kernel_timing [out.json]`.

Each kernel is launched many times inside one captured CUDA graph (so host launch cost stays
out) over enough rotating copies of its weights to defeat the L2 cache; the median over graph
replays, divided by the launches per graph, is its time. Bandwidth counts the bytes that must
move (weights + activations), against a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import sys

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from bench.results_io import git_commit
from gpu.cuda.activation import SiluMul
from gpu.cuda.attention import DecodeAttention, attention_launch_config
from gpu.cuda.kernels import TUNING_ENV
from gpu.cuda.matvec import MatVec
from gpu.cuda.norm import RMSNorm
from gpu.cuda.tcmm import ctas_per_sm, warps_n
from loader.synth_blocks import random_blocks

_T = GGMLQuantizationType
ROTATE_BYTES = 512 * 2**20  # more than 10x the H100's 50 MB L2


def _median_us(launch, per_graph: int, replays: int = 30) -> float:
    """Median device time of one launch, from replays of a graph of `per_graph` launches."""
    launch(0)  # warm-up: module load, lazy allocations
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for i in range(per_graph):
            launch(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / per_graph)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = _median_us(lambda i: dst.copy_(src), per_graph=5, replays=10)
    return 2 * src.numel() / (us * 1e-6)


def read_bandwidth() -> float:
    """Read-only streaming (bandwidth.cu), bytes read per second: the floor of a kernel that
    only reads, as a matrix product does."""
    from gpu.cuda.kernels import launch_site
    from gpu.cuda.launch import LaunchConfig

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.zeros(4 * sms, dtype=torch.int32, device="cuda")
    site = launch_site("bandwidth.cu", "read_stream", ("ptr", "i64", "ptr"))
    config = LaunchConfig((4 * sms, 1, 1), (512, 1, 1))
    us = _median_us(
        lambda i: site.launch(config, src.data_ptr(), src.numel() // 16, out.data_ptr()),
        per_graph=5, replays=10,
    )
    return src.numel() / (us * 1e-6)


@functools.lru_cache(maxsize=2)  # a table times one shape at several batches
def _weights(qtype: _T, n_rows: int, n_cols: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(0)
    if qtype == _T.F16:
        one = (torch.randn(n_rows, n_cols, device="cuda") * 0.02).half().view(torch.uint8).view(-1)
    else:
        blocks = random_blocks(qtype, n_rows * n_cols // GGML_QUANT_SIZES[qtype][0], 0.02, rng)
        one = torch.from_numpy(blocks.reshape(-1).copy()).cuda()
    copies = max(2, -(-ROTATE_BYTES // one.numel()))
    return [one.clone() for _ in range(copies)]


def time_matvec(qtype: _T, n_rows: int, n_cols: int, n_seqs: int, copy_bw: float,
                stem: str | None = None) -> dict:  # fmt: skip
    """One matvec's time; `stem` forces a kernel (an A/B of layouts: the bytes read are the
    same, so the time is valid though the values are not)."""
    weights = _weights(qtype, n_rows, n_cols)
    op = MatVec(qtype, n_rows, n_cols)
    if stem is not None:
        op.stem = stem
    x = torch.randn(n_seqs, n_cols, device="cuda")
    y = torch.empty(n_seqs, n_rows, device="cuda")
    us = _median_us(lambda i: op(y, x, weights[i % len(weights)]), per_graph=len(weights))
    nbytes = weights[0].numel() + 4 * (x.numel() + y.numel())
    return {"kernel": f"matvec_{op.stem}", "quant": qtype.name, "shape": f"{n_rows}x{n_cols}",
            "batch": n_seqs, "us": round(us, 2), "GB_s": round(nbytes / us / 1e3, 1),
            "fraction_of_copy": round(nbytes / (us * 1e-6) / copy_bw, 3)}  # fmt: skip


def time_tcmm(qtype: _T, n_rows: int, n_cols: int, n_seqs: int, read_bw: float) -> dict:
    """One tensor-core matmul's time (tcmm.cu), x already fp16; bandwidth against read-only."""
    from gpu.cuda.tcmm import TcWorkspace, TensorCoreMatmul

    weights = _weights(qtype, n_rows, n_cols)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    op = TensorCoreMatmul(qtype, n_rows, n_cols, sms)
    if op.row_bytes * n_rows != weights[0].numel():  # padded packed rows: time a padded copy
        weights = [torch.zeros(op.row_bytes * n_rows, dtype=torch.uint8, device="cuda")
                   for _ in weights]  # fmt: skip
    ws = TcWorkspace.sized(*op.workspace_needs(n_seqs), torch.device("cuda"))
    x16 = torch.randn(n_seqs, n_cols, device="cuda").half()
    y = torch.empty(n_seqs, n_rows, device="cuda")
    us = _median_us(lambda i: op(y, x16, weights[i % len(weights)], ws), per_graph=len(weights))
    nbytes = weights[0].numel() + 2 * x16.numel() + 4 * y.numel()
    tflops = 2 * n_rows * n_cols * n_seqs / (us * 1e-6) / 1e12
    return {"kernel": f"tcmm_{op.stem}", "quant": qtype.name, "shape": f"{n_rows}x{n_cols}",
            "batch": n_seqs, "us": round(us, 2), "GB_s": round(nbytes / us / 1e3, 1),
            "fraction_of_read": round(nbytes / (us * 1e-6) / read_bw, 3),
            "splits": op.splits, "tflops": round(tflops, 1)}  # fmt: skip


def tcmm_table(quants: list[_T], batches: list[int]) -> list[dict]:
    """matvec (8 sequences per launch, as the decode step runs it) against tcmm per batch."""
    read_bw = read_bandwidth()
    copy_bw = copy_bandwidth()
    print(f"read-only {read_bw / 1e9:.0f} GB/s, copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    rows = []
    for qtype in quants:
        for n_rows, n_cols in ((4096, 4096), (28672, 4096), (4096, 14336)):
            for b in batches:
                tc = time_tcmm(qtype, n_rows, n_cols, b, read_bw)
                mv = time_matvec(qtype, n_rows, n_cols, min(b, 8), copy_bw)
                mv_us = mv["us"] * -(-b // 8)
                rows.append({**tc, "matvec_us": round(mv_us, 2),
                             "defines": os.environ.get(TUNING_ENV, ""),
                             "ctas_per_sm": ctas_per_sm(), "warps_n": warps_n()})  # fmt: skip
                print(f"{qtype.name:5s} {n_rows}x{n_cols} b={b:<3d} tcmm {tc['us']:8.1f} us "
                      f"({100 * tc['fraction_of_read']:5.1f}% of read, {tc['tflops']:6.1f} TFLOP/s, "
                      f"{tc['splits']} splits)  matvec {mv_us:8.1f} us", flush=True)  # fmt: skip
    return rows


def time_others(copy_bw: float) -> list[dict]:
    rows = []
    hidden, ffn = 4096, 14336
    x = torch.randn(8, hidden, device="cuda")
    out = torch.empty_like(x)
    weight = torch.randn(hidden, device="cuda")
    norm = RMSNorm(hidden, 1e-5)
    for batch in (1, 8):
        us = _median_us(lambda i, b=batch: norm(out[:b], x[:b], weight), per_graph=50)
        nbytes = 4 * (2 * batch * hidden + hidden)
        rows.append({"kernel": "rms_norm", "shape": f"{batch}x{hidden}", "batch": batch,
                     "us": round(us, 2), "GB_s": round(nbytes / us / 1e3, 1)})  # fmt: skip
    gate_up = torch.randn(8, 2 * ffn, device="cuda")
    act_out = torch.empty(8, ffn, device="cuda")
    silu = SiluMul(ffn)
    us = _median_us(lambda i: silu(act_out[:1], gate_up[:1]), per_graph=50)
    rows.append({"kernel": "silu_mul", "shape": f"1x{ffn}", "batch": 1, "us": round(us, 2),
                 "GB_s": round(4 * 3 * ffn / us / 1e3, 1)})  # fmt: skip
    rows.extend(time_attention(copy_bw, ((1, 2000), (8, 2000), (32, 512))))
    return rows


def time_attention(bw: float, cases, splits_per_cta: int | None = None) -> list[dict]:
    """Decode attention on the 8B shape (32 query heads, 8 KV heads of 128, fp16 KV) per
    (batch, context): the KV bytes it must read against the bandwidth `bw`. `splits_per_cta`
    pins the splits a CTA walks (None: the launcher's pick, recorded in each row)."""
    rows = []
    n_heads, n_kv, head_dim, block_size = 32, 8, 128, 16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, context in cases:
        n_blocks = batch * -(-context // block_size)
        shape = (n_blocks, block_size, n_kv, head_dim)
        k = torch.randn(shape, device="cuda").half()
        v = torch.randn(shape, device="cuda").half()
        tables = torch.arange(n_blocks, dtype=torch.int32, device="cuda").view(batch, -1)
        lens = torch.full((batch,), context, dtype=torch.int64, device="cuda")
        q = torch.randn(batch, n_heads * head_dim, device="cuda")
        o = torch.empty_like(q)
        attn = DecodeAttention(n_heads, n_kv, head_dim, block_size, torch.float16)
        attn.splits_per_cta = splits_per_cta
        per_cta = attention_launch_config(batch, n_heads, n_kv, context, head_dim, sm_count=sms,
                                          splits_per_cta=splits_per_cta).splits_per_cta  # fmt: skip
        us = _median_us(
            lambda i, op=attn, a=(o, q, k, v, tables, lens, context): op(*a), per_graph=20
        )
        nbytes = 2 * k.numel() * 2
        rows.append({"kernel": "attention_decode_f16", "shape": f"ctx{context} 32/8x128",
                     "batch": batch, "us": round(us, 2), "GB_s": round(nbytes / us / 1e3, 1),
                     "fraction_of_copy": round(nbytes / (us * 1e-6) / bw, 3),
                     "splits_per_cta": per_cta, "pinned": splits_per_cta is not None})  # fmt: skip
        print(f"attention b={batch:<3d} ctx={context:<5d} {us:8.1f} us "
              f"{nbytes / us / 1e3:7.0f} GB/s ({100 * nbytes / (us * 1e-6) / bw:5.1f}% of read) "
              f"{per_cta} splits per CTA", flush=True)  # fmt: skip
        del k, v
    return rows


# Decode attention at many sequences: (sequences, context tokens), 8B shape, up to 2^19 tokens.
MANY_SEQUENCES = [(b, ctx) for b in (64, 128, 256) for ctx in (512, 1024, 4096) if b * ctx <= 2**19]


def write_rows(path: str, rows: list[dict], **extra: object) -> None:
    """A run's rows as JSON, with the device, date, commit and kernel defines measured."""
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(),
                   "date": datetime.date.today().isoformat(), "commit": git_commit(),
                   "defines": os.environ.get(TUNING_ENV, ""), **extra, "rows": rows},
                  f, indent=1)  # fmt: skip


def main() -> None:
    torch.manual_seed(0)
    # --attention [out.json]: decode attention alone, at 1 and 8 sequences and at many;
    # --attention-runs 1,2,4,8 [out.json]: the same cases with the splits a CTA walks pinned to
    #   each value in turn, then the launcher's pick (a sweep for TARGET_CTAS_PER_SM);
    # --tcmm Q4_0,F16 1,8,64 [out.json]: tcmm against the matvec, then decode attention;
    # --tcmm-only: the matmuls alone (a sweep over ORCD_KERNEL_DEFINES / ORCD_TC_CTAS_PER_SM).
    attention_cases = [(1, 2000), (8, 2000), *MANY_SEQUENCES]
    if len(sys.argv) > 1 and sys.argv[1] == "--attention":
        rows = time_attention(read_bandwidth(), attention_cases)
        if len(sys.argv) > 2:
            write_rows(sys.argv[2], rows)
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--attention-runs":
        read_bw = read_bandwidth()
        rows = []
        for per_cta in [*(int(n) for n in sys.argv[2].split(",")), None]:
            rows += time_attention(read_bw, attention_cases, per_cta)
        if len(sys.argv) > 3:
            write_rows(sys.argv[3], rows)
        return
    if len(sys.argv) > 1 and sys.argv[1] in ("--tcmm", "--tcmm-only"):
        quants = [_T[q] for q in sys.argv[2].split(",")]
        rows = tcmm_table(quants, [int(b) for b in sys.argv[3].split(",")])
        if sys.argv[1] == "--tcmm":
            rows += time_attention(read_bandwidth(), MANY_SEQUENCES)
        if len(sys.argv) > 4:
            write_rows(sys.argv[4], rows)
        return
    copy_bw = copy_bandwidth()
    rows = []
    for qtype in (_T.Q4_0, _T.Q4_K, _T.Q8_0, _T.F16):
        for n_rows, n_cols in ((4096, 4096), (14336, 4096), (4096, 14336)):
            rows.append(time_matvec(qtype, n_rows, n_cols, 1, copy_bw))
        rows.append(time_matvec(qtype, 14336, 4096, 8, copy_bw))
    for n_rows, n_cols in ((4096, 4096), (14336, 4096), (4096, 14336)):  # 4-byte lanes, before
        rows.append(time_matvec(_T.Q4_0, n_rows, n_cols, 1, copy_bw, stem="q4_0"))
    rows.append(time_matvec(_T.Q4_0, 14336, 4096, 8, copy_bw, stem="q4_0"))
    rows.extend(time_others(copy_bw))
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    print(f"{device}, {date}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    for r in rows:
        frac = f"{100 * r['fraction_of_copy']:5.1f}% of copy" if "fraction_of_copy" in r else ""
        print(f"{r['kernel']:22s} {r.get('quant', ''):5s} {r['shape']:18s} b={r['batch']:<2d} "
              f"{r['us']:8.2f} us {r['GB_s']:8.1f} GB/s {frac}")  # fmt: skip
    if len(sys.argv) > 1:
        write_rows(sys.argv[1], rows, copy_GB_s=copy_bw / 1e9)


if __name__ == "__main__":
    main()
