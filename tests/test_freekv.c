/*
 * freekv: speculative selection (pages chosen by fkv_select with the
 * previous query, made active by fkv_recall) and per-KV-head correction
 * (mean cosine under the threshold: re-selected with the current query).
 * docs/design.md section 4.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Two sequences whose lengths are not page multiples (1000 % 16 = 8,
 * 1203 % 16 = 3), so appending a token seals no page. */
static void fk_setup(tst_model *m, int *slots, int layers, int qh, int kvh,
                     float thr, int mode, uint64_t seed)
{
    fkv_options o;
    int ntok[2] = {1000, 1203};
    tst_options(&o, layers, qh, kvh, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_FREEKV;
    o.correction_threshold = thr;
    o.group_score = mode ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(m, &o, seed);
    slots[0] = tst_open(m);
    slots[1] = tst_open(m);
    tst_prefill(m, 2, slots, ntok);
}

/* Selected pages of (layer, slot, g) == reference top-K of q_seq now. */
static void expect_pages_of(tst_model *m, int layer, int slot, int g,
                            const float *q_seq, const char *which)
{
    int want[64], got[64], i;
    int nw = tst_ref_select(m, layer, slot, q_seq, g, want, NULL);
    int ng = tst_selected(m, layer, slot, g, got, 64);
    ck_assert_msg(ng == nw, "layer %d slot %d kv head %d: %d pages, %s has %d",
                  layer, slot, g, ng, which, nw);
    for (i = 0; i < nw; ++i)
        ck_assert_msg(got[i] == want[i],
                      "layer %d slot %d kv head %d: page #%d = %d, the top-K "
                      "of %s has %d",
                      layer, slot, g, i, got[i], which, want[i]);
}

/* Whether the top-K of a and b differ for (layer, slot, g). */
static int topk_differs(tst_model *m, int layer, int slot, int g,
                        const float *qa, const float *qb)
{
    int pa[64], pb[64], i;
    int na = tst_ref_select(m, layer, slot, qa, g, pa, NULL);
    int nb = tst_ref_select(m, layer, slot, qb, g, pb, NULL);
    if (na != nb)
        return 1;
    for (i = 0; i < na; ++i)
        if (pa[i] != pb[i])
            return 1;
    return 0;
}

/* Step 1 on every layer: attend q0 (synchronous selection), select q_a,
 * recall. q0 and q_a: [L][2][QH][D]. */
static void fk_first_step(tst_model *m, const int *slots, float *q0,
                          float *qa)
{
    size_t pl = (size_t)2 * m->QH * m->D;
    int l;
    for (l = 0; l < m->L; ++l) {
        tst_good_query(m, l, 2, slots, q0 + l * pl);
        tst_attend_check(m, l, 2, slots, q0 + l * pl, TST_TOL_F32);
        tst_good_query(m, l, 2, slots, qa + l * pl);
        tst_select(m, l, 2, slots, qa + l * pl);
        tst_recall(m, l, 2, slots);
    }
}

START_TEST(fk_first_step_synchronous)
{
    tst_model m;
    int slots[2];
    fkv_stats st;
    float *q;
    size_t pl;
    int l, i, g;
    fk_setup(&m, slots, 2, 8, 2, 0.8f, _i, 2000 + (uint64_t)_i);
    pl = (size_t)2 * m.QH * m.D;
    q = (float *)calloc(pl * m.L, sizeof(float));
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 2, slots, q + l * pl);
        tst_attend_check(&m, l, 2, slots, q + l * pl, TST_TOL_F32);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < m.KVH; ++g)
                expect_pages_of(&m, l, slots[i], g,
                                q + l * pl + (size_t)i * m.QH * m.D,
                                "the current query");
    }
    tst_stats(&m, &st);
    ck_assert_msg(st.corrections == (uint64_t)2 * m.KVH * m.L,
                  "corrections %llu, want %d (every head, first step)",
                  (unsigned long long)st.corrections, 2 * m.KVH * m.L);
    ck_assert_msg(st.heads_checked == (uint64_t)2 * m.KVH * m.L,
                  "heads_checked %llu, want %d",
                  (unsigned long long)st.heads_checked, 2 * m.KVH * m.L);
    free(q);
    tst_model_free(&m);
}
END_TEST

/* Correction off: a completely different q_b still uses q_a's pages. */
START_TEST(fk_speculative_correction_off)
{
    tst_model m;
    int slots[2], l, i, g, differs = 0;
    size_t pl, qs;
    float *q0, *qa, *qb;
    fkv_stats before, after;
    fk_setup(&m, slots, 2, 8, 2, FKV_CORRECTION_OFF, _i, 2100 + (uint64_t)_i);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl * m.L, sizeof(float));
    qa = (float *)calloc(pl * m.L, sizeof(float));
    qb = (float *)calloc(pl * m.L, sizeof(float));
    fk_first_step(&m, slots, q0, qa);
    tst_stats(&m, &before);
    for (l = 0; l < m.L; ++l) {
        tst_append_rand(&m, l, 2, slots, NULL);
        tst_rand_query(&m, 2, qb + l * pl);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < m.KVH; ++g)
                differs += topk_differs(&m, l, slots[i], g,
                                        qa + l * pl + i * qs,
                                        qb + l * pl + i * qs);
        tst_attend_check(&m, l, 2, slots, qb + l * pl, TST_TOL_F32);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < m.KVH; ++g)
                expect_pages_of(&m, l, slots[i], g, qa + l * pl + i * qs,
                                "the previous (speculative) query");
    }
    ck_assert_msg(differs > 0, "test not discriminating: q_a and q_b select "
                  "the same pages");
    tst_stats(&m, &after);
    ck_assert_msg(after.corrections == before.corrections,
                  "corrections with correction off: %llu",
                  (unsigned long long)(after.corrections -
                                       before.corrections));
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* q_b close to q_a (mean cosine above 0.8 for every head): speculative
 * pages, no correction; every head checked. */
START_TEST(fk_speculative_similar_query)
{
    tst_model m;
    int slots[2], l, i, g, differs = 0, tries;
    size_t pl, qs;
    float *q0, *qa, *qb;
    fkv_stats before, after;
    fk_setup(&m, slots, 2, 8, 2, 0.8f, _i, 2200 + (uint64_t)_i);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl * m.L, sizeof(float));
    qa = (float *)calloc(pl * m.L, sizeof(float));
    qb = (float *)calloc(pl * m.L, sizeof(float));
    fk_first_step(&m, slots, q0, qa);
    tst_stats(&m, &before);
    for (l = 0; l < m.L; ++l) {
        tst_append_rand(&m, l, 2, slots, NULL);
        for (tries = 0; tries < 200; ++tries) {
            int ok = 1, d = 0;
            tst_perturb(&m, qa + l * pl, qb + l * pl, pl, 0.45);
            for (i = 0; i < 2; ++i)
                for (g = 0; g < m.KVH; ++g) {
                    size_t off = l * pl + i * qs + (size_t)g * m.G * m.D;
                    double c = ref_group_cosine(qb + off, qa + off, m.G, m.D);
                    if (c < 0.8 + 0.02)
                        ok = 0;
                    d += topk_differs(&m, l, slots[i], g, qa + l * pl + i * qs,
                                      qb + l * pl + i * qs);
                }
            if (ok && d > 0) {
                differs += d;
                break;
            }
        }
        ck_assert_msg(tries < 200, "could not draw a similar query");
        tst_attend_check(&m, l, 2, slots, qb + l * pl, TST_TOL_F32);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < m.KVH; ++g)
                expect_pages_of(&m, l, slots[i], g, qa + l * pl + i * qs,
                                "the previous (speculative) query");
    }
    ck_assert(differs > 0);
    tst_stats(&m, &after);
    ck_assert_msg(after.corrections == before.corrections,
                  "%llu corrections for similar queries",
                  (unsigned long long)(after.corrections -
                                       before.corrections));
    ck_assert_msg(after.heads_checked - before.heads_checked ==
                      (uint64_t)2 * m.KVH * m.L,
                  "heads_checked grew by %llu, want %d",
                  (unsigned long long)(after.heads_checked -
                                       before.heads_checked),
                  2 * m.KVH * m.L);
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* Some KV heads drift (fresh random query: cosine about 0), the others
 * stay (q_a + small noise). Drifted heads are corrected to q_b's pages. */
START_TEST(fk_correction_per_head)
{
    /* drifted[seq][kv head] */
    static const int drifted[2][4] = {{0, 1, 0, 1}, {1, 0, 0, 0}};
    tst_model m;
    int slots[2], l, i, g, tries;
    size_t pl, qs, gs;
    float *q0, *qa, *qb;
    fkv_stats before, after;
    fk_setup(&m, slots, 2, 16, 4, 0.8f, _i, 2300 + (uint64_t)_i);
    qs = (size_t)m.QH * m.D;
    gs = (size_t)m.G * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl * m.L, sizeof(float));
    qa = (float *)calloc(pl * m.L, sizeof(float));
    qb = (float *)calloc(pl * m.L, sizeof(float));
    fk_first_step(&m, slots, q0, qa);
    tst_stats(&m, &before);
    for (l = 0; l < m.L; ++l) {
        tst_append_rand(&m, l, 2, slots, NULL);
        for (tries = 0; tries < 200; ++tries) {
            int ok = 1;
            float *fresh = (float *)calloc(pl, sizeof(float));
            tst_perturb(&m, qa + l * pl, qb + l * pl, pl, 0.05);
            tst_rand_query(&m, 2, fresh);
            for (i = 0; i < 2; ++i)
                for (g = 0; g < m.KVH; ++g) {
                    size_t off = i * qs + g * gs;
                    double c;
                    if (drifted[i][g])
                        memcpy(qb + l * pl + off, fresh + off,
                               sizeof(float) * gs);
                    c = ref_group_cosine(qb + l * pl + off, qa + l * pl + off,
                                         m.G, m.D);
                    if (drifted[i][g]) {
                        if (c > 0.8 - 0.05 ||
                            !topk_differs(&m, l, slots[i], g,
                                          qa + l * pl + i * qs,
                                          qb + l * pl + i * qs))
                            ok = 0;
                    } else if (c < 0.8 + 0.05) {
                        ok = 0;
                    }
                }
            free(fresh);
            if (ok && tst_query_gap(&m, l, 2, slots, qb + l * pl) >=
                          TST_MIN_GAP)
                break;
        }
        ck_assert_msg(tries < 200, "could not draw the drifted query");
        tst_attend_check(&m, l, 2, slots, qb + l * pl, TST_TOL_F32);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < m.KVH; ++g)
                expect_pages_of(&m, l, slots[i], g,
                                (drifted[i][g] ? qb : qa) + l * pl + i * qs,
                                drifted[i][g] ? "the current query (drifted "
                                                "head, corrected)"
                                              : "the previous query (head "
                                                "not drifted)");
    }
    tst_stats(&m, &after);
    ck_assert_msg(after.corrections - before.corrections == (uint64_t)3 * m.L,
                  "corrections grew by %llu, want %d (3 drifted heads x %d "
                  "layers)",
                  (unsigned long long)(after.corrections - before.corrections),
                  3 * m.L, m.L);
    ck_assert_msg(after.heads_checked - before.heads_checked ==
                      (uint64_t)2 * m.KVH * m.L,
                  "heads_checked grew by %llu, want %d",
                  (unsigned long long)(after.heads_checked -
                                       before.heads_checked),
                  2 * m.KVH * m.L);
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* fkv_select without fkv_recall: the pending selection is not used; the
 * active one (made by the first attend's query) stays. */
START_TEST(fk_select_without_recall)
{
    tst_model m;
    int slots[2], l, i, g;
    size_t pl, qs;
    float *q0, *qa, *qb;
    fk_setup(&m, slots, 1, 8, 2, 0.8f, 0, 2400);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl, sizeof(float));
    qa = (float *)calloc(pl, sizeof(float));
    qb = (float *)calloc(pl, sizeof(float));
    l = 0;
    tst_good_query(&m, l, 2, slots, q0);
    tst_attend_check(&m, l, 2, slots, q0, TST_TOL_F32);
    tst_good_query(&m, l, 2, slots, qa);
    tst_select(&m, l, 2, slots, qa); /* no recall */
    tst_append_rand(&m, l, 2, slots, NULL);
    tst_perturb(&m, q0, qb, pl, 0.02);
    tst_attend_check(&m, l, 2, slots, qb, TST_TOL_F32);
    for (i = 0; i < 2; ++i)
        for (g = 0; g < m.KVH; ++g)
            expect_pages_of(&m, l, slots[i], g, q0 + i * qs,
                            "the first step's query (no recall since)");
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* Select at attend: the recall after an attend moves the attend's top-K
 * (the next step's speculative set) with no fkv_select (_i 0), after
 * fkv_select(q NULL) (_i 1) and after it twice (_i 2). */
START_TEST(fk_pending_from_attend)
{
    tst_model m;
    int slots[2], i, g, differ, n;
    size_t pl, qs;
    float *q0, *qa, *qb;
    fk_setup(&m, slots, 1, 8, 2, FKV_CORRECTION_OFF, 0, 2470 + (uint64_t)_i);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl, sizeof(float));
    qa = (float *)calloc(pl, sizeof(float));
    qb = (float *)calloc(pl, sizeof(float));
    tst_good_query(&m, 0, 2, slots, q0);
    tst_attend_check(&m, 0, 2, slots, q0, TST_TOL_F32); /* corrects fully */
    tst_recall(&m, 0, 2, slots);
    tst_append_rand(&m, 0, 2, slots, NULL);
    tst_good_query(&m, 0, 2, slots, qa);
    tst_attend_check(&m, 0, 2, slots, qa, TST_TOL_F32); /* q0's pages */
    for (n = 0; n < _i; ++n)
        tst_select(&m, 0, 2, slots, NULL);
    tst_recall(&m, 0, 2, slots);
    tst_append_rand(&m, 0, 2, slots, NULL);
    tst_rand_query(&m, 2, qb);
    tst_attend_check(&m, 0, 2, slots, qb, TST_TOL_F32);
    differ = 0;
    for (i = 0; i < 2; ++i)
        for (g = 0; g < m.KVH; ++g) {
            expect_pages_of(&m, 0, slots[i], g, qa + i * qs,
                            "the previous attend's query");
            differ |= topk_differs(&m, 0, slots[i], g, q0 + i * qs,
                                   qa + i * qs);
        }
    ck_assert_msg(differ, "not discriminating: q0 and qa select alike");
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* Two selects before a recall: the last one wins. */
START_TEST(fk_last_select_wins)
{
    tst_model m;
    int slots[2], i, g;
    size_t pl, qs;
    float *q0, *qa, *qc, *qb;
    fk_setup(&m, slots, 1, 8, 2, FKV_CORRECTION_OFF, 0, 2450);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl, sizeof(float));
    qa = (float *)calloc(pl, sizeof(float));
    qc = (float *)calloc(pl, sizeof(float));
    qb = (float *)calloc(pl, sizeof(float));
    tst_good_query(&m, 0, 2, slots, q0);
    tst_attend_check(&m, 0, 2, slots, q0, TST_TOL_F32);
    tst_good_query(&m, 0, 2, slots, qa);
    tst_good_query(&m, 0, 2, slots, qc);
    tst_select(&m, 0, 2, slots, qa);
    tst_select(&m, 0, 2, slots, qc);
    tst_recall(&m, 0, 2, slots);
    tst_recall(&m, 0, 2, slots); /* a second recall changes nothing */
    tst_append_rand(&m, 0, 2, slots, NULL);
    tst_rand_query(&m, 2, qb);
    tst_attend_check(&m, 0, 2, slots, qb, TST_TOL_F32);
    for (i = 0; i < 2; ++i)
        for (g = 0; g < m.KVH; ++g)
            expect_pages_of(&m, 0, slots[i], g, qc + i * qs,
                            "the last fkv_select's query");
    free(q0);
    free(qa);
    free(qc);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* A zero query has cosine 0 with anything: its head is corrected; all its
 * page scores are 0, so the tie rule picks the K lowest candidates. */
START_TEST(fk_zero_query_corrected)
{
    tst_model m;
    int slots[2], i, g;
    size_t pl, qs, gs;
    float *q0, *qa, *qb;
    fkv_stats before, after;
    fk_setup(&m, slots, 1, 8, 2, 0.8f, _i, 2500 + (uint64_t)_i);
    qs = (size_t)m.QH * m.D;
    gs = (size_t)m.G * m.D;
    pl = 2 * qs;
    q0 = (float *)calloc(pl, sizeof(float));
    qa = (float *)calloc(pl, sizeof(float));
    qb = (float *)calloc(pl, sizeof(float));
    tst_good_query(&m, 0, 2, slots, q0);
    tst_attend_check(&m, 0, 2, slots, q0, TST_TOL_F32);
    tst_good_query(&m, 0, 2, slots, qa);
    tst_select(&m, 0, 2, slots, qa);
    tst_recall(&m, 0, 2, slots);
    tst_append_rand(&m, 0, 2, slots, NULL);
    tst_stats(&m, &before);
    tst_perturb(&m, qa, qb, pl, 0.01);
    memset(qb, 0, sizeof(float) * gs); /* seq 0, KV head 0: zero */
    tst_attend_check(&m, 0, 2, slots, qb, TST_TOL_F32);
    {
        int got[64], c = tst_selected(&m, 0, slots[0], 0, got, 64);
        ck_assert_int_eq(c, m.lay.K);
        for (i = 0; i < c; ++i)
            ck_assert_msg(got[i] == m.lay.S + i,
                          "zero query: page #%d = %d, want %d", i, got[i],
                          m.lay.S + i);
    }
    for (i = 0; i < 2; ++i)
        for (g = 0; g < m.KVH; ++g)
            if (i || g)
                expect_pages_of(&m, 0, slots[i], g, qa + i * qs,
                                "the previous query");
    tst_stats(&m, &after);
    ck_assert_msg(after.corrections - before.corrections == 1,
                  "corrections grew by %llu, want 1",
                  (unsigned long long)(after.corrections - before.corrections));
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* A page that becomes a candidate after the speculative selection (it
 * leaves the window when the appended token seals a page) is not attended
 * by a head that is not corrected, even if it would score highest. */
START_TEST(fk_new_candidate_not_speculative)
{
    fkv_options o;
    tst_model m;
    const int P = 16, D = 64, KVH = 2, QH = 8, G = 4;
    const int n0 = 1007; /* sealed 62; candidates [2, 58); page 58 window */
    size_t row = (size_t)KVH * D, qs = (size_t)QH * D;
    float *k, *v, *q0, *qa, *qb;
    int s, g, t, i, h, tries;
    tst_options(&o, 1, QH, KVH, D, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_FREEKV;
    o.correction_threshold = 0.8f;
    tst_model_init(&m, &o, 2600);
    s = tst_open(&m);
    k = (float *)calloc((size_t)n0 * row, sizeof(float));
    v = (float *)calloc((size_t)n0 * row, sizeof(float));
    q0 = (float *)calloc(qs, sizeof(float));
    qa = (float *)calloc(qs, sizeof(float));
    qb = (float *)calloc(qs, sizeof(float));
    ref_random_tensor(&m.rng, REF_F32, k, (size_t)n0 * row, 1.0);
    ref_random_tensor(&m.rng, REF_F32, v, (size_t)n0 * row, 1.0);
    ref_random_tensor(&m.rng, REF_F32, qa, qs, 1.0);
    /* Page 58 aligned with the group means of q_a. */
    for (g = 0; g < KVH; ++g)
        for (t = 0; t < P; ++t)
            for (i = 0; i < D; ++i) {
                double mq = 0.0;
                for (h = 0; h < G; ++h)
                    mq += qa[((size_t)g * G + h) * D + i];
                k[((size_t)(58 * P + t) * KVH + g) * D + i] =
                    (float)(12.0 * mq / G);
            }
    tst_ok(tst_append(&m, 0, 1, &s, &n0, k, v));
    ck_assert_msg(tst_query_gap(&m, 0, 1, &s, qa) >= TST_MIN_GAP,
                  "q_a's top-K not well separated (change the seed)");
    tst_good_query(&m, 0, 1, &s, q0);
    tst_attend_check(&m, 0, 1, &s, q0, TST_TOL_F32);
    tst_select(&m, 0, 1, &s, qa);
    tst_recall(&m, 0, 1, &s);
    tst_append_rand(&m, 0, 1, &s, NULL); /* seals page 62: 58 a candidate */
    for (tries = 0; tries < 100; ++tries) {
        tst_perturb(&m, qa, qb, qs, 0.05);
        if (tst_query_gap(&m, 0, 1, &s, qb) >= TST_MIN_GAP)
            break;
    }
    for (g = 0; g < KVH; ++g) {
        int pages[64], c, found = 0;
        c = tst_ref_select(&m, 0, s, qb, g, pages, NULL);
        for (i = 0; i < c; ++i)
            found |= pages[i] == 58;
        ck_assert_msg(found, "precondition: page 58 in the current top-K");
    }
    tst_attend_check(&m, 0, 1, &s, qb, TST_TOL_F32);
    for (g = 0; g < KVH; ++g) {
        int got[64], c = tst_selected(&m, 0, s, g, got, 64);
        for (i = 0; i < c && i < 64; ++i)
            ck_assert_msg(got[i] != 58,
                          "kv head %d: page 58 attended although it was no "
                          "candidate at fkv_select and the head was not "
                          "corrected",
                          g);
    }
    free(k);
    free(v);
    free(q0);
    free(qa);
    free(qb);
    tst_model_free(&m);
}
END_TEST

/* SYNC never checks or corrects. */
START_TEST(fk_sync_no_corrections)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {1000, 777}, t, l;
    float *q;
    fkv_stats st;
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 2700);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    for (t = 0; t < 4; ++t)
        for (l = 0; l < m.L; ++l) {
            tst_append_rand(&m, l, 2, slots, NULL);
            tst_good_query(&m, l, 2, slots, q);
            tst_attend_check(&m, l, 2, slots, q, TST_TOL_F32);
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
    tst_stats(&m, &st);
    ck_assert_msg(st.corrections == 0 && st.heads_checked == 0,
                  "SYNC: corrections %llu heads_checked %llu, want 0 and 0",
                  (unsigned long long)st.corrections,
                  (unsigned long long)st.heads_checked);
    free(q);
    tst_model_free(&m);
}
END_TEST

/* Many decode steps with drifting queries (some heads corrected, some
 * not, pages sealing on the way), checked against the simulation every
 * step; the correction counters match the simulation. */
START_TEST(fk_multistep_drift)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {700, 1001}, t, l;
    size_t qs, pl;
    float *q, *prev;
    fkv_stats st;
    tst_options(&o, 2, 10, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_FREEKV;
    o.group_score = (_i & 1) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    o.correction_threshold = (_i & 2) ? 0.9f : 0.8f;
    tst_model_init(&m, &o, 2800 + (uint64_t)(_i & 3));
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    qs = (size_t)m.QH * m.D;
    pl = 2 * qs;
    q = (float *)calloc(pl * m.L, sizeof(float));
    prev = (float *)calloc(pl * m.L, sizeof(float));
    for (t = 0; t < 24; ++t)
        for (l = 0; l < m.L; ++l) {
            float *ql = q + l * pl, *pq = prev + l * pl;
            if (t > 0)
                tst_append_rand(&m, l, 2, slots, NULL);
            tst_next_query(&m, l, 2, slots, t ? pq : NULL, ql);
            tst_attend_check(&m, l, 2, slots, ql, TST_TOL_F32);
            if (_i & 4) /* the attend's query, as engines pass it */
                tst_select(&m, l, 2, slots, NULL);
            else
                tst_select(&m, l, 2, slots, ql);
            tst_recall(&m, l, 2, slots);
            memcpy(pq, ql, sizeof(float) * pl);
        }
    tst_stats(&m, &st);
    ck_assert_msg(st.corrections == m.sim_corrections,
                  "corrections %llu, reference %llu",
                  (unsigned long long)st.corrections,
                  (unsigned long long)m.sim_corrections);
    ck_assert_msg(st.heads_checked == m.sim_checks,
                  "heads_checked %llu, reference %llu",
                  (unsigned long long)st.heads_checked,
                  (unsigned long long)m.sim_checks);
    ck_assert_msg(m.sim_corrections > (uint64_t)2 * m.KVH * m.L &&
                      m.sim_corrections < m.sim_checks,
                  "test not discriminating: %llu corrections of %llu",
                  (unsigned long long)m.sim_corrections,
                  (unsigned long long)m.sim_checks);
    free(q);
    free(prev);
    tst_model_free(&m);
}
END_TEST

Suite *suite_freekv(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "freekv"));
    TCase *tc = tst_tcase(s, "freekv");
    tcase_add_loop_test(tc, fk_first_step_synchronous, 0, 2);
    tcase_add_loop_test(tc, fk_speculative_correction_off, 0, 2);
    tcase_add_loop_test(tc, fk_speculative_similar_query, 0, 2);
    tcase_add_loop_test(tc, fk_correction_per_head, 0, 2);
    tcase_add_test(tc, fk_select_without_recall);
    tcase_add_test(tc, fk_last_select_wins);
    tcase_add_loop_test(tc, fk_zero_query_corrected, 0, 2);
    tcase_add_test(tc, fk_new_candidate_not_speculative);
    tcase_add_test(tc, fk_sync_no_corrections);
    tcase_add_loop_test(tc, fk_multistep_drift, 0, 8);
    tcase_add_loop_test(tc, fk_pending_from_attend, 0, 3);
    return s;
}
