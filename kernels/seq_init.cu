// Initialises the metadata of one layer of a freshly opened sequence slot
// (the host launches it per layer, each with the layer's geometry): zeroes
// the metadata, sets its "-1" arrays (empty slots, no selection yet, no
// correction pending) and zeroes the layer's length. Units are left as they
// are: nothing reads a unit before an append or a recall has written it.
#include "common.cuh"

namespace {

__global__ void seq_init_kernel(fkv_dev_geometry g, fkv_dev_state st, int32_t slot,
                                int32_t layer)
{
    uint32_t *words = reinterpret_cast<uint32_t *>(st.seq_base[slot] + g.region_off);
    const uint64_t n = g.meta_bytes / 4;
    const uint64_t neg_first = g.neg_begin / 4, neg_end = (g.neg_begin + g.neg_bytes) / 4;
    for (uint64_t w = threadIdx.x; w < n; w += blockDim.x)
        words[w] = (w >= neg_first && w < neg_end) ? 0xffffffffu : 0u;
    if (threadIdx.x == 0)
        st.len[(uint64_t)slot * g.layers + layer] = 0;
}

} // namespace

extern "C" cudaError_t fkv_launch_seq_init(const fkv_dev_geometry *g,
                                           const fkv_dev_state *st, int32_t slot,
                                           int32_t layer, cudaStream_t stream)
{
    seq_init_kernel<<<1, 256, 0, stream>>>(*g, *st, slot, layer);
    return cudaGetLastError();
}
