// Small helpers shared by the non-matvec kernels: warp/block reductions in a fixed order (so
// results are deterministic run to run) and the KV-cache element conversions.
#pragma once
#include "quant_blocks.cuh"
#include "grid_dependency.cuh"

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
    return v;
}

// Sum over the CTA (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` holds 32 floats. Warps are added in index order: the same sum every run.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < n_warps; ++w) total += scratch[w];
    return total;
}

// KV cache elements: float32 or fp16 (u16 bits).
__device__ __forceinline__ float load_kv(const float* p) { return *p; }
__device__ __forceinline__ float load_kv(const u16* p) { return f16_to_f32(*p); }
__device__ __forceinline__ void store_kv(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_kv(u16* p, float v) { *p = f32_to_f16(v); }
