/*
 * multitoken: fkv_attend_tokens with several query tokens per sequence
 * (speculative-decoding verification). Each token attends causally over the
 * page set chosen with the sequence's last query token; checked against the
 * float64 reference on every policy, with mixed token counts in a batch,
 * and bad inputs leave the cache unchanged.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* fkv_attend_tokens of q ([sum T][QH][D], T[i] tokens of slots[i], each
 * sequence's last T[i] tokens appended) checked against the reference.
 * q_last ([nseq][QH][D]) receives each sequence's last query token. */
static void mt_attend_check(tst_model *m, int layer, int nseq,
                            const int *slots, const int *T, const float *q,
                            float *q_last)
{
    size_t qs = (size_t)m->QH * m->D;
    fkv_seq_id ids[TST_MAX_SEQS];
    int32_t nt[TST_MAX_SEQS];
    fkv_batch b;
    int i, j, g, hq, total = 0, row;
    double *ref_last = (double *)malloc(sizeof(double) * qs * nseq);
    float *out;
    void *dq, *dout;
    fkv_status st;
    for (i = 0; i < nseq; ++i) {
        ids[i] = m->seq[slots[i]].id;
        nt[i] = T[i];
        memcpy(q_last + i * qs, q + (size_t)(total + T[i] - 1) * qs,
               sizeof(float) * qs);
        total += T[i];
    }
    out = (float *)malloc(sizeof(float) * qs * total);
    dq = tst_dev_from_floats(m->dt, q, qs * total);
    dout = tst_dev_alloc(m->o.dtype == FKV_DTYPE_F32 ? 4 * qs * total
                                                     : 2 * qs * total);
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = nt;
    st = fkv_attend_tokens(m->c, layer, &b, dq, dout);
    if (st != FKV_OK) {
        char buf[512];
        fkv_last_error(m->c, buf, sizeof buf);
        ck_abort_msg("fkv_attend_tokens: %d (%s): %s", (int)st,
                     fkv_status_string(st), buf);
    }
    tst_dev_to_floats(m->dt, dout, out, qs * total);
    /* The selection: what fkv_attend would do with the last queries. */
    tst_sim_attend(m, layer, nseq, slots, q_last, ref_last);
    row = 0;
    for (i = 0; i < nseq; ++i) {
        tst_seq *s = &m->seq[slots[i]];
        int64_t n = s->len[layer];
        unsigned char *mask = (unsigned char *)malloc((size_t)n);
        char what[160];
        for (j = 0; j < T[i]; ++j) {
            const float *qj = q + (size_t)(row + j) * qs;
            double *want = (double *)malloc(sizeof(double) * qs);
            for (g = 0; g < m->KVH; ++g) {
                tst_sel *used = &s->used[layer][g];
                if (used->valid)
                    ref_attended_mask(&m->lay, n, used->pages, used->count,
                                      mask);
                else /* DENSE: every token */
                    memset(mask, 1, (size_t)n);
                ref_causal_limit(n, n - T[i] + j, mask);
                for (hq = g * m->G; hq < (g + 1) * m->G; ++hq)
                    ref_attention(s->k[layer], s->v[layer], n, m->KVH, m->D,
                                  g, qj + (size_t)hq * m->D, m->scale, mask,
                                  want + (size_t)hq * m->D);
            }
            if (j == T[i] - 1) /* the causal limit is no limit for it */
                ck_assert_double_lt(ref_rel_err_dd(want, ref_last + i * qs,
                                                   qs), 1e-12);
            snprintf(what, sizeof what,
                     "attend_tokens layer %d, entry %d, token %d of %d", layer,
                     i, j, T[i]);
            tst_assert_close(m, out + (size_t)(row + j) * qs, want,
                             tst_tol(m->dt), what);
            free(want);
        }
        free(mask);
        tst_check_selected(m, layer, slots[i]);
        row += T[i];
    }
    free(ref_last);
    free(out);
    tst_dev_free(dq);
    tst_dev_free(dout);
}

/* Rounds of: append T[i] tokens per sequence, attend them all, select and
 * recall with the last query. T = 1 rounds are plain decode steps. */
static void mt_rounds(tst_model *m, int nseq, const int *slots,
                      const int *T, int rounds, float *prev)
{
    size_t qs = (size_t)m->QH * m->D, pl = qs * nseq;
    int total = 0, i, l, t, row;
    float *q, *last = (float *)malloc(sizeof(float) * pl);
    for (i = 0; i < nseq; ++i)
        total += T[i];
    q = (float *)malloc(sizeof(float) * qs * total);
    for (t = 0; t < rounds; ++t)
        for (l = 0; l < m->L; ++l) {
            tst_append_rand(m, l, nseq, slots, T);
            /* Last tokens: a drift from the previous step (corrections for
             * some heads); the earlier ones: any query. */
            tst_next_query(m, l, nseq, slots, prev[0] == 0.0f && t == 0
                               ? NULL : prev + l * pl, last);
            tst_rand_query(m, total, q);
            row = 0;
            for (i = 0; i < nseq; ++i) {
                row += T[i];
                memcpy(q + (size_t)(row - 1) * qs, last + i * qs,
                       sizeof(float) * qs);
            }
            mt_attend_check(m, l, nseq, slots, T, q, last);
            tst_select(m, l, nseq, slots, last);
            tst_recall(m, l, nseq, slots);
            memcpy(prev + l * pl, last, sizeof(float) * pl);
        }
    free(q);
    free(last);
}

static const fkv_policy k_policies[] = {FKV_POLICY_FREEKV, FKV_POLICY_SYNC,
                                        FKV_POLICY_RESIDENT,
                                        FKV_POLICY_DENSE};

/* Two sequences, 5 and 1 query tokens, then 16 and 3, then plain steps;
 * _i: the policy. */
START_TEST(multitoken_matches_reference)
{
    fkv_options o;
    tst_model m;
    int slots[2], n[2] = {400, 150}, t1[2] = {5, 1}, t2[2] = {16, 3},
        t0[2] = {1, 1};
    float *prev;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    o.max_tokens_per_sequence = 2048;
    tst_model_init(&m, &o, 14000 + _i);
    prev = (float *)calloc((size_t)m.L * 2 * m.QH * m.D, sizeof(float));
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n);
    mt_rounds(&m, 2, slots, t0, 2, prev);
    mt_rounds(&m, 2, slots, t1, 2, prev);
    mt_rounds(&m, 2, slots, t2, 3, prev);
    mt_rounds(&m, 2, slots, t0, 1, prev);
    free(prev);
    tst_model_free(&m);
}
END_TEST

/* bf16: the per-token outputs round like fkv_attend's. */
START_TEST(multitoken_bf16)
{
    fkv_options o;
    tst_model m;
    int s, n = 333, t[1] = {7};
    float *prev;
    tst_options(&o, 1, 8, 2, 128, FKV_DTYPE_BF16);
    tst_model_init(&m, &o, 14100);
    prev = (float *)calloc((size_t)m.L * m.QH * m.D, sizeof(float));
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    mt_rounds(&m, 1, &s, t, 3, prev);
    free(prev);
    tst_model_free(&m);
}
END_TEST

/* Token counts out of range, more tokens than held, tokens before the
 * window: clear errors and nothing changes. */
START_TEST(multitoken_bad_input)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    int slots[2], n[2] = {256, 100};
    fkv_seq_id ids[2];
    int32_t nt[2];
    fkv_batch b;
    void *q, *out;
    size_t bytes = (size_t)2 * 17 * 4 * 64 * sizeof(float);
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_geometry(&o, 8, 16, 8, 64); /* the window is one page of 8 */
    tst_model_init(&m, &o, 14200);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n);
    q = tst_dev_alloc(bytes);
    out = tst_dev_alloc(bytes);
    {
        float *z = (float *)calloc(bytes / sizeof(float), sizeof(float));
        tst_dev_put(q, z, bytes);
        free(z);
    }
    tst_snapshot_take(&m, &snap);
    ids[0] = m.seq[slots[0]].id;
    ids[1] = m.seq[slots[1]].id;
    b.num_seqs = 2;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = nt;
    nt[0] = 1;
    nt[1] = FKV_MAX_QUERY_TOKENS + 1;
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "17 query tokens");
    nt[1] = 0;
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "0 query tokens");
    nt[1] = -3;
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "-3 query tokens");
    /* 256 tokens = 32 sealed pages: 9 tokens reach the page before the
     * one-page window. */
    nt[0] = 9;
    nt[1] = 1;
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "tokens before the window");
    nt[0] = 1;
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, NULL, out),
                     FKV_ERR_INVALID_ARGUMENT, "q NULL");
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, NULL),
                     FKV_ERR_INVALID_ARGUMENT, "out NULL");
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 2, &b, q, out),
                     FKV_ERR_OUT_OF_RANGE, "layer 2");
    tst_expect_error(NULL, fkv_attend_tokens(NULL, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "NULL cache");
    ids[1] = ids[0];
    tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                     FKV_ERR_INVALID_ARGUMENT, "a sequence twice");
    tst_snapshot_check(&m, &snap);
    /* More query tokens than the sequence holds. */
    {
        int s3 = tst_open(&m), three = 3;
        tst_prefill(&m, 1, &s3, &three);
        ids[0] = m.seq[s3].id;
        b.num_seqs = 1;
        nt[0] = 4;
        tst_expect_error(m.c, fkv_attend_tokens(m.c, 0, &b, q, out),
                         FKV_ERR_INVALID_ARGUMENT, "4 tokens of 3");
        nt[0] = 3; /* all of them: fine */
        tst_ok(fkv_attend_tokens(m.c, 0, &b, q, out));
    }
    tst_snapshot_free(&snap);
    tst_dev_free(q);
    tst_dev_free(out);
    tst_model_free(&m);
}
END_TEST

Suite *suite_multitoken(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "multitoken"));
    TCase *tc = tst_tcase(s, "multitoken");
    tcase_add_loop_test(tc, multitoken_matches_reference, 0, 4);
    tcase_add_test(tc, multitoken_bf16);
    tcase_add_test(tc, multitoken_bad_input);
    return s;
}
