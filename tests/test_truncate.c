/*
 * truncate: fkv_seq_truncate drops the last tokens on every layer; the
 * following steps attend exactly as if the dropped tokens had never been
 * appended (checked against the float64 reference), pages are freed, and
 * bad calls change nothing.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdlib.h>
#include <string.h>

static const fkv_policy k_policies[] = {FKV_POLICY_FREEKV, FKV_POLICY_SYNC,
                                        FKV_POLICY_RESIDENT,
                                        FKV_POLICY_DENSE};

/* Decode past a few page boundaries, drop back over them (into what the
 * window ring has overwritten since), decode again. _i: the policy. */
START_TEST(truncate_then_decode)
{
    fkv_options o;
    tst_model m;
    int slots[2], n[2] = {400, 333};
    int64_t len = -1, cuts[] = {395, 380, 337, 360, 16 * 20, 7};
    size_t i;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    o.max_sequences = 4;
    o.max_tokens_per_sequence = 2048;
    tst_model_init(&m, &o, 13000 + _i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n);
    tst_decode_steps(&m, 2, slots, 3);
    for (i = 0; i < sizeof cuts / sizeof cuts[0]; ++i) {
        /* Decode 40 tokens (2.5 pages), then cut sequence 0 back. */
        tst_decode_steps(&m, 2, slots, i == 0 ? 1 : 40);
        ck_assert_int_le(cuts[i], m.seq[slots[0]].len[0]);
        tst_ok(fkv_seq_truncate(m.c, m.seq[slots[0]].id, cuts[i]));
        tst_model_truncate(&m, slots[0], cuts[i]);
        tst_ok(fkv_seq_length(m.c, m.seq[slots[0]].id, &len));
        ck_assert_int_eq(len, cuts[i]);
        tst_decode_steps(&m, 2, slots, 2);
    }
    tst_model_free(&m);
}
END_TEST

/* Pages past the new length go back to the pool: a cache whose pool holds
 * exactly one sequence's pages can grow again after a truncate. */
START_TEST(truncate_frees_pages)
{
    fkv_options o;
    tst_model m;
    fkv_stats before, after;
    int s, n = 512, more = 255;
    size_t block;
    float kv[2 * 64] = {0};
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    block = (size_t)16 * 2 * 2 * 64 * sizeof(float); /* P * KVH * (K+V) * D */
    o.host_pool_bytes = (uint64_t)block * 2 * (512 / 16); /* 2 layers */
    o.max_tokens_per_sequence = 4096;
    tst_model_init(&m, &o, 13100);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    /* Full: one more token does not fit. */
    tst_expect_error(m.c, tst_append(&m, 0, 1, &s, NULL, kv, kv),
                     FKV_ERR_CAPACITY, "append into a full pool");
    tst_stats(&m, &before);
    tst_ok(fkv_seq_truncate(m.c, m.seq[s].id, 256));
    tst_model_truncate(&m, s, 256);
    tst_stats(&m, &after);
    ck_assert_uint_eq(after.host_bytes, before.host_bytes); /* pool kept */
    tst_prefill(&m, 1, &s, &more);
    tst_decode_steps(&m, 1, &s, 1); /* fits only if the 256 tokens' pages were freed */
    ck_assert_int_eq(m.seq[s].len[0], 512);
    tst_model_free(&m);
}
END_TEST

/* To the current length: a no-op; to 0: the sequence is empty and can be
 * refilled. */
START_TEST(truncate_noop_and_zero)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int s, n = 300;
    int64_t len = -1;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 13200);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    tst_decode_steps(&m, 1, &s, 2);
    tst_snapshot_take(&m, &snap);
    tst_ok(fkv_seq_truncate(m.c, m.seq[s].id, 302));
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    tst_ok(fkv_seq_truncate(m.c, m.seq[s].id, 0));
    tst_model_truncate(&m, s, 0);
    tst_ok(fkv_seq_length(m.c, m.seq[s].id, &len));
    ck_assert_int_eq(len, 0);
    n = 200;
    tst_prefill(&m, 1, &s, &n);
    tst_decode_steps(&m, 1, &s, 2);
    tst_model_free(&m);
}
END_TEST

/* Unknown, closed, beyond the length, negative, NULL cache: clear errors,
 * nothing changes. */
START_TEST(truncate_bad_input)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int s, t, n = 300;
    fkv_seq_id closed;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 13300);
    s = tst_open(&m);
    t = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    closed = m.seq[t].id;
    tst_close(&m, t);
    tst_decode_steps(&m, 1, &s, 1);
    tst_snapshot_take(&m, &snap);
    tst_expect_error(m.c, fkv_seq_truncate(m.c, closed, 0),
                     FKV_ERR_UNKNOWN_SEQUENCE, "truncate a closed sequence");
    tst_expect_error(m.c, fkv_seq_truncate(m.c, 12345, 0),
                     FKV_ERR_UNKNOWN_SEQUENCE, "truncate an unknown id");
    tst_expect_error(m.c, fkv_seq_truncate(m.c, -1, 0),
                     FKV_ERR_UNKNOWN_SEQUENCE, "truncate id -1");
    tst_expect_error(m.c, fkv_seq_truncate(m.c, m.seq[s].id, 302),
                     FKV_ERR_OUT_OF_RANGE, "truncate beyond the length");
    tst_expect_error(m.c, fkv_seq_truncate(m.c, m.seq[s].id, -1),
                     FKV_ERR_INVALID_ARGUMENT, "truncate to -1");
    tst_expect_error(NULL, fkv_seq_truncate(NULL, m.seq[s].id, 0),
                     FKV_ERR_INVALID_ARGUMENT, "truncate a NULL cache");
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    tst_decode_steps(&m, 1, &s, 1);
    tst_model_free(&m);
}
END_TEST

Suite *suite_truncate(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "truncate"));
    TCase *tc = tst_tcase(s, "truncate");
    tcase_add_loop_test(tc, truncate_then_decode, 0, 4);
    tcase_add_test(tc, truncate_frees_pages);
    tcase_add_test(tc, truncate_noop_and_zero);
    tcase_add_test(tc, truncate_bad_input);
    return s;
}
