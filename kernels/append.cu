// Append: writes each sequence's new tokens (K and V after RoPE) at the end
// of its (sequence, layer), to
//  - the host pool block of the page (mapped pinned memory, written over
//    PCIe as the token arrives: offload needs no separate D2H pass), for the
//    policies that recall from the host (FREEKV, SYNC);
//  - the device copy: the store (RESIDENT, DENSE), or the sink / window ring;
// summarises every page it completes (per-channel max and min of the keys),
// and advances the lengths.
//
// Grid (page chunk, KV head, sequence): each block owns one page of one KV
// head, so a page's summary is computed by the block that completes it.
// Positions come from len on the device, so a captured launch replays right.
#include "common.cuh"

namespace {

template <typename T>
__global__ void append_kernel(fkv_dev_geometry g, fkv_dev_state st, fkv_dev_batch b,
                              int32_t layer, const T *k, const T *v, fkv_dev_strides s)
{
    const int32_t i = blockIdx.z, h = blockIdx.y, j = blockIdx.x;
    const int32_t slot = b.slot[i], n = b.tokens[i];
    const int32_t P = g.page, D = g.head_dim;
    int32_t *len = st.len + (uint64_t)slot * g.layers + layer;
    const int32_t base = *len; // read before the last block moves it
    const bool fits = (int64_t)base + n <= g.max_tokens;
    const int32_t first_page = base / P, last_page = (base + n - 1) / P;
    const int32_t page = first_page + j;

    if (!fits && j == 0 && h == 0 && threadIdx.x == 0)
        atomicOr(st.error, FKV_DEV_ERR_CAPACITY);

    // The last block to read its base moves the lengths, before any block
    // writes a row: nothing in this launch reads a length after its base,
    // and later launches see the rows and the lengths together at its end.
    // The fence therefore orders only loads here; after the rows it would
    // also wait for every row written to the host over PCIe.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
        last = atomicAdd(&st.append_done[layer], 1u) == blocks - 1;
    }
    __syncthreads();
    if (last) {
        // A sequence whose tokens cannot all land (past the capacity, or a
        // page with no pool block: a replay beyond fkv_seq_reserve) keeps
        // its length; the error bit tells fkv_sync.
        for (int32_t e = threadIdx.x; e < b.n; e += blockDim.x) {
            int32_t *l = st.len + (uint64_t)b.slot[e] * g.layers + layer;
            const int32_t from = *l, count = b.tokens[e];
            bool landed = (int64_t)from + count <= g.max_tokens;
            if (landed && !g.store) {
                const uint64_t *blocks =
                    st.block_ptr + ((uint64_t)b.slot[e] * g.layers + layer) * g.max_pages;
                for (int32_t p = from / P; landed && p <= (from + count - 1) / P; p++)
                    landed = blocks[p] != 0;
            }
            if (landed)
                *l = from + count;
        }
        if (threadIdx.x == 0)
            st.append_done[layer] = 0;
    }

    if (fits && page <= last_page) {
        fkv::layer_view lv(g, st, slot, layer);
        const int32_t t0 = max(base, page * P), t1 = min(base + n, (page + 1) * P);
        const uint64_t row_bytes = (uint64_t)D * sizeof(T);

        unsigned char *host = nullptr;
        if (!g.store) {
            uint64_t block = st.block_ptr[((uint64_t)slot * g.layers + layer) * g.max_pages + page];
            if (block)
                host = reinterpret_cast<unsigned char *>(block) + (uint64_t)h * g.unit_bytes;
            else if (threadIdx.x == 0)
                atomicOr(st.error, FKV_DEV_ERR_CAPACITY); // page not reserved
        }
        // In a long append a ring slot is written by several pages; only the
        // last ring_pages pages survive, so only they are written.
        const bool on_device = g.store || page < g.sink_pages || page > last_page - g.ring_pages;
        unsigned char *dev = on_device ? lv.resident_unit(h, page) : nullptr;

        // Copy rows [t0, t1) of K and V, 16 bytes per thread access when
        // every source row is 16-byte aligned (always for packed rows),
        // else one element per access (fkv_append_strided's odd strides).
        const uint32_t rows = (uint32_t)(t1 - t0);
        if (s.vec16) {
            const uint32_t vecs_per_row = (uint32_t)(row_bytes / 16);
            const uint32_t total = 2 * rows * vecs_per_row;
            for (uint32_t e = threadIdx.x; e < total; e += blockDim.x) {
                const uint32_t kv = e / (rows * vecs_per_row); // 0: K, 1: V
                const uint32_t rem = e % (rows * vecs_per_row);
                const uint32_t r = rem / vecs_per_row, c = rem % vecs_per_row;
                const int32_t t = t0 + (int32_t)r;
                const int64_t src_row = b.offset[i] + (t - base);
                const T *src = kv ? v + src_row * s.v_token + h * s.v_head
                                  : k + src_row * s.k_token + h * s.k_head;
                const uint4 val = reinterpret_cast<const uint4 *>(src)[c];
                const uint64_t dst_off = ((uint64_t)kv * P + (t - page * P)) * row_bytes + (uint64_t)c * 16;
                if (dev)
                    *reinterpret_cast<uint4 *>(dev + dst_off) = val;
                if (host)
                    *reinterpret_cast<uint4 *>(host + dst_off) = val;
            }
        } else {
            const uint32_t total = 2 * rows * (uint32_t)D;
            for (uint32_t e = threadIdx.x; e < total; e += blockDim.x) {
                const uint32_t kv = e / (rows * (uint32_t)D);
                const uint32_t rem = e % (rows * (uint32_t)D);
                const uint32_t r = rem / (uint32_t)D, c = rem % (uint32_t)D;
                const int32_t t = t0 + (int32_t)r;
                const int64_t src_row = b.offset[i] + (t - base);
                const T val = kv ? v[src_row * s.v_token + h * s.v_head + c]
                                 : k[src_row * s.k_token + h * s.k_head + c];
                const uint64_t dst_off = ((uint64_t)kv * P + (t - page * P)) * row_bytes + (uint64_t)c * sizeof(T);
                if (dev)
                    *reinterpret_cast<T *>(dev + dst_off) = val;
                if (host)
                    *reinterpret_cast<T *>(host + dst_off) = val;
            }
        }

        // Summary of a completed page. Rows from this append come from k
        // (device memory); older rows of the page from its device copy when
        // that survives this append, else from the host block.
        if (g.policy != FKV_POLICY_DENSE && t1 == (page + 1) * P) {
            const unsigned char *old = dev ? dev : host;
            T *mx = lv.summary_max<T>(h, page), *mn = lv.summary_min<T>(h, page);
            for (int32_t d = threadIdx.x; d < D; d += blockDim.x) {
                float hi = -INFINITY, lo = INFINITY;
                for (int32_t r = 0; r < P; r++) {
                    const int32_t t = page * P + r;
                    float x;
                    if (t >= base)
                        x = fkv::to_f(k[(b.offset[i] + (t - base)) * s.k_token + h * s.k_head + d]);
                    else if (old)
                        x = fkv::to_f(reinterpret_cast<const T *>(old + r * row_bytes)[d]);
                    else
                        x = 0.0f; // page not reserved: already reported
                    hi = fmaxf(hi, x);
                    lo = fminf(lo, x);
                }
                mx[d] = fkv::from_f<T>(hi); // exact: hi is a T value
                mn[d] = fkv::from_f<T>(lo);
            }
        }
    }
}

} // namespace

extern "C" cudaError_t fkv_launch_append(const fkv_dev_geometry *g,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         const void *k, const void *v,
                                         cudaStream_t stream)
{
    const int64_t row = (int64_t)g->kv_heads * g->head_dim;
    return fkv_launch_append_strided(g, st, b, layer, k, row, g->head_dim, v,
                                     row, g->head_dim, stream);
}

extern "C" cudaError_t fkv_launch_append_strided(
    const fkv_dev_geometry *g, const fkv_dev_state *st, const fkv_dev_batch *b,
    int32_t layer, const void *k, int64_t k_token, int64_t k_head,
    const void *v, int64_t v_token, int64_t v_head, cudaStream_t stream)
{
    fkv_dev_strides s;
    s.k_token = k_token;
    s.k_head = k_head;
    s.v_token = v_token;
    s.v_head = v_head;
    if (b->n == 0)
        return cudaSuccess;
    // n tokens touch at most ceil((n + P - 1) / P) pages.
    const int32_t chunks = (b->max_tokens + g->page - 2) / g->page + 1;
    const dim3 grid(chunks, g->kv_heads, b->n);
    return fkv::dispatch_dtype(g->dtype, [&](auto tag) {
        using T = decltype(tag);
        // 16-byte accesses need every row start (and the row length)
        // aligned to 16 bytes.
        const uint64_t eb = sizeof(T);
        const uint64_t bits = (uint64_t)(uintptr_t)k | (uint64_t)(uintptr_t)v |
                              (uint64_t)k_token * eb | (uint64_t)k_head * eb |
                              (uint64_t)v_token * eb | (uint64_t)v_head * eb |
                              (uint64_t)g->head_dim * eb;
        s.vec16 = (bits & 15u) == 0;
        append_kernel<T><<<grid, 128, 0, stream>>>(*g, *st, *b, layer,
                                                   static_cast<const T *>(k),
                                                   static_cast<const T *>(v), s);
        return cudaGetLastError();
    });
}
