// FREEKV's fkv_select with a query runs its selection on the library's side
// stream; the engine may overwrite q and append the next token meanwhile.
// This kernel, on the engine's stream, keeps what the selection must see:
// the query (as float, in pending_q) and the length at the time of the call,
// unless they are those the attend selected with (select at attend). With
// q NULL fkv_select launches nothing (lib/cuda_layer_calls.c).
#include "common.cuh"

namespace {

template <typename T>
__global__ void snapshot_kernel(fkv_dev_geometry g, fkv_dev_state st, fkv_dev_batch b,
                                int32_t layer, const T *q)
{
    const int32_t i = blockIdx.x, slot = b.slot[i];
    fkv::layer_view lv(g, st, slot, layer);
    float *dst = lv.at<float>(g.off_pending_q);
    const uint64_t n = (uint64_t)g.q_heads * g.head_dim;
    const T *src = q + (uint64_t)i * n;
    const int32_t len = fkv::seq_len(g, st, slot, layer);
    // Select at attend: fkv_attend left its query in pending_q and its
    // length in snap_len. The same query (bitwise as float) at the same
    // length keeps its selection; every thread compares before any writes
    // (the barrier of __syncthreads_or).
    int32_t *attend = lv.at<int32_t>(g.off_pending_attend);
    bool differ = *attend == 0 || *lv.at<int32_t>(g.off_snap_len) != len;
    for (uint64_t e = threadIdx.x; !differ && e < n; e += blockDim.x)
        differ = __float_as_uint(fkv::to_f(src[e])) != __float_as_uint(dst[e]);
    if (!__syncthreads_or(differ))
        return;
    if (threadIdx.x == 0)
        *attend = 0;
    for (uint64_t e = threadIdx.x; e < n; e += blockDim.x)
        dst[e] = fkv::to_f(src[e]);
    if (threadIdx.x == 0)
        *lv.at<int32_t>(g.off_snap_len) = len;
}

} // namespace

extern "C" cudaError_t fkv_launch_snapshot(const fkv_dev_geometry *g,
                                           const fkv_dev_state *st,
                                           const fkv_dev_batch *b, int32_t layer,
                                           const void *q, cudaStream_t stream)
{
    if (b->n == 0)
        return cudaSuccess;
    return fkv::dispatch_dtype(g->dtype, [&](auto tag) {
        using T = decltype(tag);
        snapshot_kernel<T><<<b->n, 256, 0, stream>>>(*g, *st, *b, layer,
                                                     static_cast<const T *>(q));
        return cudaGetLastError();
    });
}
