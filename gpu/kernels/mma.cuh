// Tensor-core building blocks shared by the mma kernels (prefill_attention.cu, tcmm.cu):
// fp16 packing, mma.sync m16n8k16, ldmatrix, cp.async. sm_80+.
#pragma once
#include "quant_blocks.cuh"

// Two floats as one word of fp16: cvt puts its first source in the high half.
__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// d += a b: a 16x16 (row-major) x b 16x8 (col-major) fp16, d 16x8 fp32. Fragments, per lane
// (grp = lane / 4, qd = lane % 4; the lower column / k index in the low 16 bits):
//   a[0] (grp, 2qd..+1)  a[1] (grp+8, 2qd..+1)  a[2] (grp, 2qd+8..+9)  a[3] (grp+8, 2qd+8..+9)
//   b[0] (k 2qd..+1, n grp)  b[1] (k 2qd+8..+9, n grp)
//   d[0..1] (grp, 2qd..+1)  d[2..3] (grp+8, 2qd..+1)
// Not volatile: a pure function of its registers, so the compiler may interleave independent
// mmas (a chain of dependent ones would wait out the tensor-core latency each time).
__device__ __forceinline__ void mma_16816(float* d, const u32* a, u32 b0, u32 b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 fp16 matrices: lane l gives the address of row l % 8 of matrix l / 8, and gets
// (row l / 4, columns 2 (l % 4) ..+1) of each; .trans gets (rows 2 (l % 4) ..+1, column l / 4).
__device__ __forceinline__ void ldmatrix_x4(u32* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, const u16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
}

// 16 bytes global -> shared without a register stop (sm_80+); src_bytes 0 writes zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(shared_address(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// Wait until at most N of this thread's committed cp.async groups are still in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

