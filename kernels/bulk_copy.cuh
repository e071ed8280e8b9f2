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

// The recall's bulk gathers (kernels/recall.cu, and the selection kernel's
// tail in kernels/select.cu): units are cut into pieces of at most
// kGatherPiece bytes, kGatherStages of them in flight per issuing thread
// (bench/mapped_probe: 4 stages of 16 KiB per block, two blocks, reach the
// PCIe limit). kGatherStageBytes: the stages and their barriers.
constexpr uint32_t kGatherPiece = 16384;
constexpr int kGatherStages = 4;
constexpr size_t kGatherStageBytes = (size_t)kGatherStages * kGatherPiece + 8u * kGatherStages;

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

// Orders the executing thread's generic-proxy accesses to shared memory
// (mbarrier.init included) before later async-proxy (TMA) accesses to it.
__device__ __forceinline__ void fence_proxy_async() {
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

// One thread copies n pieces from global memory (mapped host memory too)
// to global memory through `Stages` shared-memory stages of `Piece` bytes
// at shared address stage0, with their mbarriers at bar0 (8 bytes each; the
// stages' memory must be free for the async proxy: see fence_proxy_async).
// piece(j, src, dst, bytes) names piece j (bytes <= Piece, multiples of
// 16); it is called once per piece, in increasing j, one piece ahead of
// its load so that the loads it makes hide behind the wait. Piece j lands
// in stage j % Stages (its barrier completes with the bytes; a parity bit
// per stage says which completion is next), is bulk-stored to its
// destination, and once that store has read the stage the stage takes
// piece j + Stages. Returns when every write has completed.
template <int Stages, uint32_t Piece, class PieceFn>
__device__ __forceinline__ void copy_pieces(uint32_t stage0, uint32_t bar0, int64_t n,
                                            PieceFn piece) {
    static_assert(Stages >= 1 && Stages <= 32, "a parity bit per stage");
    if (n <= 0) return;
    for (int s = 0; s < Stages; s++) barrier_init(bar0 + 8 * s);
    fence_proxy_async();
    unsigned char *dst_of[Stages];  // the pieces in the stages (a ring)
    uint32_t bytes_of[Stages];
    for (int64_t j = 0; j < Stages && j < n; j++) {
        const unsigned char *src;
        piece(j, src, dst_of[j], bytes_of[j]);
        load(stage0 + (uint32_t)j * Piece, src, bytes_of[j], bar0 + 8 * (uint32_t)j);
    }
    const unsigned char *next_src = nullptr;
    unsigned char *next_dst = nullptr;
    uint32_t next_bytes = 0;
    if (Stages < n) piece(Stages, next_src, next_dst, next_bytes);
    uint32_t parity = 0;
    for (int64_t j = 0; j < n; j++) {
        const int s = (int)(j % Stages);
        const uint32_t stage = stage0 + (uint32_t)s * Piece, bar = bar0 + 8 * (uint32_t)s;
        barrier_wait(bar, (parity >> s) & 1u);
        parity ^= 1u << s;
        store(dst_of[s], stage, bytes_of[s]);
        if (j + Stages < n) {
            const unsigned char *src = next_src;
            dst_of[s] = next_dst;
            bytes_of[s] = next_bytes;
            if (j + Stages + 1 < n) piece(j + Stages + 1, next_src, next_dst, next_bytes);
            wait_stores_read();  // the stage is free once its store has read it
            load(stage, src, bytes_of[s], bar);
        }
    }
    wait_stores_done();
}

#endif  // FKV_HAS_BULK_COPY

}  // namespace bulk
}  // namespace fkv
