// RMSNorm of float32 rows, optionally fused with the residual add that precedes it:
//   h = x (+ residual);  residual = h (when fused);  out = h * rsqrt(mean(h^2) + eps) * weight
// out is float32, or fp16 in the *_half kernels (the tensor-core matmul's input: no separate
// rounding kernel before it).
// One CTA per row; the sum of squares is reduced in a fixed order (deterministic).
//
// rms_norm_f32_vec (hidden a multiple of 4, rows 16-byte aligned, hidden <= 4 * NORM_VEC * 1024):
// each thread holds up to NORM_VEC float4s of h in registers, so h is read once, and loads its
// gains before the grid-dependency wait (they are constant: the load overlaps the previous
// kernel's tail). rms_norm_f32 is the scalar fallback for any other shape: scalar loads, h read
// twice. Both kernels' times: bench/NOTES.md, "Kernel notes".
#include "common.cuh"

#define NORM_VEC 4  // float4s per thread at most (gpu/cuda/norm.py NORM_VEC)

// Output rows: float32, or fp16 (HALF: the tensor-core matmul's input, x rounded once here).
template <bool HALF> struct NormOut;
template <> struct NormOut<false> {
    typedef float T;
    static __device__ __forceinline__ void store4(float* p, int i, float4 v) { ((float4*)p)[i] = v; }
    static __device__ __forceinline__ void store(float* p, int i, float v) { p[i] = v; }
};
template <> struct NormOut<true> {
    typedef u16 T;
    static __device__ __forceinline__ void store4(u16* p, int i, float4 v) {
        ((uint2*)p)[i] = make_uint2((u32)f32_to_f16(v.x) | ((u32)f32_to_f16(v.y) << 16),
                                    (u32)f32_to_f16(v.z) | ((u32)f32_to_f16(v.w) << 16));
    }
    static __device__ __forceinline__ void store(u16* p, int i, float v) { p[i] = f32_to_f16(v); }
};

template <bool HALF>
__device__ __forceinline__ void rms_norm_vec_impl(
    typename NormOut<HALF>::T* __restrict__ out, int out_stride, const float* __restrict__ x,
    int x_stride, float* __restrict__ residual, int residual_stride,
    const float* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    const int n4 = hidden >> 2;
    const float4* g4 = reinterpret_cast<const float4*>(weight);
    float4 g[NORM_VEC], h[NORM_VEC];
#pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) g[k] = __ldg(g4 + i);
    }
    grid_dependency_sync();
    const i64 row = blockIdx.x;
    const float4* x4 = reinterpret_cast<const float4*>(x + row * x_stride);
    float4* r4 = residual ? reinterpret_cast<float4*>(residual + row * residual_stride) : nullptr;
    float sum_sq = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4) {
            float4 v = x4[i];
            if (r4) {
                const float4 r = r4[i];
                v = make_float4(v.x + r.x, v.y + r.y, v.z + r.z, v.w + r.w);
                r4[i] = v;
            }
            h[k] = v;
            sum_sq += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
        }
    }
    const float total = block_sum(sum_sq, scratch);
    const float inv_rms = rsqrtf(total / (float)hidden + eps);
    typename NormOut<HALF>::T* orow = out + row * out_stride;
#pragma unroll
    for (int k = 0; k < NORM_VEC; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < n4)
            NormOut<HALF>::store4(orow, i, make_float4(h[k].x * inv_rms * g[k].x, h[k].y * inv_rms * g[k].y,
                                                       h[k].z * inv_rms * g[k].z, h[k].w * inv_rms * g[k].w));
    }
}

template <bool HALF>
__device__ __forceinline__ void rms_norm_impl(
    typename NormOut<HALF>::T* __restrict__ out, int out_stride, const float* __restrict__ x,
    int x_stride, float* __restrict__ residual, int residual_stride,
    const float* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    grid_dependency_sync();
    const i64 row = blockIdx.x;
    const float* xr = x + row * x_stride;
    float* rr = residual ? residual + row * residual_stride : nullptr;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float h = xr[i];
        if (rr) {
            h += rr[i];
            rr[i] = h;
        }
        sum_sq += h * h;
    }
    const float total = block_sum(sum_sq, scratch);
    const float inv_rms = rsqrtf(total / (float)hidden + eps);
    typename NormOut<HALF>::T* orow = out + row * out_stride;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float h = rr ? rr[i] : xr[i];  // this thread wrote rr[i] itself above
        NormOut<HALF>::store(orow, i, h * inv_rms * weight[i]);
    }
}

#define RMS_NORM_KERNEL(NAME, IMPL, HALF)                                                          \
    extern "C" __global__ void __launch_bounds__(1024) NAME(                                      \
        typename NormOut<HALF>::T* __restrict__ out, int out_stride, const float* __restrict__ x, \
        int x_stride, float* __restrict__ residual, int residual_stride,                          \
        const float* __restrict__ weight, int hidden, float eps) {                                \
        IMPL<HALF>(out, out_stride, x, x_stride, residual, residual_stride, weight, hidden, eps); \
    }
RMS_NORM_KERNEL(rms_norm_f32_vec, rms_norm_vec_impl, false)
RMS_NORM_KERNEL(rms_norm_f32_vec_half, rms_norm_vec_impl, true)
RMS_NORM_KERNEL(rms_norm_f32, rms_norm_impl, false)
RMS_NORM_KERNEL(rms_norm_f32_half, rms_norm_impl, true)
