/*
 * bench/recall's (d): the GEMMs of a Llama-3.1-8B decode step alone and with
 * a recall variant kept running beside them by a feeder thread.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#ifdef FKV_WITH_CUDA

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------------ */
/* (d) GEMMs of a Llama-3.1-8B decode step, with recall beside them          */
/* ------------------------------------------------------------------------ */

/* One pass of the GEMM stand-ins (bench/gemm_model.h); GPU time in ms
 * between events on the model's stream, which first waits for `wait` when
 * given. */
static double model_step(bench_gemm_model *m, int batch, cudaEvent_t wait,
                         cudaEvent_t g0, cudaEvent_t g1)
{
    if (wait)
        BENCH_CUDA_CHECK(cudaStreamWaitEvent(m->s, wait, 0));
    bench_gemm_enqueue(m, batch, g0, g1);
    BENCH_CUDA_CHECK(cudaEventSynchronize(g1));
    return bench_event_ms(g0, g1);
}

/* A host thread that keeps one recall variant running on a stream, a
 * bounded number of chunks ahead, recording an event after each chunk. */
typedef enum feed_kind { FEED_RECALL, FEED_MEMCPY, FEED_BATCH } feed_kind;

typedef struct feeder {
    feed_kind kind;
    rctx *x;
    int blocks;            /* FEED_RECALL */
    size_t chunk_units;    /* FEED_MEMCPY, FEED_BATCH */
    size_t cursor;         /* next unit; wraps with par ^= 1 */
    int par;
    int64_t cycles;
    double chunk_bytes;
    cudaStream_t s;
    int device;
    cudaEvent_t begin;
    cudaEvent_t *ev;
    int nev, depth, limit; /* limit: stop after that many chunks */
    atomic_int state;      /* 0 starting, 1 first chunk recorded, 2 failed */
    atomic_int stop;
    int issued;
    char err[256];
} feeder;

static cudaError_t feed_chunk(feeder *f)
{
    rctx *x = f->x;
    if (f->kind == FEED_RECALL)
        return rctx_enqueue(x, f->blocks, f->s, NULL, NULL);
    if (f->kind == FEED_BATCH) {
        cudaError_t e = batch_copy(x->udst + f->cursor,
                                   x->usrc[f->par] + f->cursor,
                                   x->usize + f->cursor, f->chunk_units, f->s);
        if (e != cudaSuccess)
            return e;
    } else {
        for (size_t u = 0; u < f->chunk_units; u++) {
            cudaError_t e = cudaMemcpyAsync(x->udst[f->cursor + u],
                                            x->usrc[f->par][f->cursor + u],
                                            x->unit_bytes,
                                            cudaMemcpyHostToDevice, f->s);
            if (e != cudaSuccess)
                return e;
        }
    }
    f->cursor += f->chunk_units;
    if (f->cursor == x->units) {
        f->cursor = 0;
        f->par ^= 1;
        f->cycles++;
    }
    return cudaSuccess;
}

static void *feeder_main(void *arg)
{
    feeder *f = arg;
    cudaError_t e = cudaSetDevice(f->device);
    const char *what = "cudaSetDevice";
    if (e == cudaSuccess) {
        e = cudaEventRecord(f->begin, f->s);
        what = "cudaEventRecord";
    }
    for (int i = 0; e == cudaSuccess && i < f->limit; i++) {
        if (i > 0 && atomic_load(&f->stop))
            break;
        if (i >= f->depth) {
            e = cudaEventSynchronize(f->ev[i - f->depth]);
            what = "cudaEventSynchronize";
            if (e != cudaSuccess)
                break;
        }
        e = feed_chunk(f);
        what = f->kind == FEED_RECALL  ? "fkv_launch_recall"
               : f->kind == FEED_BATCH ? "cudaMemcpyBatchAsync"
                                       : "cudaMemcpyAsync";
        if (e == cudaSuccess) {
            e = cudaEventRecord(f->ev[i], f->s);
            what = "cudaEventRecord";
        }
        if (e == cudaSuccess) {
            f->issued = i + 1;
            if (i == 0)
                atomic_store(&f->state, 1);
        }
    }
    if (e != cudaSuccess) {
        snprintf(f->err, sizeof f->err, "feeder: %s: %s (%s)", what,
                 cudaGetErrorString(e), cudaGetErrorName(e));
        atomic_store(&f->state, 2);
    }
    return NULL;
}

static void feeder_init(feeder *f, feed_kind kind, rctx *x, int blocks,
                        cudaStream_t s, int device, int nev)
{
    memset(f, 0, sizeof *f);
    atomic_init(&f->state, 0);
    atomic_init(&f->stop, 0);
    f->kind = kind;
    f->x = x;
    f->blocks = blocks;
    f->s = s;
    f->device = device;
    f->nev = nev;
    f->depth = 8;
    /* Copies: chunks of 64 units (1 MiB), so that a few milliseconds of
     * GEMMs hold several event intervals. */
    f->chunk_units = x->units;
    if (kind != FEED_RECALL && x->units % 64 == 0)
        f->chunk_units = 64;
    f->chunk_bytes = kind == FEED_RECALL
                         ? (double)x->units * (double)x->unit_bytes
                         : (double)f->chunk_units * (double)x->unit_bytes;
    BENCH_CUDA_CHECK(cudaEventCreate(&f->begin));
    f->ev = bench_xmalloc((size_t)nev * sizeof *f->ev);
    for (int i = 0; i < nev; i++)
        BENCH_CUDA_CHECK(cudaEventCreate(&f->ev[i]));
}

static void feeder_free(feeder *f)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaEventDestroy(f->begin));
    for (int i = 0; i < f->nev; i++)
        BENCH_CUDA_CHECK(cudaEventDestroy(f->ev[i]));
    free(f->ev);
}

static void feeder_start(feeder *f, pthread_t *t, int limit)
{
    atomic_store(&f->state, 0);
    atomic_store(&f->stop, 0);
    f->issued = 0;
    f->limit = limit < f->nev ? limit : f->nev;
    int rc = pthread_create(t, NULL, feeder_main, f);
    if (rc != 0)
        bench_die("pthread_create failed (%d)", rc);
    while (atomic_load(&f->state) == 0)
        sleep_us(20);
    if (atomic_load(&f->state) == 2) {
        pthread_join(*t, NULL);
        bench_die("%s", f->err);
    }
}

static void feeder_join(feeder *f, pthread_t t)
{
    atomic_store(&f->stop, 1);
    pthread_join(t, NULL);
    if (atomic_load(&f->state) == 2)
        bench_die("%s", f->err);
    BENCH_CUDA_CHECK(cudaStreamSynchronize(f->s));
}

/* Bandwidth of the chunks that completed in [t0, t1] ms after f->begin
 * (NAN with fewer than two completions there). */
static double feeder_gbps(const feeder *f, double t0, double t1)
{
    int first = -1, last = -1;
    double tf = 0.0, tl = 0.0;
    for (int i = 0; i < f->issued; i++) {
        const double t = bench_event_ms(f->begin, f->ev[i]);
        if (t < t0 || t > t1)
            continue;
        if (first < 0) {
            first = i;
            tf = t;
        }
        last = i;
        tl = t;
    }
    if (first < 0 || last <= first || tl <= tf)
        return NAN;
    return (double)(last - first) * f->chunk_bytes / ((tl - tf) * 1e-3) / 1e9;
}

static void feeder_verify(feeder *f, const pool *p, const char *what)
{
    if (f->kind == FEED_RECALL) {
        rctx_verify(f->x, p, what);
    } else {
        /* Units before the cursor hold the current set, the others the
         * previous one (or nothing yet, before the first full cycle). */
        units_verify(f->x, f->par, f->cursor, f->cycles > 0, what);
    }
}

void bench_gemm(const config *c, const pool *p, int device,
                int sm_count, bool batch_ok)
{
    int least = 0, greatest = 0;
    BENCH_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t gs, rs;
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&gs, cudaStreamNonBlocking, greatest));
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&rs, cudaStreamNonBlocking, least));
    int max_batch = 1;
    for (int i = 0; i < c->ngemm_batches; i++)
        if (c->gemm_batches[i] > max_batch)
            max_batch = c->gemm_batches[i];
    bench_gemm_model m;
    bench_gemm_create(&m, c->gemm_layers, max_batch, gs);
    printf("(d) %d layers of Llama-3.1-8B GEMMs (bf16 cuBLAS, %.2f GB of "
           "weights) on a stream of priority %d; recall beside them on a "
           "stream of priority %d (lower)\n",
           c->gemm_layers, (double)m.layer_bytes * c->gemm_layers / 1e9,
           greatest, least);
    cudaEvent_t g0, g1;
    BENCH_CUDA_CHECK(cudaEventCreate(&g0));
    BENCH_CUDA_CHECK(cudaEventCreate(&g1));
    const int reps = c->gemm_reps;
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    double *bw = bench_xmalloc((size_t)reps * sizeof *bw);

    for (int bi = 0; bi < c->ngemm_batches; bi++) {
        const int batch = c->gemm_batches[bi];
        for (int r = 0; r < 3; r++)
            (void)model_step(&m, batch, NULL, g0, g1);
        for (int r = 0; r < reps; r++)
            ms[r] = model_step(&m, batch, NULL, g0, g1);
        const double alone = bench_median(ms, (size_t)reps);
        row *rw = add_row("gemm", "GEMMs alone", batch, -1, -1);
        rw->gemm_ms = alone;
        rw->alone_ms = alone;
        rw->slow_pct = 0.0;
        printf("(d) batch %d: GEMMs alone %.3f ms\n", batch, alone);

        rctx x;
        rctx_create(&x, c, p, batch, c->conc_pages, 0xC0C0ull + (uint64_t)batch);
        const int nvar = c->nconc_blocks + 1 + (batch_ok ? 1 : 0);
        for (int vi = 0; vi < nvar; vi++) {
            feed_kind kind = vi < c->nconc_blocks        ? FEED_RECALL
                             : vi == c->nconc_blocks     ? FEED_MEMCPY
                                                         : FEED_BATCH;
            int blocks = 0;
            char name[48];
            if (kind == FEED_RECALL) {
                blocks = c->conc_blocks[vi] > 0 ? c->conc_blocks[vi] : sm_count;
                snprintf(name, sizeof name, "recall %s %d",
                         c->fused_plan    ? "fused, ignored blocks"
                         : c->bulk_gather ? "bulk blocks"
                                          : "gather_blocks",
                         blocks);
            } else {
                snprintf(name, sizeof name, "%s",
                         kind == FEED_MEMCPY ? "per-unit cudaMemcpyAsync"
                                             : "cudaMemcpyBatchAsync");
            }
            feeder f;
            feeder_init(&f, kind, &x, blocks, rs, device, 4096);
            if (kind == FEED_RECALL)
                rctx_reset_counters(&x);
            pthread_t t;
            /* The variant alone: 48 chunks, bandwidth over all but the
             * first. */
            feeder_start(&f, &t, 48);
            feeder_join(&f, t);
            const double alone_bw = feeder_gbps(&f, 0.0, INFINITY);
            /* Beside the GEMMs. */
            for (int r = 0; r < reps; r++) {
                feeder_start(&f, &t, f.nev);
                ms[r] = model_step(&m, batch, f.ev[0], g0, g1);
                feeder_join(&f, t);
                const double t0 = bench_event_ms(f.begin, g0);
                const double t1 = bench_event_ms(f.begin, g1);
                bw[r] = feeder_gbps(&f, t0, t1);
                if (f.issued == f.nev &&
                    bench_event_ms(f.begin, f.ev[f.nev - 1]) < t1)
                    printf("    (the feeder ran out of events before the "
                           "GEMMs ended: bandwidth covers part of the "
                           "window)\n");
            }
            char what[96];
            snprintf(what, sizeof what, "beside GEMMs, batch %d, %s", batch,
                     name);
            feeder_verify(&f, p, what);
            feeder_free(&f);
            const double with = bench_median(ms, (size_t)reps);
            int nbw = 0;
            for (int r = 0; r < reps; r++)
                if (!isnan(bw[r]))
                    bw[nbw++] = bw[r];
            rw = add_row("gemm", name, batch,
                         kind == FEED_RECALL ? x.K : -1,
                         kind == FEED_RECALL ? blocks : -1);
            rw->gemm_ms = with;
            rw->alone_ms = alone;
            rw->slow_pct = 100.0 * (with / alone - 1.0);
            rw->rec_gbps = nbw ? bench_median(bw, (size_t)nbw) : NAN;
            rw->rec_alone_gbps = alone_bw;
            printf("(d) batch %d, %s beside: GEMMs %.3f ms (%+.1f%%), recall "
                   "%.2f GB/s meanwhile (%.2f GB/s alone), verified\n",
                   batch, name, with, rw->slow_pct, rw->rec_gbps, alone_bw);
        }
        rctx_destroy(&x);
    }
    free(ms);
    free(bw);
    BENCH_CUDA_CHECK(cudaEventDestroy(g0));
    BENCH_CUDA_CHECK(cudaEventDestroy(g1));
    bench_gemm_destroy(&m);
    BENCH_CUDA_CHECK(cudaStreamDestroy(gs));
    BENCH_CUDA_CHECK(cudaStreamDestroy(rs));
}


#endif /* FKV_WITH_CUDA */
