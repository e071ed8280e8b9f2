// TMA bulk copies (cp.async.bulk, sm_90) between global memory, which may
// be mapped host memory, and shared memory, with the mbarriers that signal
// a read's completion. One issuing thread drives them; the copy engine of
// the SM does the rest, so a one-warp block keeps tens of KiB in flight.
// bench/mapped_probe measured them on the H200: correct from
// cudaHostAllocMapped memory, 51 GB/s with two one-warp blocks.
//
// Sizes and addresses must be multiples of 16 bytes. Everything here is
// sm_90 only: callers guard their use with FKV_HAS_BULK_COPY and never
// launch such code on an older device.
#pragma once

#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FKV_HAS_BULK_COPY 1
#else
#define FKV_HAS_BULK_COPY 0
#endif

namespace fkv {
namespace bulk {

#if FKV_HAS_BULK_COPY

// The .global address of a generic pointer (the bulk copies take .global
// operands; a mapped host pointer is a global address too).
__device__ __forceinline__ uint64_t global_addr(const void *p) {
    uint64_t g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(p));
    return g;
}

__device__ __forceinline__ uint32_t shared_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// One arrival completes a phase (the arming thread's), plus the bytes.
__device__ __forceinline__ void barrier_init(uint32_t bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}

// Makes initialised barriers visible to the async proxy (TMA) before its
// first complete_tx.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// One non-blocking probe of the barrier's phase of parity `parity`.
__device__ __forceinline__ bool barrier_try_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.b32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}

__device__ __forceinline__ void barrier_wait(uint32_t bar, uint32_t parity) {
    while (!barrier_try_wait(bar, parity)) {
    }
}

// Arms `bar` for one arrival and `bytes` to come, and starts the read of
// `bytes` at src into shared memory at `dst`.
__device__ __forceinline__ void load(uint32_t dst, const void *src, uint32_t bytes,
                                     uint32_t bar) {
    asm volatile(
        "{\n\t.reg .b64 state;\n\t"
        "mbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n\t}" ::"r"(bar),
        "r"(bytes)
        : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1], %2, [%3];" ::"r"(dst),
        "l"(global_addr(src)), "r"(bytes), "r"(bar)
        : "memory");
}

// Starts the write of `bytes` of shared memory at src to dst, as one bulk
// group.
__device__ __forceinline__ void store(void *dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(
                     global_addr(dst)),
                 "r"(src), "r"(bytes)
                 : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// Every store issued so far has read its shared memory (which may be
// reused) / has completed its writes.
__device__ __forceinline__ void wait_stores_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
}
__device__ __forceinline__ void wait_stores_done() {
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

#endif  // FKV_HAS_BULK_COPY

}  // namespace bulk
}  // namespace fkv
