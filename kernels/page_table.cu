// Writes entries of the device page table (fkv_dev_state.block_ptr). The
// values travel as kernel arguments, copied at the launch, so the host keeps
// no buffer that a copy still in flight could read after the host has moved
// on (a reused sequence slot rewrites its entries while the previous
// sequence's work may still be queued).
#include "common.cuh"

namespace {

__global__ void page_table_kernel(uint64_t *dst, const fkv_dev_page_entries e)
{
    if ((int32_t)threadIdx.x < e.n) dst[threadIdx.x] = e.addr[threadIdx.x];
}

} // namespace

extern "C" cudaError_t fkv_launch_page_table(const fkv_dev_state *st, uint64_t first,
                                             const fkv_dev_page_entries *e,
                                             cudaStream_t stream)
{
    if (!st || !e || e->n < 0 || e->n > FKV_DEV_PAGE_ENTRIES) return cudaErrorInvalidValue;
    if (e->n == 0) return cudaSuccess;
    // The table is const to the other kernels; this one owns its writes.
    uint64_t *dst = const_cast<uint64_t *>(st->block_ptr) + first;
    page_table_kernel<<<1, FKV_DEV_PAGE_ENTRIES, 0, stream>>>(dst, *e);
    return cudaGetLastError();
}
