/*
 * Issue 12: the host allocator (fkv_options.host_alloc / host_free) and
 * fault injection. A script of calls (create, open, reserve, prefill and
 * decode appends, attend, select, recall, close, destroy) runs on every
 * policy; for each call, every host allocation it makes is failed in turn
 * (and, on the CUDA backend, every cudaMalloc / cudaHostAlloc through the
 * library's test-only counter). Each failure must give
 * FKV_ERR_OUT_OF_MEMORY, leave a cache that matches a twin that never saw
 * the call (lengths, selected pages, memory figures, the outputs of a
 * following attend) and leak nothing (the allocator counts live bytes).
 *
 * SPDX-License-Identifier: MIT
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests.h"

/* libfreekv.a's hidden test hooks (lib/memory.c, lib/cache.c). */
extern int64_t fkvi_device_fault_countdown;
extern uint64_t fkvi_device_alloc_calls;
fkv_status fkvi_debug_audit(fkv_cache *c);

/* The resident-slot audit (both backends). */
static void ft_audit(fkv_cache *c)
{
    fkv_status st = fkvi_debug_audit(c);
    char msg[512];
    fkv_last_error(c, msg, sizeof msg);
    ck_assert_msg(st == FKV_OK, "audit: %d: %s", (int)st, msg);
}

/* ---- a counting allocator that fails where it is told ------------------ */

typedef struct fault_alloc {
    int64_t live_bytes, live_blocks;
    int64_t calls;
    int64_t fail_at; /* call index to fail; -1: none */
    int64_t failures;
    int bad_free;    /* host_free given a size other than the block's */
    size_t watch_size; /* remember the last block of this size */
    void *watched;
} fault_alloc;

static fault_alloc g_fa;

typedef struct fa_header {
    void *raw;
    size_t size;
    uint64_t magic;
} fa_header;

#define FA_MAGIC 0x66617573656d656dULL

static void *fa_alloc(void *user, size_t size, size_t alignment)
{
    fault_alloc *f = (fault_alloc *)user;
    int64_t i = f->calls++;
    if (i == f->fail_at) {
        f->failures++;
        return NULL;
    }
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)))
        return NULL; /* the library must ask for a power of two */
    size_t pad = sizeof(fa_header) + alignment;
    unsigned char *raw = (unsigned char *)malloc(size + pad);
    if (!raw)
        return NULL;
    uintptr_t at = ((uintptr_t)raw + sizeof(fa_header) + alignment - 1) &
                   ~(uintptr_t)(alignment - 1);
    fa_header h = {raw, size, FA_MAGIC};
    memcpy((unsigned char *)at - sizeof h, &h, sizeof h);
    f->live_bytes += (int64_t)size;
    f->live_blocks++;
    if (size == f->watch_size)
        f->watched = (void *)at;
    return (void *)at;
}

static void fa_free(void *user, void *ptr, size_t size)
{
    fault_alloc *f = (fault_alloc *)user;
    if (!ptr)
        return;
    fa_header h;
    memcpy(&h, (unsigned char *)ptr - sizeof h, sizeof h);
    if (h.magic != FA_MAGIC || h.size != size)
        f->bad_free++;
    f->live_bytes -= (int64_t)h.size;
    f->live_blocks--;
    free(h.raw);
}

/* ---- the script ----------------------------------------------------------- */

enum {
    FT_L = 2, FT_QH = 4, FT_KVH = 2, FT_D = 64, FT_P = 16,
    FT_PREFILL = 300, /* 19 pages: several pool chunks (see ft_options) */
    FT_MAXTOK = 512
};

typedef struct ft_run {
    fkv_cache *c;
    fkv_seq_id a, b;
    int a_open, b_open;
    int64_t len_a, len_b;
} ft_run;

/* 1: the last layer is dense (fkv_options.dense_layers), so that the
 * copy of the flags and, on CUDA, the per-layer layouts are failed too. */
static int g_ft_dense_layer;
static const uint8_t k_ft_dense[FT_L] = {0, 1};

static void ft_options(fkv_options *o, fkv_policy policy)
{
    tst_options(o, FT_L, FT_QH, FT_KVH, FT_D, FKV_DTYPE_F32);
    if (g_ft_dense_layer)
        o->dense_layers = k_ft_dense;
    tst_geometry(o, FT_P, 16, 32, 96); /* K = 3 */
    o->policy = policy;
    o->max_sequences = 2;
    o->max_tokens_per_sequence = FT_MAXTOK;
    /* Chunks of 11 blocks (a quarter of the limit): after the reserve (5
     * pages per layer) leaves 1 block free, the prefill of layer 0 needs 14
     * more and grows the pool by two chunks. 44 blocks hold the script. */
    size_t block = 2 * (size_t)FT_P * FT_D * sizeof(float) * FT_KVH;
    o->host_pool_bytes = 44 * block;
    o->host_alloc = fa_alloc;
    o->host_free = fa_free;
    o->alloc_user = &g_fa;
}

/* Deterministic values in [-1, 1), independent of the library. */
static void ft_fill(float *x, size_t n, uint64_t seed)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 12345;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        x[i] = (float)((double)(s >> 40) / (double)(1 << 23) - 1.0);
    }
}

static void *ft_dev(const float *x, size_t n)
{
    return tst_dev_from_floats(FKV_DTYPE_F32, x, n);
}

static fkv_status ft_append(ft_run *r, int layer, int which, int tokens,
                            uint64_t seed)
{
    size_t n = (size_t)tokens * FT_KVH * FT_D;
    float *k = (float *)malloc(n * sizeof *k), *v = (float *)malloc(n * sizeof *v);
    ck_assert(k && v);
    ft_fill(k, n, seed);
    ft_fill(v, n, seed + 1);
    void *dk = ft_dev(k, n), *dv = ft_dev(v, n);
    int32_t nt = tokens;
    fkv_seq_id id = which ? r->b : r->a;
    fkv_batch b = {1, 0, &id, &nt};
    fkv_status st = fkv_append(r->c, layer, &b, dk, dv);
    tst_dev_free(dk);
    tst_dev_free(dv);
    free(k);
    free(v);
    return st;
}

static fkv_status ft_attend(ft_run *r, int layer, uint64_t seed, float *out)
{
    size_t n = (size_t)FT_QH * FT_D;
    float q[FT_QH * FT_D];
    ft_fill(q, n, seed);
    void *dq = ft_dev(q, n), *dout = tst_dev_alloc(n * sizeof(float));
    fkv_batch b = {1, 0, &r->a, NULL};
    fkv_status st = fkv_attend(r->c, layer, &b, dq, dout);
    if (st == FKV_OK && out)
        tst_dev_get(out, dout, n * sizeof(float));
    tst_dev_free(dq);
    tst_dev_free(dout);
    return st;
}

static fkv_status ft_select(ft_run *r, int layer, uint64_t seed)
{
    size_t n = (size_t)FT_QH * FT_D;
    float q[FT_QH * FT_D];
    ft_fill(q, n, seed);
    void *dq = ft_dev(q, n);
    fkv_batch b = {1, 0, &r->a, NULL};
    fkv_status st = fkv_select(r->c, layer, &b, dq);
    tst_dev_free(dq);
    return st;
}

static const char *const k_calls[] = {
    "fkv_create", "fkv_seq_open", "fkv_seq_reserve", "prefill append L0",
    "prefill append L1", "attend L0", "select L0", "recall L0", "attend L1",
    "select L1", "recall L1", "decode append L0", "decode append L1",
    "attend L0 (2)", "select L0 (2)", "recall L0 (2)", "fkv_seq_open (b)",
    "append b", "fkv_seq_close (b)", "fkv_destroy"};
enum { FT_NCALLS = sizeof k_calls / sizeof k_calls[0] };

/* Call t of the script. */
static fkv_status ft_call(ft_run *r, const fkv_options *o, int t)
{
    fkv_batch ba = {1, 0, &r->a, NULL};
    fkv_status st = FKV_OK;
    switch (t) {
    case 0: return fkv_create(o, &r->c);
    case 1:
        st = fkv_seq_open(r->c, &r->a);
        r->a_open = st == FKV_OK;
        return st;
    case 2: return fkv_seq_reserve(r->c, r->a, 80);
    case 3: case 4:
        return ft_append(r, t - 3, 0, FT_PREFILL, 100 + t);
    case 5: case 8: case 13: return ft_attend(r, t == 8, 200 + t, NULL);
    case 6: case 9: case 14: return ft_select(r, t == 9, 200 + t);
    case 7: case 10: case 15: return fkv_recall(r->c, t == 10, &ba);
    case 11: case 12: return ft_append(r, t - 11, 0, 1, 300 + t);
    case 16:
        st = fkv_seq_open(r->c, &r->b);
        r->b_open = st == FKV_OK;
        return st;
    case 17: return ft_append(r, 0, 1, 50, 400);
    case 18:
        st = fkv_seq_close(r->c, r->b);
        if (st == FKV_OK)
            r->b_open = 0;
        return st;
    case 19:
        fkv_destroy(r->c);
        r->c = NULL;
        return FKV_OK;
    }
    return FKV_ERR_INTERNAL;
}

static void ft_prefix(ft_run *r, const fkv_options *o, int t)
{
    memset(r, 0, sizeof *r);
    for (int i = 0; i < t; i++) {
        fkv_status st = ft_call(r, o, i);
        ck_assert_msg(st == FKV_OK, "script call %s failed: %d", k_calls[i],
                      (int)st);
    }
}

/* Everything observable of the two caches agrees. */
static void ft_compare(ft_run *x, ft_run *y, const char *what)
{
    fkv_stats sx, sy;
    sx.struct_size = sy.struct_size = sizeof sx;
    tst_ok(fkv_get_stats(x->c, &sx));
    tst_ok(fkv_get_stats(y->c, &sy));
    ck_assert_msg(sx.host_bytes == sy.host_bytes,
                  "%s: host_bytes %llu, twin %llu", what,
                  (unsigned long long)sx.host_bytes,
                  (unsigned long long)sy.host_bytes);
    ck_assert_msg(sx.device_bytes == sy.device_bytes,
                  "%s: device_bytes %llu, twin %llu", what,
                  (unsigned long long)sx.device_bytes,
                  (unsigned long long)sy.device_bytes);
    ck_assert_msg(x->a_open == y->a_open && x->b_open == y->b_open,
                  "%s: open sequences differ", what);
    if (!x->a_open)
        return;
    int64_t lx, ly;
    tst_ok(fkv_seq_length(x->c, x->a, &lx));
    tst_ok(fkv_seq_length(y->c, y->a, &ly));
    ck_assert_msg(lx == ly, "%s: length %lld, twin %lld", what,
                  (long long)lx, (long long)ly);
    for (int round = 0; round < 2; round++) {
        for (int l = 0; l < FT_L; l++) {
            for (int h = 0; h < FT_KVH; h++) {
                int32_t px[64], py[64], nx = 0, ny = 0;
                tst_ok(fkv_get_selected_pages(x->c, l, x->a, h, px, 64, &nx));
                tst_ok(fkv_get_selected_pages(y->c, l, y->a, h, py, 64, &ny));
                ck_assert_msg(nx == ny && !memcmp(px, py, nx * sizeof *px),
                              "%s: selected pages of layer %d head %d differ",
                              what, l, h);
            }
        }
        if (round == 1 || lx == 0)
            break;
        /* A following attend gives the same outputs on both. */
        for (int l = 0; l < FT_L; l++) {
            float ox[FT_QH * FT_D], oy[FT_QH * FT_D];
            tst_ok(ft_attend(x, l, 999, ox));
            tst_ok(ft_attend(y, l, 999, oy));
            ck_assert_msg(!memcmp(ox, oy, sizeof ox),
                          "%s: attend outputs of layer %d differ", what, l);
        }
        ft_audit(x->c);
        ft_audit(y->c);
    }
}

static void ft_end(ft_run *r)
{
    fkv_destroy(r->c);
    r->c = NULL;
}

/* Fails, for call t, allocation j (host: the test allocator; device: the
 * library's counter) and checks the outcome against a twin. */
static void ft_one(const fkv_options *o, int t, int64_t j, int device)
{
    char what[160];
    snprintf(what, sizeof what, "policy %d, %s, %s allocation %lld",
             (int)o->policy, k_calls[t], device ? "device" : "host",
             (long long)j);
    ft_run x, y;
    ft_prefix(&x, o, t);
    ft_prefix(&y, o, t);
    g_fa.failures = 0;
    if (device)
        fkvi_device_fault_countdown = j + 1;
    else
        g_fa.fail_at = g_fa.calls + j;
    fkv_status st = ft_call(&x, o, t);
    g_fa.fail_at = -1;
    fkvi_device_fault_countdown = 0;
    ck_assert_msg(device || g_fa.failures == 1, "%s: not reached", what);
    ck_assert_msg(st == FKV_ERR_OUT_OF_MEMORY, "%s: status %d (%s)", what,
                  (int)st, fkv_status_string(st));
    char msg[512];
    ck_assert_msg(fkv_last_error(t == 0 ? NULL : x.c, msg, sizeof msg) > 0,
                  "%s: no message", what);
    if (t == 0)
        ck_assert_msg(x.c == NULL, "%s: a handle after a failed create", what);
    else
        ft_compare(&x, &y, what);
    ft_end(&x);
    ft_end(&y);
    ck_assert_msg(g_fa.live_bytes == 0 && g_fa.live_blocks == 0,
                  "%s: %lld bytes in %lld blocks leaked", what,
                  (long long)g_fa.live_bytes, (long long)g_fa.live_blocks);
    ck_assert_msg(!g_fa.bad_free, "%s: host_free got a wrong size", what);
}

static void ft_policy(fkv_policy policy)
{
    fkv_options o;
    ft_options(&o, policy);
    memset(&g_fa, 0, sizeof g_fa);
    g_fa.fail_at = -1;
    int64_t total = 0;
    for (int t = 0; t < FT_NCALLS; t++) {
        /* Count the call's allocations on a run where nothing fails. */
        ft_run r;
        ft_prefix(&r, &o, t);
        int64_t host0 = g_fa.calls;
        uint64_t dev0 = fkvi_device_alloc_calls;
        tst_ok(ft_call(&r, &o, t));
        int64_t nh = g_fa.calls - host0;
        int64_t nd = (int64_t)(fkvi_device_alloc_calls - dev0);
        if (t > 0 && t < FT_NCALLS - 1 && r.a_open && t >= 4) {
            ft_audit(r.c);
        }
        ft_end(&r);
        ck_assert_int_eq(g_fa.live_bytes, 0);
        if (t == FT_NCALLS - 1 || (t >= 5 && t <= 15 && t != 11 && t != 12))
            /* Destroy and the decode path allocate nothing. */
            ck_assert_msg(nh == 0, "policy %d: %s made %lld host "
                          "allocations", (int)policy, k_calls[t],
                          (long long)nh);
        for (int64_t j = 0; j < nh; j++)
            ft_one(&o, t, j, 0);
        for (int64_t j = 0; j < nd; j++)
            ft_one(&o, t, j, 1);
        total += nh + nd;
    }
    ck_assert_msg(total > 20, "only %lld allocations seen", (long long)total);
}

START_TEST(ft_faults_freekv) { ft_policy(FKV_POLICY_FREEKV); }
END_TEST
START_TEST(ft_faults_sync) { ft_policy(FKV_POLICY_SYNC); }
END_TEST
START_TEST(ft_faults_resident) { ft_policy(FKV_POLICY_RESIDENT); }
END_TEST
START_TEST(ft_faults_dense) { ft_policy(FKV_POLICY_DENSE); }
END_TEST
START_TEST(ft_faults_dense_layer)
{
    g_ft_dense_layer = 1;
    ft_policy(FKV_POLICY_FREEKV);
    g_ft_dense_layer = 0;
}
END_TEST

/* Every host allocation goes through the allocator: with it, the live
 * bytes are 0 after destroy and positive while the cache lives; with
 * malloc failing from the start, fkv_create fails without a handle. */
START_TEST(ft_allocator_used)
{
    fkv_options o;
    ft_options(&o, FKV_POLICY_FREEKV);
    memset(&g_fa, 0, sizeof g_fa);
    g_fa.fail_at = 0;
    fkv_cache *c = (fkv_cache *)1;
    tst_expect_error(NULL, fkv_create(&o, &c), FKV_ERR_OUT_OF_MEMORY,
                     "fkv_create with a failing allocator");
    ck_assert_ptr_null(c);
    ck_assert_int_eq(g_fa.live_bytes, 0);
    g_fa.fail_at = -1;
    tst_ok(fkv_create(&o, &c));
    ck_assert_int_gt(g_fa.live_bytes, 0);
    fkv_destroy(c);
    ck_assert_int_eq(g_fa.live_bytes, 0);
    ck_assert_int_eq(g_fa.bad_free, 0);
    /* One without the other is an error that names the fields. */
    o.host_free = NULL;
    tst_expect_error(NULL, fkv_create(&o, &c), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_create(host_alloc without host_free)");
    char msg[256];
    fkv_last_error(NULL, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "host_free") != NULL, "message: %s", msg);
}
END_TEST

/* Defect 2: a multi-chunk pool growth that fails on its second chunk
 * leaves host_bytes as they were (the first chunk is given back). */
START_TEST(ft_append_gives_back_chunks)
{
    fkv_options o;
    ft_options(&o, FKV_POLICY_FREEKV);
    memset(&g_fa, 0, sizeof g_fa);
    g_fa.fail_at = -1;
    ft_run x, y;
    ft_prefix(&x, &o, 3);
    ft_prefix(&y, &o, 3);
    fkv_stats s0, s1;
    s0.struct_size = s1.struct_size = sizeof s0;
    tst_ok(fkv_get_stats(x.c, &s0));
    /* The prefill grows the pool by two chunks (ft_options); its last
     * allocation is the second chunk. Count, then fail exactly that one. */
    ft_run z;
    ft_prefix(&z, &o, 3);
    int64_t before = g_fa.calls;
    tst_ok(ft_call(&z, &o, 3));
    int64_t n = g_fa.calls - before;
    fkv_stats sz;
    sz.struct_size = sizeof sz;
    tst_ok(fkv_get_stats(z.c, &sz));
    ck_assert_msg(sz.host_bytes > s0.host_bytes, "the prefill did not grow");
    ft_end(&z);
    ck_assert_int_ge(n, 2);
    g_fa.fail_at = g_fa.calls + n - 1;
    tst_expect_error(x.c, ft_call(&x, &o, 3), FKV_ERR_OUT_OF_MEMORY,
                     "prefill with the last chunk failing");
    g_fa.fail_at = -1;
    tst_ok(fkv_get_stats(x.c, &s1));
    ck_assert_msg(s1.host_bytes == s0.host_bytes,
                  "host_bytes %llu after the failed append, %llu before",
                  (unsigned long long)s1.host_bytes,
                  (unsigned long long)s0.host_bytes);
    ft_compare(&x, &y, "failed multi-chunk append");
    /* And the same append succeeds afterwards. */
    tst_ok(ft_call(&x, &o, 3));
    ft_end(&x);
    ft_end(&y);
    ck_assert_int_eq(g_fa.live_bytes, 0);
}
END_TEST

/* The resident-slot audit after many FREEKV steps with speculation,
 * correction and recall in flight (on the CUDA backend the steps are
 * asynchronous; the audit waits). Drifting queries make some heads
 * correct and others use speculative pages; the audit runs after every
 * step, between attend and recall and after recall. On CUDA the attend's
 * split kernel reads corrected units from the pool and writes them back to
 * their slots, so the audit between attend and recall checks that write:
 * per shape, f32 (the CUDA-core engine), bf16 with head_dim 128 (the
 * tensor-core engine) and f16 with a GQA group of 16 (two blocks per KV
 * head, of which only the first writes). */
static const struct {
    int q_heads, kv_heads, head_dim;
    fkv_dtype dtype;
} ft_audit_shapes[] = {
    {8, 2, 64, FKV_DTYPE_F32},
    {8, 2, 128, FKV_DTYPE_BF16},
    {32, 2, 64, FKV_DTYPE_F16},
};

START_TEST(ft_audit_after_steps)
{
    fkv_options o;
    tst_options(&o, 2, ft_audit_shapes[_i].q_heads, ft_audit_shapes[_i].kv_heads,
                ft_audit_shapes[_i].head_dim, ft_audit_shapes[_i].dtype);
    tst_model m;
    tst_model_init(&m, &o, 77);
    int slots[2] = {tst_open(&m), tst_open(&m)};
    int n[2] = {700, 1030};
    tst_prefill(&m, 2, slots, n);
    enum { QMAX = 2 * 32 * 128 };
    static float q[2][QMAX], prev[2][QMAX];
    for (int l = 0; l < 2; l++)
        tst_next_query(&m, l, 2, slots, NULL, q[l]);
    for (int step = 0; step < 24; step++) {
        for (int l = 0; l < 2; l++) {
            tst_append_rand(&m, l, 2, slots, NULL);
            tst_attend_check(&m, l, 2, slots, q[l], tst_tol(o.dtype));
            tst_select(&m, l, 2, slots, q[l]);
            ft_audit(m.c);
            tst_recall(&m, l, 2, slots);
        }
        ft_audit(m.c);
        memcpy(prev, q, sizeof q);
        for (int l = 0; l < 2; l++)
            tst_next_query(&m, l, 2, slots, prev[l], q[l]);
    }
    fkv_stats st;
    tst_stats(&m, &st);
    ck_assert_uint_gt(st.pages_recalled, 0);
    ck_assert_uint_gt(st.pages_recalled_critical, 0);
    ck_assert_uint_gt(st.corrections, 2 * 2 * 2); /* beyond the first step */
    ck_assert_uint_lt(st.corrections, st.heads_checked);
    tst_model_free(&m);
}
END_TEST

/* The audit can fail: a slot that no longer holds its page is found. */
START_TEST(ft_audit_finds_corruption)
{
    if (g_test_backend != FKV_BACKEND_CPU)
        return; /* needs to write the CPU backend's slots directly */
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.host_alloc = fa_alloc;
    o.host_free = fa_free;
    o.alloc_user = &g_fa;
    memset(&g_fa, 0, sizeof g_fa);
    g_fa.fail_at = -1;
    /* The recall slots of one (sequence, layer): K * KVH units of
     * 2 * P * D floats, plus the library's 16-byte header. */
    g_fa.watch_size = 10 * 2 * (2 * 16 * 64 * sizeof(float)) + 16;
    tst_model m;
    tst_model_init(&m, &o, 5);
    int s = tst_open(&m);
    int n = 1000;
    tst_prefill(&m, 1, &s, &n);
    float q[4 * 64];
    tst_good_query(&m, 0, 1, &s, q);
    tst_attend_check(&m, 0, 1, &s, q, tst_tol(FKV_DTYPE_F32));
    tst_ok(fkvi_debug_audit(m.c));
    ck_assert_ptr_nonnull(g_fa.watched);
    /* 56 candidates, K = 10: every slot holds a page. Change one byte of
     * slot 0 of KV head 0 (after the allocation's 16-byte size header). */
    ((unsigned char *)g_fa.watched)[16 + 5] ^= 0x40;
    ck_assert_int_eq(fkvi_debug_audit(m.c), FKV_ERR_INTERNAL);
    char msg[512];
    fkv_last_error(m.c, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "slot 0 differs") != NULL, "message: %s", msg);
    ((unsigned char *)g_fa.watched)[16 + 5] ^= 0x40;
    tst_ok(fkvi_debug_audit(m.c));
    tst_model_free(&m);
}
END_TEST

Suite *suite_faults(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "faults"));
    TCase *tc = tst_tcase(s, "allocator");
    tcase_add_test(tc, ft_allocator_used);
    tcase_add_test(tc, ft_append_gives_back_chunks);
    tc = tst_tcase(s, "audit");
    tcase_add_loop_test(tc, ft_audit_after_steps, 0,
                        (int)(sizeof ft_audit_shapes / sizeof ft_audit_shapes[0]));
    tcase_add_test(tc, ft_audit_finds_corruption);
    tc = tst_tcase(s, "injection");
    tcase_add_test(tc, ft_faults_freekv);
    tcase_add_test(tc, ft_faults_sync);
    tcase_add_test(tc, ft_faults_resident);
    tcase_add_test(tc, ft_faults_dense);
    tcase_add_test(tc, ft_faults_dense_layer);
    return s;
}
