// Incremental recall, in two launches:
//  plan   one block per (sequence, KV head), plan.cuh's recall_plan: matches
//         the new page set against the pages already in slots, gives each
//         missing page a slot whose page left the set, writes the copy list
//         and makes the set active (skipped when the selection kernel's
//         tail made the plan: FKV_PLAN_DONE);
//  gather a fixed grid of warps copies each listed unit (one page of one KV
//         head, K and V: 16 KiB for bf16, P 32, D 128) from the host pool
//         (mapped pinned memory, read over PCIe) into its slot. With
//         st.gather_bulk (FKV_CUDA_EXPERIMENTAL, sm_90) a few one-warp
//         blocks do it with TMA bulk copies instead (gather_bulk_kernel).
// A fixed grid keeps the launch graph-capturable; gather_blocks sets how
// many SMs recall takes from the engine (DESIGN section 3's trade-off).
#include "bulk_copy.cuh"
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

// The stages, then unit_base [heads + 1].
__host__ __device__ constexpr size_t bulk_smem(int32_t heads) {
    return fkv::bulk::kGatherStageBytes + 4u * ((size_t)heads + 1);
}

// One warp per block. The warp first reads every (sequence, KV head)'s
// work_count, 32 at a time, into exclusive prefix sums in shared memory
// (unit_base), so that the listed units have one global order; piece q of
// that order (unit q / ppu, part q % ppu) belongs to block q mod gridDim.x.
// Then lane 0 copies the block's pieces (plan.cuh's recall_gather).
__global__ void __launch_bounds__(fkv::kWarp)
gather_bulk_kernel(fkv_dev_state st, fkv_dev_batch b, int32_t kv_heads, int32_t K,
                   uint64_t unit_bytes)
{
#if FKV_HAS_BULK_COPY
    namespace bulk = fkv::bulk;
    extern __shared__ __align__(128) unsigned char stages[];
    const int32_t heads = b.n * kv_heads;
    int32_t *unit_base = reinterpret_cast<int32_t *>(stages + bulk::kGatherStageBytes);
    const int lane = threadIdx.x;
    int32_t before = 0;
    for (int32_t h0 = 0; h0 < heads; h0 += fkv::kWarp) {
        const int32_t head = h0 + lane;
        int32_t c = 0;
        if (head < heads) {
            const int32_t i = head / kv_heads, h = head % kv_heads;
            c = st.work_count[(uint64_t)b.slot[i] * kv_heads + h];
        }
        int32_t x = c;
#pragma unroll
        for (int o = 1; o < fkv::kWarp; o <<= 1) {
            const int32_t y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (head < heads) unit_base[head] = before + x - c;
        before += __shfl_sync(0xffffffffu, x, fkv::kWarp - 1);
    }
    if (lane == 0) unit_base[heads] = before;
    __syncwarp();
    if (lane != 0) return;  // one issuing thread is all TMA needs

    const uint32_t ppu = fkv::recall_pieces(unit_bytes);
    const int64_t pieces = (int64_t)before * ppu;
    const int64_t first = blockIdx.x, stride = gridDim.x;
    const int64_t n = first < pieces ? (pieces - 1 - first) / stride + 1 : 0;
    // Piece j of this block is piece q = first + j * stride of the global
    // order. Units are visited in increasing order, so the head only moves
    // forward.
    int32_t head = 0;
    fkv::recall_gather(st, unit_bytes, bulk::shared_addr(stages), n,
                       [&](int64_t j, uint64_t &at, uint32_t &part) {
                           const int64_t q = first + j * stride;
                           const int64_t u = q / ppu;
                           while (unit_base[head + 1] <= u) head++;
                           const int32_t i = head / kv_heads, h = head % kv_heads;
                           at = ((uint64_t)b.slot[i] * kv_heads + h) * K +
                                (uint64_t)(u - unit_base[head]);
                           part = (uint32_t)(q % ppu);
                       });
#else
    (void)st;
    (void)b;
    (void)kv_heads;
    (void)K;
    (void)unit_bytes;
#endif
}

} // namespace

extern "C" size_t fkv_recall_bulk_smem(const fkv_dev_geometry *g) {
    return bulk_smem(FKV_DEV_MAX_BATCH * g->kv_heads);
}

extern "C" cudaError_t fkv_recall_init(const fkv_dev_geometry *g, int32_t gather_bulk) {
    if (!gather_bulk) return cudaSuccess;
    return cudaFuncSetAttribute(gather_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)fkv_recall_bulk_smem(g));
}

extern "C" cudaError_t fkv_launch_recall(const fkv_dev_geometry *g,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         fkv_recall_mode mode, int32_t gather_blocks,
                                         fkv_plan_kind plan, cudaStream_t stream)
{
    if (b->n == 0 || plan == FKV_PLAN_GATHERED)
        return cudaSuccess;
    if (plan != FKV_PLAN_DONE) {
        const size_t smem = 4 * (size_t)g->select_pages * sizeof(int32_t);
        plan_kernel<<<dim3(g->kv_heads, b->n), kPlanThreads, smem, stream>>>(
            *g, *st, *b, layer, (int32_t)mode);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            return e;
    }
    if (st->gather_bulk) {
        gather_bulk_kernel<<<gather_blocks, fkv::kWarp, bulk_smem(b->n * g->kv_heads), stream>>>(
            *st, *b, g->kv_heads, g->select_pages, g->unit_bytes);
    } else {
        gather_kernel<<<gather_blocks, kGatherThreads, 0, stream>>>(*st, *b, g->kv_heads,
                                                                    g->select_pages, g->unit_bytes);
    }
    return cudaGetLastError();
}
