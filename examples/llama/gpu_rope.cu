/* RoPE (HF rotate-half) on q and k, fused with splitting the QKV GEMM's
 * f32 output into the cache's dtype.
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

/* One thread per (token, head, j < D/2): q and k heads rotate the pair
 * (j, j + D/2); v heads copy the same two elements. */
template <typename T>
static __global__ void rope_split_kernel(const float *qkv, int n,
                                         const int32_t *pos,
                                         const float *inv_freq, int nq,
                                         int nkv, int D, T *q, T *k, T *v)
{
    const int heads = nq + 2 * nkv, half = D / 2;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * heads * half)
        return;
    int j = (int)(idx % half);
    long long th = idx / half;
    int h = (int)(th % heads);
    long long t = th / heads;
    const float *src = qkv + (t * heads + h) * D;
    float x0 = src[j], x1 = src[j + half];
    T *dst;
    if (h < nq + nkv) {
        /* As HF: the angle is the f32 product position * inv_freq, and the
         * precise sincosf (arguments reach 32K radians). */
        float c, sn;
        sincosf((float)pos[t] * inv_freq[j], &sn, &c);
        float r0 = x0 * c - x1 * sn, r1 = x1 * c + x0 * sn;
        x0 = r0;
        x1 = r1;
        dst = h < nq ? q + (t * nq + h) * D : k + (t * nkv + (h - nq)) * D;
    } else {
        dst = v + (t * nkv + (h - nq - nkv)) * D;
    }
    dst[j] = gpu_from_f32<T>(x0);
    dst[j + half] = gpu_from_f32<T>(x1);
}

template <typename T>
static void rope_split(const float *qkv, int n, const int32_t *pos,
                       const float *inv_freq, int nq, int nkv, int D, void *q,
                       void *k, void *v, cudaStream_t s)
{
    long long threads = (long long)n * (nq + 2 * nkv) * (D / 2);
    rope_split_kernel<T><<<gpu_blocks(threads, 256), 256, 0, s>>>(
        qkv, n, pos, inv_freq, nq, nkv, D, (T *)q, (T *)k, (T *)v);
    GPU_CHECK_LAUNCH();
}

void gpu_rope_split(const float *qkv, int n, const int32_t *pos,
                    const float *inv_freq, int nq, int nkv, int D, int dtype,
                    void *q, void *k, void *v, cudaStream_t s)
{
    if (n <= 0)
        return;
    if (dtype == GPU_F32)
        rope_split<float>(qkv, n, pos, inv_freq, nq, nkv, D, q, k, v, s);
    else if (dtype == GPU_F16)
        rope_split<__half>(qkv, n, pos, inv_freq, nq, nkv, D, q, k, v, s);
    else
        rope_split<__nv_bfloat16>(qkv, n, pos, inv_freq, nq, nkv, D, q, k, v,
                                  s);
}
