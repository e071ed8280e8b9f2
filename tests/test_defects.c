/*
 * Issue 12: the defects found (each case failed before its fix) and the
 * contract points settled in docs/api.md.
 *
 * SPDX-License-Identifier: MIT
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tests.h"

static fkv_status create_with(fkv_options *o)
{
    fkv_cache *c = NULL;
    fkv_status st = fkv_create(o, &c);
    fkv_destroy(c);
    return st;
}

/* An allocator that refuses more than 1 GiB at once, as a machine without
 * overcommit would (the C library's may "succeed" and the kernel kill the
 * process later). */
static void *small_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    if (size > ((size_t)1 << 30))
        return NULL;
    return aligned_alloc(alignment, (size + alignment - 1) / alignment *
                                        alignment);
}

static void small_free(void *user, void *ptr, size_t size)
{
    (void)user;
    (void)size;
    free(ptr);
}

static void last_error(fkv_cache *c, char *buf, size_t len)
{
    fkv_last_error(c, buf, len);
}

/* 1: sink + window was summed in int32 (signed overflow). */
START_TEST(df_sink_window_overflow)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.sink_tokens = 1500000000;
    o.window_tokens = 1500000000;
    o.budget_tokens = 2048;
    tst_expect_error(NULL, create_with(&o), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_create(sink + window > INT32_MAX)");
    char msg[512];
    last_error(NULL, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "3000000000") && strstr(msg, "2048"),
                  "message: %s", msg);
}
END_TEST

/* 3: recall slots were sized by the budget, not by what a sequence can
 * hold: a huge budget with 100 tokens per sequence failed at open. Raw
 * calls (the harness sizes its model by the budget). */
static void df_run(fkv_options *o, fkv_stats *st, float *out)
{
    fkv_cache *c = NULL;
    tst_ok(fkv_create(o, &c));
    fkv_seq_id id;
    tst_ok(fkv_seq_open(c, &id));
    enum { N = 100, KVH = 2, QH = 4, D = 64 };
    static float k[N * KVH * D], v[N * KVH * D], q[QH * D];
    ref_rng r;
    ref_rng_seed(&r, 9);
    for (size_t i = 0; i < sizeof k / sizeof *k; i++) {
        k[i] = (float)ref_rng_normal(&r);
        v[i] = (float)ref_rng_normal(&r);
    }
    for (size_t i = 0; i < sizeof q / sizeof *q; i++)
        q[i] = (float)ref_rng_normal(&r);
    void *dk = tst_dev_from_floats(FKV_DTYPE_F32, k, N * KVH * D);
    void *dv = tst_dev_from_floats(FKV_DTYPE_F32, v, N * KVH * D);
    void *dq = tst_dev_from_floats(FKV_DTYPE_F32, q, QH * D);
    void *dout = tst_dev_alloc(QH * D * sizeof(float));
    int32_t n = N;
    fkv_batch b = {1, 0, &id, &n};
    for (int l = 0; l < 2; l++)
        tst_ok(fkv_append(c, l, &b, dk, dv));
    b.num_tokens = NULL;
    tst_ok(fkv_attend(c, 1, &b, dq, dout));
    tst_dev_get(out, dout, QH * D * sizeof(float));
    st->struct_size = sizeof *st;
    tst_ok(fkv_get_stats(c, st));
    tst_dev_free(dk);
    tst_dev_free(dv);
    tst_dev_free(dq);
    tst_dev_free(dout);
    fkv_destroy(c);
}

START_TEST(df_slots_sized_by_sequence)
{
    fkv_options o;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.budget_tokens = INT32_MAX - 15; /* 2^31 - 16, a multiple of 16 */
    o.max_tokens_per_sequence = 100;
    fkv_stats st, st2;
    float out[4 * 64], out2[4 * 64];
    df_run(&o, &st, out);
    /* The same cache with the smallest budget that covers 100 tokens
     * (7 pages: 2 sink, 4 window, at most 1 candidate). */
    fkv_options small = o;
    small.budget_tokens = 32 + 64 + 16;
    df_run(&small, &st2, out2);
    ck_assert_msg(st.host_bytes == st2.host_bytes &&
                      st.device_bytes == st2.device_bytes,
                  "host %llu / device %llu bytes with the huge budget, "
                  "%llu / %llu with one that covers the sequence",
                  (unsigned long long)st.host_bytes,
                  (unsigned long long)st.device_bytes,
                  (unsigned long long)st2.host_bytes,
                  (unsigned long long)st2.device_bytes);
    /* Both attend to every token: the same output. */
    ck_assert(!memcmp(out, out2, sizeof out));
}
END_TEST

/* 4: NaN scores made the ranking's comparison inconsistent (undefined
 * behaviour for qsort). Now a NaN score ranks below every number, NaNs by
 * page: with NaN in every query element, every page scores NaN and the
 * first K candidates are chosen. CPU backend (docs/api.md). */
START_TEST(df_nan_query_selection)
{
    if (g_test_backend != FKV_BACKEND_CPU)
        return; /* CUDA: the outputs and selection are unspecified */
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_model m;
    tst_model_init(&m, &o, 7);
    int s = tst_open(&m);
    int n = 1000; /* 62 pages: 56 candidates for K = 10 */
    tst_prefill(&m, 1, &s, &n);
    float q[4 * 64];
    for (int i = 0; i < 4 * 64; i++)
        q[i] = NAN;
    float out[4 * 64];
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    for (int h = 0; h < 2; h++) {
        int pages[16];
        int cnt = tst_selected(&m, 0, s, h, pages, 16);
        ck_assert_int_eq(cnt, 10);
        for (int i = 0; i < cnt; i++)
            ck_assert_int_eq(pages[i], 2 + i); /* after the 2 sink pages */
    }
    /* A finite query afterwards is served normally. */
    tst_select(&m, 0, 1, &s, q);
    tst_model_free(&m);
}
END_TEST

/* 5: dtype has no default; forgetting it names the field. */
START_TEST(df_dtype_unset)
{
    fkv_options o;
    tst_ok(fkv_options_init(&o, sizeof o));
    ck_assert_int_eq(o.dtype, FKV_DTYPE_UNSET);
    o.backend = g_test_backend;
    o.num_layers = 1;
    o.num_q_heads = 4;
    o.num_kv_heads = 2;
    o.head_dim = 64;
    tst_expect_error(NULL, create_with(&o), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_create(dtype unset)");
    char msg[512];
    last_error(NULL, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "opts.dtype") != NULL, "message: %s", msg);
    o.dtype = FKV_DTYPE_BF16;
    tst_ok(create_with(&o));
}
END_TEST

/* Contract: a successful call clears the message (per handle, and the
 * thread's handle-less one). */
START_TEST(df_last_error_cleared)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_model m;
    tst_model_init(&m, &o, 3);
    char msg[256];
    ck_assert_int_eq(fkv_seq_close(m.c, 12345), FKV_ERR_UNKNOWN_SEQUENCE);
    ck_assert_uint_gt(fkv_last_error(m.c, msg, sizeof msg), 0);
    /* fkv_last_error itself keeps it. */
    ck_assert_uint_gt(fkv_last_error(m.c, msg, sizeof msg), 0);
    fkv_stats st;
    tst_stats(&m, &st);
    ck_assert_uint_eq(fkv_last_error(m.c, msg, sizeof msg), 0);
    ck_assert_str_eq(msg, "");
    /* Handle-less: a failed then a successful fkv_create. */
    fkv_options bad = o;
    bad.num_layers = 0;
    ck_assert_int_ne(create_with(&bad), FKV_OK);
    ck_assert_uint_gt(fkv_last_error(NULL, msg, sizeof msg), 0);
    tst_ok(create_with(&o));
    ck_assert_uint_eq(fkv_last_error(NULL, msg, sizeof msg), 0);
    tst_model_free(&m);
}
END_TEST

/* Contract: FKV_CORRECTION_OFF disables only the cosine test. The first
 * attend after prefill and "candidates fit but are missing" still correct,
 * and are counted. */
START_TEST(df_correction_off)
{
    if (g_test_backend != FKV_BACKEND_CPU)
        return; /* counters of the CUDA backend: test_stats */
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.correction_threshold = FKV_CORRECTION_OFF;
    tst_model m;
    tst_model_init(&m, &o, 11);
    int s = tst_open(&m);
    int n = 112; /* 7 pages: sink 2, window 4, 1 candidate (fits in K) */
    tst_prefill(&m, 1, &s, &n);
    float q[4 * 64], out[4 * 64];
    tst_rand_query(&m, 1, q);
    fkv_stats st;
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.heads_checked, 2);
    ck_assert_uint_eq(st.corrections, 2); /* first attend: both heads */
    tst_ok(fkv_reset_stats(m.c));
    /* Same-page query drift of any size is not corrected... */
    tst_rand_query(&m, 1, q);
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.corrections, 0);
    /* ...but a new candidate page that fits and is missing is. */
    int n16 = 16;
    tst_append_rand(&m, 0, 1, &s, &n16);
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.corrections, 2);
    ck_assert_uint_eq(st.heads_checked, 4);
    tst_model_free(&m);
}
END_TEST

/* Contract: which error wins, reserved, head_dim 0, select before attend,
 * a huge max_tokens_per_sequence on the CPU. */
START_TEST(df_error_order)
{
    fkv_options o;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_model m;
    tst_model_init(&m, &o, 5);
    int s = tst_open(&m);
    fkv_seq_id id = m.seq[s].id;
    char msg[256];
    /* Batch checks come before the tensor pointers. */
    fkv_batch b = {0, 0, &id, NULL};
    ck_assert_int_eq(fkv_attend(m.c, 0, &b, NULL, NULL),
                     FKV_ERR_INVALID_ARGUMENT);
    fkv_last_error(m.c, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "num_seqs") != NULL, "message: %s", msg);
    /* The layer before the batch's contents. */
    b.num_seqs = 1;
    ck_assert_int_eq(fkv_attend(m.c, 7, &b, NULL, NULL), FKV_ERR_OUT_OF_RANGE);
    /* reserved != 0 */
    b.reserved = 1;
    ck_assert_int_eq(fkv_recall(m.c, 0, &b), FKV_ERR_INVALID_ARGUMENT);
    b.reserved = 0;
    /* A NULL tensor once the batch is valid... */
    ck_assert_int_eq(fkv_attend(m.c, 0, &b, NULL, NULL),
                     FKV_ERR_INVALID_ARGUMENT);
    fkv_last_error(m.c, msg, sizeof msg);
    ck_assert_msg(strstr(msg, "q is NULL") != NULL, "message: %s", msg);
    /* ...and order after it: no tokens yet. */
    float q[4 * 64], out[4 * 64];
    tst_rand_query(&m, 1, q);
    ck_assert_int_eq(tst_attend_raw(&m, 0, 1, &s, q, out),
                     FKV_ERR_INVALID_STATE);
    /* select before any attend is allowed once there are tokens. */
    int n = 500;
    tst_prefill(&m, 1, &s, &n);
    tst_select(&m, 0, 1, &s, q);
    tst_model_free(&m);

    /* head_dim 0 (or negative) is UNSUPPORTED, like any other value. */
    o.head_dim = 0;
    ck_assert_int_eq(create_with(&o), FKV_ERR_UNSUPPORTED);
    o.head_dim = -64;
    ck_assert_int_eq(create_with(&o), FKV_ERR_UNSUPPORTED);
    o.head_dim = 64;
    if (g_test_backend == FKV_BACKEND_CPU) {
        /* Valid, but the CPU backend's per-call scratch is sized by it. */
        o.page_tokens = 1024;
        o.sink_tokens = o.window_tokens = 0;
        o.budget_tokens = 1024;
        o.max_tokens_per_sequence = (int64_t)1024 * (INT32_MAX / 2 - 1);
        o.host_alloc = small_alloc;
        o.host_free = small_free;
        tst_expect_error(NULL, create_with(&o), FKV_ERR_OUT_OF_MEMORY,
                         "fkv_create(max_tokens_per_sequence 2^40)");
    }
}
END_TEST

Suite *suite_defects(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "defects"));
    TCase *tc = tst_tcase(s, "defects");
    tcase_add_test(tc, df_sink_window_overflow);
    tcase_add_test(tc, df_slots_sized_by_sequence);
    tcase_add_test(tc, df_nan_query_selection);
    tcase_add_test(tc, df_dtype_unset);
    tcase_add_test(tc, df_last_error_cleared);
    tcase_add_test(tc, df_correction_off);
    tcase_add_test(tc, df_error_order);
    return s;
}
