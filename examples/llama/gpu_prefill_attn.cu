/*
 * Causal prefill attention (GQA) of one sequence's prompt: a simple, correct
 * tiled kernel with an online softmax and f32 accumulation; no tensor cores.
 *
 * Work unit: a (position, query head) "pair". The pairs of KV head g are
 * numbered P = pos * G + (h - g * G), G = nq / nkv, so that consecutive
 * pairs share keys. A block of ATT_WARPS warps takes ATT_PAIRS consecutive
 * pairs of one KV head (ATT_QW per warp) and walks the keys 0..its last
 * position in tiles of 32 held in shared memory as f32: lane j scores key j
 * of the tile against a pair's (pre-scaled) query, the warp reduces the tile
 * max and sum, and each lane accumulates D/32 output dims, so that a K/V
 * tile is read from global memory once per ATT_PAIRS pairs.
 *
 * SPDX-License-Identifier: MIT
 */
#include "gpu_kernels.cuh"
#include <math.h>

#define ATT_WARPS 8
#define ATT_QW 4
#define ATT_PAIRS (ATT_WARPS * ATT_QW)
#define ATT_TILE 32
/* Queries per launch: bounds one kernel's run time for 32K prompts. */
#define ATT_CHUNK_POS 4096

static size_t att_smem_bytes(int D)
{
    /* q [ATT_PAIRS][D], K [ATT_TILE][D + 1] (padded: lane j reads row j, so
     * the rows must fall in distinct banks), V [ATT_TILE][D]. */
    return sizeof(float) *
           ((size_t)ATT_PAIRS * D + (size_t)ATT_TILE * (D + 1) +
            (size_t)ATT_TILE * D);
}

template <typename T, int D>
static __global__ void __launch_bounds__(ATT_WARPS * 32)
prefill_attn_kernel(const T *q, const T *k, const T *v, int nq, int nkv,
                    float scale, long long pair0, long long pair_end,
                    __nv_bfloat16 *out)
{
    extern __shared__ float att_smem[];
    float *qs = att_smem;                       /* [ATT_PAIRS][D] */
    float *ks = qs + ATT_PAIRS * D;             /* [ATT_TILE][D + 1] */
    float *vs = ks + ATT_TILE * (D + 1);        /* [ATT_TILE][D] */
    const int G = nq / nkv, g = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long pb = pair0 + (long long)blockIdx.x * ATT_PAIRS;
    if (pb >= pair_end)
        return; /* whole block: no barrier is skipped by part of it */
    const long long plast =
        (pb + ATT_PAIRS - 1 < pair_end ? pb + ATT_PAIRS - 1 : pair_end - 1);
    const int kmax = (int)(plast / G); /* last key any pair here needs */

    for (int i = threadIdx.x; i < ATT_PAIRS * D; i += blockDim.x) {
        int p = i / D, d = i % D;
        long long P = pb + p;
        float val = 0.0f;
        if (P < pair_end) {
            long long pos = P / G;
            int h = g * G + (int)(P % G);
            val = gpu_to_f32(q[(pos * nq + h) * D + d]) * scale;
        }
        qs[i] = val;
    }

    int mypos[ATT_QW];
    float m[ATT_QW], l[ATT_QW], acc[ATT_QW][D / 32];
#pragma unroll
    for (int a = 0; a < ATT_QW; a++) {
        long long P = pb + warp * ATT_QW + a;
        mypos[a] = P < pair_end ? (int)(P / G) : -1; /* -1: no pair */
        m[a] = -INFINITY;
        l[a] = 0.0f;
#pragma unroll
        for (int i = 0; i < D / 32; i++)
            acc[a][i] = 0.0f;
    }

    for (int kt = 0; kt <= kmax; kt += ATT_TILE) {
        __syncthreads(); /* qs written / the previous tile consumed */
        for (int i = threadIdx.x; i < ATT_TILE * D; i += blockDim.x) {
            int j = i / D, d = i % D, key = kt + j;
            float kv = 0.0f, vv = 0.0f;
            if (key <= kmax) {
                long long off = ((long long)key * nkv + g) * D + d;
                kv = gpu_to_f32(k[off]);
                vv = gpu_to_f32(v[off]);
            }
            ks[j * (D + 1) + d] = kv;
            vs[j * D + d] = vv;
        }
        __syncthreads();

#pragma unroll
        for (int a = 0; a < ATT_QW; a++) {
            const int pos = mypos[a]; /* warp-uniform */
            if (pos < kt)
                continue; /* no pair, or every key of the tile is future */
            const float *qrow = qs + (warp * ATT_QW + a) * D;
            const int key = kt + lane;
            float sc = -INFINITY;
            if (key <= pos) {
                const float *krow = ks + lane * (D + 1);
                float dot = 0.0f;
#pragma unroll 16
                for (int d = 0; d < D; d++)
                    dot += qrow[d] * krow[d];
                sc = dot;
            }
            /* key kt <= pos, so lane 0's score is finite: mt is too. */
            const float mt = gpu_warp_max(sc);
            const float mn = fmaxf(m[a], mt);
            const float corr = expf(m[a] - mn); /* 0 on the first tile */
            const float p = key <= pos ? expf(sc - mn) : 0.0f;
            l[a] = l[a] * corr + gpu_warp_sum(p);
#pragma unroll
            for (int i = 0; i < D / 32; i++)
                acc[a][i] *= corr;
            const int jn = pos - kt + 1 < ATT_TILE ? pos - kt + 1 : ATT_TILE;
            for (int j = 0; j < jn; j++) { /* jn is warp-uniform */
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < D / 32; i++)
                    acc[a][i] += pj * vs[j * D + lane + 32 * i];
            }
            m[a] = mn;
        }
    }

#pragma unroll
    for (int a = 0; a < ATT_QW; a++) {
        if (mypos[a] < 0)
            continue;
        long long P = pb + warp * ATT_QW + a;
        int h = g * G + (int)(P % G);
        __nv_bfloat16 *o = out + ((long long)mypos[a] * nq + h) * D;
        const float inv = 1.0f / l[a]; /* l >= 1: the max term is exp(0) */
#pragma unroll
        for (int i = 0; i < D / 32; i++)
            o[lane + 32 * i] = __float2bfloat16_rn(acc[a][i] * inv);
    }
}

template <typename T, int D>
static void prefill_attn(const void *q, const void *k, const void *v, int n,
                         int nq, int nkv, float scale, __nv_bfloat16 *out,
                         cudaStream_t s)
{
    const size_t smem = att_smem_bytes(D);
    /* Above 48 KiB dynamic shared memory must be opted into, once per
     * instantiation (sm_80 allows 163 KiB, sm_90 227 KiB). */
    static bool attr_set = false;
    if (!attr_set) {
        GPU_CHECK(cudaFuncSetAttribute(prefill_attn_kernel<T, D>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
        attr_set = true;
    }
    const int G = nq / nkv;
    for (int p0 = 0; p0 < n; p0 += ATT_CHUNK_POS) {
        int p1 = p0 + ATT_CHUNK_POS < n ? p0 + ATT_CHUNK_POS : n;
        long long pair0 = (long long)p0 * G, pair_end = (long long)p1 * G;
        dim3 grid(gpu_blocks(pair_end - pair0, ATT_PAIRS), nkv);
        prefill_attn_kernel<T, D><<<grid, ATT_WARPS * 32, smem, s>>>(
            (const T *)q, (const T *)k, (const T *)v, nq, nkv, scale, pair0,
            pair_end, out);
        GPU_CHECK_LAUNCH();
    }
}

template <typename T>
static void prefill_attn_d(const void *q, const void *k, const void *v, int n,
                           int nq, int nkv, int D, float scale,
                           __nv_bfloat16 *out, cudaStream_t s)
{
    if (D == 64)
        prefill_attn<T, 64>(q, k, v, n, nq, nkv, scale, out, s);
    else if (D == 128)
        prefill_attn<T, 128>(q, k, v, n, nq, nkv, scale, out, s);
    else if (D == 256)
        prefill_attn<T, 256>(q, k, v, n, nq, nkv, scale, out, s);
    else {
        fprintf(stderr, "llama: CUDA prefill attention supports head_dim "
                        "64, 128 or 256, not %d\n", D);
        exit(1);
    }
}

void gpu_prefill_attention(int dtype, const void *q, const void *k,
                           const void *v, int n, int nq, int nkv, int D,
                           float scale, __nv_bfloat16 *out, cudaStream_t s)
{
    if (n <= 0)
        return;
    if (dtype == GPU_F32)
        prefill_attn_d<float>(q, k, v, n, nq, nkv, D, scale, out, s);
    else if (dtype == GPU_F16)
        prefill_attn_d<__half>(q, k, v, n, nq, nkv, D, scale, out, s);
    else
        prefill_attn_d<__nv_bfloat16>(q, k, v, n, nq, nkv, D, scale, out, s);
}
