// Incremental recall, in two launches:
//  plan   one block per (sequence, KV head), plan.cuh's recall_plan: matches
//         the new page set against the pages already in slots, gives each
//         missing page a slot whose page left the set, writes the copy list
//         and makes the set active (skipped when the selection kernel's
//         tail made the plan: FKV_PLAN_DONE);
//  gather a fixed grid of warps copies each listed unit (one page of one KV
//         head, K and V: 16 KiB for bf16, P 32, D 128) from the host pool
//         (mapped pinned memory, read over PCIe) into its slot.
// A fixed grid keeps the launch graph-capturable; gather_blocks sets how
// many SMs recall takes from the engine (DESIGN section 3's trade-off).
#include "common.cuh"
#include "plan.cuh"

namespace {

constexpr int kPlanThreads = 128;
constexpr int kGatherThreads = 256;

__global__ void __launch_bounds__(kPlanThreads)
plan_kernel(fkv_dev_geometry g, fkv_dev_state st, fkv_dev_batch b, int32_t layer,
            int32_t mode)
{
    extern __shared__ int32_t smem[];
    __shared__ uint32_t warp_total[kPlanThreads / fkv::kWarp];
    fkv::recall_plan<kPlanThreads>(g, st, b.slot[blockIdx.y], blockIdx.x, layer, mode,
                                   smem, warp_total);
}

__global__ void gather_kernel(fkv_dev_state st, fkv_dev_batch b, int32_t kv_heads,
                              int32_t K, uint64_t unit_bytes)
{
    const int32_t lane = threadIdx.x % fkv::kWarp;
    const int32_t warps = blockDim.x / fkv::kWarp;
    const int64_t first = (int64_t)blockIdx.x * warps + threadIdx.x / fkv::kWarp;
    const int64_t stride = (int64_t)gridDim.x * warps;
    const int64_t items = (int64_t)b.n * kv_heads * K;
    for (int64_t it = first; it < items; it += stride) {
        const int32_t i = (int32_t)(it / ((int64_t)kv_heads * K));
        const int32_t rem = (int32_t)(it % ((int64_t)kv_heads * K));
        const int32_t h = rem / K, w = rem % K;
        const uint64_t head = (uint64_t)b.slot[i] * kv_heads + h;
        if (w >= st.work_count[head]) continue;
        const uint64_t at = head * K + w;
        fkv::copy16(reinterpret_cast<void *>(st.work_dst[at]),
                    reinterpret_cast<const void *>(st.work_src[at]), unit_bytes, lane,
                    fkv::kWarp);
    }
}

} // namespace

extern "C" cudaError_t fkv_launch_recall(const fkv_dev_geometry *g,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         fkv_recall_mode mode, int32_t gather_blocks,
                                         fkv_plan_kind plan, cudaStream_t stream)
{
    if (b->n == 0)
        return cudaSuccess;
    if (plan != FKV_PLAN_DONE) {
        const size_t smem = 4 * (size_t)g->select_pages * sizeof(int32_t);
        plan_kernel<<<dim3(g->kv_heads, b->n), kPlanThreads, smem, stream>>>(
            *g, *st, *b, layer, (int32_t)mode);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            return e;
    }
    gather_kernel<<<gather_blocks, kGatherThreads, 0, stream>>>(*st, *b, g->kv_heads,
                                                                g->select_pages, g->unit_bytes);
    return cudaGetLastError();
}
