/*
 * --tp N (gpu_tp.h): N CUDA backend shards of one process, one worker
 * thread per GPU. Every call of the backend runs the same call on every
 * shard at once (each on its own thread, current device = its rank) and
 * waits for all of them: the shards' NCCL all-reduces meet inside those
 * calls, so they must run concurrently, and a thread per device keeps each
 * shard's code the one-GPU code (its graph capture included).
 *
 * The workers are started at create and wait on a condition variable; a
 * decode step is one broadcast and one wait (no allocation, no thread
 * creation on the decode path). Rank 0's logits go to the caller; the
 * others' (the same values) to per-rank scratch.
 *
 * The shards validate their inputs identically, so a bad input fails on
 * every rank before any collective. A failure on one rank only (a CUDA
 * error) would leave the others waiting in NCCL; the example then hangs
 * rather than returning (NCCL has no timeout by default).
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "gpu_tp.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef LLAMA_WITH_NCCL

int llama_tp_available(void)
{
    return 0;
}

static int tp_none(const llama_model *m, const llama_run_config *rc,
                   llama_backend **out, char *err, size_t errlen)
{
    (void)m;
    (void)rc;
    *out = NULL;
    llama_errf(err, errlen, "--tp: built without NCCL (the Makefile found "
               "no nccl.h and libnccl under CUDA_HOME)");
    return -1;
}

const llama_backend_ops llama_cuda_tp_backend = {
    "cuda-tp", tp_none, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
};

#else /* LLAMA_WITH_NCCL */

#include <cuda_runtime_api.h>
#include <nccl.h>

#define ERRLEN 1024

typedef enum tp_op {
    TP_CREATE,
    TP_DESTROY,
    TP_CACHE_OPEN,
    TP_SLOT_RESET,
    TP_PREFILL,
    TP_REPLAY,
    TP_FILL,
    TP_DECODE,
    TP_STATS,
    TP_QUIT
} tp_op;

/* One call's arguments, the same for every rank (logits: rank 0's). */
typedef struct tp_job {
    tp_op op;
    const llama_model *m;
    const llama_run_config *rc;
    const fkv_options *opts;
    int32_t slot, n;
    const int32_t *tokens, *slots;
    int64_t count;
    uint64_t seed;
    float *logits;
    fkv_stats *st;
} tp_job;

typedef struct tp_backend tp_backend;

typedef struct tp_rank {
    tp_backend *tp;
    int rank;
    pthread_t thread;
    int started;
    llama_backend *b; /* the shard */
    float *scratch;   /* [max_batch, vocab]: a rank > 0's logits */
    int rcode;
    char err[ERRLEN];
} tp_rank;

struct tp_backend {
    int n;
    int32_t vocab;
    ncclComm_t comm[LLAMA_TP_MAX];
    int comms;
    tp_rank r[LLAMA_TP_MAX];
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned long gen; /* bumped per job */
    int pending;       /* ranks still running the job */
    tp_job job;
};

int llama_tp_available(void)
{
    return 1;
}

static void run_job(tp_rank *r, const tp_job *j)
{
    const llama_backend_ops *o = &llama_cuda_backend;
    char *err = r->err;
    float *lg = r->rank == 0 ? j->logits : (j->logits ? r->scratch : NULL);
    fkv_stats st;
    r->rcode = 0;
    err[0] = '\0';
    switch (j->op) {
    case TP_CREATE:
        r->rcode = llama_cuda_shard_create(j->m, j->rc, r->rank, r->tp->n,
                                           (void *)r->tp->comm[r->rank],
                                           &r->b, err, ERRLEN);
        break;
    case TP_DESTROY:
        if (r->b)
            o->destroy(r->b);
        r->b = NULL;
        break;
    case TP_CACHE_OPEN:
        r->rcode = o->cache_open(r->b, j->opts, err, ERRLEN);
        break;
    case TP_SLOT_RESET:
        r->rcode = o->slot_reset(r->b, j->slot, err, ERRLEN);
        break;
    case TP_PREFILL:
        r->rcode = o->prefill(r->b, j->slot, j->tokens, j->count, lg, err,
                              ERRLEN);
        break;
    case TP_REPLAY:
        r->rcode = o->replay_prefill(r->b, j->slot, err, ERRLEN);
        break;
    case TP_FILL:
        r->rcode = o->fill_random(r->b, j->slot, j->count, j->seed, err,
                                  ERRLEN);
        break;
    case TP_DECODE:
        r->rcode = o->decode(r->b, j->n, j->slots, j->tokens, lg, err,
                             ERRLEN);
        break;
    case TP_STATS: /* every rank settles its graph; rank 0 reports */
        memset(&st, 0, sizeof st);
        r->rcode = o->stats(r->b, r->rank == 0 ? j->st : &st, err, ERRLEN);
        break;
    case TP_QUIT:
        break;
    }
}

static void *worker(void *arg)
{
    tp_rank *r = (tp_rank *)arg;
    tp_backend *tp = r->tp;
    unsigned long seen = 0;
    /* The current device is per thread: set once, every shard call of
     * this rank runs here. */
    cudaError_t e = cudaSetDevice(r->rank);
    for (;;) {
        pthread_mutex_lock(&tp->mu);
        while (tp->gen == seen)
            pthread_cond_wait(&tp->go, &tp->mu);
        seen = tp->gen;
        tp_job j = tp->job;
        pthread_mutex_unlock(&tp->mu);
        if (e != cudaSuccess && j.op != TP_QUIT && j.op != TP_DESTROY) {
            r->rcode = -1;
            llama_errf(r->err, ERRLEN, "cudaSetDevice(%d): %s", r->rank,
                       cudaGetErrorString(e));
        } else {
            run_job(r, &j);
        }
        pthread_mutex_lock(&tp->mu);
        if (--tp->pending == 0)
            pthread_cond_signal(&tp->done);
        pthread_mutex_unlock(&tp->mu);
        if (j.op == TP_QUIT)
            return NULL;
    }
}

/* Runs j on every rank and waits; the first failing rank's message. */
static int run_all(tp_backend *tp, const tp_job *j, char *err, size_t errlen)
{
    pthread_mutex_lock(&tp->mu);
    tp->job = *j;
    tp->pending = tp->n;
    tp->gen++;
    pthread_cond_broadcast(&tp->go);
    while (tp->pending > 0)
        pthread_cond_wait(&tp->done, &tp->mu);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 0; i < tp->n; i++)
        if (tp->r[i].rcode) {
            llama_errf(err, errlen, "tp rank %d: %s", i, tp->r[i].err);
            return -1;
        }
    return 0;
}

static void tp_destroy(llama_backend *bb)
{
    tp_backend *tp = (tp_backend *)bb;
    if (!tp)
        return;
    char e[8];
    int all = 1;
    for (int i = 0; i < tp->n; i++)
        all &= tp->r[i].started;
    if (all) {
        tp_job j;
        memset(&j, 0, sizeof j);
        j.op = TP_DESTROY;
        (void)run_all(tp, &j, e, sizeof e);
        j.op = TP_QUIT;
        (void)run_all(tp, &j, e, sizeof e);
    } else {
        /* Some thread did not start (create failed): nothing ran on any
         * rank yet, and the started ones are told to quit. */
        pthread_mutex_lock(&tp->mu);
        tp->job.op = TP_QUIT;
        tp->gen++;
        tp->pending = 0;
        pthread_cond_broadcast(&tp->go);
        pthread_mutex_unlock(&tp->mu);
    }
    for (int i = 0; i < tp->n; i++)
        if (tp->r[i].started)
            pthread_join(tp->r[i].thread, NULL);
    /* After the shards: their streams are idle now. */
    for (int i = 0; i < tp->comms; i++)
        ncclCommDestroy(tp->comm[i]);
    for (int i = 0; i < tp->n; i++)
        free(tp->r[i].scratch);
    pthread_cond_destroy(&tp->go);
    pthread_cond_destroy(&tp->done);
    pthread_mutex_destroy(&tp->mu);
    free(tp);
}

static int tp_create(const llama_model *m, const llama_run_config *rc,
                     llama_backend **out, char *err, size_t errlen)
{
    *out = NULL;
    const llama_config *c = &m->cfg;
    const int n = rc->tp;
    if (n < 2 || n > LLAMA_TP_MAX) {
        llama_errf(err, errlen, "--tp %d not in [2, %d]", n, LLAMA_TP_MAX);
        return -1;
    }
    if (c->kv_heads % n != 0) {
        llama_errf(err, errlen, "--tp %d: the model's %d KV heads do not "
                   "divide by %d", n, (int)c->kv_heads, n);
        return -1;
    }
    if (c->intermediate % n != 0) {
        llama_errf(err, errlen, "--tp %d: intermediate_size %d does not "
                   "divide by %d", n, (int)c->intermediate, n);
        return -1;
    }
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess) {
        (void)cudaGetLastError();
        ndev = 0;
    }
    if (ndev < n) {
        llama_errf(err, errlen, "--tp %d: %d CUDA device%s visible", n, ndev,
                   ndev == 1 ? "" : "s");
        return -1;
    }
    /* NVLink SHARP (multicast) stays off on the machines this runs on;
     * NCCL reads the variable at init. */
    const char *nv = getenv("NCCL_NVLS_ENABLE");
    if (nv && strcmp(nv, "0") != 0) {
        llama_errf(err, errlen, "--tp: NCCL_NVLS_ENABLE=%s; NVLink multicast "
                   "must stay off (unset it or set it to 0)", nv);
        return -1;
    }
    if (!nv && setenv("NCCL_NVLS_ENABLE", "0", 1) != 0) {
        llama_errf(err, errlen, "--tp: cannot set NCCL_NVLS_ENABLE=0");
        return -1;
    }

    tp_backend *tp = (tp_backend *)calloc(1, sizeof *tp);
    if (!tp) {
        llama_errf(err, errlen, "--tp: out of host memory");
        return -1;
    }
    tp->n = n;
    tp->vocab = c->vocab;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->go, NULL);
    pthread_cond_init(&tp->done, NULL);
    int devs[LLAMA_TP_MAX];
    for (int i = 0; i < n; i++)
        devs[i] = i;
    ncclResult_t nr = ncclCommInitAll(tp->comm, n, devs);
    if (nr != ncclSuccess) {
        llama_errf(err, errlen, "NCCL: ncclCommInitAll(%d): %s", n,
                   ncclGetErrorString(nr));
        tp_destroy((llama_backend *)tp);
        return -1;
    }
    tp->comms = n;
    for (int i = 0; i < n; i++) {
        tp_rank *r = &tp->r[i];
        r->tp = tp;
        r->rank = i;
        if (i > 0) {
            r->scratch = (float *)malloc(sizeof(float) * (size_t)rc->max_batch *
                                         (size_t)c->vocab);
            if (!r->scratch) {
                llama_errf(err, errlen, "--tp: out of host memory");
                tp_destroy((llama_backend *)tp);
                return -1;
            }
        }
        if (pthread_create(&r->thread, NULL, worker, r) != 0) {
            llama_errf(err, errlen, "--tp: cannot start thread %d", i);
            tp_destroy((llama_backend *)tp);
            return -1;
        }
        r->started = 1;
    }
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_CREATE;
    j.m = m;
    j.rc = rc;
    if (run_all(tp, &j, err, errlen)) {
        tp_destroy((llama_backend *)tp);
        return -1;
    }
    *out = (llama_backend *)tp;
    return 0;
}

static int tp_cache_open(llama_backend *bb, const fkv_options *opts,
                         char *err, size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_CACHE_OPEN;
    j.opts = opts; /* each shard fills in its own heads and device */
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static int tp_slot_reset(llama_backend *bb, int32_t slot, char *err,
                         size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_SLOT_RESET;
    j.slot = slot;
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static int tp_prefill(llama_backend *bb, int32_t slot, const int32_t *tokens,
                      int64_t n, float *logits, char *err, size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_PREFILL;
    j.slot = slot;
    j.tokens = tokens;
    j.count = n;
    j.logits = logits;
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static int tp_replay(llama_backend *bb, int32_t slot, char *err,
                     size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_REPLAY;
    j.slot = slot;
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static int tp_fill(llama_backend *bb, int32_t slot, int64_t n, uint64_t seed,
                   char *err, size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_FILL;
    j.slot = slot;
    j.count = n;
    j.seed = seed; /* random K/V of each rank's own heads */
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static int tp_decode(llama_backend *bb, int32_t n, const int32_t *slots,
                     const int32_t *tokens, float *logits, char *err,
                     size_t errlen)
{
    tp_backend *tp = (tp_backend *)bb;
    tp_job j;
    /* Each shard checks n, slots and tokens (and so before scratch, sized
     * for max_batch, is written). */
    memset(&j, 0, sizeof j);
    j.op = TP_DECODE;
    j.n = n;
    j.slots = slots;
    j.tokens = tokens;
    j.logits = logits;
    return run_all(tp, &j, err, errlen);
}

static int tp_stats(llama_backend *bb, fkv_stats *st, char *err,
                    size_t errlen)
{
    tp_job j;
    memset(&j, 0, sizeof j);
    j.op = TP_STATS;
    j.st = st;
    return run_all((tp_backend *)bb, &j, err, errlen);
}

static uint64_t tp_weight_bytes(llama_backend *bb)
{
    tp_backend *tp = (tp_backend *)bb;
    return llama_cuda_backend.weight_bytes(tp->r[0].b); /* one device's */
}

const llama_backend_ops llama_cuda_tp_backend = {
    "cuda-tp",     tp_create, tp_destroy, tp_cache_open, tp_slot_reset,
    tp_prefill,    tp_replay, tp_fill,    tp_decode,     tp_stats,
    tp_weight_bytes,
};

#endif /* LLAMA_WITH_NCCL */
