/*
 * gemm_model.c: the GEMM stand-ins of bench/gemm_model.h.
 *
 * SPDX-License-Identifier: MIT
 */
#define BENCH_WITH_CUBLAS
#include "bench.h"
#include "gemm_model.h"

#ifdef FKV_WITH_CUDA

const int bench_gemm_shape[4][2] = {
    {4096, 6144}, {4096, 4096}, {4096, 28672}, {14336, 4096}};

void bench_gemm_create(bench_gemm_model *m, int layers, int max_batch,
                       cudaStream_t s)
{
    memset(m, 0, sizeof *m);
    m->layers = layers;
    m->max_batch = max_batch;
    m->s = s;
    uint64_t off = 0;
    for (int j = 0; j < 4; j++) {
        m->off[j] = off;
        off += (uint64_t)bench_gemm_shape[j][0] * bench_gemm_shape[j][1] * 2;
    }
    m->layer_bytes = (off + 255) / 256 * 256;
    const uint64_t total = m->layer_bytes * (uint64_t)layers;
    BENCH_CUDA_CHECK(cudaMalloc((void **)&m->w, total));
    /* A 16 MiB random chunk (|v| in [2^-6, 2^-5)), replicated. */
    const size_t chunk = (size_t)16 << 20;
    uint16_t *hw = bench_xmalloc(chunk);
    bench_rng seed = bench_rng_seed(0x6E33ull);
    for (size_t i = 0; i < chunk / 2; i++) {
        const uint64_t r = bench_rng_next(&seed);
        hw[i] = (uint16_t)(((r & 1) << 15) |
                           (0x3C80u + (uint16_t)((r >> 1) & 0x7F)));
    }
    BENCH_CUDA_CHECK(cudaMemcpy(m->w, hw, chunk < total ? chunk : total,
                                cudaMemcpyHostToDevice));
    for (uint64_t at = chunk; at < total; at += chunk) {
        const uint64_t n = total - at < chunk ? total - at : chunk;
        BENCH_CUDA_CHECK(
            cudaMemcpy(m->w + at, m->w, n, cudaMemcpyDeviceToDevice));
    }
    const size_t xbytes = (size_t)max_batch * 28672 * 2;
    BENCH_CUDA_CHECK(cudaMalloc(&m->x, xbytes));
    BENCH_CUDA_CHECK(cudaMalloc(&m->y, xbytes));
    BENCH_CUDA_CHECK(cudaMemcpy(m->x, hw, xbytes < chunk ? xbytes : chunk,
                                cudaMemcpyHostToDevice));
    BENCH_CUDA_CHECK(cudaMemset(m->y, 0, xbytes));
    free(hw);
    BENCH_CUBLAS_CHECK(cublasCreate(&m->h));
    BENCH_CUBLAS_CHECK(cublasSetStream(m->h, s));
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

void bench_gemm_destroy(bench_gemm_model *m)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUBLAS_CHECK(cublasDestroy(m->h));
    BENCH_CUDA_CHECK(cudaFree(m->w));
    BENCH_CUDA_CHECK(cudaFree(m->x));
    BENCH_CUDA_CHECK(cudaFree(m->y));
    memset(m, 0, sizeof *m);
}

void bench_gemm_enqueue(bench_gemm_model *m, int batch, cudaEvent_t g0,
                        cudaEvent_t g1)
{
    const float one = 1.0f, zero = 0.0f;
    BENCH_CUDA_CHECK(cudaEventRecord(g0, m->s));
    for (int l = 0; l < m->layers; l++)
        for (int j = 0; j < 4; j++) {
            const int k = bench_gemm_shape[j][0], n = bench_gemm_shape[j][1];
            const unsigned char *w = m->w + m->layer_bytes * l + m->off[j];
            BENCH_CUBLAS_CHECK(cublasGemmEx(
                m->h, CUBLAS_OP_T, CUBLAS_OP_N, n, batch, k, &one, w,
                CUDA_R_16BF, k, m->x, CUDA_R_16BF, k, &zero, m->y,
                CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
    BENCH_CUDA_CHECK(cudaEventRecord(g1, m->s));
}

#endif /* FKV_WITH_CUDA */
