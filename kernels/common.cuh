// Shared device helpers of the CUDA backend: dtype traits, addressing of a
// (sequence, layer) region, page ranges and warp/block reductions. Each
// kernel lives in its own .cu file and includes this.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "freekv.h"
#include "kernels.h"

namespace fkv {

constexpr int kWarp = 32;

// ---- dtypes ---------------------------------------------------------------

template <typename T> struct dtype_traits;
template <> struct dtype_traits<float> {
    static __device__ __forceinline__ float to_float(float x) { return x; }
    static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct dtype_traits<__half> {
    static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct dtype_traits<__nv_bfloat16> {
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> __device__ __forceinline__ float to_f(T x) { return dtype_traits<T>::to_float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return dtype_traits<T>::from_float(x); }

// Calls f.template operator()<T>() with T the C++ type of a fkv_dtype, so a
// launcher can dispatch once: dispatch_dtype(dt, [&](auto tag) { using T =
// decltype(tag); ... }).
template <typename F> inline cudaError_t dispatch_dtype(int32_t dtype, F &&f) {
    switch (dtype) {
    case FKV_DTYPE_F32: return f(float{});
    case FKV_DTYPE_F16: return f(__half{});
    case FKV_DTYPE_BF16: return f(__nv_bfloat16{});
    }
    return cudaErrorInvalidValue;
}

// Calls f(std::integral_constant<int, D>) for the supported head dims.
template <int D> struct head_dim_tag { static constexpr int value = D; };
template <typename F> inline cudaError_t dispatch_head_dim(int32_t head_dim, F &&f) {
    switch (head_dim) {
    case 64: return f(head_dim_tag<64>{});
    case 128: return f(head_dim_tag<128>{});
    case 256: return f(head_dim_tag<256>{});
    }
    return cudaErrorInvalidValue;
}

// ---- addressing ---------------------------------------------------------

// The (slot, layer) region and typed views of its arrays; geo is the
// layer's geometry (its region_off places the region).
struct layer_view {
    unsigned char *base;
    const fkv_dev_geometry *g;

    __device__ __forceinline__ layer_view(const fkv_dev_geometry &geo,
                                          const fkv_dev_state &st,
                                          int32_t slot, int32_t layer)
        : base(st.seq_base[slot] + geo.region_off), g(&geo) { (void)layer; }
    // The region given by value (the host knows it: a slot's region never
    // moves), saving the dependent load of seq_base.
    __device__ __forceinline__ layer_view(const fkv_dev_geometry &geo, unsigned char *region)
        : base(region), g(&geo) {}

    template <typename T> __device__ __forceinline__ T *at(uint64_t off) const {
        return reinterpret_cast<T *>(base + off);
    }
    __device__ __forceinline__ unsigned char *unit(uint64_t off, int32_t kv_head,
                                                   int32_t per_head, int32_t i) const {
        return base + off + ((uint64_t)kv_head * per_head + i) * g->unit_bytes;
    }
    __device__ __forceinline__ unsigned char *sink_unit(int32_t h, int32_t page) const {
        return unit(g->off_sink, h, g->sink_pages, page);
    }
    __device__ __forceinline__ unsigned char *ring_unit(int32_t h, int32_t page) const {
        return unit(g->off_ring, h, g->ring_pages, (page - g->sink_pages) % g->ring_pages);
    }
    __device__ __forceinline__ unsigned char *slot_unit(int32_t h, int32_t s) const {
        return unit(g->off_slots, h, g->select_pages, s);
    }
    __device__ __forceinline__ unsigned char *store_unit(int32_t h, int32_t page) const {
        return unit(g->off_store, h, g->max_pages, page);
    }
    // Where a page that is not a recalled candidate lives on the device:
    // the store, else the sink or the window ring.
    __device__ __forceinline__ unsigned char *resident_unit(int32_t h, int32_t page) const {
        if (g->store) return store_unit(h, page);
        return page < g->sink_pages ? sink_unit(h, page) : ring_unit(h, page);
    }
    template <typename T> __device__ __forceinline__ T *summary_max(int32_t h, int32_t page) const {
        return at<T>(g->off_smax) + ((uint64_t)h * g->max_pages + page) * g->head_dim;
    }
    template <typename T> __device__ __forceinline__ T *summary_min(int32_t h, int32_t page) const {
        return at<T>(g->off_smin) + ((uint64_t)h * g->max_pages + page) * g->head_dim;
    }
    __device__ __forceinline__ int32_t *k_array(uint64_t off, int32_t h) const {
        return at<int32_t>(off) + (uint64_t)h * g->select_pages;
    }
    __device__ __forceinline__ int32_t *h_array(uint64_t off) const { return at<int32_t>(off); }
};

__device__ __forceinline__ int32_t seq_len(const fkv_dev_geometry &g,
                                           const fkv_dev_state &st,
                                           int32_t slot, int32_t layer) {
    return st.len[(uint64_t)slot * g.layers + layer];
}

// Page ranges of a (sequence, layer) with n tokens (docs/design.md s.2).
struct page_ranges {
    int32_t sealed, partial, sink_end, window_first, cand_first, cand_count;

    __device__ __forceinline__ page_ranges(const fkv_dev_geometry &g, int32_t n) {
        sealed = n / g.page;
        partial = n % g.page;
        sink_end = sealed < g.sink_pages ? sealed : g.sink_pages;
        int32_t wf = sealed - g.window_pages;
        window_first = wf < g.sink_pages ? sink_end : wf;
        cand_first = g.sink_pages;
        cand_count = window_first - g.sink_pages;
        if (cand_count < 0) cand_count = 0;
    }
};

// Each batch entry's (sequence, layer) region, by value: the host knows
// them (a slot's region never moves once allocated, so a captured value
// stays right), which saves the dependent load of st.seq_base.
struct region_table {
    unsigned char *base[FKV_DEV_MAX_BATCH];
};

// Host side of a launch that takes the regions by value: the batch's
// entries from seq_base_host (the host's copy of st.seq_base). False for a
// slot out of range or without a region (the launch must then refuse).
inline bool fill_regions(const fkv_dev_geometry &g, const fkv_dev_state &st,
                         const fkv_dev_batch &b, unsigned char *const *seq_base_host,
                         region_table &regions) {
    if (!seq_base_host) return false;
    for (int32_t j = 0; j < b.n; j++) {
        if (b.slot[j] < 0 || b.slot[j] >= st.max_seqs || !seq_base_host[b.slot[j]])
            return false;
        regions.base[j] = seq_base_host[b.slot[j]] + g.region_off;
    }
    return true;
}

// ---- asynchronous copies to shared memory (sm_80) -------------------------

// 16-byte global -> shared copy, L2 only (streamed data); src_bytes 0
// writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// 4-byte global -> shared copy (through L1: .cg takes 16 bytes only).
__device__ __forceinline__ void cp_async4(void *dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n"
                 :: "r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
// 8-byte global -> shared copy (through L1).
__device__ __forceinline__ void cp_async8(void *dst, const void *src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n"
                 :: "r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}

// ---- reductions -----------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Copies `bytes` (a multiple of 16) with 16-byte accesses, threads of the
// calling group striding by `stride` from `lane`.
__device__ __forceinline__ void copy16(void *dst, const void *src, uint64_t bytes,
                                       int lane, int stride) {
    uint4 *d = reinterpret_cast<uint4 *>(dst);
    const uint4 *s = reinterpret_cast<const uint4 *>(src);
    uint64_t n = bytes / 16;
    uint64_t i = lane;
    // Four loads in flight before the stores: PCIe and HBM both want it.
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = s[i], b = s[i + stride], c = s[i + 2 * stride], e = s[i + 3 * stride];
        d[i] = a; d[i + stride] = b; d[i + 2 * stride] = c; d[i + 3 * stride] = e;
    }
    for (; i < n; i += stride) d[i] = s[i];
}

} // namespace fkv
