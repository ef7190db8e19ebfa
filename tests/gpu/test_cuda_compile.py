"""NVRTC compilation and launch geometry of the CUDA backend: all of it runs without a GPU.

Every kernel file must compile for Ampere (the oldest we support: mma.sync, cp.async) and Hopper
(the target; Ada adds nothing these kernels use, and each arch costs CI ~15 s per big file); the cache must hit on the second
compile and miss on any change to the key; a broken source must surface NVRTC's log; the launch
configs must cover ragged shapes exactly once.
"""

from __future__ import annotations

import functools

import pytest
from gguf import GGMLQuantizationType

from gpu.cuda import nvrtc
from gpu.cuda.activation import THREADS, silu_mul_launch_config
from gpu.cuda.attention import (
    PARTITION_TOKENS,
    TARGET_CTAS_PER_SM,
    attention_launch_config,
    row_lanes,
    splits_per_cta_for,
)
from gpu.cuda.decode_inputs import stage_launch_config
from gpu.cuda.embedding import dequant_rows_launch_config
from gpu.cuda.errors import CudaError
from gpu.cuda.kernels import (
    KERNEL_OPTIONS,
    PROGRAMMATIC_FILES,
    TUNABLES,
    kernel_files,
    tuning_options,
)
from gpu.cuda.launch import LaunchConfig
from gpu.cuda.matvec import (
    MATVEC_TYPES,
    MATVEC_WARPS,
    ROWS_PER_CTA,
    ROWS_PER_CTA_BY_STEM,
    ROWS_VARIANTS,
    matvec_launch_config,
)
from gpu.cuda.norm import NORM_VEC, rms_norm_launch_config
from gpu.cuda.rope_kv import rope_kv_launch_config

# The lent GPUs are Hopper: sm_90 is compiled to a CUBIN (ptxas included), as they load it. For
# sm_80 the front end is what can fail (an instruction or intrinsic newer than Ampere), so PTX
# for compute_80 is enough and takes half the time (tcmm.cu 9.0 s vs 15.6 s on the CI's CPU).


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    """One empty cache for the module: every first compile here is a real NVRTC run."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORCD_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
        yield


def test_every_kernel_file_has_options():
    assert kernel_files(), "no .cu files found"
    assert set(kernel_files()) == set(KERNEL_OPTIONS)


@pytest.mark.parametrize("filename", sorted(KERNEL_OPTIONS))
def test_kernel_compiles_to_cubin(kernel_cache, filename):
    image = nvrtc.compile_file(filename, "sm_90", KERNEL_OPTIONS[filename])
    assert image.kind == "cubin" and image.target == "sm_90"
    assert image.code[:4] == b"\x7fELF"


@pytest.mark.parametrize("filename", sorted(KERNEL_OPTIONS))
def test_kernel_compiles_for_ampere(filename):
    source = (nvrtc.KERNEL_DIR / filename).read_text()
    ptx = nvrtc._compile(source, filename, nvrtc.included_headers(source),
                         (*nvrtc.BASE_OPTIONS, *KERNEL_OPTIONS[filename],
                          "--gpu-architecture=compute_80"), "ptx")  # fmt: skip
    assert b".target sm_80" in ptx and b".entry " in ptx


def test_second_compile_is_a_cache_hit(kernel_cache):
    options = KERNEL_OPTIONS["norm.cu"]
    first = nvrtc.compile_file("norm.cu", "sm_90", options)
    compiled, hits = nvrtc.stats.compiled, nvrtc.stats.cache_hits
    second = nvrtc.compile_file("norm.cu", "sm_90", options)
    assert (nvrtc.stats.compiled, nvrtc.stats.cache_hits) == (compiled, hits + 1)
    assert second == first


def test_option_change_misses_the_cache(kernel_cache):
    nvrtc.compile_file("activation.cu", "sm_90", ())
    compiled = nvrtc.stats.compiled
    nvrtc.compile_file("activation.cu", "sm_90", ("-lineinfo",))
    assert nvrtc.stats.compiled == compiled + 1


def test_cache_key_covers_every_input():
    base = ("src", {"a.cuh": "x"}, ("-std=c++17",), "sm_90", (13, 0))
    key = nvrtc.cache_key(*base)
    variants = [
        ("src2", {"a.cuh": "x"}, ("-std=c++17",), "sm_90", (13, 0)),
        ("src", {"a.cuh": "y"}, ("-std=c++17",), "sm_90", (13, 0)),
        ("src", {"b.cuh": "x"}, ("-std=c++17",), "sm_90", (13, 0)),
        ("src", {"a.cuh": "x"}, ("-std=c++14",), "sm_90", (13, 0)),
        ("src", {"a.cuh": "x"}, ("-std=c++17",), "sm_80", (13, 0)),
        ("src", {"a.cuh": "x"}, ("-std=c++17",), "sm_90", (13, 1)),
    ]
    assert len({key, *(nvrtc.cache_key(*v) for v in variants)}) == len(variants) + 1


def test_headers_are_collected_transitively():
    headers = nvrtc.included_headers('#include "common.cuh"\n')
    assert set(headers) == {"common.cuh", "quant_blocks.cuh", "grid_dependency.cuh"}


def test_missing_header_is_named():
    with pytest.raises(CudaError, match="nope.cuh"):
        nvrtc.included_headers('#include "nope.cuh"\n')


def test_broken_source_raises_with_the_log(kernel_cache):
    source = 'extern "C" __global__ void broken(float* y) { y[0] = undefined_name; }\n'
    with pytest.raises(CudaError) as info:
        nvrtc.compile_source(source, "broken.cu", {}, "sm_90")
    message = str(info.value)
    assert "nvrtcCompileProgram" in message and "NVRTC_ERROR_COMPILATION" in message
    assert "undefined_name" in message and "broken.cu" in message


def test_unsupported_arch_falls_back_to_ptx(kernel_cache):
    newest = max(nvrtc.supported_archs())
    assert nvrtc.choose_target(newest + 1, [80, 90]) == ("compute_90", "ptx")
    image = nvrtc.compile_source('extern "C" __global__ void k() {}\n', "k.cu", {}, newest + 1)
    assert image.kind == "ptx" and image.target == f"compute_{newest}"
    assert image.code.endswith(b"\0") and b".entry k" in image.code


def test_arch_below_everything_is_refused():
    with pytest.raises(CudaError, match="sm_30"):
        nvrtc.choose_target(30, [75, 80, 90])


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("sm_90", 90), ("sm_90a", 90), ("compute_89", 89), (80, 80), ((8, 6), 86)],
)
def test_parse_arch(arch, expected):
    assert nvrtc.parse_arch(arch) == expected


# --- launch geometry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "n_seqs", "variant"),
    [(1, 1, 1), (4, 2, 2), (5, 3, 4), (4097, 5, 8), (14336, 8, 8), (4095, 1, 1)],
)
def test_matvec_config_covers_every_row_once(n_rows, n_seqs, variant):
    config, chosen, rows = matvec_launch_config(n_rows, n_seqs)
    assert chosen == variant and rows == ROWS_PER_CTA[variant] and rows in ROWS_VARIANTS
    for stem, table in ROWS_PER_CTA_BY_STEM.items():
        assert matvec_launch_config(n_rows, n_seqs, stem)[2] == table[variant] in ROWS_VARIANTS
    assert config.grid == (-(-n_rows // rows), 1, 1) and config.block == (32 * MATVEC_WARPS, 1, 1)
    assert (config.grid[0] - 1) * rows < n_rows <= config.grid[0] * rows


@pytest.mark.parametrize("n_seqs", [0, 9])
def test_matvec_config_refuses_batch_out_of_range(n_seqs):
    with pytest.raises(CudaError):
        matvec_launch_config(16, n_seqs)


def test_matvec_types_cover_the_issue():
    names = {t.name for t in MATVEC_TYPES}
    assert names == {"F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize(("hidden", "threads"), [(1, 32), (33, 64), (576, 576), (4096, 1024)])
def test_rms_norm_config(hidden, threads):
    assert rms_norm_launch_config(7, hidden) == LaunchConfig((7, 1, 1), (threads, 1, 1))


@pytest.mark.parametrize(
    ("hidden", "threads"), [(4, 32), (576, 64), (3072, 192), (4096, 256), (16384, 1024)]
)
def test_rms_norm_vector_config(hidden, threads):
    """Whole warps, each thread at most NORM_VEC float4s: every float4 of the row is covered."""
    config = rms_norm_launch_config(7, hidden, vector=True)
    assert config == LaunchConfig((7, 1, 1), (threads, 1, 1))
    assert threads * NORM_VEC * 4 >= hidden


@pytest.mark.parametrize("hidden", [6, 16388])
def test_rms_norm_vector_config_refuses(hidden):
    with pytest.raises(CudaError):
        rms_norm_launch_config(1, hidden, vector=True)


@pytest.mark.parametrize(("ffn", "x_blocks"), [(1, 1), (256, 1), (257, 2), (14336, 56)])
def test_silu_mul_config(ffn, x_blocks):
    config = silu_mul_launch_config(3, ffn)
    assert config.grid == (x_blocks, 3, 1) and config.block == (THREADS, 1, 1)


@pytest.mark.parametrize(("n_cols", "threads"), [(32, 32), (576, 32), (4096, 128), (16384, 256)])
def test_dequant_rows_config(n_cols, threads):
    assert dequant_rows_launch_config(5, n_cols).block == (threads, 1, 1)


def test_rope_kv_config():
    assert rope_kv_launch_config(9, 32, 8, 128).block == (64, 1, 1)
    assert rope_kv_launch_config(9, 9, 3, 64).block == (32, 1, 1)
    assert rope_kv_launch_config(1, 1, 1, 2).block == (32, 1, 1)
    assert rope_kv_launch_config(1, 1, 1, 256).block == (128, 1, 1)
    assert rope_kv_launch_config(9, 32, 8, 128).grid == (9, 48, 1)
    with pytest.raises(CudaError):
        rope_kv_launch_config(0, 32, 8, 128)


@pytest.mark.parametrize(
    ("max_context", "splits"), [(1, 1), (PARTITION_TOKENS, 1), (PARTITION_TOKENS + 1, 2),
     (2000, -(-2000 // PARTITION_TOKENS))]
)
def test_attention_config_splits_by_fixed_partitions(max_context, splits):
    launch = attention_launch_config(3, 32, 8, max_context, sm_count=132, splits_per_cta=1)
    assert launch.n_splits == splits
    assert launch.decode.grid == (8, 3, splits)


@pytest.mark.parametrize("num_seqs", [1, 8, 64, 256])
@pytest.mark.parametrize("max_context", [1, 65, 512, 2000, 4096, 32768])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_attention_runs_cover_every_split_once(num_seqs, max_context, sm_count):
    """A CTA walks splits [z * per_cta, min((z + 1) * per_cta, n_splits)): every split of the
    fixed partition in exactly one non-empty run, the runs of a pair as even as they can be,
    and runs longer than one split only where that keeps ~TARGET_CTAS_PER_SM CTAs per SM (or one
    CTA per pair)."""
    launch = attention_launch_config(num_seqs, 32, 8, max_context, sm_count=sm_count)
    n_splits, per_cta = launch.n_splits, launch.splits_per_cta
    assert n_splits == -(-max_context // PARTITION_TOKENS)
    assert 1 <= per_cta <= n_splits
    runs = [range(z * per_cta, min(z * per_cta + per_cta, n_splits))
            for z in range(launch.decode.grid[2])]  # fmt: skip
    assert all(runs) and [s for run in runs for s in run] == list(range(n_splits))
    assert len(runs[-1]) > per_cta - len(runs)  # 8 splits in 2 runs: 4 + 4, never 7 + 1
    pairs = 8 * num_seqs
    if per_cta > 1:  # longer runs only where the grid would otherwise pass the target
        assert pairs * n_splits >= TARGET_CTAS_PER_SM * sm_count
        assert pairs * launch.decode.grid[2] <= max(pairs, 2 * TARGET_CTAS_PER_SM * sm_count)
    assert launch.decode.grid[:2] == (8, num_seqs)


def test_attention_splits_per_cta_picks():
    """Worked cases on 132 SMs (the 8B shape: 8 kv heads): batch 1 keeps one split per CTA (its
    parallelism is the splits), many sequences walk several."""
    assert splits_per_cta_for(8, 32, 132) == 1  # 1 x 2,000 tokens
    assert splits_per_cta_for(64 * 8, 8, 132) == 4  # 64 x 512: two CTAs of 4 per pair
    assert splits_per_cta_for(256 * 8, 64, 132) == 64  # 256 x 4,096: one CTA per pair
    assert splits_per_cta_for(64 * 8, 1, 132) == 1


def test_attention_config_pins_splits_per_cta():
    for per_cta, z in ((1, 32), (2, 16), (3, 11), (8, 4), (32, 1), (100, 1)):
        launch = attention_launch_config(1, 32, 8, 2000, sm_count=132, splits_per_cta=per_cta)
        assert launch.decode.grid == (8, 1, z) and launch.n_splits == 32
        assert launch.splits_per_cta == min(per_cta, 32)
    with pytest.raises(CudaError):
        attention_launch_config(1, 32, 8, 2000, sm_count=132, splits_per_cta=0)


@pytest.mark.parametrize(("head_dim", "lanes", "threads"),
                         [(1, 8, 256), (64, 8, 256), (65, 16, 512), (80, 16, 512), (128, 16, 512),
                          (136, 32, 512), (256, 32, 512)])  # fmt: skip
def test_attention_row_lanes_and_threads(head_dim, lanes, threads):
    """Row groups of `lanes` threads, at most 32 of them and 512 threads (attention.cu)."""
    assert row_lanes(head_dim) == lanes
    launch = attention_launch_config(1, 32, 8, 600, head_dim, sm_count=132)
    assert launch.decode.block == (threads, 1, 1)
    assert launch.decode.grid == (8, 1, 10)


def test_attention_refuses_head_dim_out_of_range():
    with pytest.raises(CudaError):
        row_lanes(257)
    with pytest.raises(CudaError):
        row_lanes(0)


def test_attention_config_refuses_bad_groups():
    with pytest.raises(CudaError):
        attention_launch_config(1, 30, 8, 10, sm_count=132)  # not a whole group
    with pytest.raises(CudaError):
        attention_launch_config(1, 32, 2, 10, sm_count=132)  # 16 query heads per kv head


def test_launch_config_checks_limits():
    with pytest.raises(CudaError):
        LaunchConfig((1, 70000, 1), (32, 1, 1))
    with pytest.raises(CudaError):
        LaunchConfig((1, 1, 1), (1024, 2, 1))
    with pytest.raises(CudaError):
        LaunchConfig((0, 1, 1), (32, 1, 1))


def test_compiling_leaves_shared_bytes_objects_alone(kernel_cache):
    """NVRTC writes into the buffers it is given: a shared one-byte b" " once became b"\\0"."""
    with pytest.raises(CudaError):
        nvrtc.compile_source("this is not C++", "broken_again.cu", {}, "sm_90", ())
    nvrtc.compile_file("norm.cu", "sm_80", KERNEL_OPTIONS["norm.cu"])
    assert b" "[0] == 32 and bytes([32]).decode() == " "


@functools.cache
def hopper_ptx(filename: str, extra_options: tuple[str, ...] = ()) -> bytes:
    """A kernel file's PTX for compute_90 with its own options (plus `extra_options`), compiled
    once per test run: matvec.cu takes ~20 s here and two tests read it."""
    source = (nvrtc.KERNEL_DIR / filename).read_text()
    headers = nvrtc.included_headers(source)
    options = (*nvrtc.BASE_OPTIONS, *KERNEL_OPTIONS[filename], "--gpu-architecture=compute_90")
    return nvrtc._compile(source, filename, headers, (*options, *extra_options), "ptx")


# The two readers of matvec.cu's PTX share one pytest-xdist worker, and so hopper_ptx's cache.
MATVEC_PTX = pytest.mark.xdist_group("matvec-ptx")


@pytest.mark.parametrize("filename", [
    pytest.param(f, marks=MATVEC_PTX) if f == "matvec.cu" else f for f in sorted(PROGRAMMATIC_FILES)
])
def test_programmatic_kernels_wait_on_their_grid_dependency(filename):
    """A kernel launched programmatically that never waits would read its inputs while the
    kernel before it still writes them: every entry of these files must hold the wait (PTX for
    Hopper, where the instruction exists)."""
    ptx = hopper_ptx(filename).decode(errors="replace")
    entries = ptx.split(".entry ")[1:]
    assert entries, f"no kernels in {filename}"
    for entry in entries:
        name = entry.split("(", 1)[0]
        assert "griddepcontrol.wait" in entry, f"{filename}: {name} never waits"
        assert "griddepcontrol.launch_dependents" in entry, f"{filename}: {name} never triggers"


def test_stage_decode_inputs_config():
    assert stage_launch_config(3, 4).grid == (4, 1, 1)
    for n_seqs, bucket in ((0, 4), (5, 4)):
        with pytest.raises(CudaError):
            stage_launch_config(n_seqs, bucket)


def test_matvec_long_rows_take_two_rows_per_cta_at_batch_1():
    assert matvec_launch_config(4096, 1, "q4_0x4", 14336)[2] == 2
    assert matvec_launch_config(4096, 1, "q4_0x4", 4096)[2] == 4
    assert matvec_launch_config(4096, 2, "q4_0x4", 14336)[2] == ROWS_PER_CTA_BY_STEM["q4_0x4"][2]
    config, _, rows = matvec_launch_config(4097, 1, "q4_0x4", 14336)
    assert config.grid == (-(-4097 // rows), 1, 1)


@MATVEC_PTX
def test_tuning_defines_override_only_declared_guarded_constants(kernel_cache):
    spec = "matvec.cu:MATVEC_PREFETCH_BYTES=8192"
    assert tuning_options("matvec.cu", spec) == ("-DMATVEC_PREFETCH_BYTES=8192",)
    assert tuning_options("norm.cu", spec) == ()
    assert tuning_options("matvec.cu", "") == ()
    for bad in ("matvec.cu:MATVEC_WARPS=8", "norm.cu:MATVEC_PREFETCH_BYTES=1",
                "matvec.cu:MATVEC_PREFETCH_BYTES=8k", "MATVEC_PREFETCH_BYTES=1"):  # fmt: skip
        with pytest.raises(CudaError, match="ORCD_KERNEL_DEFINES"):
            tuning_options("matvec.cu", bad)
    for filename, names in TUNABLES.items():
        source = (nvrtc.KERNEL_DIR / filename).read_text()
        for name in names:  # guarded, so that the -D replaces the default instead of clashing
            assert f"#ifndef {name}" in source, f"{filename}: {name} is not #ifndef-guarded"
    # The override reaches the code: the PTX changes with the value.
    tuned = hopper_ptx("matvec.cu", tuning_options("matvec.cu", spec))
    assert tuned != hopper_ptx("matvec.cu")


@pytest.mark.parametrize("n_rows", [1, 127, 128, 4096, 28672, 128256])
@pytest.mark.parametrize("n_seqs", [1, 7, 8, 9, 64, 65, 256])
def test_tcmm_config_covers_rows_and_sequences_once(n_rows, n_seqs):
    """Row tiles x sequence tiles cover every output once; K splits are non-empty and depend on
    the shape and the device only (batch invariance); shared memory fits every Hopper CTA."""
    from gpu.cuda.launch import OPT_IN_SHARED_LIMIT
    from gpu.cuda.tcmm import (
        CHUNK_BYTES,
        NT_VARIANTS,
        TC_BM,
        TC_KC,
        shared_bytes,
        split_count,
        tcmm_launch_config,
    )  # fmt: skip

    for n_cols in (576, 4096, 14336):
        config, nt, splits = tcmm_launch_config("q4_k", n_rows, n_cols, n_seqs, 132)
        gx, gy, gz = config.grid
        assert (gx - 1) * TC_BM < n_rows <= gx * TC_BM
        assert (gy - 1) * 8 * nt < n_seqs <= gy * 8 * nt
        assert nt in (NT_VARIANTS[0], NT_VARIANTS[-1]) or 4 * nt < n_seqs <= 8 * nt
        n_chunks = -(-n_cols // TC_KC)
        per_split = -(-n_chunks // gz)
        assert (gz - 1) * per_split < n_chunks  # the last split has chunks
        assert splits == gz == split_count(n_rows, n_cols, 132)
    for stem in CHUNK_BYTES:
        for v in NT_VARIANTS:
            assert shared_bytes(stem, v) <= OPT_IN_SHARED_LIMIT
    for wn in (1, 2):  # eight warps (WN = 2) only where tcmm.cu has _w2 kernels: 4+ n tiles
        config, nt, _ = tcmm_launch_config("q4_0", n_rows, 4096, n_seqs, 132, wn=wn)
        assert config.block[0] == (256 if wn == 2 and nt >= 4 else 128)


def test_tcmm_stems_cover_the_matvec_types():
    from gpu.cuda.matvec import MATVEC_TYPES
    from gpu.cuda.tcmm import CHUNK_BYTES, tc_stem

    for qtype in MATVEC_TYPES:
        assert tc_stem(qtype, 256 * 3) in CHUNK_BYTES
    assert tc_stem(GGMLQuantizationType.Q4_0, 4096) == "q4_0x4"
    assert tc_stem(GGMLQuantizationType.Q4_0, 96) == "q4_0"


def test_auto_takes_the_tensor_cores_later_on_small_models():
    from gpu.backends.cuda_backend import BATCH_BUCKETS, TC_MIN_BATCH_SMALL, auto_tc_min_batch

    assert auto_tc_min_batch(4096) == auto_tc_min_batch(2048) == 8  # 8B, TinyLlama
    assert auto_tc_min_batch(576) == auto_tc_min_batch(896) == 32  # SmolLM2-135M, Qwen2-0.5B
    assert TC_MIN_BATCH_SMALL in BATCH_BUCKETS  # a graph bucket starts on the tensor cores


def test_small_models_take_the_tensor_cores_for_whole_prefill_steps(monkeypatch):
    from gpu.backends.cuda_backend import TC_PREFILL_ENV, tc_prefill_max_tokens
    from gpu.cuda.errors import CudaError

    monkeypatch.delenv(TC_PREFILL_ENV, raising=False)
    assert tc_prefill_max_tokens(4096) == tc_prefill_max_tokens(2048) == 64  # 8B, TinyLlama
    assert tc_prefill_max_tokens(576) == 512  # SmolLM2-135M: the engine's token budget
    monkeypatch.setenv(TC_PREFILL_ENV, "128")
    assert tc_prefill_max_tokens(4096) == tc_prefill_max_tokens(576) == 128
    monkeypatch.setenv(TC_PREFILL_ENV, "lots")
    with pytest.raises(CudaError, match=TC_PREFILL_ENV):
        tc_prefill_max_tokens(576)
