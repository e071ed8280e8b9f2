// The recall plan of one (sequence, KV head), run by a whole block of NT
// threads (blockDim.x == NT): matches the new page set against the pages
// already in slots, gives each missing page a slot whose page left the set,
// writes the copy list (work_src / work_dst / work_count) for the gather
// and makes the set active. recall.cu's plan kernel (NT 128) calls
// recall_plan, which reads the set and the slots from the metadata; the
// selection kernel's tail for the correction recall of COSINE and SYNC
// (NT 256; select.cu) calls plan_apply with them in shared memory (the set
// it just selected, the slots it prefetched at its start), so that both run
// the same code.
#pragma once

#include "bulk_copy.cuh"
#include "common.cuh"

namespace fkv {

// Exclusive prefix sum over the block in thread order; `total` gets the sum
// of all. Every thread must call it; ends with a barrier.
template <int NT>
__device__ __forceinline__ uint32_t plan_scan(uint32_t v, uint32_t &total,
                                               uint32_t *warp_total)
{
    const int lane = threadIdx.x % fkv::kWarp, warp = threadIdx.x / fkv::kWarp;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < fkv::kWarp; o <<= 1) {
        const uint32_t y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == fkv::kWarp - 1) warp_total[warp] = x;
    __syncthreads();
    uint32_t before = 0, all = 0;
    for (int w = 0; w < NT / fkv::kWarp; w++) {
        const uint32_t t = warp_total[w];
        before += w < warp ? t : 0u;
        all += t;
    }
    __syncthreads();
    total = all;
    return before + x - v;
}

// What a plan starts from: recall_plan loads it from the (sequence, layer)
// metadata; the selection kernel's tail has it in shared memory already.
struct plan_input {
    const int32_t *pages;         // [count] shared: the new set, ascending, distinct
    int32_t count;                // its size; FKV_RECALL_FIX: < 0, no correction
    int32_t *slot_page;           // [K] shared: each slot's page (updated in place)
    const uint64_t *blocks;       // [count] shared: pages' pool blocks, or null
    bool blocks_async;            // blocks is being filled by this block's cp.async
    const int32_t *active_pages;  // FIX with count < 0: the active set, kept
    int32_t active_count;         // ... and its size (< 0: none)
};

// The plan of `in` for (sequence slot, KV head h) of `layer`. scratch: 3 * K
// int32 of shared memory, not overlapping in's arrays; warp_total: NT / 32
// uint32 of shared memory. Every thread of the block must call it with the
// same arguments; in's shared arrays must be visible to every thread, or
// written by the threads that also read them here before the first barrier
// (recall_plan: thread t wrote pages[t] and slot_page[t + i * NT]); unless
// in.count < 0 under FIX, which reads active_pages only. With
// in.blocks_async every thread's cp.async into in.blocks is waited for
// only where the missing pages' blocks are read, after the matching (their
// latency hides behind it). Under FIX it also writes st.fetch_src (where
// not null) for every position of the set. Returns together.
template <int NT>
__device__ __forceinline__ void plan_apply(const fkv_dev_geometry &g, const fkv_dev_state &st,
                                           const fkv::layer_view &lv, int32_t slot, int32_t h,
                                           int32_t layer, int32_t mode, const plan_input &in,
                                           int32_t *scratch, uint32_t *warp_total)
{
    const int32_t K = g.select_pages;
    int32_t *work_count = st.work_count + (uint64_t)slot * g.kv_heads + h;
    const int32_t count = in.count;
    if (mode == FKV_RECALL_FIX && count < 0) {
        if (in.blocks_async) cp_async_wait<0>();  // none outlives the block
        // No correction: attention uses the active set as it is.
        const int32_t n = in.active_count < 0 ? 0 : in.active_count;
        int32_t *used = lv.k_array(g.off_used_pages, h);
        for (int32_t j = threadIdx.x; j < n; j += blockDim.x) used[j] = in.active_pages[j];
        if (threadIdx.x == 0) {
            lv.h_array(g.off_used_count)[h] = n;
            *work_count = 0;
        }
        return;
    }
    const int32_t *pages = in.pages;
    int32_t *slot_page = in.slot_page;  // [K]
    int32_t *new_slot = scratch;        // [K]
    int32_t *keep = scratch + K;        // [K]
    int32_t *free_list = scratch + 2 * K;  // [K] (the prefix-sum assignment)
    int32_t *active_pages = lv.k_array(g.off_active_pages, h);
    int32_t *active_count = lv.h_array(g.off_active_count) + h;
    const uint64_t *blocks = st.block_ptr + ((uint64_t)slot * g.layers + layer) * g.max_pages;

    // The first round's pool blocks (below), loaded now so that the loads
    // are in flight during the matching (unless the caller has them); only
    // missing pages use theirs.
    const int32_t j0 = (int32_t)threadIdx.x;
    const uint64_t block0 = !in.blocks && j0 < count ? blocks[pages[j0]] : 0;
    for (int32_t j = threadIdx.x; j < count; j += blockDim.x) new_slot[j] = -1;
    __syncthreads();
    // Pages of the set that are resident keep their slot: each slot's page
    // is looked up in the set (ascending) by bisection. Pages are distinct,
    // and so are the pages in slots: no two threads write one new_slot.
    for (int32_t s = threadIdx.x; s < K; s += blockDim.x) {
        const int32_t p = slot_page[s];  // -1: empty, in no set
        int32_t lo = 0, hi = count;
        while (lo < hi) {
            const int32_t mid = (lo + hi) >> 1;
            if (pages[mid] < p) lo = mid + 1; else hi = mid;
        }
        const bool kept = lo < count && pages[lo] == p;
        keep[s] = kept;
        if (kept) new_slot[lo] = s;
    }
    __syncthreads();
    const uint64_t list = ((uint64_t)slot * g.kv_heads + h) * K;
    // Missing pages in set order take the free slots (those whose pages
    // left the set: the lowest scored) in slot order, from prefix sums:
    // the r-th missing page takes the r-th free slot. The copy list
    // skips pages without a block (an internal error).
    uint32_t nfree = 0;
    for (int32_t base = 0; base < K; base += NT) {
        const int32_t s = base + (int32_t)threadIdx.x;
        const uint32_t f = s < K && !keep[s];
        uint32_t total;
        const uint32_t before = plan_scan<NT>(f, total, warp_total);
        if (f) free_list[nfree + before] = s;
        nfree += total;
    }
    if (in.blocks_async) cp_async_wait<0>();  // the barrier publishes them
    __syncthreads();  // free_list complete
    uint32_t nmiss = 0, w = 0;
    uint64_t *fetch = mode == FKV_RECALL_FIX && st.fetch_src ? st.fetch_src + list : nullptr;
    for (int32_t base = 0; base < count; base += NT) {
        const int32_t j = base + (int32_t)threadIdx.x;
        const bool miss = j < count && new_slot[j] < 0;
        const uint64_t block = !miss      ? 0
                               : in.blocks ? in.blocks[j]
                               : base == 0 ? block0
                                           : blocks[pages[j]];
        // (listed << 16 | missing): each under K < 2^16 per round.
        const uint32_t v = (uint32_t)miss | (uint32_t)(block != 0) << 16;
        uint32_t total;
        const uint32_t before = plan_scan<NT>(v, total, warp_total);
        uint64_t src = 0;
        if (miss) {
            const int32_t s = free_list[nmiss + (before & 0xffffu)];
            new_slot[j] = s;
            slot_page[s] = pages[j];
            if (!block) {
                atomicOr(st.error, FKV_DEV_ERR_INTERNAL);
            } else {
                const uint32_t at = w + (before >> 16);
                src = block + (uint64_t)h * g.unit_bytes;
                st.work_src[list + at] = src;
                st.work_dst[list + at] = reinterpret_cast<uint64_t>(lv.slot_unit(h, s));
            }
        }
        if (fetch && j < count) fetch[j] = src;
        nmiss += total & 0xffffu;
        w += total >> 16;
    }
    if (threadIdx.x == 0) {
        *work_count = (int32_t)w;
        if (w) {
            atomicAdd(&st.counters[FKV_DEV_PAGES_RECALLED], (unsigned long long)w);
            atomicAdd(&st.counters[FKV_DEV_BYTES_RECALLED],
                      (unsigned long long)w * g.unit_bytes);
            // FIX recalls run inside fkv_attend, except fkv_set_pages'
            // (BOUNDED is always FREEKV).
            if (mode == FKV_RECALL_FIX && g.policy != FKV_POLICY_EXTERNAL)
                atomicAdd(&st.counters[FKV_DEV_PAGES_RECALLED_CRITICAL],
                          (unsigned long long)w);
        }
    }
    __syncthreads();
    int32_t *slots_of = lv.k_array(g.off_slot_page, h);
    int32_t *active_slot = lv.k_array(g.off_active_slot, h);
    for (int32_t s = threadIdx.x; s < K; s += blockDim.x) slots_of[s] = slot_page[s];
    for (int32_t j = threadIdx.x; j < count; j += blockDim.x) {
        active_pages[j] = pages[j];
        active_slot[j] = new_slot[j];
    }
    if (mode == FKV_RECALL_FIX) {
        int32_t *used = lv.k_array(g.off_used_pages, h);
        for (int32_t j = threadIdx.x; j < count; j += blockDim.x) used[j] = pages[j];
    } else {
        // The query that chose the set is the one correction compares with.
        const int32_t n = g.group * g.head_dim;
        const float *src = lv.at<float>(g.off_pending_q) + (uint64_t)h * n;
        float *dst = lv.at<float>(g.off_active_q) + (uint64_t)h * n;
        for (int32_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = src[e];
    }
    __syncthreads(); // every read of the mode's source arrays is done
    if (threadIdx.x == 0) {
        *active_count = count;
        if (mode == FKV_RECALL_FIX) {
            lv.h_array(g.off_used_count)[h] = count;
            lv.h_array(g.off_fix_count)[h] = -1;
        } else {
            lv.h_array(g.off_pending_valid)[h] = 0;
            // The selection made at attend is active now; the next
            // fkv_select selects afresh (nothing reads this meanwhile).
            if (h == 0) *lv.at<int32_t>(g.off_pending_attend) = 0;
        }
    }
}

// The plan of the mode's set (FKV_RECALL_PENDING: the pending selection;
// FKV_RECALL_FIX: the correction) read from the metadata of lv, (sequence
// slot, layer)'s view (the caller's: it may have the region by value).
// smem: 5 * K int32 of shared memory; warp_total: NT / 32 uint32 of shared
// memory. Every thread of the block must call it, with the same arguments;
// returns together.
template <int NT>
__device__ __forceinline__ void recall_plan(const fkv_dev_geometry &g,
                                            const fkv_dev_state &st,
                                            const fkv::layer_view &lv, int32_t slot,
                                            int32_t h, int32_t layer, int32_t mode,
                                            int32_t *smem,
                                            uint32_t *warp_total)
{
    const int32_t K = g.select_pages;
    int32_t *slot_page = smem, *pages = smem + K;  // [K] each; the scratch follows
    plan_input in;
    in.pages = pages;
    in.slot_page = slot_page;
    in.blocks = nullptr;
    in.blocks_async = false;
    in.active_pages = lv.k_array(g.off_active_pages, h);
    in.active_count = 0;
    const int32_t *from;
    if (mode == FKV_RECALL_PENDING) {
        if (!lv.h_array(g.off_pending_valid)[h]) {
            if (threadIdx.x == 0) st.work_count[(uint64_t)slot * g.kv_heads + h] = 0;
            return;
        }
        from = lv.k_array(g.off_pending_pages, h);
        in.count = lv.h_array(g.off_pending_count)[h];
    } else {
        from = lv.k_array(g.off_fix_pages, h);
        in.count = lv.h_array(g.off_fix_count)[h];
        if (in.count < 0) in.active_count = lv.h_array(g.off_active_count)[h];
    }
    if (mode == FKV_RECALL_PENDING || in.count >= 0) {
        const int32_t *slots_of = lv.k_array(g.off_slot_page, h);
        for (int32_t s = threadIdx.x; s < K; s += blockDim.x) slot_page[s] = slots_of[s];
        for (int32_t j = threadIdx.x; j < in.count; j += blockDim.x) pages[j] = from[j];
    }
    // plan_apply's first barrier makes them visible.
    plan_apply<NT>(g, st, lv, slot, h, layer, mode, in, smem + 2 * K, warp_total);
}

#if FKV_HAS_BULK_COPY
// Piece `part` (of bulk::kGatherPiece bytes, the last one shorter) of the
// unit at position `at` of the recall work lists: where the bulk gathers
// (recall.cu's kernel, recall_gather_head below) read and write it.
__device__ __forceinline__ void recall_piece(const fkv_dev_state &st, uint64_t unit_bytes,
                                             uint64_t at, uint32_t part,
                                             const unsigned char *&src, unsigned char *&dst,
                                             uint32_t &bytes)
{
    const uint64_t off = (uint64_t)part * bulk::kGatherPiece;
    src = reinterpret_cast<const unsigned char *>(st.work_src[at]) + off;
    dst = reinterpret_cast<unsigned char *>(st.work_dst[at]) + off;
    bytes = (uint32_t)(unit_bytes - off < bulk::kGatherPiece ? unit_bytes - off
                                                             : bulk::kGatherPiece);
}

// Pieces per unit.
__device__ __forceinline__ uint32_t recall_pieces(uint64_t unit_bytes)
{
    return (uint32_t)((unit_bytes + bulk::kGatherPiece - 1) / bulk::kGatherPiece);
}

// Gathers with the stages at shared address stage0 (bulk::kGatherStageBytes,
// free for the async proxy), n pieces, piece j at piece_at(j) (in increasing
// j: see bulk::copy_pieces).
template <class PieceAt>
__device__ __forceinline__ void recall_gather(const fkv_dev_state &st, uint64_t unit_bytes,
                                              uint32_t stage0, int64_t n, PieceAt piece_at)
{
    auto piece = [&](int64_t j, const unsigned char *&src, unsigned char *&dst,
                     uint32_t &bytes) {
        uint64_t at;
        uint32_t part;
        piece_at(j, at, part);
        recall_piece(st, unit_bytes, at, part, src, dst, bytes);
    };
    bulk::copy_pieces<bulk::kGatherStages, bulk::kGatherPiece>(
        stage0, stage0 + (uint32_t)bulk::kGatherStages * bulk::kGatherPiece, n, piece);
}

// One thread copies the units on (sequence slot, KV head h)'s work list
// (the plan's, above) into their slots, for recall_gather_own below: a
// block that made a head's plan then copies its units without a launch of
// their own.
__device__ __forceinline__ void recall_gather_head(const fkv_dev_geometry &g,
                                                   const fkv_dev_state &st, int32_t slot,
                                                   int32_t h, uint32_t stage0)
{
    const uint64_t list = ((uint64_t)slot * g.kv_heads + h) * g.select_pages;
    const uint32_t ppu = recall_pieces(g.unit_bytes);
    const int64_t n = (int64_t)st.work_count[(uint64_t)slot * g.kv_heads + h] * ppu;
    recall_gather(st, g.unit_bytes, stage0, n, [&](int64_t j, uint64_t &at, uint32_t &part) {
        at = list + (uint64_t)(j / ppu);
        part = (uint32_t)(j % ppu);
    });
}

// After a block's plan of (sequence slot, KV head h): its thread 0 copies
// the head's listed units with the stages at stage0, shared memory the block
// may have written with generic stores (the plan's scratch). Every thread
// must call it: the barriers publish the work list, and the fence orders
// every thread's generic accesses before the async proxy's writes.
__device__ __forceinline__ void recall_gather_own(const fkv_dev_geometry &g,
                                                  const fkv_dev_state &st, int32_t slot,
                                                  int32_t h, uint32_t stage0)
{
    __syncthreads();
    bulk::fence_proxy_async();
    __syncthreads();
    if (threadIdx.x == 0) recall_gather_head(g, st, slot, h, stage0);
}
#endif

} // namespace fkv
