// Programmatic dependent launch (Hopper, sm_90+): a kernel launched with the launch attribute
// PROGRAMMATIC_STREAM_SERIALIZATION (gpu/cuda/driver.py LaunchSite, decode steps only) may start
// while the kernel before it on the stream is still finishing. It must then call
// grid_dependency_wait() before it reads anything the earlier kernels wrote or writes anything
// they read: the wait returns once every prerequisite grid has completed and its writes are
// visible. What it does before the wait overlaps the previous kernel's tail: constant loads
// (weights, norm gains) and L2 prefetches. Every kernel here waits before its first dependent
// access, and so the ordering stays transitive: a kernel cannot finish before its own wait.
//
// grid_dependents_launch() lets the next kernel's CTAs be scheduled as soon as every CTA of this
// grid has called it (or exited); called right after the wait, the next grid's launch latency
// (~0.8 us per graph node, docs/anchors.md) hides under this kernel's work.
//
// Without the attribute (and before sm_90, where the instructions do not exist) the wait
// returns at once and the trigger does nothing, so the same kernels serve every launch.
#pragma once

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Wait for the kernels before this one, then let the next one launch: the prologue of every
// kernel that has nothing constant to load first.
__device__ __forceinline__ void grid_dependency_sync() {
    grid_dependency_wait();
    grid_dependents_launch();
}

// Hint: bring [p, p + bytes) into L2 (one bulk request on sm_90; nothing before). Only whole
// 16-byte units inside the range are requested, so the hint never touches memory past it.
__device__ __forceinline__ void prefetch_l2(const void* p, long long bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const unsigned long long start = ((unsigned long long)p + 15) & ~15ull;
    const unsigned long long end = ((unsigned long long)p + bytes) & ~15ull;
    if (end > start)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(start), "r"((unsigned)(end - start)) : "memory");
#endif
}
