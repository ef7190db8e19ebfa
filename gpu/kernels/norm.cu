// RMSNorm of float32 rows, optionally fused with the residual add that precedes it:
//   h = x (+ residual);  residual = h (when fused);  out = h * rsqrt(mean(h^2) + eps) * weight
// One CTA per row; the sum of squares is reduced in a fixed order (deterministic).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024) rms_norm_f32(
    float* __restrict__ out, int out_stride, const float* __restrict__ x, int x_stride,
    float* __restrict__ residual, int residual_stride, const float* __restrict__ weight, int hidden,
    float eps) {
    __shared__ float scratch[32];
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
    float* orow = out + row * out_stride;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float h = rr ? rr[i] : xr[i];  // this thread wrote rr[i] itself above
        orow[i] = h * inv_rms * weight[i];
    }
}
