// Incremental recall, in two launches:
//  plan   one block per (sequence, KV head), plan.cuh's recall_plan: matches
//         the new page set against the pages already in slots, gives each
//         missing page a slot whose page left the set, writes the copy list
//         and makes the set active (skipped when the selection kernel's
//         tail made the plan: FKV_PLAN_DONE);
//  gather a fixed grid copies the listed units (one page of one KV head, K
//         and V: 16 KiB for bf16, P 32, D 128) from the host pool (mapped
//         pinned memory, read over PCIe) into their slots, every thread
//         16-byte pieces of the units' one global order. With
//         st.gather_bulk (sm_90: FREEKV's speculative recall; the engine
//         stream's with FKV_CUDA_EXPERIMENTAL) a few one-warp blocks do it
//         with TMA bulk copies instead (gather_bulk_kernel).
// FKV_PLAN_FUSED (FKV_CUDA_EXPERIMENTAL, sm_90) makes both one launch: each
// plan block then copies its own head's units (plan_gather_kernel).
// fkv_attend launches neither: the plan is made by the selection's tail or
// BOUNDED's rule kernel, and the split kernel reads the listed units
// itself (attend.cu, "Fetch").
// A fixed grid keeps the launch graph-capturable; gather_blocks sets how
// many SMs recall takes from the engine (DESIGN section 3's trade-off).
#include "bulk_copy.cuh"
#include "common.cuh"
#include "launch.cuh"
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
    const int32_t slot = b.slot[blockIdx.y];
    const fkv::layer_view lv(g, st, slot, layer);
    fkv::recall_plan<kPlanThreads>(g, st, lv, slot, blockIdx.x, layer, mode, smem,
                                   warp_total);
}

// FKV_PLAN_FUSED: the plan kernel's block, then its thread 0 copies the
// head's listed units by TMA bulk copies (plan.cuh's recall_gather_head, as
// the selection's FKV_TAIL_GATHER does), in the same shared memory: the
// plan's arrays first, the stages after. Heads start copying as soon as
// their own plan is made, with no second launch and no prefix pass over
// the batch. Dynamic shared memory: fused_smem below.
__global__ void __launch_bounds__(kPlanThreads)
plan_gather_kernel(fkv_dev_geometry g, fkv_dev_state st, fkv_dev_batch b, int32_t layer,
                   int32_t mode)
{
#if FKV_HAS_BULK_COPY
    extern __shared__ __align__(128) int32_t fused[];
    __shared__ uint32_t warp_total[kPlanThreads / fkv::kWarp];
    const int32_t slot = b.slot[blockIdx.y];
    const fkv::layer_view lv(g, st, slot, layer);
    fkv::recall_plan<kPlanThreads>(g, st, lv, slot, blockIdx.x, layer, mode, fused,
                                   warp_total);
    fkv::recall_gather_own(g, st, slot, blockIdx.x, fkv::bulk::shared_addr(fused));
#else
    (void)g;
    (void)st;
    (void)b;
    (void)layer;
    (void)mode;
#endif
}

// Exclusive prefix sums of the work counts of the batch's (sequence, KV
// head)s into unit_base [heads + 1], by one warp (32 heads at a time), so
// that the listed units have one global order. Returns the total.
__device__ __forceinline__ int32_t unit_prefix(const fkv_dev_state &st,
                                               const fkv_dev_batch &b, int32_t kv_heads,
                                               int32_t *unit_base, int lane) {
    const int32_t heads = b.n * kv_heads;
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
    return before;
}

// The 16-byte pieces of every listed unit in one global order (units in
// unit_base order, pieces within a unit), thread t of the grid copying
// pieces t, t + T, ... (T threads in all) four at a time, all four loads
// before the stores. A small recall (a correction) then has all its bytes
// in flight at once, about one PCIe round trip, where a warp per unit
// needed eight (16 KiB / (32 lanes x 16 B x 4 in flight)); a warp's lanes
// read 512 consecutive bytes of one unit. Dynamic shared memory:
// unit_base [heads + 1].
constexpr int kGatherBatch = 4;

__global__ void __launch_bounds__(kGatherThreads)
gather_kernel(fkv_dev_state st, fkv_dev_batch b, int32_t kv_heads, int32_t K,
              uint64_t unit_bytes)
{
    extern __shared__ int32_t unit_base[];
    if (threadIdx.x < fkv::kWarp) unit_prefix(st, b, kv_heads, unit_base, threadIdx.x);
    __syncthreads();
    const uint64_t per_unit = unit_bytes / 16;
    const uint64_t pieces = (uint64_t)unit_base[b.n * kv_heads] * per_unit;
    const uint64_t threads = (uint64_t)gridDim.x * blockDim.x;
    int32_t head = 0;  // a thread's pieces only move forward: so does head
    for (uint64_t p = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; p < pieces;
         p += kGatherBatch * threads) {
        uint4 v[kGatherBatch];
        uint4 *dst[kGatherBatch];
#pragma unroll
        for (int k = 0; k < kGatherBatch; k++) {
            const uint64_t q = p + k * threads;
            dst[k] = nullptr;
            if (q >= pieces) continue;
            const uint64_t u = q / per_unit, part = q % per_unit;
            while ((uint64_t)unit_base[head + 1] <= u) head++;
            const int32_t i = head / kv_heads, h = head % kv_heads;
            const uint64_t at = ((uint64_t)b.slot[i] * kv_heads + h) * K +
                                (u - (uint64_t)unit_base[head]);
            v[k] = reinterpret_cast<const uint4 *>(st.work_src[at])[part];
            dst[k] = reinterpret_cast<uint4 *>(st.work_dst[at]) + part;
        }
#pragma unroll
        for (int k = 0; k < kGatherBatch; k++)
            if (dst[k]) *dst[k] = v[k];
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
    int32_t *unit_base = reinterpret_cast<int32_t *>(stages + bulk::kGatherStageBytes);
    const int lane = threadIdx.x;
    const int32_t before = unit_prefix(st, b, kv_heads, unit_base, lane);
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

// The plan kernel's dynamic shared memory: the slots, the set and the
// plan's scratch, K int32 each (plan.cuh, recall_plan).
static size_t plan_smem(const fkv_dev_geometry *g) {
    return 5 * (size_t)(g->select_pages > 0 ? g->select_pages : 0) * sizeof(int32_t);
}

extern "C" cudaError_t fkv_recall_plan_init(const fkv_dev_geometry *g,
                                            const fkv_dev_limits *lim) {
    cudaFuncAttributes a;
    cudaError_t e = cudaFuncGetAttributes(&a, plan_kernel);
    if (e != cudaSuccess || plan_smem(g) <= (size_t)a.maxDynamicSharedSizeBytes) return e;
    // Past the default: the device's most (as select.cu's allow_smem).
    const long long most = (long long)lim->smem_per_block_optin - (long long)a.sharedSizeBytes;
    if (most < (long long)plan_smem(g)) return cudaErrorInvalidValue;  // K is too large
    return cudaFuncSetAttribute(plan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)most);
}

extern "C" cudaError_t fkv_recall_bulk_built(int32_t *built) {
    if (!built) return cudaErrorInvalidValue;
    cudaFuncAttributes a;
    const cudaError_t e = cudaFuncGetAttributes(&a, gather_bulk_kernel);
    if (e != cudaSuccess) return e;
    // The virtual architecture the code came from: code JIT-compiled for
    // sm_90 from compute_80 PTX lacks the copies (its binaryVersion is 90).
    *built = a.ptxVersion >= 90;
    return cudaSuccess;
}

// FKV_PLAN_FUSED's: the plan's arrays (plan_smem), then reused by the
// stages.
static size_t fused_smem(const fkv_dev_geometry *g) {
    const size_t plan = plan_smem(g);
    return plan > fkv::bulk::kGatherStageBytes ? plan : fkv::bulk::kGatherStageBytes;
}

extern "C" cudaError_t fkv_recall_init(const fkv_dev_geometry *g, int32_t gather_bulk,
                                       int32_t fused) {
    cudaError_t e = cudaSuccess;
    if (gather_bulk)
        e = cudaFuncSetAttribute(gather_bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)fkv_recall_bulk_smem(g));
    if (e == cudaSuccess && fused)
        e = cudaFuncSetAttribute(plan_gather_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)fused_smem(g));
    return e;
}

extern "C" cudaError_t fkv_launch_recall(const fkv_dev_geometry *g,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         fkv_recall_mode mode, int32_t gather_blocks,
                                         fkv_plan_kind plan, cudaStream_t stream)
{
    if (b->n == 0)
        return cudaSuccess;
    if (plan == FKV_PLAN_FUSED) {
        if (!st->gather_bulk) return cudaErrorInvalidValue;
        return fkv::enqueue(plan_gather_kernel, dim3(g->kv_heads, b->n), kPlanThreads,
                            fused_smem(g), stream, *g, *st, *b, layer, (int32_t)mode);
    }
    if (plan != FKV_PLAN_DONE) {
        const cudaError_t e = fkv::enqueue(plan_kernel, dim3(g->kv_heads, b->n), kPlanThreads,
                                           plan_smem(g), stream, *g, *st, *b, layer,
                                           (int32_t)mode);
        if (e != cudaSuccess) return e;
    }
    if (st->gather_bulk)
        return fkv::enqueue(gather_bulk_kernel, gather_blocks, fkv::kWarp,
                            bulk_smem(b->n * g->kv_heads), stream, *st, *b, g->kv_heads,
                            g->select_pages, g->unit_bytes);
    const size_t smem = 4u * ((size_t)b->n * g->kv_heads + 1);
    return fkv::enqueue(gather_kernel, gather_blocks, kGatherThreads, smem, stream, *st, *b,
                        g->kv_heads, g->select_pages, g->unit_bytes);
}
