/*
 * external: FKV_POLICY_EXTERNAL with fkv_set_pages. The engine's pages (in
 * any order) are attended with sink, window and partial page, checked
 * against the float64 reference, also after appends (a page set stays a
 * candidate as the window moves on); invalid pages are rejected and change
 * nothing.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdlib.h>
#include <string.h>

#define EXT_K 10 /* tst_options: (256 - 32 - 64) / 16 */

typedef struct ext_pages {
    int32_t pages[TST_MAX_SEQS][TST_MAX_KVH][EXT_K];
    int32_t counts[TST_MAX_SEQS][TST_MAX_KVH];
} ext_pages;

static void ext_options(fkv_options *o)
{
    tst_options(o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o->policy = FKV_POLICY_EXTERNAL;
    o->max_tokens_per_sequence = 2048;
}

/* Random distinct candidate pages (unsorted) for every (entry, KV head);
 * the last candidate page, next to the window, is always in when there is
 * room. */
static void ext_choose(tst_model *m, int layer, int nseq, const int *slots,
                       ext_pages *e)
{
    int i, g, j;
    memset(e, 0, sizeof *e);
    for (i = 0; i < nseq; ++i) {
        int first, end, nc = ref_candidates(&m->lay, m->seq[slots[i]].len[layer],
                                            &first, &end);
        for (g = 0; g < m->KVH; ++g) {
            int want = ref_rng_below(&m->rng, (nc < EXT_K ? nc : EXT_K) + 1);
            int n = 0;
            if (want > 0) {
                e->pages[i][g][n++] = end - 1;
            }
            while (n < want) {
                int p = first + ref_rng_below(&m->rng, nc), dup = 0;
                for (j = 0; j < n; ++j)
                    dup |= e->pages[i][g][j] == p;
                if (!dup)
                    e->pages[i][g][n++] = p;
            }
            /* Shuffle: the library must not rely on the order. */
            for (j = n - 1; j > 0; --j) {
                int k = ref_rng_below(&m->rng, j + 1), t = e->pages[i][g][j];
                e->pages[i][g][j] = e->pages[i][g][k];
                e->pages[i][g][k] = t;
            }
            e->counts[i][g] = n;
        }
    }
}

static fkv_status ext_set(tst_model *m, int layer, int nseq, const int *slots,
                          const ext_pages *e)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    int32_t pages[TST_MAX_SEQS * TST_MAX_KVH * EXT_K];
    int32_t counts[TST_MAX_SEQS * TST_MAX_KVH];
    fkv_batch b;
    int i, g;
    for (i = 0; i < nseq; ++i) {
        ids[i] = m->seq[slots[i]].id;
        for (g = 0; g < m->KVH; ++g) {
            memcpy(pages + ((size_t)i * m->KVH + g) * EXT_K, e->pages[i][g],
                   sizeof e->pages[i][g]);
            counts[i * m->KVH + g] = e->counts[i][g];
        }
    }
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    return fkv_set_pages(m->c, layer, &b, pages, counts, 0);
}

/* fkv_attend with q against the reference over e's pages; the selected
 * pages reported are e's, ascending. */
static void ext_attend_check(tst_model *m, int layer, int nseq,
                             const int *slots, const float *q,
                             const ext_pages *e)
{
    size_t qs = (size_t)m->QH * m->D;
    float *out = (float *)malloc(sizeof(float) * qs * nseq);
    double *ref = (double *)malloc(sizeof(double) * qs);
    int i, g, j, k;
    tst_ok(tst_attend_raw(m, layer, nseq, slots, q, out));
    for (i = 0; i < nseq; ++i) {
        int buf[TST_MAX_KVH][EXT_K], *ptrs[TST_MAX_KVH], counts[TST_MAX_KVH];
        int got[EXT_K + 1], want[EXT_K], nw, ng;
        for (g = 0; g < m->KVH; ++g) {
            for (j = 0; j < e->counts[i][g]; ++j)
                buf[g][j] = e->pages[i][g][j];
            ptrs[g] = buf[g];
            counts[g] = e->counts[i][g];
        }
        tst_ref_output(m, layer, slots[i], q + i * qs, ptrs, counts, ref);
        tst_assert_close(m, out + i * qs, ref, TST_TOL_F32, "external attend");
        for (g = 0; g < m->KVH; ++g) {
            nw = 0;
            for (j = 0; j < counts[g]; ++j) { /* ascending */
                for (k = nw; k > 0 && want[k - 1] > buf[g][j]; --k)
                    want[k] = want[k - 1];
                want[k] = buf[g][j];
                nw++;
            }
            ng = tst_selected(m, layer, slots[i], g, got, EXT_K + 1);
            ck_assert_int_eq(ng, nw);
            for (j = 0; j < nw; ++j)
                ck_assert_int_eq(got[j], want[j]);
        }
    }
    free(out);
    free(ref);
}

START_TEST(external_matches_reference)
{
    fkv_options o;
    tst_model m;
    ext_pages e, none;
    fkv_stats st;
    int slots[2], n[2] = {400, 300}, sixteen[2] = {16, 16}, t, l;
    float q[2 * 4 * 64];
    ext_options(&o);
    tst_model_init(&m, &o, 16000);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n);
    memset(&none, 0, sizeof none);
    for (l = 0; l < m.L; ++l) { /* nothing set yet */
        tst_rand_query(&m, 2, q);
        ext_attend_check(&m, l, 2, slots, q, &none);
    }
    tst_ok(fkv_reset_stats(m.c));
    for (t = 0; t < 8; ++t)
        for (l = 0; l < m.L; ++l) {
            ext_choose(&m, l, 2, slots, &e);
            tst_ok(ext_set(&m, l, 2, slots, &e));
            /* Every third step appends a whole page. */
            tst_append_rand(&m, l, 2, slots, t % 3 == 2 ? sixteen : NULL);
            tst_rand_query(&m, 2, q);
            ext_attend_check(&m, l, 2, slots, q, &e);
        }
    tst_stats(&m, &st);
    ck_assert_uint_gt(st.pages_recalled, 0);
    ck_assert_uint_eq(st.pages_recalled_critical, 0); /* all in set_pages */
    /* A truncate forgets the pages: sink, window and partial page only. */
    tst_ok(fkv_seq_truncate(m.c, m.seq[slots[0]].id, 350));
    m.seq[slots[0]].len[0] = m.seq[slots[0]].len[1] = 350;
    tst_rand_query(&m, 1, q);
    ext_attend_check(&m, 0, 1, slots, q, &none);
    tst_model_free(&m);
}
END_TEST

START_TEST(external_bad_pages)
{
    fkv_options o;
    tst_model m;
    tst_snapshot snap;
    ext_pages e, bad;
    int slots[2], n[2] = {400, 300}, first, end;
    ext_options(&o);
    tst_model_init(&m, &o, 16100);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, n);
    ext_choose(&m, 0, 2, slots, &e);
    tst_ok(ext_set(&m, 0, 2, slots, &e));
    tst_snapshot_take(&m, &snap);
    ref_candidates(&m.lay, 300, &first, &end);
    memset(&bad, 0, sizeof bad);
    bad.counts[1][1] = 2;
    bad.pages[1][1][0] = first;
#define BAD(page, status, what)                                              \
    do {                                                                     \
        bad.pages[1][1][1] = (page);                                         \
        tst_expect_error(m.c, ext_set(&m, 0, 2, slots, &bad), (status),      \
                         what);                                              \
    } while (0)
    BAD(-1, FKV_ERR_OUT_OF_RANGE, "page -1");
    BAD(first - 1, FKV_ERR_OUT_OF_RANGE, "a sink page");
    BAD(end, FKV_ERR_OUT_OF_RANGE, "a window page");
    BAD(300 / 16, FKV_ERR_OUT_OF_RANGE, "the partial page");
    BAD(1000, FKV_ERR_OUT_OF_RANGE, "past the sequence");
    BAD(first, FKV_ERR_INVALID_ARGUMENT, "a page twice");
#undef BAD
    bad.pages[1][1][1] = first + 1;
    bad.counts[0][0] = EXT_K + 1;
    tst_expect_error(m.c, ext_set(&m, 0, 2, slots, &bad),
                     FKV_ERR_INVALID_ARGUMENT, "count K + 1");
    bad.counts[0][0] = -1;
    tst_expect_error(m.c, ext_set(&m, 0, 2, slots, &bad),
                     FKV_ERR_INVALID_ARGUMENT, "count -1");
    bad.counts[0][0] = 0;
    {
        fkv_seq_id ids[2] = {m.seq[slots[0]].id, m.seq[slots[1]].id};
        int32_t counts[4] = {0, 1, 0, 0}, zero[4] = {0, 0, 0, 0};
        int32_t pages[4 * EXT_K] = {0};
        fkv_batch b = {2, 0, ids, NULL};
        tst_expect_error(m.c, fkv_set_pages(m.c, 0, &b, NULL, counts, 0),
                         FKV_ERR_INVALID_ARGUMENT, "pages NULL");
        tst_expect_error(m.c, fkv_set_pages(m.c, 0, &b, pages, NULL, 0),
                         FKV_ERR_INVALID_ARGUMENT, "counts NULL");
        tst_expect_error(m.c, fkv_set_pages(m.c, 0, &b, pages, zero, 1),
                         FKV_ERR_INVALID_ARGUMENT, "flags 1");
        tst_expect_error(m.c, fkv_set_pages(m.c, 2, &b, pages, zero, 0),
                         FKV_ERR_OUT_OF_RANGE, "layer 2");
        ids[1] = 4242;
        tst_expect_error(m.c, fkv_set_pages(m.c, 0, &b, pages, zero, 0),
                         FKV_ERR_UNKNOWN_SEQUENCE, "unknown sequence");
        tst_expect_error(NULL, fkv_set_pages(NULL, 0, &b, pages, zero, 0),
                         FKV_ERR_INVALID_ARGUMENT, "NULL cache");
    }
    tst_snapshot_check(&m, &snap);
    tst_snapshot_free(&snap);
    /* The valid set is still the one attended. */
    {
        float q[2 * 4 * 64];
        tst_rand_query(&m, 2, q);
        ext_attend_check(&m, 0, 2, slots, q, &e);
    }
    tst_model_free(&m);
}
END_TEST

/* Another policy: fkv_set_pages is out of order. */
START_TEST(external_needs_policy)
{
    fkv_options o;
    tst_model m;
    int s, n = 300;
    fkv_seq_id id;
    int32_t counts[2] = {0, 0};
    fkv_batch b = {1, 0, &id, NULL};
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 16200);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    id = m.seq[s].id;
    tst_expect_error(m.c, fkv_set_pages(m.c, 0, &b, NULL, counts, 0),
                     FKV_ERR_INVALID_STATE, "set_pages under FREEKV");
    tst_model_free(&m);
}
END_TEST

Suite *suite_external(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "external"));
    TCase *tc = tst_tcase(s, "external");
    tcase_add_test(tc, external_matches_reference);
    tcase_add_test(tc, external_bad_pages);
    tcase_add_test(tc, external_needs_policy);
    return s;
}
