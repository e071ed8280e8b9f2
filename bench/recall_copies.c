/*
 * bench/recall's (a) large copy, (b) per-unit and batched copies and (c)
 * recalls, against the large copy's bandwidth.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

#ifdef FKV_WITH_CUDA

/* ------------------------------------------------------------------------ */
/* (a), (b), (c)                                                            */
/* ------------------------------------------------------------------------ */

double bench_big_copy(const config *c, cudaStream_t s)
{
    const size_t bytes = (size_t)c->big_mib << 20;
    unsigned char *h = NULL, *d = NULL, *back = bench_xmalloc(bytes);
    BENCH_CUDA_CHECK(cudaHostAlloc((void **)&h, bytes, cudaHostAllocDefault));
    BENCH_CUDA_CHECK(cudaMalloc((void **)&d, bytes));
    bench_rng seed = {0xB16C0B1ull};
    for (size_t i = 0; i < bytes / 8; i++)
        ((uint64_t *)h)[i] = bench_rng_next(&seed);
    const int reps = c->smoke ? 3 : 20, warm = 2;
    cudaEvent_t e0, e1;
    BENCH_CUDA_CHECK(cudaEventCreate(&e0));
    BENCH_CUDA_CHECK(cudaEventCreate(&e1));
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    for (int r = -warm; r < reps; r++) {
        BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
        BENCH_CUDA_CHECK(
            cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s));
        BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
        BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
        if (r >= 0)
            ms[r] = bench_event_ms(e0, e1);
    }
    BENCH_CUDA_CHECK(cudaMemcpy(back, d, bytes, cudaMemcpyDeviceToHost));
    if (memcmp(back, h, bytes) != 0)
        bench_die("large copy: device bytes differ from the host buffer");
    const double t = bench_median(ms, (size_t)reps);
    const double gbps = (double)bytes / (t * 1e-3) / 1e9;
    row *r = add_row("h2d", "big pinned cudaMemcpyAsync", -1, -1, -1);
    r->mib = (double)bytes / (1 << 20);
    r->us = t * 1e3;
    r->gbps = gbps;
    r->pct = 100.0;
    printf("(a) one pinned cudaMemcpyAsync of %d MiB: %.1f us, %.2f GB/s "
           "(median of %d, bytes verified)\n",
           c->big_mib, t * 1e3, gbps, reps);
    BENCH_CUDA_CHECK(cudaEventDestroy(e0));
    BENCH_CUDA_CHECK(cudaEventDestroy(e1));
    BENCH_CUDA_CHECK(cudaFreeHost(h));
    BENCH_CUDA_CHECK(cudaFree(d));
    free(back);
    free(ms);
    return gbps;
}

bool bench_unit_copies(const config *c, rctx *x, cudaStream_t s,
                       double big_gbps, bool try_batch)
{
    const int reps = c->unit_reps, warm = 1;
    cudaEvent_t e0, e1;
    BENCH_CUDA_CHECK(cudaEventCreate(&e0));
    BENCH_CUDA_CHECK(cudaEventCreate(&e1));
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    const double mib = (double)(x->units * x->unit_bytes) / (1 << 20);
    int par = 0;
    for (int r = -warm; r < reps; r++, par ^= 1) {
        BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
        for (size_t u = 0; u < x->units; u++)
            BENCH_CUDA_CHECK(cudaMemcpyAsync(x->udst[u], x->usrc[par][u],
                                             x->unit_bytes,
                                             cudaMemcpyHostToDevice, s));
        BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
        BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
        if (r >= 0)
            ms[r] = bench_event_ms(e0, e1);
    }
    units_verify(x, par ^ 1, x->units, false, "per-unit cudaMemcpyAsync");
    double t = bench_median(ms, (size_t)reps);
    row *rw = add_row(g_h2d_section, "per-unit cudaMemcpyAsync", x->n, x->K,
                      -1);
    rw->mib = mib;
    rw->us = t * 1e3;
    rw->gbps = mib * (1 << 20) / (t * 1e-3) / 1e9;
    rw->pct = 100.0 * rw->gbps / big_gbps;
    printf("(b) batch %2d K %3d: %zu x cudaMemcpyAsync(%llu B): %.1f us, "
           "%.2f GB/s (%.1f%% of (a))\n",
           x->n, x->K, x->units, (unsigned long long)x->unit_bytes,
           rw->us, rw->gbps, rw->pct);

    bool batch_ok = try_batch;
    if (try_batch) {
        for (int r = -warm; r < reps && batch_ok; r++, par ^= 1) {
            BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
            cudaError_t e = batch_copy(x->udst, x->usrc[par], x->usize,
                                       x->units, s);
            if (e != cudaSuccess) {
                (void)cudaGetLastError();
                printf("(b) cudaMemcpyBatchAsync: not available here (%s); "
                       "skipped\n",
                       cudaGetErrorString(e));
                batch_ok = false;
                break;
            }
            BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
            BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
            if (r >= 0)
                ms[r] = bench_event_ms(e0, e1);
        }
        if (batch_ok) {
            units_verify(x, par ^ 1, x->units, false, "cudaMemcpyBatchAsync");
            t = bench_median(ms, (size_t)reps);
            rw = add_row(g_h2d_section, "cudaMemcpyBatchAsync (units)", x->n,
                         x->K, -1);
            rw->mib = mib;
            rw->us = t * 1e3;
            rw->gbps = mib * (1 << 20) / (t * 1e-3) / 1e9;
            rw->pct = 100.0 * rw->gbps / big_gbps;
            printf("(b) batch %2d K %3d: one cudaMemcpyBatchAsync of %zu "
                   "units: %.1f us, %.2f GB/s (%.1f%% of (a))\n",
                   x->n, x->K, x->units, rw->us, rw->gbps, rw->pct);
        }
    }
    BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
    BENCH_CUDA_CHECK(cudaEventDestroy(e0));
    BENCH_CUDA_CHECK(cudaEventDestroy(e1));
    free(ms);
    return batch_ok;
}

void bench_recall(const config *c, rctx *x, const pool *p,
                  cudaStream_t s, int sm_count, double big_gbps)
{
    const int reps = c->reps, warm = c->warmup;
    cudaEvent_t *e0 = bench_xmalloc((size_t)(reps + warm) * sizeof *e0);
    cudaEvent_t *e1 = bench_xmalloc((size_t)(reps + warm) * sizeof *e1);
    for (int r = 0; r < reps + warm; r++) {
        BENCH_CUDA_CHECK(cudaEventCreate(&e0[r]));
        BENCH_CUDA_CHECK(cudaEventCreate(&e1[r]));
    }
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    const double bytes = (double)x->units * (double)x->unit_bytes;
    /* --fused-plan: one launch whose blocks are the (sequence, KV head)s;
     * the gather-block list does not apply, so one row. */
    const int nvariants = x->plan == FKV_PLAN_FUSED ? 1 : c->nblocks;
    for (int bi = 0; bi < nvariants; bi++) {
        const int blocks = x->plan == FKV_PLAN_FUSED ? x->n * x->H
                           : c->blocks[bi] > 0       ? c->blocks[bi]
                                                     : sm_count;
        char what[96];
        snprintf(what, sizeof what, "recall batch %d K %d gather_blocks %d",
                 x->n, x->K, blocks);
        rctx_reset_counters(x);
        /* One checked recall before timing: from whatever the slots held
         * (empty at first) to the next set. */
        BENCH_CUDA_CHECK(rctx_enqueue(x, blocks, s, NULL, NULL));
        rctx_verify(x, p, what);
        for (int r = 0; r < reps + warm; r++)
            BENCH_CUDA_CHECK(rctx_enqueue(x, blocks, s, e0[r], e1[r]));
        BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
        for (int r = 0; r < reps; r++)
            ms[r] = bench_event_ms(e0[warm + r], e1[warm + r]);
        rctx_verify(x, p, what);
        const double t = bench_median(ms, (size_t)reps);
        row *rw = add_row(g_h2d_section,
                          x->plan == FKV_PLAN_FUSED ? "recall fused plan+gather"
                          : x->st.gather_bulk       ? "recall bulk gather"
                                                    : "recall fkv_launch_recall",
                          x->n,
                          x->K, blocks);
        rw->mib = bytes / (1 << 20);
        rw->us = t * 1e3;
        rw->gbps = bytes / (t * 1e-3) / 1e9;
        rw->pct = 100.0 * rw->gbps / big_gbps;
        printf("(c) batch %2d K %3d gather_blocks %3d: %.1f us, %.2f GB/s "
               "(%.1f%% of (a)%s), verified\n",
               x->n, x->K, blocks, rw->us, rw->gbps, rw->pct,
               rw->pct >= 90.0 ? ", target met" : ", below the 90% target");
    }
    for (int r = 0; r < reps + warm; r++) {
        BENCH_CUDA_CHECK(cudaEventDestroy(e0[r]));
        BENCH_CUDA_CHECK(cudaEventDestroy(e1[r]));
    }
    free(e0);
    free(e1);
    free(ms);
}


#endif /* FKV_WITH_CUDA */
