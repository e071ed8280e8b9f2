/*
 * Test harness: options on the run's backend, tensor memory in the
 * backend's space, the tst_model (the caller's copy of the cache contents
 * plus a simulation of the policy state), and comparisons against the
 * float64 reference.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

fkv_backend g_test_backend = FKV_BACKEND_CPU;

double tst_tol(fkv_dtype dt)
{
    switch (dt) {
    case FKV_DTYPE_F16:
        return TST_TOL_F16;
    case FKV_DTYPE_BF16:
        return TST_TOL_BF16;
    default:
        return TST_TOL_F32;
    }
}

void tst_geometry(fkv_options *o, int page, int sink, int window, int budget)
{
    o->page_tokens = page;
    o->sink_tokens = sink;
    o->window_tokens = window;
    o->budget_tokens = budget;
}

void tst_options(fkv_options *o, int num_layers, int num_q_heads,
                 int num_kv_heads, int head_dim, fkv_dtype dtype)
{
    fkv_status st;
    memset(o, 0, sizeof *o);
    st = fkv_options_init(o, sizeof *o);
    ck_assert_msg(st == FKV_OK, "fkv_options_init returned %d", (int)st);
    o->backend = g_test_backend;
    o->device = 0;
    o->num_layers = num_layers;
    o->num_q_heads = num_q_heads;
    o->num_kv_heads = num_kv_heads;
    o->head_dim = head_dim;
    o->dtype = dtype;
    o->softmax_scale = 0.0f;
    tst_geometry(o, 16, 32, 64, 256);
    o->correction_threshold = 0.8f;
    o->policy = FKV_POLICY_FREEKV;
    o->group_score = FKV_GROUP_MEAN_SOFTMAX;
    o->max_sequences = 8;
    o->max_tokens_per_sequence = 16384;
    o->host_pool_bytes = 0;
}

TCase *tst_tcase(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 600);
    suite_add_tcase(s, tc);
    return tc;
}

int tst_cuda_experimental(void)
{
    const char *x = getenv("FKV_CUDA_EXPERIMENTAL");
    return x && strcmp(x, "1") == 0;
}

const char *tst_suite_name(const char *prefix, const char *name)
{
    /* Static storage: suites keep the pointer until srunner_free. */
    static char names[64][48];
    static int used;
    char *s = names[used % 64];
    used++;
    snprintf(s, sizeof names[0], "%s%s", prefix, name);
    return s;
}

/* ---------------------------------------------------------------------- */
/* Device memory. The CUDA runtime is reached through weak references (the */
/* CUDA build of libfreekv links it) or, failing that, the driver API      */
/* loaded at run time; the CPU build needs neither.                        */
/* ---------------------------------------------------------------------- */

extern int cudaMalloc(void **p, size_t n) __attribute__((weak));
extern int cudaFree(void *p) __attribute__((weak));
extern int cudaMemcpy(void *d, const void *s, size_t n, int kind)
    __attribute__((weak));
extern int cudaDeviceSynchronize(void) __attribute__((weak));
#pragma weak dlopen
#pragma weak dlsym

typedef unsigned long long tst_cu_ptr;
static struct {
    int ready;
    int driver; /* 1: driver API through dlopen */
    int (*cuInit)(unsigned);
    int (*cuDeviceGet)(int *, int);
    int (*cuDevicePrimaryCtxRetain)(void **, int);
    int (*cuCtxSetCurrent)(void *);
    int (*cuMemAlloc)(tst_cu_ptr *, size_t);
    int (*cuMemFree)(tst_cu_ptr);
    int (*cuMemcpyHtoD)(tst_cu_ptr, const void *, size_t);
    int (*cuMemcpyDtoH)(void *, tst_cu_ptr, size_t);
    int (*cuCtxSynchronize)(void);
} g_cu;

int tst_dev_init(char *why, size_t len)
{
    void *h;
    void *ctx = NULL;
    int dev = 0;
    if (g_cu.ready)
        return 1;
    if (cudaMalloc && cudaFree && cudaMemcpy && cudaDeviceSynchronize) {
        g_cu.ready = 1;
        g_cu.driver = 0;
        return 1;
    }
    if (!dlopen || !dlsym) {
        snprintf(why, len, "no CUDA runtime linked and no dlopen");
        return 0;
    }
    h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        snprintf(why, len, "no CUDA runtime linked and no libcuda.so.1");
        return 0;
    }
#define TST_SYM(field, name)                                                 \
    do {                                                                     \
        void *p_ = dlsym(h, name);                                           \
        if (!p_) {                                                           \
            snprintf(why, len, "libcuda.so.1 lacks %s", name);               \
            return 0;                                                        \
        }                                                                    \
        memcpy(&g_cu.field, &p_, sizeof p_);                                 \
    } while (0)
    TST_SYM(cuInit, "cuInit");
    TST_SYM(cuDeviceGet, "cuDeviceGet");
    TST_SYM(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    TST_SYM(cuCtxSetCurrent, "cuCtxSetCurrent");
    TST_SYM(cuMemAlloc, "cuMemAlloc_v2");
    TST_SYM(cuMemFree, "cuMemFree_v2");
    TST_SYM(cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    TST_SYM(cuMemcpyDtoH, "cuMemcpyDtoH_v2");
    TST_SYM(cuCtxSynchronize, "cuCtxSynchronize");
#undef TST_SYM
    if (g_cu.cuInit(0) || g_cu.cuDeviceGet(&dev, 0) ||
        g_cu.cuDevicePrimaryCtxRetain(&ctx, dev) ||
        g_cu.cuCtxSetCurrent(ctx)) {
        snprintf(why, len, "CUDA driver initialisation failed");
        return 0;
    }
    g_cu.driver = 1;
    g_cu.ready = 1;
    return 1;
}

static int on_device(void)
{
    return g_test_backend == FKV_BACKEND_CUDA;
}

void *tst_dev_alloc(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0)
        bytes = 1;
    if (!on_device()) {
        p = malloc(bytes);
        ck_assert_msg(p != NULL, "malloc(%zu) failed", bytes);
        memset(p, 0xA5, bytes);
        return p;
    }
    ck_assert_msg(g_cu.ready, "device memory used before tst_dev_init");
    if (g_cu.driver) {
        tst_cu_ptr d = 0;
        ck_assert_msg(g_cu.cuMemAlloc(&d, bytes) == 0, "cuMemAlloc failed");
        p = (void *)(uintptr_t)d;
    } else {
        ck_assert_msg(cudaMalloc(&p, bytes) == 0, "cudaMalloc failed");
    }
    return p;
}

void tst_dev_free(void *p)
{
    if (!p)
        return;
    if (!on_device()) {
        free(p);
        return;
    }
    if (g_cu.driver) {
        g_cu.cuCtxSynchronize();
        g_cu.cuMemFree((tst_cu_ptr)(uintptr_t)p);
    } else {
        cudaDeviceSynchronize();
        cudaFree(p);
    }
}

void tst_dev_put(void *dev, const void *host, size_t bytes)
{
    if (!on_device()) {
        memcpy(dev, host, bytes);
        return;
    }
    if (g_cu.driver) {
        ck_assert(g_cu.cuCtxSynchronize() == 0);
        ck_assert(g_cu.cuMemcpyHtoD((tst_cu_ptr)(uintptr_t)dev, host,
                                    bytes) == 0);
    } else {
        ck_assert(cudaDeviceSynchronize() == 0);
        ck_assert(cudaMemcpy(dev, host, bytes, 1 /* H2D */) == 0);
    }
}

void tst_dev_get(void *host, const void *dev, size_t bytes)
{
    if (!on_device()) {
        memcpy(host, dev, bytes);
        return;
    }
    if (g_cu.driver) {
        ck_assert(g_cu.cuCtxSynchronize() == 0);
        ck_assert(g_cu.cuMemcpyDtoH(host, (tst_cu_ptr)(uintptr_t)dev,
                                    bytes) == 0);
    } else {
        ck_assert(cudaDeviceSynchronize() == 0);
        ck_assert(cudaMemcpy(host, dev, bytes, 2 /* D2H */) == 0);
    }
}

void *tst_dev_from_floats(fkv_dtype dt, const float *src, size_t n)
{
    size_t bytes = n * ref_dtype_bytes((int)dt);
    void *host = malloc(bytes ? bytes : 1);
    void *dev;
    ck_assert(host != NULL);
    ref_encode((int)dt, src, host, n);
    dev = tst_dev_alloc(bytes);
    tst_dev_put(dev, host, bytes);
    free(host);
    return dev;
}

void tst_dev_to_floats(fkv_dtype dt, const void *dev, float *dst, size_t n)
{
    size_t bytes = n * ref_dtype_bytes((int)dt);
    void *host = malloc(bytes ? bytes : 1);
    ck_assert(host != NULL);
    tst_dev_get(host, dev, bytes);
    ref_decode((int)dt, host, dst, n);
    free(host);
}

/* ---------------------------------------------------------------------- */
/* Errors                                                                 */
/* ---------------------------------------------------------------------- */

void tst_expect_error_at(fkv_cache *c, fkv_status got, fkv_status want,
                         const char *what, const char *file, int line)
{
    char buf[1024];
    size_t n;
    ck_assert_msg(got == want, "%s:%d: %s: got status %d (%s), want %d (%s)",
                  file, line, what, (int)got, fkv_status_string(got),
                  (int)want, fkv_status_string(want));
    buf[0] = '\0';
    n = fkv_last_error(c, buf, sizeof buf);
    ck_assert_msg(n > 0 && buf[0] != '\0',
                  "%s:%d: %s: fkv_last_error(%s) is empty after a failure",
                  file, line, what, c ? "cache" : "NULL");
    ck_assert_msg(n == strlen(buf) || n >= sizeof buf,
                  "%s:%d: %s: fkv_last_error returned %zu for \"%s\"", file,
                  line, what, n, buf);
}

/* ---------------------------------------------------------------------- */
/* Model                                                                  */
/* ---------------------------------------------------------------------- */

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    ck_assert_msg(p != NULL, "out of memory in the test harness");
    return p;
}

void tst_model_init(tst_model *m, const fkv_options *o, uint64_t seed)
{
    fkv_status st;
    memset(m, 0, sizeof *m);
    m->o = *o;
    ck_assert(o->num_layers <= TST_MAX_LAYERS);
    ck_assert(o->num_kv_heads <= TST_MAX_KVH);
    st = fkv_create(o, &m->c);
    if (st != FKV_OK) {
        char buf[512];
        fkv_last_error(NULL, buf, sizeof buf);
        ck_abort_msg("fkv_create failed: %d (%s): %s", (int)st,
                     fkv_status_string(st), buf);
    }
    ck_assert(m->c != NULL);
    m->L = o->num_layers;
    m->QH = o->num_q_heads;
    m->KVH = o->num_kv_heads;
    m->D = o->head_dim;
    m->G = m->QH / m->KVH;
    m->dt = o->dtype;
    m->scale = o->softmax_scale != 0.0f ? (double)o->softmax_scale
                                        : 1.0 / sqrt((double)m->D);
    m->lay.P = o->page_tokens;
    m->lay.S = o->sink_tokens / o->page_tokens;
    m->lay.W = o->window_tokens / o->page_tokens;
    m->lay.K = (o->budget_tokens - o->sink_tokens - o->window_tokens) /
               o->page_tokens;
    ref_rng_seed(&m->rng, seed);
}

static void sel_alloc(tst_model *m, tst_sel *s)
{
    s->valid = 0;
    s->count = 0;
    s->pages = (int *)xcalloc((size_t)(m->lay.K > 0 ? m->lay.K : 1),
                              sizeof(int));
    s->q = (float *)xcalloc((size_t)m->G * m->D, sizeof(float));
}

static void sel_free(tst_sel *s)
{
    free(s->pages);
    free(s->q);
    s->pages = NULL;
    s->q = NULL;
    s->valid = 0;
}

static void seq_free(tst_model *m, tst_seq *s)
{
    int l, g;
    for (l = 0; l < TST_MAX_LAYERS; ++l) {
        free(s->k[l]);
        free(s->v[l]);
        s->k[l] = s->v[l] = NULL;
        s->len[l] = s->cap[l] = 0;
    }
    for (l = 0; l < m->L; ++l)
        for (g = 0; g < m->KVH; ++g) {
            sel_free(&s->active[l][g]);
            sel_free(&s->pending[l][g]);
            sel_free(&s->used[l][g]);
        }
    s->open = 0;
}

void tst_model_free(tst_model *m)
{
    int i;
    for (i = 0; i < m->nslots; ++i)
        seq_free(m, &m->seq[i]);
    fkv_destroy(m->c);
    m->c = NULL;
    m->nslots = 0;
}

int tst_open(tst_model *m)
{
    tst_seq *s;
    int l, g;
    fkv_status st;
    ck_assert_msg(m->nslots < TST_MAX_SEQS, "too many test sequences");
    s = &m->seq[m->nslots];
    memset(s, 0, sizeof *s);
    st = fkv_seq_open(m->c, &s->id);
    ck_assert_msg(st == FKV_OK, "fkv_seq_open returned %d (%s)", (int)st,
                  fkv_status_string(st));
    s->open = 1;
    for (l = 0; l < m->L; ++l)
        for (g = 0; g < m->KVH; ++g) {
            sel_alloc(m, &s->active[l][g]);
            sel_alloc(m, &s->pending[l][g]);
            sel_alloc(m, &s->used[l][g]);
        }
    return m->nslots++;
}

void tst_close(tst_model *m, int slot)
{
    tst_seq *s = &m->seq[slot];
    ck_assert(s->open);
    tst_ok(fkv_seq_close(m->c, s->id));
    /* Keep the slot (ids of closed sequences are used by some tests) but
     * drop its data. */
    {
        fkv_seq_id id = s->id;
        seq_free(m, s);
        s->id = id;
        s->open = 0;
    }
}

static void make_batch(tst_model *m, int nseq, const int *slots,
                       fkv_seq_id *ids)
{
    int i;
    for (i = 0; i < nseq; ++i)
        ids[i] = m->seq[slots[i]].id;
}

static void grow_rows(tst_model *m, tst_seq *s, int layer, int64_t need)
{
    size_t row = (size_t)m->KVH * m->D;
    if (need <= s->cap[layer])
        return;
    {
        int64_t cap = s->cap[layer] ? s->cap[layer] : 64;
        while (cap < need)
            cap *= 2;
        s->k[layer] = (float *)realloc(s->k[layer],
                                       sizeof(float) * row * (size_t)cap);
        s->v[layer] = (float *)realloc(s->v[layer],
                                       sizeof(float) * row * (size_t)cap);
        ck_assert(s->k[layer] && s->v[layer]);
        s->cap[layer] = cap;
    }
}

fkv_status tst_append(tst_model *m, int layer, int nseq, const int *slots,
                      const int *ntok, const float *k, const float *v)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    int32_t nt[TST_MAX_SEQS];
    fkv_batch b;
    int64_t total = 0;
    size_t row = (size_t)m->KVH * m->D;
    void *dk, *dv;
    fkv_status st;
    int i;
    ck_assert(nseq <= TST_MAX_SEQS);
    make_batch(m, nseq, slots, ids);
    for (i = 0; i < nseq; ++i) {
        nt[i] = ntok ? ntok[i] : 1;
        total += nt[i] > 0 ? nt[i] : 0;
    }
    dk = tst_dev_from_floats(m->dt, k, (size_t)total * row);
    dv = tst_dev_from_floats(m->dt, v, (size_t)total * row);
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = ntok ? nt : NULL;
    st = fkv_append(m->c, layer, &b, dk, dv);
    tst_dev_free(dk);
    tst_dev_free(dv);
    if (st != FKV_OK)
        return st;
    tst_model_add(m, layer, nseq, slots, ntok, k, v);
    return FKV_OK;
}

void tst_model_add(tst_model *m, int layer, int nseq, const int *slots,
                   const int *ntok, const float *k, const float *v)
{
    size_t row = (size_t)m->KVH * m->D;
    int64_t off = 0;
    int i;
    for (i = 0; i < nseq; ++i) {
        tst_seq *s = &m->seq[slots[i]];
        int n = ntok ? ntok[i] : 1;
        grow_rows(m, s, layer, s->len[layer] + n);
        memcpy(s->k[layer] + (size_t)s->len[layer] * row,
               k + (size_t)off * row, sizeof(float) * row * n);
        memcpy(s->v[layer] + (size_t)s->len[layer] * row,
               v + (size_t)off * row, sizeof(float) * row * n);
        s->len[layer] += n;
        off += n;
    }
}

void tst_append_rand(tst_model *m, int layer, int nseq, const int *slots,
                     const int *ntok)
{
    int64_t total = 0;
    size_t row = (size_t)m->KVH * m->D;
    float *k, *v;
    fkv_status st;
    int i;
    for (i = 0; i < nseq; ++i)
        total += ntok ? ntok[i] : 1;
    k = (float *)xcalloc((size_t)total * row, sizeof(float));
    v = (float *)xcalloc((size_t)total * row, sizeof(float));
    ref_random_tensor(&m->rng, (int)m->dt, k, (size_t)total * row, 1.0);
    ref_random_tensor(&m->rng, (int)m->dt, v, (size_t)total * row, 1.0);
    st = tst_append(m, layer, nseq, slots, ntok, k, v);
    free(k);
    free(v);
    if (st != FKV_OK) {
        char buf[512];
        fkv_last_error(m->c, buf, sizeof buf);
        ck_abort_msg("fkv_append(layer %d) returned %d (%s): %s", layer,
                     (int)st, fkv_status_string(st), buf);
    }
}

void tst_prefill(tst_model *m, int nseq, const int *slots, const int *ntok)
{
    int l;
    for (l = 0; l < m->L; ++l)
        tst_append_rand(m, l, nseq, slots, ntok);
}

fkv_status tst_attend_bytes(tst_model *m, int layer, int nseq,
                            const int *slots, const float *q, void *out)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    fkv_batch b;
    size_t n = (size_t)nseq * m->QH * m->D;
    size_t bytes = n * ref_dtype_bytes((int)m->dt);
    void *dq, *dout;
    fkv_status st;
    make_batch(m, nseq, slots, ids);
    dq = tst_dev_from_floats(m->dt, q, n);
    dout = tst_dev_alloc(bytes);
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    st = fkv_attend(m->c, layer, &b, dq, dout);
    if (st == FKV_OK)
        tst_dev_get(out, dout, bytes);
    tst_dev_free(dq);
    tst_dev_free(dout);
    return st;
}

fkv_status tst_attend_raw(tst_model *m, int layer, int nseq,
                          const int *slots, const float *q, float *out)
{
    size_t n = (size_t)nseq * m->QH * m->D;
    void *host = xcalloc(n, ref_dtype_bytes((int)m->dt));
    fkv_status st = tst_attend_bytes(m, layer, nseq, slots, q, host);
    if (st == FKV_OK)
        ref_decode((int)m->dt, host, out, n);
    free(host);
    return st;
}

/* ---------------------------------------------------------------------- */
/* Policy simulation                                                      */
/* ---------------------------------------------------------------------- */

int tst_ref_select(tst_model *m, int layer, int slot, const float *q_seq,
                   int kvh, int *pages, double *gap)
{
    tst_seq *s = &m->seq[slot];
    return ref_select(&m->lay, s->k[layer], s->len[layer], m->KVH, m->D, kvh,
                      q_seq + (size_t)kvh * m->G * m->D, m->G, m->scale,
                      m->o.group_score == FKV_GROUP_MEAN_SCORE
                          ? REF_GROUP_MEAN_SCORE
                          : REF_GROUP_MEAN_SOFTMAX,
                      pages, gap);
}

static int count_missing(const tst_sel *now, const tst_sel *before)
{
    int i, j, c = 0;
    for (i = 0; i < now->count; ++i) {
        int found = 0;
        if (before && before->valid)
            for (j = 0; j < before->count; ++j)
                if (before->pages[j] == now->pages[i])
                    found = 1;
        c += !found;
    }
    return c;
}

static void sel_copy(tst_model *m, tst_sel *dst, const tst_sel *src)
{
    dst->valid = src->valid;
    dst->count = src->count;
    memcpy(dst->pages, src->pages, sizeof(int) * (size_t)src->count);
    memcpy(dst->q, src->q, sizeof(float) * (size_t)m->G * m->D);
}

static void sel_make(tst_model *m, int layer, int slot, const float *q_seq,
                     int kvh, tst_sel *dst)
{
    dst->count = tst_ref_select(m, layer, slot, q_seq, kvh, dst->pages, NULL);
    memcpy(dst->q, q_seq + (size_t)kvh * m->G * m->D,
           sizeof(float) * (size_t)m->G * m->D);
    dst->valid = 1;
}

static int holds_candidates(const tst_sel *a, int first, int end)
{
    int p, i;
    for (p = first; p < end; ++p) {
        int found = 0;
        for (i = 0; i < a->count; ++i)
            if (a->pages[i] == p)
                found = 1;
        if (!found)
            return 0;
    }
    return 1;
}

void tst_ref_output(tst_model *m, int layer, int slot, const float *q_seq,
                    int *const *pages, const int *counts, double *out)
{
    tst_seq *s = &m->seq[slot];
    int64_t n = s->len[layer];
    unsigned char *mask = (unsigned char *)xcalloc((size_t)n, 1);
    int h;
    for (h = 0; h < m->QH; ++h) {
        int g = h / m->G;
        const unsigned char *mk = NULL;
        if (pages) {
            ref_attended_mask(&m->lay, n, pages[g], counts[g], mask);
            mk = mask;
        }
        ref_attention(s->k[layer], s->v[layer], n, m->KVH, m->D, g,
                      q_seq + (size_t)h * m->D, m->scale, mk,
                      out + (size_t)h * m->D);
    }
    free(mask);
}

void tst_ref_output_mask(tst_model *m, int layer, int slot,
                         const float *q_seq, const unsigned char *mask,
                         double *out)
{
    tst_seq *s = &m->seq[slot];
    int h;
    for (h = 0; h < m->QH; ++h)
        ref_attention(s->k[layer], s->v[layer], s->len[layer], m->KVH, m->D,
                      h / m->G, q_seq + (size_t)h * m->D, m->scale, mask,
                      out + (size_t)h * m->D);
}

/* The policy (layer) follows: FKV_POLICY_DENSE on a dense layer
 * (docs/api.md, fkv_options.dense_layers). */
static fkv_policy layer_policy(const tst_model *m, int layer)
{
    if (m->o.struct_size > offsetof(fkv_options, dense_layers) &&
        m->o.dense_layers && m->o.dense_layers[layer])
        return FKV_POLICY_DENSE;
    return m->o.policy;
}

void tst_sim_attend(tst_model *m, int layer, int nseq, const int *slots,
                    const float *q, double *ref_out)
{
    size_t qs = (size_t)m->QH * m->D;
    const fkv_policy policy = layer_policy(m, layer);
    int i, g;
    for (i = 0; i < nseq; ++i) {
        tst_seq *s = &m->seq[slots[i]];
        const float *qq = q + i * qs;
        int64_t n = s->len[layer];
        int first, end, nc = ref_candidates(&m->lay, n, &first, &end);
        int *pages[TST_MAX_KVH];
        int counts[TST_MAX_KVH];
        s->n_at_attend[layer] = n;
        s->ncand_at_attend[layer] = nc;
        for (g = 0; g < m->KVH; ++g) {
            tst_sel *used = &s->used[layer][g];
            tst_sel *act = &s->active[layer][g];
            switch (policy) {
            case FKV_POLICY_DENSE:
                used->valid = 0;
                used->count = 0;
                break;
            case FKV_POLICY_SYNC:
            case FKV_POLICY_RESIDENT: {
                tst_sel prev = *used; /* shares arrays: count first */
                int missing;
                int old_valid = used->valid, old_count = used->count;
                int old_pages[1024];
                ck_assert(old_count <= 1024);
                memcpy(old_pages, used->pages, sizeof(int) * old_count);
                sel_make(m, layer, slots[i], qq, g, used);
                prev.valid = old_valid;
                prev.count = old_count;
                prev.pages = old_pages;
                missing = count_missing(used, &prev);
                if (policy == FKV_POLICY_SYNC)
                    m->sim_recalled += (uint64_t)missing;
                break;
            }
            case FKV_POLICY_FREEKV:
            default: {
                const float *qg = qq + (size_t)g * m->G * m->D;
                int correct = 0;
                m->sim_checks++;
                if (!act->valid)
                    correct = 1;
                else if (ref_group_cosine(qg, act->q, m->G, m->D) <
                         (double)m->o.correction_threshold)
                    correct = 1;
                else if (nc <= m->lay.K && !holds_candidates(act, first, end))
                    correct = 1;
                if (correct) {
                    int old_valid = act->valid, old_count = act->count;
                    int old_pages[1024];
                    tst_sel prev = *act;
                    ck_assert(old_count <= 1024);
                    memcpy(old_pages, act->pages, sizeof(int) * old_count);
                    sel_make(m, layer, slots[i], qq, g, act);
                    prev.valid = old_valid;
                    prev.count = old_count;
                    prev.pages = old_pages;
                    m->sim_corrections++;
                    m->sim_recalled += (uint64_t)count_missing(act, &prev);
                }
                sel_copy(m, used, act);
                /* Select at attend: the next step's speculative set. */
                sel_make(m, layer, slots[i], qq, g, &s->pending[layer][g]);
                break;
            }
            }
            pages[g] = used->pages;
            counts[g] = used->count;
        }
        tst_ref_output(m, layer, slots[i], qq,
                       policy == FKV_POLICY_DENSE ? NULL : pages, counts,
                       ref_out + i * qs);
    }
}

void tst_assert_close_at(tst_model *m, const float *got, const double *want,
                         double tol, const char *what, const char *file,
                         int line)
{
    int h;
    for (h = 0; h < m->QH; ++h) {
        double e = ref_rel_err(got + (size_t)h * m->D, want + (size_t)h * m->D,
                               (size_t)m->D);
        ck_assert_msg(e <= tol,
                      "%s:%d: %s: q head %d: relative error %.3g > %.3g "
                      "(got[0] %.6g want[0] %.6g)",
                      file, line, what, h, e, tol, (double)got[h * m->D],
                      want[h * m->D]);
    }
}

int tst_selected(tst_model *m, int layer, int slot, int kvh, int *pages,
                 int cap)
{
    int32_t cnt = -1;
    int32_t *buf = (int32_t *)xcalloc((size_t)(cap > 0 ? cap : 1),
                                      sizeof(int32_t));
    fkv_status st = fkv_get_selected_pages(m->c, layer, m->seq[slot].id, kvh,
                                           buf, cap, &cnt);
    int i;
    ck_assert_msg(st == FKV_OK, "fkv_get_selected_pages returned %d (%s)",
                  (int)st, fkv_status_string(st));
    ck_assert_msg(cnt >= 0, "fkv_get_selected_pages: count %d", (int)cnt);
    for (i = 0; i < cap && i < cnt; ++i)
        pages[i] = buf[i];
    free(buf);
    return cnt;
}

static void format_pages(char *buf, size_t len, const int *p, int n)
{
    size_t o = 0;
    int i;
    buf[0] = '\0';
    for (i = 0; i < n && o + 16 < len; ++i)
        o += (size_t)snprintf(buf + o, len - o, "%s%d", i ? "," : "", p[i]);
}

void tst_check_selected(tst_model *m, int layer, int slot)
{
    tst_seq *s = &m->seq[slot];
    int64_t n = s->n_at_attend[layer];
    int nc = s->ncand_at_attend[layer];
    int g, i;
    int cap = 2048;
    int *got = (int *)xcalloc((size_t)cap, sizeof(int));
    char b1[512], b2[512];
    for (g = 0; g < m->KVH; ++g) {
        tst_sel *u = &s->used[layer][g];
        int cnt = tst_selected(m, layer, slot, g, got, cap);
        ck_assert(cnt <= cap);
        if (layer_policy(m, layer) == FKV_POLICY_DENSE) {
            ck_assert_msg(cnt == 0,
                          "layer %d seq slot %d kv head %d: %d selected "
                          "pages reported under FKV_POLICY_DENSE (or on a "
                          "dense layer)",
                          layer, slot, g, cnt);
            continue;
        }
        /* Every candidate attended (n <= budget or at most K candidates):
         * the report may be empty (the header's wording for a context
         * that fits the budget; checked on its own by
         * dense_report_all_within_budget) or list every candidate. */
        if ((n <= m->o.budget_tokens || nc <= m->lay.K) && cnt == 0)
            continue;
        format_pages(b1, sizeof b1, got, cnt);
        format_pages(b2, sizeof b2, u->pages, u->count);
        ck_assert_msg(cnt == u->count,
                      "layer %d seq slot %d kv head %d: %d pages [%s], "
                      "reference %d [%s]",
                      layer, slot, g, cnt, b1, u->count, b2);
        for (i = 0; i < cnt; ++i)
            ck_assert_msg(got[i] == u->pages[i],
                          "layer %d seq slot %d kv head %d: pages [%s], "
                          "reference [%s]",
                          layer, slot, g, b1, b2);
    }
    free(got);
}

void tst_attend_check(tst_model *m, int layer, int nseq, const int *slots,
                      const float *q, double tol)
{
    size_t qs = (size_t)m->QH * m->D;
    float *out = (float *)xcalloc((size_t)nseq * qs, sizeof(float));
    double *ref = (double *)xcalloc((size_t)nseq * qs, sizeof(double));
    fkv_status st = tst_attend_raw(m, layer, nseq, slots, q, out);
    int i;
    if (st != FKV_OK) {
        char buf[512];
        fkv_last_error(m->c, buf, sizeof buf);
        ck_abort_msg("fkv_attend(layer %d) returned %d (%s): %s", layer,
                     (int)st, fkv_status_string(st), buf);
    }
    tst_sim_attend(m, layer, nseq, slots, q, ref);
    for (i = 0; i < nseq; ++i) {
        char what[128];
        snprintf(what, sizeof what, "attend layer %d, batch entry %d (n %lld)",
                 layer, i, (long long)m->seq[slots[i]].len[layer]);
        tst_assert_close(m, out + i * qs, ref + i * qs, tol, what);
        tst_check_selected(m, layer, slots[i]);
    }
    free(out);
    free(ref);
}

void tst_select(tst_model *m, int layer, int nseq, const int *slots,
                const float *q)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    fkv_batch b;
    size_t qs = (size_t)m->QH * m->D;
    void *dq = q ? tst_dev_from_floats(m->dt, q, (size_t)nseq * qs) : NULL;
    fkv_status st;
    int i, g;
    make_batch(m, nseq, slots, ids);
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    st = fkv_select(m->c, layer, &b, dq);
    if (dq)
        tst_dev_free(dq);
    ck_assert_msg(st == FKV_OK, "fkv_select(q %s) returned %d (%s)",
                  q ? "given" : "NULL", (int)st, fkv_status_string(st));
    /* q NULL keeps the attend's selection: the simulation's pending sets,
     * made at attend. */
    if (layer_policy(m, layer) != FKV_POLICY_FREEKV || !q)
        return;
    for (i = 0; i < nseq; ++i)
        for (g = 0; g < m->KVH; ++g)
            sel_make(m, layer, slots[i], q + i * qs, g,
                     &m->seq[slots[i]].pending[layer][g]);
}

void tst_recall(tst_model *m, int layer, int nseq, const int *slots)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    fkv_batch b;
    fkv_status st;
    int i, g;
    make_batch(m, nseq, slots, ids);
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    st = fkv_recall(m->c, layer, &b);
    ck_assert_msg(st == FKV_OK, "fkv_recall returned %d (%s)", (int)st,
                  fkv_status_string(st));
    if (layer_policy(m, layer) != FKV_POLICY_FREEKV)
        return;
    for (i = 0; i < nseq; ++i)
        for (g = 0; g < m->KVH; ++g) {
            tst_seq *s = &m->seq[slots[i]];
            if (!s->pending[layer][g].valid)
                continue;
            m->sim_recalled += (uint64_t)count_missing(
                &s->pending[layer][g], &s->active[layer][g]);
            sel_copy(m, &s->active[layer][g], &s->pending[layer][g]);
        }
}

void tst_decode_step(tst_model *m, int nseq, const int *slots, const float *q,
                     double tol)
{
    size_t per_layer = (size_t)nseq * m->QH * m->D;
    int l;
    for (l = 0; l < m->L; ++l) {
        tst_append_rand(m, l, nseq, slots, NULL);
        tst_attend_check(m, l, nseq, slots, q + l * per_layer, tol);
        tst_select(m, l, nseq, slots, q + l * per_layer);
        tst_recall(m, l, nseq, slots);
    }
}

/* ---------------------------------------------------------------------- */
/* Queries                                                                */
/* ---------------------------------------------------------------------- */

void tst_rand_query(tst_model *m, int nseq, float *q)
{
    ref_random_tensor(&m->rng, (int)m->dt, q, (size_t)nseq * m->QH * m->D,
                      1.0);
}

double tst_query_gap(tst_model *m, int layer, int nseq, const int *slots,
                     const float *q)
{
    size_t qs = (size_t)m->QH * m->D;
    double best = INFINITY;
    int *pages = (int *)xcalloc((size_t)(m->lay.K > 0 ? m->lay.K : 1),
                                sizeof(int));
    int i, g;
    for (i = 0; i < nseq; ++i)
        for (g = 0; g < m->KVH; ++g) {
            double gap;
            tst_ref_select(m, layer, slots[i], q + i * qs, g, pages, &gap);
            if (gap < best)
                best = gap;
        }
    free(pages);
    return best;
}

void tst_good_query(tst_model *m, int layer, int nseq, const int *slots,
                    float *q)
{
    int tries;
    for (tries = 0; tries < 200; ++tries) {
        tst_rand_query(m, nseq, q);
        if (tst_query_gap(m, layer, nseq, slots, q) >= TST_MIN_GAP)
            return;
    }
    ck_abort_msg("could not draw a query with a well separated top-K");
}

void tst_perturb(tst_model *m, const float *q_in, float *q_out, size_t n,
                 double noise)
{
    size_t i;
    for (i = 0; i < n; ++i)
        q_out[i] = ref_round((double)q_in[i] + noise * ref_rng_normal(&m->rng),
                             (int)m->dt);
}

void tst_next_query(tst_model *m, int layer, int nseq, const int *slots,
                    const float *prev, float *q)
{
    static const double alphas[4] = {0.15, 0.5, 1.0, 3.0};
    size_t qs = (size_t)m->QH * m->D, gs = (size_t)m->G * m->D;
    int tries, i, g;
    for (tries = 0; tries < 300; ++tries) {
        int ok = 1;
        if (!prev) {
            tst_rand_query(m, nseq, q);
        } else {
            for (i = 0; i < nseq; ++i)
                for (g = 0; g < m->KVH; ++g)
                    tst_perturb(m, prev + i * qs + g * gs,
                                q + i * qs + g * gs, gs,
                                alphas[ref_rng_below(&m->rng, 4)]);
        }
        if (layer_policy(m, layer) == FKV_POLICY_FREEKV)
            for (i = 0; i < nseq; ++i)
                for (g = 0; g < m->KVH; ++g) {
                    tst_sel *a = &m->seq[slots[i]].active[layer][g];
                    double c;
                    if (!a->valid)
                        continue;
                    c = ref_group_cosine(q + i * qs + g * gs, a->q, m->G,
                                         m->D);
                    if (fabs(c - (double)m->o.correction_threshold) <
                        TST_MIN_COS_MARGIN)
                        ok = 0;
                }
        if (ok && tst_query_gap(m, layer, nseq, slots, q) >= TST_MIN_GAP)
            return;
    }
    ck_abort_msg("could not draw a usable query");
}

void tst_stats(tst_model *m, fkv_stats *st)
{
    memset(st, 0, sizeof *st);
    st->struct_size = sizeof *st;
    tst_ok(fkv_get_stats(m->c, st));
}

/* ---------------------------------------------------------------------- */
/* Snapshots                                                              */
/* ---------------------------------------------------------------------- */

void tst_snapshot_take(tst_model *m, tst_snapshot *s)
{
    ref_rng r;
    size_t qn = (size_t)m->QH * m->D;
    int i, l;
    memset(s, 0, sizeof *s);
    s->row_bytes = qn * ref_dtype_bytes((int)m->dt);
    s->q = (float *)xcalloc(qn, sizeof(float));
    ref_rng_seed(&r, 0x5eed);
    ref_random_tensor(&r, (int)m->dt, s->q, qn, 1.0);
    for (i = 0; i < m->nslots; ++i) {
        int ok = m->seq[i].open;
        for (l = 0; l < m->L && ok; ++l)
            ok = m->seq[i].len[l] > 0;
        if (ok)
            s->slots[s->n++] = i;
    }
    s->out = (unsigned char *)xcalloc((size_t)s->n * m->L, s->row_bytes);
    for (i = 0; i < s->n; ++i) {
        int64_t len = -1;
        tst_ok(fkv_seq_length(m->c, m->seq[s->slots[i]].id, &len));
        s->len[i] = len;
        for (l = 0; l < m->L; ++l)
            tst_ok(tst_attend_bytes(m, l, 1, &s->slots[i], s->q,
                                    s->out + ((size_t)i * m->L + l) *
                                                 s->row_bytes));
    }
}

void tst_snapshot_check_at(tst_model *m, tst_snapshot *s, const char *file,
                           int line)
{
    unsigned char *buf = (unsigned char *)xcalloc(1, s->row_bytes);
    int i, l;
    for (i = 0; i < s->n; ++i) {
        int64_t len = -1;
        fkv_status st = fkv_seq_length(m->c, m->seq[s->slots[i]].id, &len);
        ck_assert_msg(st == FKV_OK, "%s:%d: fkv_seq_length returned %d", file,
                      line, (int)st);
        ck_assert_msg(len == s->len[i],
                      "%s:%d: sequence length changed by a failed call: "
                      "%lld, was %lld",
                      file, line, (long long)len, (long long)s->len[i]);
        for (l = 0; l < m->L; ++l) {
            st = tst_attend_bytes(m, l, 1, &s->slots[i], s->q, buf);
            ck_assert_msg(st == FKV_OK, "%s:%d: attend after a failed call "
                          "returned %d", file, line, (int)st);
            ck_assert_msg(memcmp(buf, s->out + ((size_t)i * m->L + l) *
                                                   s->row_bytes,
                                 s->row_bytes) == 0,
                          "%s:%d: attend output (sequence slot %d, layer %d) "
                          "changed after a failed call",
                          file, line, s->slots[i], l);
        }
    }
    free(buf);
}

void tst_snapshot_free(tst_snapshot *s)
{
    free(s->out);
    free(s->q);
    s->out = NULL;
    s->q = NULL;
}

int tst_fork(tst_model *m, int parent)
{
    tst_seq *p = &m->seq[parent], *s;
    size_t row = (size_t)m->KVH * m->D;
    int l, g;
    fkv_status st;
    ck_assert_msg(m->nslots < TST_MAX_SEQS, "too many test sequences");
    s = &m->seq[m->nslots];
    memset(s, 0, sizeof *s);
    st = fkv_seq_fork(m->c, p->id, &s->id);
    ck_assert_msg(st == FKV_OK, "fkv_seq_fork returned %d (%s)", (int)st,
                  fkv_status_string(st));
    s->open = 1;
    for (l = 0; l < m->L; ++l) {
        grow_rows(m, s, l, p->len[l] > 0 ? p->len[l] : 1);
        memcpy(s->k[l], p->k[l], sizeof(float) * row * (size_t)p->len[l]);
        memcpy(s->v[l], p->v[l], sizeof(float) * row * (size_t)p->len[l]);
        s->len[l] = p->len[l];
        for (g = 0; g < m->KVH; ++g) { /* no selection yet */
            sel_alloc(m, &s->active[l][g]);
            sel_alloc(m, &s->pending[l][g]);
            sel_alloc(m, &s->used[l][g]);
        }
    }
    return m->nslots++;
}

void tst_decode_steps(tst_model *m, int nseq, const int *slots, int n)
{
    size_t pl = (size_t)nseq * m->QH * m->D;
    float *q = (float *)calloc(pl * m->L, sizeof(float));
    float *prev = (float *)calloc(pl * m->L, sizeof(float));
    int t, l;
    ck_assert_msg(q && prev, "tst_decode_steps: out of memory");
    for (t = 0; t < n; ++t) {
        for (l = 0; l < m->L; ++l) {
            tst_append_rand(m, l, nseq, slots, NULL);
            tst_next_query(m, l, nseq, slots, t ? prev + l * pl : NULL,
                           q + l * pl);
            tst_attend_check(m, l, nseq, slots, q + l * pl, tst_tol(m->dt));
            tst_select(m, l, nseq, slots, q + l * pl);
            tst_recall(m, l, nseq, slots);
        }
        memcpy(prev, q, sizeof(float) * pl * m->L);
    }
    free(q);
    free(prev);
}

void tst_model_truncate(tst_model *m, int slot, int64_t length)
{
    tst_seq *s = &m->seq[slot];
    int l, g;
    for (l = 0; l < m->L; ++l) {
        s->len[l] = length;
        for (g = 0; g < m->KVH; ++g) {
            s->active[l][g].valid = 0;
            s->pending[l][g].valid = 0;
            s->used[l][g].valid = 0;
            s->used[l][g].count = 0;
        }
    }
}
