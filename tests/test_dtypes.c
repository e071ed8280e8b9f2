/*
 * dtypes: f16 and bf16 caches. Inputs are drawn in the dtype; the reference
 * computes in double from the same rounded values; the output is rounded to
 * the dtype (tolerances: f16 2e-3, bf16 1.6e-2). Selections must still be
 * exact (summaries of representable values are exact).
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const fkv_policy k_policies[4] = {
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT, FKV_POLICY_DENSE};

static void dt_steps(tst_model *m, int nseq, const int *slots, int steps)
{
    size_t pl = (size_t)nseq * m->QH * m->D;
    float *q = (float *)calloc(pl * m->L, sizeof(float));
    float *prev = (float *)calloc(pl * m->L, sizeof(float));
    int t, l;
    for (t = 0; t < steps; ++t)
        for (l = 0; l < m->L; ++l) {
            if (t > 0)
                tst_append_rand(m, l, nseq, slots, NULL);
            tst_next_query(m, l, nseq, slots, t ? prev + l * pl : NULL,
                           q + l * pl);
            tst_attend_check(m, l, nseq, slots, q + l * pl, tst_tol(m->dt));
            tst_select(m, l, nseq, slots, q + l * pl);
            tst_recall(m, l, nseq, slots);
            memcpy(prev + l * pl, q + l * pl, sizeof(float) * pl);
        }
    free(q);
    free(prev);
}

/* _i: dtype = F16 + _i / 4, policy = _i % 4. Context within the budget. */
START_TEST(dt_dense)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {200, 77};
    tst_options(&o, 2, 8, 2, 128,
                (_i / 4) ? FKV_DTYPE_BF16 : FKV_DTYPE_F16);
    o.policy = k_policies[_i % 4];
    tst_model_init(&m, &o, 4000 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    dt_steps(&m, 2, slots, 4);
    tst_model_free(&m);
}
END_TEST

/* Beyond the budget: selection exact, output within the dtype tolerance. */
START_TEST(dt_selection)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {1500, 999};
    tst_options(&o, 2, 8, 2, 64, (_i / 4) ? FKV_DTYPE_BF16 : FKV_DTYPE_F16);
    o.policy = k_policies[_i % 4];
    o.group_score = (_i & 1) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 4100 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    dt_steps(&m, 2, slots, 6);
    tst_model_free(&m);
}
END_TEST

/* Every head_dim and an odd group size in each half-precision type. */
START_TEST(dt_head_dims)
{
    static const int dims[3] = {64, 128, 256};
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {900, 450};
    tst_options(&o, 1, 10, 2, dims[_i % 3],
                (_i / 3) ? FKV_DTYPE_BF16 : FKV_DTYPE_F16);
    o.policy = (_i & 1) ? FKV_POLICY_SYNC : FKV_POLICY_FREEKV;
    tst_model_init(&m, &o, 4200 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    dt_steps(&m, 2, slots, 3);
    tst_model_free(&m);
}
END_TEST

/* Exact values: a single token attends to itself, so the output is its
 * value exactly (after rounding to the dtype: exact already). */
START_TEST(dt_single_token_exact)
{
    static const fkv_dtype dts[3] = {FKV_DTYPE_F32, FKV_DTYPE_F16,
                                     FKV_DTYPE_BF16};
    fkv_options o;
    tst_model m;
    int s, one = 1, h, i;
    float *k, *v, *q, *out;
    tst_options(&o, 1, 4, 2, 64, dts[_i]);
    tst_model_init(&m, &o, 4300 + (uint64_t)_i);
    s = tst_open(&m);
    k = (float *)calloc((size_t)2 * 64, sizeof(float));
    v = (float *)calloc((size_t)2 * 64, sizeof(float));
    q = (float *)calloc((size_t)4 * 64, sizeof(float));
    out = (float *)calloc((size_t)4 * 64, sizeof(float));
    ref_random_tensor(&m.rng, (int)dts[_i], k, 128, 1.0);
    ref_random_tensor(&m.rng, (int)dts[_i], v, 128, 1.0);
    ref_random_tensor(&m.rng, (int)dts[_i], q, 256, 1.0);
    tst_ok(tst_append(&m, 0, 1, &s, &one, k, v));
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    for (h = 0; h < 4; ++h)
        for (i = 0; i < 64; ++i)
            ck_assert_msg(fabsf(out[h * 64 + i] - v[(h / 2) * 64 + i]) <=
                              1e-6f * fabsf(v[(h / 2) * 64 + i]),
                          "head %d ch %d: %.9g, want %.9g", h, i,
                          (double)out[h * 64 + i],
                          (double)v[(h / 2) * 64 + i]);
    free(k);
    free(v);
    free(q);
    free(out);
    tst_model_free(&m);
}
END_TEST

/* Every 16-bit pattern of the dtype (_i: 0 f16, 1 bf16) but nan, as the V
 * of a single token: the output is 1 * v + 0 in double, rounded back, so it
 * must give the same bits (-0 becomes +0: the sum starts at +0). Checks the
 * conversions both ways on subnormals, infinities and every exponent. */
START_TEST(dt_all_patterns_exact)
{
    const fkv_dtype dt = _i ? FKV_DTYPE_BF16 : FKV_DTYPE_F16;
    const int nseq = 32, H = 8, D = 256; /* 32 * 8 * 256 = 65536 */
    const size_t per = (size_t)H * D;
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_seq_id seqs[32];
    uint16_t *v = (uint16_t *)malloc(65536 * sizeof *v);
    uint16_t *zero = (uint16_t *)calloc(65536, sizeof *zero);
    uint16_t *out = (uint16_t *)malloc(65536 * sizeof *out);
    uint32_t exp_mask = _i ? 0x7f80u : 0x7c00u;
    uint32_t p;
    int i, bad = 0;
    void *dk, *dv, *dq, *dout;
    tst_options(&o, 1, H, H, D, dt);
    o.policy = FKV_POLICY_DENSE;
    o.max_sequences = nseq;
    o.max_tokens_per_sequence = 64;
    tst_ok(fkv_create(&o, &c));
    for (p = 0; p < 65536; ++p) {
        int nan = (p & exp_mask) == exp_mask && (p & ~(exp_mask | 0x8000u));
        v[p] = (uint16_t)(nan ? 0x3c00u : p);
    }
    dk = tst_dev_alloc(65536 * 2);
    dv = tst_dev_alloc(65536 * 2);
    dq = tst_dev_alloc(65536 * 2);
    dout = tst_dev_alloc(65536 * 2);
    tst_dev_put(dk, zero, 65536 * 2);
    tst_dev_put(dv, v, 65536 * 2);
    tst_dev_put(dq, zero, 65536 * 2);
    for (i = 0; i < nseq; ++i)
        tst_ok(fkv_seq_open(c, &seqs[i]));
    {
        fkv_batch b = {nseq, 0, seqs, NULL}; /* one token each */
        tst_ok(fkv_append(c, 0, &b, dk, dv));
        tst_ok(fkv_attend(c, 0, &b, dq, dout));
    }
    tst_dev_get(out, dout, 65536 * 2);
    for (p = 0; p < 65536; ++p) {
        uint16_t want = v[p] == 0x8000u ? 0 : v[p];
        if (out[p] != want && bad++ < 5)
            fprintf(stderr, "seq %u head %u ch %u: 0x%04x, want 0x%04x\n",
                    p / (unsigned)per, p % (unsigned)per / (unsigned)D,
                    p % (unsigned)D, out[p], want);
    }
    ck_assert_msg(bad == 0, "%d of 65536 patterns changed", bad);
    tst_dev_free(dk);
    tst_dev_free(dv);
    tst_dev_free(dq);
    tst_dev_free(dout);
    fkv_destroy(c);
    free(v);
    free(zero);
    free(out);
}
END_TEST

Suite *suite_dtypes(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "dtypes"));
    TCase *tc = tst_tcase(s, "dtypes");
    tcase_add_loop_test(tc, dt_dense, 0, 8);
    tcase_add_loop_test(tc, dt_selection, 0, 8);
    tcase_add_loop_test(tc, dt_head_dims, 0, 6);
    tcase_add_loop_test(tc, dt_single_token_exact, 0, 3);
    tcase_add_loop_test(tc, dt_all_patterns_exact, 0, 2);
    return s;
}
