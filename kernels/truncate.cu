// Truncate (fkv_seq_truncate) of one (sequence, layer) to `length` tokens:
// resets the layer's metadata as at open (empty recall slots, no selection:
// docs/design.md section 9), sets the device length, and, for the policies
// that keep a window ring (FREEKV, SYNC), reloads the ring from the host
// pool, which holds every page: the window moves back over pages the ring
// has overwritten since. The store (RESIDENT, DENSE) and the sink are never
// overwritten by later pages. Summaries of sealed pages stay; the new
// partial page's is recomputed by the append that seals it again.
//
// Grid (ring_pages, kv_heads): block (j, h) reloads unit h of the j-th page
// counted back from the last page that holds tokens.
#include "common.cuh"

namespace {

__global__ void truncate_kernel(fkv_dev_geometry g, fkv_dev_state st, int32_t slot,
                                int32_t layer, int32_t length)
{
    const fkv::layer_view lv(g, st, slot, layer);
    if (blockIdx.x == 0 && blockIdx.y == 0) {
        uint32_t *words = reinterpret_cast<uint32_t *>(lv.base);
        const uint64_t n = g.meta_bytes / 4;
        const uint64_t neg_first = g.neg_begin / 4, neg_end = (g.neg_begin + g.neg_bytes) / 4;
        for (uint64_t w = threadIdx.x; w < n; w += blockDim.x)
            words[w] = (w >= neg_first && w < neg_end) ? 0xffffffffu : 0u;
        if (threadIdx.x == 0)
            st.len[(uint64_t)slot * g.layers + layer] = length;
    }
    if (g.store || length <= 0)
        return;
    const int32_t last = (length - 1) / g.page; // last page holding tokens
    const int32_t page = last - (int32_t)blockIdx.x;
    const int32_t h = blockIdx.y;
    if (page < g.sink_pages)
        return; // sink pages are never overwritten
    const uint64_t block =
        st.block_ptr[((uint64_t)slot * g.layers + layer) * g.max_pages + page];
    if (!block) {
        if (threadIdx.x == 0)
            atomicOr(st.error, FKV_DEV_ERR_INTERNAL); // a page below length unmapped
        return;
    }
    fkv::copy16(lv.resident_unit(h, page),
                reinterpret_cast<const unsigned char *>(block) + (uint64_t)h * g.unit_bytes,
                g.unit_bytes, threadIdx.x, blockDim.x);
}

} // namespace

extern "C" cudaError_t fkv_launch_truncate(const fkv_dev_geometry *g,
                                           const fkv_dev_state *st, int32_t slot,
                                           int32_t layer, int32_t length,
                                           cudaStream_t stream)
{
    const dim3 grid(g->ring_pages > 0 ? g->ring_pages : 1, g->kv_heads);
    truncate_kernel<<<grid, 256, 0, stream>>>(*g, *st, slot, layer, length);
    return cudaGetLastError();
}
