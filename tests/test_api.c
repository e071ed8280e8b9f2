/*
 * api: version, status strings, option defaults and resolution, handles,
 * error messages.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

START_TEST(api_version)
{
    char want[64];
    const char *s = fkv_version_string();
    ck_assert_int_eq(fkv_version_number(), FKV_VERSION_NUMBER);
    ck_assert_int_eq(FKV_VERSION_NUMBER, FKV_VERSION_MAJOR * 10000 +
                                             FKV_VERSION_MINOR * 100 +
                                             FKV_VERSION_PATCH);
    ck_assert_ptr_nonnull(s);
    snprintf(want, sizeof want, "%d.%d.%d", FKV_VERSION_MAJOR,
             FKV_VERSION_MINOR, FKV_VERSION_PATCH);
    ck_assert_str_eq(s, want);
    /* A static string: the same on every call. */
    ck_assert_str_eq(fkv_version_string(), want);
}
END_TEST

START_TEST(api_status_strings)
{
    const char *str[FKV_ERR_INTERNAL + 1];
    int i, j;
    for (i = FKV_OK; i <= FKV_ERR_INTERNAL; ++i) {
        str[i] = fkv_status_string((fkv_status)i);
        ck_assert_msg(str[i] != NULL, "status %d: NULL string", i);
        ck_assert_msg(str[i][0] != '\0', "status %d: empty string", i);
    }
    for (i = 0; i <= FKV_ERR_INTERNAL; ++i)
        for (j = i + 1; j <= FKV_ERR_INTERNAL; ++j)
            ck_assert_msg(strcmp(str[i], str[j]) != 0,
                          "statuses %d and %d share \"%s\"", i, j, str[i]);
    {
        const char *u = fkv_status_string((fkv_status)99);
        const char *n = fkv_status_string((fkv_status)-1);
        ck_assert_msg(u != NULL && u[0] != '\0', "unknown status 99");
        ck_assert_msg(n != NULL && n[0] != '\0', "unknown status -1");
    }
    /* The numeric values are ABI. */
    ck_assert_int_eq(FKV_ERR_INVALID_ARGUMENT, 1);
    ck_assert_int_eq(FKV_ERR_OUT_OF_RANGE, 2);
    ck_assert_int_eq(FKV_ERR_UNKNOWN_SEQUENCE, 3);
    ck_assert_int_eq(FKV_ERR_CAPACITY, 4);
    ck_assert_int_eq(FKV_ERR_INVALID_STATE, 5);
    ck_assert_int_eq(FKV_ERR_UNSUPPORTED, 6);
    ck_assert_int_eq(FKV_ERR_VERSION_MISMATCH, 7);
    ck_assert_int_eq(FKV_ERR_OUT_OF_MEMORY, 8);
    ck_assert_int_eq(FKV_ERR_DEVICE, 9);
    ck_assert_int_eq(FKV_ERR_INTERNAL, 10);
}
END_TEST

START_TEST(api_options_defaults)
{
    fkv_options o;
    memset(&o, 0x5a, sizeof o);
    tst_ok(fkv_options_init(&o, sizeof o));
    ck_assert_uint_eq(o.struct_size, sizeof o);
    ck_assert_int_eq(o.page_tokens, 32);
    ck_assert_int_eq(o.budget_tokens, 2048);
    ck_assert_int_eq(o.sink_tokens, 512);
    ck_assert_int_eq(o.window_tokens, 512);
    ck_assert_msg(o.correction_threshold == 0.9f, "threshold %g",
                  (double)o.correction_threshold);
    ck_assert_int_eq(o.policy, FKV_POLICY_FREEKV);
    ck_assert_int_eq(o.group_score, FKV_GROUP_MEAN_SOFTMAX);
    ck_assert_int_eq(o.max_sequences, 8);
    ck_assert(o.max_tokens_per_sequence == 131072);
    ck_assert_msg(o.softmax_scale == 0.0f, "softmax_scale %g",
                  (double)o.softmax_scale);
    ck_assert_int_eq(o.backend, FKV_BACKEND_AUTO);
}
END_TEST

START_TEST(api_options_init_sizes)
{
    /* Only opts_size bytes are written. */
    unsigned char buf[sizeof(fkv_options) + 64];
    fkv_options o;
    size_t i;
    memset(buf, 0xee, sizeof buf);
    tst_ok(fkv_options_init((fkv_options *)(void *)buf, sizeof(fkv_options)));
    for (i = sizeof(fkv_options); i < sizeof buf; ++i)
        ck_assert_msg(buf[i] == 0xee, "byte %zu past opts_size written", i);
    /* Too small: version mismatch. */
    ck_assert_int_eq(fkv_options_init(&o, sizeof(size_t)),
                     FKV_ERR_VERSION_MISMATCH);
    ck_assert_int_eq(fkv_options_init(&o, 0), FKV_ERR_VERSION_MISMATCH);
    ck_assert_int_eq(fkv_options_init(NULL, sizeof o),
                     FKV_ERR_INVALID_ARGUMENT);
}
END_TEST

static void check_resolved(int head_dim, float scale)
{
    fkv_options o, got;
    fkv_cache *c = NULL;
    tst_options(&o, 2, 4, 2, head_dim, FKV_DTYPE_F32);
    o.softmax_scale = scale;
    tst_ok(fkv_create(&o, &c));
    memset(&got, 0, sizeof got);
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(c, &got));
    ck_assert_uint_eq(got.struct_size, sizeof got);
    if (scale == 0.0f)
        ck_assert_msg(fabs(got.softmax_scale - 1.0 / sqrt((double)head_dim)) <
                          1e-7,
                      "D %d: softmax_scale %.9g, want 1/sqrt(D)", head_dim,
                      (double)got.softmax_scale);
    else
        ck_assert(got.softmax_scale == scale);
    ck_assert_int_eq(got.backend, g_test_backend);
    ck_assert_int_eq(got.num_layers, 2);
    ck_assert_int_eq(got.num_q_heads, 4);
    ck_assert_int_eq(got.num_kv_heads, 2);
    ck_assert_int_eq(got.head_dim, head_dim);
    ck_assert_int_eq(got.page_tokens, o.page_tokens);
    ck_assert_int_eq(got.budget_tokens, o.budget_tokens);
    ck_assert_int_eq(got.sink_tokens, o.sink_tokens);
    ck_assert_int_eq(got.window_tokens, o.window_tokens);
    ck_assert_int_eq(got.policy, o.policy);
    ck_assert_int_eq(got.max_sequences, o.max_sequences);
    ck_assert(got.correction_threshold == o.correction_threshold);
    fkv_destroy(c);
}

START_TEST(api_get_options_resolves)
{
    check_resolved(64, 0.0f);
    check_resolved(128, 0.0f);
    check_resolved(256, 0.0f);
    check_resolved(64, 0.3f);
}
END_TEST

START_TEST(api_get_options_auto_backend)
{
    fkv_options o, got;
    fkv_cache *c = NULL;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    o.backend = FKV_BACKEND_AUTO;
    tst_ok(fkv_create(&o, &c));
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(c, &got));
    ck_assert_msg(got.backend == FKV_BACKEND_CPU ||
                      got.backend == FKV_BACKEND_CUDA,
                  "AUTO resolved to %d", (int)got.backend);
    fkv_destroy(c);
}
END_TEST

START_TEST(api_get_options_writes_struct_size)
{
    unsigned char buf[sizeof(fkv_options) + 32];
    fkv_options o, *got = (fkv_options *)(void *)buf;
    fkv_cache *c = NULL;
    size_t i;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_ok(fkv_create(&o, &c));
    memset(buf, 0xcd, sizeof buf);
    got->struct_size = sizeof(fkv_options);
    tst_ok(fkv_get_options(c, got));
    for (i = sizeof(fkv_options); i < sizeof buf; ++i)
        ck_assert_msg(buf[i] == 0xcd, "byte %zu past struct_size written", i);
    ck_assert_int_eq(got->head_dim, 64);
    fkv_destroy(c);
}
END_TEST

START_TEST(api_destroy_null)
{
    fkv_destroy(NULL);
}
END_TEST

START_TEST(api_last_error_fresh)
{
    fkv_options o;
    fkv_cache *c = NULL;
    char buf[64];
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_ok(fkv_create(&o, &c));
    memset(buf, 'x', sizeof buf);
    ck_assert_uint_eq(fkv_last_error(c, buf, sizeof buf), 0);
    ck_assert_str_eq(buf, "");
    ck_assert_uint_eq(fkv_last_error(c, NULL, 0), 0);
    fkv_destroy(c);
}
END_TEST

START_TEST(api_last_error_truncates)
{
    fkv_options o;
    fkv_cache *c = NULL;
    char small[5], full[512];
    size_t n, n2;
    int64_t len;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_ok(fkv_create(&o, &c));
    ck_assert_int_eq(fkv_seq_length(c, 987654321, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE);
    n = fkv_last_error(c, full, sizeof full);
    ck_assert_msg(n > 4, "message too short to test truncation: \"%s\"", full);
    ck_assert_uint_eq(n, strlen(full));
    memset(small, 'x', sizeof small);
    n2 = fkv_last_error(c, small, sizeof small);
    ck_assert_uint_eq(n2, n);
    ck_assert_msg(small[4] == '\0', "not NUL terminated");
    ck_assert_msg(strncmp(small, full, 4) == 0, "prefix differs");
    ck_assert_uint_eq(fkv_last_error(c, NULL, 0), n);
    fkv_destroy(c);
}
END_TEST

START_TEST(api_last_error_per_handle)
{
    fkv_options o;
    fkv_cache *a = NULL, *b = NULL;
    char buf[256];
    int64_t len;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_ok(fkv_create(&o, &a));
    tst_ok(fkv_create(&o, &b));
    ck_assert_int_eq(fkv_seq_length(a, 424242, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE);
    ck_assert_uint_gt(fkv_last_error(a, buf, sizeof buf), 0);
    ck_assert_uint_eq(fkv_last_error(b, buf, sizeof buf), 0);
    fkv_destroy(a);
    fkv_destroy(b);
}
END_TEST

static void *thread_read_error(void *arg)
{
    char buf[256];
    size_t *n = (size_t *)arg;
    *n = fkv_last_error(NULL, buf, sizeof buf);
    return NULL;
}

START_TEST(api_last_error_thread_local)
{
    fkv_options o;
    fkv_cache *c = (fkv_cache *)(void *)&o; /* must be reset to NULL */
    pthread_t t;
    size_t other = 12345;
    char buf[256];
    tst_options(&o, 1, 2, 1, 100 /* unsupported */, FKV_DTYPE_F32);
    ck_assert_int_eq(fkv_create(&o, &c), FKV_ERR_UNSUPPORTED);
    ck_assert_ptr_null(c);
    ck_assert_uint_gt(fkv_last_error(NULL, buf, sizeof buf), 0);
    ck_assert_int_eq(pthread_create(&t, NULL, thread_read_error, &other), 0);
    ck_assert_int_eq(pthread_join(t, NULL), 0);
    ck_assert_msg(other == 0,
                  "a new thread sees another thread's error (%zu chars)",
                  other);
}
END_TEST

START_TEST(api_create_null_arguments)
{
    fkv_options o;
    fkv_cache *c = NULL;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_expect_error(NULL, fkv_create(NULL, &c), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_create(NULL opts)");
    ck_assert_ptr_null(c);
    tst_expect_error(NULL, fkv_create(&o, NULL), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_create(NULL cache)");
}
END_TEST

START_TEST(api_set_stream_default)
{
    fkv_options o;
    fkv_cache *c = NULL;
    tst_options(&o, 1, 2, 1, 64, FKV_DTYPE_F32);
    tst_ok(fkv_create(&o, &c));
    tst_ok(fkv_set_stream(c, NULL));
    if (g_test_backend == FKV_BACKEND_CPU) {
        int dummy;
        tst_ok(fkv_set_stream(c, &dummy)); /* accepted and ignored */
    }
    tst_ok(fkv_set_stream(c, NULL));
    fkv_destroy(c);
}
END_TEST

START_TEST(api_two_caches_independent)
{
    /* Two handles with the same data give the same results; closing and
     * destroying one does not affect the other. */
    fkv_options o;
    tst_model a, b;
    int sa, sb, n = 300;
    float *q, *oa, *ob;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&a, &o, 1);
    tst_model_init(&b, &o, 1);
    sa = tst_open(&a);
    sb = tst_open(&b);
    tst_prefill(&a, 1, &sa, &n);
    tst_prefill(&b, 1, &sb, &n);
    q = (float *)calloc((size_t)4 * 64, sizeof(float));
    oa = (float *)calloc((size_t)4 * 64, sizeof(float));
    ob = (float *)calloc((size_t)4 * 64, sizeof(float));
    tst_good_query(&a, 0, 1, &sa, q);
    tst_ok(tst_attend_raw(&a, 0, 1, &sa, q, oa));
    tst_close(&a, sa);
    tst_model_free(&a);
    tst_ok(tst_attend_raw(&b, 0, 1, &sb, q, ob));
    ck_assert_msg(memcmp(oa, ob, sizeof(float) * 4 * 64) == 0,
                  "same data and query, different handles: outputs differ");
    tst_model_free(&b);
    free(q);
    free(oa);
    free(ob);
}
END_TEST

Suite *suite_api(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "api"));
    TCase *tc = tst_tcase(s, "api");
    tcase_add_test(tc, api_version);
    tcase_add_test(tc, api_status_strings);
    tcase_add_test(tc, api_options_defaults);
    tcase_add_test(tc, api_options_init_sizes);
    tcase_add_test(tc, api_get_options_resolves);
    tcase_add_test(tc, api_get_options_auto_backend);
    tcase_add_test(tc, api_get_options_writes_struct_size);
    tcase_add_test(tc, api_destroy_null);
    tcase_add_test(tc, api_last_error_fresh);
    tcase_add_test(tc, api_last_error_truncates);
    tcase_add_test(tc, api_last_error_per_handle);
    tcase_add_test(tc, api_last_error_thread_local);
    tcase_add_test(tc, api_create_null_arguments);
    tcase_add_test(tc, api_set_stream_default);
    tcase_add_test(tc, api_two_caches_independent);
    return s;
}
