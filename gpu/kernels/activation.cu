// SwiGLU on a fused gate.up output: out[t, i] = silu(gu[t, i]) * gu[t, ffn + i], float32.
// The gate half comes first, as a fused weight of parts (and the torch backend's chunk(2)) lays it out.
#include "common.cuh"

extern "C" __global__ void silu_mul_f32(float* __restrict__ out, int out_stride,
                                        const float* __restrict__ gate_up, int gate_up_stride,
                                        int ffn) {
    grid_dependency_sync();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const i64 t = blockIdx.y;
    const float gate = gate_up[t * gate_up_stride + i];
    const float up = gate_up[t * gate_up_stride + ffn + i];
    out[t * out_stride + i] = gate / (1.0f + expf(-gate)) * up;
}

// The same on a gate.up output whose columns interleave gate and up (the prefill GEMM of a
// gate.up matrix loaded for the matvec's SwiGLU epilogue): gate at 2i, up at 2i + 1.
extern "C" __global__ void silu_mul_interleaved_f32(float* __restrict__ out, int out_stride,
                                                    const float* __restrict__ gate_up,
                                                    int gate_up_stride, int ffn) {
    grid_dependency_sync();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const i64 t = blockIdx.y;
    const float2 gu = *reinterpret_cast<const float2*>(gate_up + t * gate_up_stride + 2 * i);
    out[t * out_stride + i] = gu.x / (1.0f + expf(-gu.x)) * gu.y;
}

