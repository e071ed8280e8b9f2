/*
 * fork: fkv_seq_fork gives a child with the parent's tokens that then
 * decodes independently of it (both checked against the float64 reference),
 * shares the sealed pages (the pool grows by the partial pages only),
 * survives the parent's close and a truncate into the shared pages, and
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

/* Fork mid-decode, decode parent and child apart (different tokens), close
 * the parent, decode the child; _i: the policy. */
START_TEST(fork_decodes_independently)
{
    fkv_options o;
    tst_model m;
    int p, c, both[2], n = 405;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    o.max_tokens_per_sequence = 2048;
    tst_model_init(&m, &o, 15000 + _i);
    p = tst_open(&m);
    tst_prefill(&m, 1, &p, &n);
    tst_decode_steps(&m, 1, &p, 3);
    c = tst_fork(&m, p);
    both[0] = p;
    both[1] = c;
    tst_decode_steps(&m, 2, both, 20); /* past a page boundary */
    tst_decode_steps(&m, 1, &c, 2);
    tst_decode_steps(&m, 1, &p, 2);
    tst_close(&m, p);
    tst_decode_steps(&m, 1, &c, 20);
    /* A grandchild of the child, then the child closes. */
    p = tst_fork(&m, c);
    tst_close(&m, c);
    tst_decode_steps(&m, 1, &p, 3);
    tst_model_free(&m);
}
END_TEST

/* A pool limited to the parent's pages plus one page per layer holds the
 * fork (sealed pages are shared, the partial ones copied), and host_bytes
 * grows by no pool chunk. */
START_TEST(fork_shares_pages)
{
    fkv_options o;
    tst_model m;
    fkv_stats a, b;
    int p, c, n = 16 * 40 + 5;
    size_t block = (size_t)16 * 2 * 2 * 64 * sizeof(float);
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.max_tokens_per_sequence = 4096;
    o.host_pool_bytes = (uint64_t)block * 2 * (41 + 1);
    tst_model_init(&m, &o, 15100);
    p = tst_open(&m);
    tst_prefill(&m, 1, &p, &n);
    tst_decode_steps(&m, 1, &p, 1);
    tst_stats(&m, &a);
    c = tst_fork(&m, p);
    tst_stats(&m, &b);
    /* The child's tables and backend state, not 2 x 41 more pages. */
    ck_assert_uint_lt(b.host_bytes - a.host_bytes, (uint64_t)block * 2 * 41);
    {
        int both[2] = {p, c};
        tst_decode_steps(&m, 2, both, 2);
    }
    tst_close(&m, p);
    tst_decode_steps(&m, 1, &c, 2);
    tst_model_free(&m);
}
END_TEST

/* The child truncates into the shared pages (the page that becomes partial
 * is copied before appends write it) and the parent keeps its tokens;
 * _i: the policy (DENSE and RESIDENT read every page from the pool). */
START_TEST(fork_truncate_copy_on_write)
{
    fkv_options o;
    tst_model m;
    int p, c, both[2], n = 300;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 15200 + _i);
    p = tst_open(&m);
    tst_prefill(&m, 1, &p, &n);
    tst_decode_steps(&m, 1, &p, 1);
    c = tst_fork(&m, p);
    tst_ok(fkv_seq_truncate(m.c, m.seq[c].id, 250)); /* mid-page 15 */
    tst_model_truncate(&m, c, 250);
    both[0] = p;
    both[1] = c;
    tst_decode_steps(&m, 2, both, 40); /* the child rewrites 250..289 */
    tst_ok(fkv_seq_truncate(m.c, m.seq[p].id, 200)); /* and the parent */
    tst_model_truncate(&m, p, 200);
    tst_decode_steps(&m, 2, both, 3);
    tst_close(&m, c);
    tst_decode_steps(&m, 1, &p, 2);
    tst_model_free(&m);
}
END_TEST

/* Beyond max_sequences, unknown and closed parents, NULL child: clear
 * errors, nothing changes. */
START_TEST(fork_bad_input)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int p, q, n = 300;
    fkv_seq_id child = 77, closed;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.max_sequences = 2;
    tst_model_init(&m, &o, 15300);
    p = tst_open(&m);
    q = tst_open(&m);
    tst_prefill(&m, 1, &p, &n);
    tst_decode_steps(&m, 1, &p, 1);
    tst_snapshot_take(&m, &snap);
    tst_expect_error(m.c, fkv_seq_fork(m.c, m.seq[p].id, &child),
                     FKV_ERR_CAPACITY, "fork beyond max_sequences");
    ck_assert_int_eq(child, 77);
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    closed = m.seq[q].id;
    tst_close(&m, q);
    tst_snapshot_take(&m, &snap);
    tst_expect_error(m.c, fkv_seq_fork(m.c, closed, &child),
                     FKV_ERR_UNKNOWN_SEQUENCE, "fork a closed sequence");
    tst_expect_error(m.c, fkv_seq_fork(m.c, 999, &child),
                     FKV_ERR_UNKNOWN_SEQUENCE, "fork an unknown id");
    tst_expect_error(m.c, fkv_seq_fork(m.c, m.seq[p].id, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "fork into NULL");
    tst_expect_error(NULL, fkv_seq_fork(NULL, m.seq[p].id, &child),
                     FKV_ERR_INVALID_ARGUMENT, "fork a NULL cache");
    ck_assert_int_eq(child, 77);
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    /* The slot is free again: a fork works. */
    q = tst_fork(&m, p);
    tst_decode_steps(&m, 1, &q, 1);
    tst_model_free(&m);
}
END_TEST

Suite *suite_fork(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "fork"));
    TCase *tc = tst_tcase(s, "fork");
    tcase_add_loop_test(tc, fork_decodes_independently, 0, 4);
    tcase_add_test(tc, fork_shares_pages);
    tcase_add_loop_test(tc, fork_truncate_copy_on_write, 0, 4);
    tcase_add_test(tc, fork_bad_input);
    return s;
}
