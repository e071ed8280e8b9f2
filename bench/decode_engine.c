/*
 * bench/decode's engine: the backend, its stream, cuBLAS and the model's
 * weights and activations, whose GEMMs stand in for the model's work.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

/* ------------------------------------------------------------------------ */
/* The engine: backend, stream, cuBLAS, weights, activations                */
/* ------------------------------------------------------------------------ */

#ifdef FKV_WITH_CUDA
void gemm_bf16(engine *e, int m, int n, int k, const void *w,
               const void *x, int ldx, void *y)
{
    const float one = 1.0f, zero = 0.0f;
    BENCH_CUBLAS_CHECK(cublasGemmEx(e->blas, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k,
                                    &one, w, CUDA_R_16BF, m, x, CUDA_R_16BF,
                                    ldx, &zero, y, CUDA_R_16BF, m,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* Fills n bf16 elements at dev with uniform values in [-amp, amp): a host
 * block copied once, then doubled by device-to-device copies. */
static void fill_random_bf16(void *dev, size_t n, float amp, uint64_t seed)
{
    size_t block = n < ((size_t)8 << 20) ? n : ((size_t)8 << 20);
    uint16_t *h = bench_xmalloc(block * sizeof *h);
    bench_rng r = bench_rng_seed(seed);
    for (size_t i = 0; i < block; i++)
        h[i] = bench_f32_to_bf16(
            (float)((2.0 * bench_rng_uniform(&r) - 1.0) * amp));
    BENCH_CUDA_CHECK(cudaMemcpy(dev, h, block * 2, cudaMemcpyHostToDevice));
    free(h);
    size_t done = block;
    while (done < n) {
        size_t c = done < n - done ? done : n - done;
        BENCH_CUDA_CHECK(cudaMemcpy((char *)dev + done * 2, dev, c * 2,
                                    cudaMemcpyDeviceToDevice));
        done += c;
    }
    /* The copies ran on the legacy stream, which the engine's
     * (non-blocking) stream does not wait for. */
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

void h2d(engine *e, void *dst, const void *src, size_t bytes)
{
    BENCH_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, e->stream));
    BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
}

/* Median bandwidth of `reps` copies of `bytes` (GB/s), counting `factor`
 * times the bytes (2 for a device-to-device copy: read + write). */
static double copy_bandwidth(engine *e, void *dst, const void *src,
                             size_t bytes, enum cudaMemcpyKind kind,
                             double factor)
{
    enum { REPS = 7 };
    double ms[REPS];
    bench_timer t;
    bench_timer_init(&t, 1, e->stream);
    for (int i = -2; i < REPS; i++) {
        bench_timer_start(&t);
        BENCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, e->stream));
        bench_timer_stop(&t);
        double v = bench_timer_elapsed_ms(&t);
        if (i >= 0)
            ms[i] = v;
    }
    bench_timer_free(&t);
    return factor * (double)bytes / (bench_median(ms, REPS) * 1e-3) / 1e9;
}

void engine_cuda_init(engine *e, const args *a)
{
    bench_device dev;
    bench_device_open(a->device, &dev);
    snprintf(e->device_name, sizeof e->device_name, "%s", dev.name);
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    BENCH_CUBLAS_CHECK(cublasCreate(&e->blas));
    BENCH_CUBLAS_CHECK(cublasSetStream(e->blas, e->stream));
    if (a->graph) {
        /* A workspace of our own, so that no capture makes cuBLAS allocate
         * one (as examples/llama does; set after the stream, which resets
         * it). */
        const size_t ws = (size_t)32 << 20;
        BENCH_CUDA_CHECK(cudaMalloc(&e->blas_ws, ws));
        BENCH_CUBLAS_CHECK(cublasSetWorkspace(e->blas, e->blas_ws, ws));
    }

    /* Bandwidths: one 256 MiB pinned host-to-device copy, one 1 GiB
     * device-to-device copy. */
    {
        size_t bytes = (size_t)256 << 20;
        void *host = NULL, *dev = NULL;
        BENCH_CUDA_CHECK(cudaMallocHost(&host, bytes));
        memset(host, 1, bytes);
        BENCH_CUDA_CHECK(cudaMalloc(&dev, bytes));
        e->pcie_gbs = copy_bandwidth(e, dev, host, bytes,
                                     cudaMemcpyHostToDevice, 1.0);
        BENCH_CUDA_CHECK(cudaFree(dev));
        BENCH_CUDA_CHECK(cudaFreeHost(host));
    }
    {
        size_t bytes = (size_t)1 << 30;
        void *src = NULL, *dst = NULL;
        BENCH_CUDA_CHECK(cudaMalloc(&src, bytes));
        BENCH_CUDA_CHECK(cudaMalloc(&dst, bytes));
        BENCH_CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, e->stream));
        e->dev_gbs = copy_bandwidth(e, dst, src, bytes,
                                    cudaMemcpyDeviceToDevice, 2.0);
        BENCH_CUDA_CHECK(cudaFree(src));
        BENCH_CUDA_CHECK(cudaFree(dst));
    }

    /* Activations, and the attention output the O GEMM reads. */
    const size_t B = (size_t)e->max_batch, hid = (size_t)a->hidden;
    const size_t inter = (size_t)a->intermediate;
    e->n_qkv = (size_t)(a->q_heads + 2 * a->kv_heads) * (size_t)a->head_dim;
    BENCH_CUDA_CHECK(cudaMalloc(&e->x, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->qkv, B * e->n_qkv * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->h, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->gu, B * 2 * inter * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->out, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMemsetAsync(e->out, 0, B * hid * 2, e->stream));
    fill_random_bf16(e->x, B * hid, 1.0f, 7);

    if (e->use_gemm) {
        /* Every layer its own weights, as a real model (14 GiB for
         * Llama-3.1-8B): one layer's would sit in no cache anyway, but the
         * device memory left for the KV store is then realistic. */
        e->w_qkv = 0;
        e->w_o = e->w_qkv + hid * e->n_qkv;
        e->w_gu = e->w_o + hid * hid;
        e->w_down = e->w_gu + hid * 2 * inter;
        e->w_layer = e->w_down + inter * hid;
        e->weight_bytes = e->w_layer * (size_t)a->layers * 2;
        BENCH_CUDA_CHECK(cudaMalloc(&e->weights, e->weight_bytes));
        fill_random_bf16(e->weights, e->w_layer * (size_t)a->layers,
                         (float)(1.0 / sqrt((double)hid)), 11);
    }
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

void engine_cuda_free(engine *e)
{
    BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
    BENCH_CUDA_CHECK(cudaFree(e->weights));
    BENCH_CUDA_CHECK(cudaFree(e->x));
    BENCH_CUDA_CHECK(cudaFree(e->qkv));
    BENCH_CUDA_CHECK(cudaFree(e->h));
    BENCH_CUDA_CHECK(cudaFree(e->gu));
    BENCH_CUDA_CHECK(cudaFree(e->out));
    BENCH_CUBLAS_CHECK(cublasDestroy(e->blas));
    if (e->blas_ws)
        BENCH_CUDA_CHECK(cudaFree(e->blas_ws));
    BENCH_CUDA_CHECK(cudaStreamDestroy(e->stream));
}
#endif /* FKV_WITH_CUDA */

const char *backend_name(fkv_backend b)
{
    return b == FKV_BACKEND_CUDA ? "CUDA" : b == FKV_BACKEND_CPU ? "CPU"
                                                                : "AUTO";
}

void resolve_backend(const args *a, engine *e)
{
    fkv_options o;
    fkv_cache *c = NULL;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = a->backend;
    o.device = a->device;
    o.num_layers = 1;
    o.num_q_heads = 1;
    o.num_kv_heads = 1;
    o.head_dim = 64;
    o.max_sequences = 1;
    o.max_tokens_per_sequence = 64;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.budget_tokens = 32;
    o.dtype = FKV_DTYPE_BF16;
    BENCH_FKV_CHECK(NULL, fkv_create(&o, &c));
    fkv_options got;
    BENCH_FKV_CHECK(c, fkv_options_init(&got, sizeof got));
    BENCH_FKV_CHECK(c, fkv_get_options(c, &got));
    e->backend = got.backend;
    fkv_destroy(c);
    if (e->backend == FKV_BACKEND_CPU && a->backend == FKV_BACKEND_AUTO) {
        /* Why not CUDA: ask for it and keep the library's message. */
        o.backend = FKV_BACKEND_CUDA;
        c = NULL;
        if (fkv_create(&o, &c) == FKV_OK) {
            fkv_destroy(c);
            snprintf(e->why_cpu, sizeof e->why_cpu, "AUTO chose the CPU");
        } else {
            char msg[200];
            fkv_last_error(NULL, msg, sizeof msg);
            snprintf(e->why_cpu, sizeof e->why_cpu, "%s", msg);
        }
    } else if (e->backend == FKV_BACKEND_CPU) {
        snprintf(e->why_cpu, sizeof e->why_cpu, "--backend cpu");
    }
#ifndef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        bench_die("libfreekv chose CUDA but this program was built without "
                  "it (build both with the same CUDA=)");
#endif
}

