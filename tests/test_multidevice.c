/*
 * multidevice: one cache per GPU, used from one thread per GPU at once, as a
 * tensor-parallel engine does (each device holds its share of the KV heads).
 * main.c adds this suite to the "gpu:" run only when two CUDA devices exist,
 * and prints "skipped" otherwise.
 *
 *  multidevice_concurrent  two workloads (different data, every policy), each
 *                          on its own device: run one at a time, then both at
 *                          once from two threads. Outputs, selected pages and
 *                          counters of the concurrent run equal the
 *                          one-at-a-time run bit for bit (the kernels are
 *                          deterministic; a difference means state shared
 *                          across handles or devices).
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef FKV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

int tst_cuda_device_count(void)
{
#ifdef FKV_WITH_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
#else
    return 0;
#endif
}

#ifdef FKV_WITH_CUDA

#define MD_LAYERS 2
#define MD_QH 8
#define MD_KVH 2
#define MD_D 128
#define MD_SEQS 2
#define MD_PROMPT 3000 /* tokens: beyond the budget, so selection matters */
#define MD_STEPS 6

typedef struct md_run {
    int device;
    uint64_t seed;
    fkv_policy policy;
    /* Results, host memory: outputs of every (step, layer), then the
     * selected pages of every (layer, seq, KV head) after the last step. */
    float *out;
    int32_t pages[MD_LAYERS][MD_SEQS][MD_KVH][64];
    int32_t npages[MD_LAYERS][MD_SEQS][MD_KVH];
    fkv_stats stats;
    char error[512]; /* "" when the run succeeded */
} md_run;

static size_t md_out_floats(void)
{
    return (size_t)MD_STEPS * MD_LAYERS * MD_SEQS * MD_QH * MD_D;
}

static uint64_t md_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1): enough for attention inputs, cheap for 3K tokens. */
static void md_fill(uint64_t *s, float *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        dst[i] = (float)((double)(md_next(s) >> 11) * 0x1.0p-52 - 1.0);
}

/* Records the first failure; later steps are skipped. */
static int md_fail(md_run *r, fkv_cache *c, const char *what, int code)
{
    char msg[384];
    msg[0] = '\0';
    if (c)
        fkv_last_error(c, msg, sizeof msg);
    else
        fkv_last_error(NULL, msg, sizeof msg);
    snprintf(r->error, sizeof r->error, "device %d: %s failed (%d): %s",
             r->device, what, code, msg);
    return 0;
}

#define MD_CUDA(call)                                                        \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess) {                                             \
            snprintf(r->error, sizeof r->error, "device %d: %s: %s",         \
                     r->device, #call, cudaGetErrorString(e_));              \
            goto done;                                                       \
        }                                                                    \
    } while (0)
#define MD_FKV(c, call)                                                      \
    do {                                                                     \
        fkv_status s_ = (call);                                              \
        if (s_ != FKV_OK) {                                                  \
            md_fail(r, (c), #call, (int)s_);                                 \
            goto done;                                                       \
        }                                                                    \
    } while (0)

static void *md_work(void *arg)
{
    md_run *r = (md_run *)arg;
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_seq_id ids[MD_SEQS];
    int32_t ntok[MD_SEQS];
    cudaStream_t stream = NULL;
    float *hk = NULL, *hq = NULL;
    void *dk = NULL, *dv = NULL, *dq = NULL, *dout = NULL;
    size_t prompt_rows = (size_t)MD_SEQS * MD_PROMPT * MD_KVH * MD_D;
    size_t q_floats = (size_t)MD_SEQS * MD_QH * MD_D;
    size_t step_kv = (size_t)MD_SEQS * MD_KVH * MD_D;
    uint64_t seed = r->seed;
    fkv_batch b;
    int i, l, t, g;

    r->error[0] = '\0';
    MD_CUDA(cudaSetDevice(r->device));
    MD_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    memset(&o, 0, sizeof o);
    fkv_options_init(&o, sizeof o);
    o.backend = FKV_BACKEND_CUDA;
    o.device = r->device;
    o.num_layers = MD_LAYERS;
    o.num_q_heads = MD_QH;
    o.num_kv_heads = MD_KVH;
    o.head_dim = MD_D;
    o.dtype = FKV_DTYPE_F32;
    o.page_tokens = 32;
    o.sink_tokens = 64;
    o.window_tokens = 128;
    o.budget_tokens = 512;
    o.policy = r->policy;
    o.max_sequences = MD_SEQS;
    o.max_tokens_per_sequence = 4096;
    MD_FKV(NULL, fkv_create(&o, &c));
    MD_FKV(c, fkv_set_stream(c, stream));
    for (i = 0; i < MD_SEQS; ++i)
        MD_FKV(c, fkv_seq_open(c, &ids[i]));

    hk = malloc(prompt_rows * sizeof(float));
    hq = malloc(q_floats * sizeof(float));
    if (!hk || !hq) {
        snprintf(r->error, sizeof r->error, "host malloc failed");
        goto done;
    }
    MD_CUDA(cudaMalloc(&dk, prompt_rows * sizeof(float)));
    MD_CUDA(cudaMalloc(&dv, prompt_rows * sizeof(float)));
    MD_CUDA(cudaMalloc(&dq, q_floats * sizeof(float)));
    MD_CUDA(cudaMalloc(&dout, q_floats * sizeof(float)));

    b.num_seqs = MD_SEQS;
    b.reserved = 0;
    b.seq_ids = ids;
    for (i = 0; i < MD_SEQS; ++i)
        ntok[i] = MD_PROMPT;
    b.num_tokens = ntok;
    for (l = 0; l < MD_LAYERS; ++l) {
        md_fill(&seed, hk, prompt_rows);
        MD_CUDA(cudaMemcpyAsync(dk, hk, prompt_rows * sizeof(float),
                                cudaMemcpyHostToDevice, stream));
        md_fill(&seed, hk, prompt_rows);
        MD_CUDA(cudaMemcpyAsync(dv, hk, prompt_rows * sizeof(float),
                                cudaMemcpyHostToDevice, stream));
        MD_FKV(c, fkv_append(c, l, &b, dk, dv));
        /* hk is refilled next: the copies must have read it. */
        MD_CUDA(cudaStreamSynchronize(stream));
    }

    b.num_tokens = NULL;
    for (t = 0; t < MD_STEPS; ++t) {
        for (l = 0; l < MD_LAYERS; ++l) {
            md_fill(&seed, hk, 2 * step_kv);
            MD_CUDA(cudaMemcpyAsync(dk, hk, 2 * step_kv * sizeof(float),
                                    cudaMemcpyHostToDevice, stream));
            md_fill(&seed, hq, q_floats);
            MD_CUDA(cudaMemcpyAsync(dq, hq, q_floats * sizeof(float),
                                    cudaMemcpyHostToDevice, stream));
            MD_FKV(c, fkv_append(c, l, &b, dk,
                                 (const float *)dk + step_kv));
            MD_FKV(c, fkv_attend(c, l, &b, dq, dout));
            MD_FKV(c, fkv_select(c, l, &b, dq));
            MD_FKV(c, fkv_recall(c, l, &b));
            MD_CUDA(cudaMemcpyAsync(
                r->out + ((size_t)t * MD_LAYERS + l) * q_floats, dout,
                q_floats * sizeof(float), cudaMemcpyDeviceToHost, stream));
            MD_CUDA(cudaStreamSynchronize(stream));
        }
    }

    for (l = 0; l < MD_LAYERS; ++l)
        for (i = 0; i < MD_SEQS; ++i)
            for (g = 0; g < MD_KVH; ++g)
                MD_FKV(c, fkv_get_selected_pages(c, l, ids[i], g,
                                                 r->pages[l][i][g], 64,
                                                 &r->npages[l][i][g]));
    r->stats.struct_size = sizeof r->stats;
    MD_FKV(c, fkv_get_stats(c, &r->stats));

done:
    fkv_destroy(c);
    if (dk)
        cudaFree(dk);
    if (dv)
        cudaFree(dv);
    if (dq)
        cudaFree(dq);
    if (dout)
        cudaFree(dout);
    if (stream)
        cudaStreamDestroy(stream);
    free(hk);
    free(hq);
    return NULL;
}

static const fkv_policy k_md_policies[4] = {
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT, FKV_POLICY_DENSE};

static void md_init(md_run *r, int device, uint64_t seed, fkv_policy p)
{
    memset(r, 0, sizeof *r);
    r->device = device;
    r->seed = seed;
    r->policy = p;
    r->out = calloc(md_out_floats(), sizeof(float));
    ck_assert_msg(r->out != NULL, "calloc failed");
}

static void md_same(const md_run *a, const md_run *b)
{
    ck_assert_msg(a->error[0] == '\0', "one at a time: %s", a->error);
    ck_assert_msg(b->error[0] == '\0', "concurrent: %s", b->error);
    ck_assert_msg(memcmp(a->out, b->out, md_out_floats() * sizeof(float)) == 0,
                  "device %d: concurrent outputs differ from the run alone",
                  a->device);
    ck_assert_msg(memcmp(a->npages, b->npages, sizeof a->npages) == 0 &&
                      memcmp(a->pages, b->pages, sizeof a->pages) == 0,
                  "device %d: selected pages differ", a->device);
    ck_assert_msg(a->stats.corrections == b->stats.corrections &&
                      a->stats.heads_checked == b->stats.heads_checked &&
                      a->stats.pages_recalled == b->stats.pages_recalled,
                  "device %d: counters differ (corrections %llu/%llu, "
                  "recalled %llu/%llu)",
                  a->device, (unsigned long long)a->stats.corrections,
                  (unsigned long long)b->stats.corrections,
                  (unsigned long long)a->stats.pages_recalled,
                  (unsigned long long)b->stats.pages_recalled);
}

START_TEST(multidevice_concurrent)
{
    fkv_policy p = k_md_policies[_i];
    md_run alone[2], together[2];
    pthread_t th[2];
    int d;

    for (d = 0; d < 2; ++d) {
        md_init(&alone[d], d, 1000 + 77 * (uint64_t)d, p);
        md_init(&together[d], d, 1000 + 77 * (uint64_t)d, p);
    }
    for (d = 0; d < 2; ++d)
        md_work(&alone[d]);
    for (d = 0; d < 2; ++d)
        ck_assert_msg(pthread_create(&th[d], NULL, md_work, &together[d]) == 0,
                      "pthread_create failed");
    for (d = 0; d < 2; ++d)
        pthread_join(th[d], NULL);
    for (d = 0; d < 2; ++d)
        md_same(&alone[d], &together[d]);
    /* The two workloads differ: equal outputs would hide a mix-up. */
    ck_assert_msg(memcmp(alone[0].out, alone[1].out,
                         md_out_floats() * sizeof(float)) != 0,
                  "the two devices' workloads gave identical outputs");
    for (d = 0; d < 2; ++d) {
        free(alone[d].out);
        free(together[d].out);
    }
}
END_TEST

#endif /* FKV_WITH_CUDA */

Suite *suite_multidevice(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "multidevice"));
#ifdef FKV_WITH_CUDA
    tcase_add_loop_test(tst_tcase(s, "multidevice_concurrent"),
                        multidevice_concurrent, 0, 4);
#endif
    return s;
}
