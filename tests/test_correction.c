/*
 * correction: FREEKV's BOUNDED correction criterion with select at attend
 * (docs/design.md section 4, "The BOUNDED criterion"). The simulation below
 * is written from that text; selection, page masses and attention come from
 * the float64 reference (reference.h).
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CR_MAXK 64

/* Simulated state of one (sequence, layer, KV head). */
typedef struct cr_head {
    int active_valid, nactive, active[CR_MAXK];
    int pending_valid, npending, pending[CR_MAXK];
} cr_head;

typedef struct cr_sim {
    tst_model m;
    int slots[2], nseq;
    cr_head head[2][TST_MAX_LAYERS][TST_MAX_KVH];
    float *pending_q[2][TST_MAX_LAYERS]; /* [QH][D] */
    int64_t pending_len[2][TST_MAX_LAYERS];
    int pending_at_attend[2][TST_MAX_LAYERS];
    uint64_t checks, corrections, recalled, recalled_attend;
    /* Heads where the cap M or the threshold left a missing page out. */
    uint64_t capped, target_met;
    /* Heads whose speculative set (speculative_min_mass) left pages of the
     * top-K out, and heads where it holds pages the attend did not fetch. */
    uint64_t spec_short, spec_ahead;
    int via_tokens; /* attend through fkv_attend_tokens, one token each */
} cr_sim;

static int has(const int *list, int n, int p)
{
    int i;
    for (i = 0; i < n; ++i)
        if (list[i] == p)
            return 1;
    return 0;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* BOUNDED, with or without a speculative mass, is created on this run's
 * backend (both have it). */
static void check_bounded_creates(const fkv_options *o)
{
    fkv_cache *c = NULL;
    fkv_status st = fkv_create(o, &c);
    ck_assert_msg(st == FKV_OK, "fkv_create(BOUNDED) returned %d", (int)st);
    fkv_destroy(c);
}

static void cr_options(fkv_options *o, int layers, float min_mass, int M)
{
    tst_options(o, layers, 4, 2, 64, FKV_DTYPE_F32);
    o->policy = FKV_POLICY_FREEKV;
    o->correction_criterion = FKV_CRITERION_BOUNDED;
    o->correction_min_mass = min_mass;
    o->correction_max_pages = M;
}

/* Two sequences of n0 and n1 tokens. */
static void cr_init_len(cr_sim *s, const fkv_options *o, uint64_t seed,
                        int n0, int n1)
{
    int ntok[2], i, l;
    ntok[0] = n0;
    ntok[1] = n1;
    memset(s, 0, sizeof *s);
    check_bounded_creates(o);
    tst_model_init(&s->m, o, seed);
    s->nseq = 2;
    s->slots[0] = tst_open(&s->m);
    s->slots[1] = tst_open(&s->m);
    tst_prefill(&s->m, 2, s->slots, ntok);
    for (i = 0; i < 2; ++i)
        for (l = 0; l < s->m.L; ++l)
            s->pending_q[i][l] = (float *)calloc(
                (size_t)s->m.QH * s->m.D, sizeof(float));
}

/* 1000 and 1203 tokens: K = 10 of 56 and 69 candidates. */
static void cr_init(cr_sim *s, const fkv_options *o, uint64_t seed)
{
    cr_init_len(s, o, seed, 1000, 1203);
}

static void cr_free(cr_sim *s)
{
    int i, l;
    for (i = 0; i < 2; ++i)
        for (l = 0; l < TST_MAX_LAYERS; ++l)
            free(s->pending_q[i][l]);
    tst_model_free(&s->m);
}

/* mass[p - first] over the candidates [first, end): MEAN_SOFTMAX of the
 * group's Quest scores (design.md section 3). */
static void cr_mass(cr_sim *s, int layer, int i, int g, const float *q_seq,
                    int first, int end, double *mass)
{
    tst_model *m = &s->m;
    tst_seq *sq = &m->seq[s->slots[i]];
    int n = end - first, h, p;
    double *scores = (double *)malloc(sizeof(double) * (size_t)m->G * n);
    double mx[256], mn[256];
    ck_assert(m->D <= 256);
    for (p = first; p < end; ++p) {
        ref_page_minmax(sq->k[layer], m->KVH, m->D, g, m->lay.P, p, mx, mn);
        for (h = 0; h < m->G; ++h)
            scores[(size_t)h * n + (p - first)] = ref_page_score(
                q_seq + ((size_t)g * m->G + h) * m->D, mx, mn, m->D);
    }
    ref_group_aggregate(scores, m->G, n, m->scale, REF_GROUP_MEAN_SOFTMAX,
                        mass);
    free(scores);
}

typedef struct ranked {
    double mass;
    int page;
} ranked;

static int by_mass_desc(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->mass != y->mass)
        return x->mass > y->mass ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

static int by_mass_asc(const void *a, const void *b)
{
    const ranked *x = a, *y = b;
    if (x->mass != y->mass)
        return x->mass < y->mass ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

/* The design text, for one (sequence i, layer, KV head g) at fkv_attend. */
static void cr_sim_head(cr_sim *s, int layer, int i, int g,
                        const float *q_seq)
{
    tst_model *m = &s->m;
    cr_head *hd = &s->head[i][layer][g];
    const int K = m->lay.K;
    const float thr = m->o.correction_min_mass;
    const float spec = m->o.speculative_min_mass;
    int spec_set[CR_MAXK], nspec_set = -1; /* -1: the top-K */
    const int M = m->o.correction_max_pages;
    int64_t n = m->seq[s->slots[i]].len[layer];
    int first, end, nc = ref_candidates(&m->lay, n, &first, &end);
    int top[CR_MAXK], ntop, j, full;
    ck_assert(K <= CR_MAXK);
    s->checks++;
    ntop = tst_ref_select(m, layer, s->slots[i], q_seq, g, top, NULL);
    full = !hd->active_valid;
    if (!full && nc <= K)
        for (j = first; j < end; ++j)
            if (!has(hd->active, hd->nactive, j))
                full = 1;
    if (full) {
        for (j = 0; j < ntop; ++j)
            if (!hd->active_valid || !has(hd->active, hd->nactive, top[j]))
                s->recalled++, s->recalled_attend++;
        memcpy(hd->active, top, sizeof(int) * (size_t)ntop);
        hd->nactive = ntop;
        hd->active_valid = 1;
        s->corrections++;
    } else if (nc > K) {
        double *mass = (double *)malloc(sizeof(double) * (size_t)nc);
        ranked miss[CR_MAXK], out[CR_MAXK];
        int nmiss = 0, nout = 0, nfetch, replace, na = 0, heavy = 0;
        int next[CR_MAXK], na0 = hd->nactive;
        double have = 0.0, want = 0.0, mass_top = 0.0;
        cr_mass(s, layer, i, g, q_seq, first, end, mass);
        /* docs/design.md section 4 step 4: the missing pages of T, most
         * mass first, until the attended set holds (1 - m) of T's mass. */
        for (j = 0; j < ntop; ++j) {
            want += mass[top[j] - first];
            if (!has(hd->active, hd->nactive, top[j])) {
                miss[nmiss].mass = mass[top[j] - first];
                miss[nmiss].page = top[j];
                nmiss++;
            }
        }
        for (j = 0; j < hd->nactive; ++j) {
            have += mass[hd->active[j] - first];
            if (!has(top, ntop, hd->active[j])) {
                out[nout].mass = mass[hd->active[j] - first];
                out[nout].page = hd->active[j];
                nout++;
            }
        }
        mass_top = want;
        want *= 1.0 - (double)thr;
        (void)heavy;
        qsort(miss, (size_t)nmiss, sizeof *miss, by_mass_desc);
        qsort(out, (size_t)nout, sizeof *out, by_mass_asc);
        for (nfetch = 0; nfetch < nmiss && nfetch < M && have < want;
             ++nfetch) {
            if (nfetch >= K - hd->nactive)
                have -= out[nfetch - (K - hd->nactive)].mass;
            have += miss[nfetch].mass;
        }
        if (nfetch == M && nfetch < nmiss && have < want)
            s->capped++;
        if (nfetch < nmiss && have >= want)
            s->target_met++;
        replace = nfetch - (K - hd->nactive);
        if (replace < 0)
            replace = 0;
        ck_assert(nout >= replace);
        for (j = 0; j < hd->nactive; ++j) {
            int r, dropped = 0;
            for (r = 0; r < replace; ++r)
                dropped |= out[r].page == hd->active[j];
            if (!dropped)
                next[na++] = hd->active[j];
        }
        for (j = 0; j < nfetch; ++j)
            next[na++] = miss[j].page;
        qsort(next, (size_t)na, sizeof(int), cmp_int);
        if (spec > 0.0f) {
            /* The walk goes on from the attended set, without the cap, to
             * (1 - spec) of T's mass; that set is the pending one. */
            int ns = nfetch, rs, r;
            double spec_want = (1.0 - (double)spec) * mass_top;
            for (; ns < nmiss && have < spec_want; ++ns) {
                if (ns >= K - na0)
                    have -= out[ns - (K - na0)].mass;
                have += miss[ns].mass;
            }
            rs = ns - (K - na0);
            if (rs < 0)
                rs = 0;
            nspec_set = 0;
            for (j = 0; j < na0; ++j) {
                int dropped = 0;
                for (r = 0; r < rs; ++r)
                    dropped |= out[r].page == hd->active[j];
                if (!dropped)
                    spec_set[nspec_set++] = hd->active[j];
            }
            for (j = 0; j < ns; ++j)
                spec_set[nspec_set++] = miss[j].page;
            qsort(spec_set, (size_t)nspec_set, sizeof(int), cmp_int);
            if (ns < nmiss)
                s->spec_short++;
            if (ns > nfetch)
                s->spec_ahead++;
        }
        memcpy(hd->active, next, sizeof(int) * (size_t)na);
        hd->nactive = na;
        s->recalled += (uint64_t)nfetch;
        s->recalled_attend += (uint64_t)nfetch;
        if (nfetch > 0)
            s->corrections++;
        free(mass);
    }
    if (nspec_set >= 0) {
        memcpy(hd->pending, spec_set, sizeof(int) * (size_t)nspec_set);
        hd->npending = nspec_set;
    } else {
        memcpy(hd->pending, top, sizeof(int) * (size_t)ntop);
        hd->npending = ntop;
    }
    hd->pending_valid = 1;
}

/* fkv_attend of q [nseq][QH][D] on layer, checked against the simulation:
 * outputs and fkv_get_selected_pages. */
/* fkv_attend_tokens with one query token per sequence: what fkv_attend
 * does (out as floats). */
static fkv_status cr_attend_tokens_raw(tst_model *m, int layer, int nseq,
                                       const int *slots, const float *q,
                                       float *out)
{
    fkv_seq_id ids[TST_MAX_SEQS];
    int32_t nt[TST_MAX_SEQS];
    fkv_batch b;
    size_t n = (size_t)nseq * m->QH * m->D;
    void *dq, *dout;
    fkv_status st;
    int i;
    for (i = 0; i < nseq; ++i) {
        ids[i] = m->seq[slots[i]].id;
        nt[i] = 1;
    }
    dq = tst_dev_from_floats(m->dt, q, n);
    dout = tst_dev_alloc(n * ref_dtype_bytes((int)m->dt));
    b.num_seqs = nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = nt;
    st = fkv_attend_tokens(m->c, layer, &b, dq, dout);
    if (st == FKV_OK)
        tst_dev_to_floats(m->dt, dout, out, n);
    tst_dev_free(dq);
    tst_dev_free(dout);
    return st;
}

static void cr_attend(cr_sim *s, int layer, const float *q)
{
    tst_model *m = &s->m;
    size_t qs = (size_t)m->QH * m->D;
    float *out = (float *)malloc(sizeof(float) * qs * s->nseq);
    double *ref = (double *)malloc(sizeof(double) * qs);
    int i, g, j;
    tst_ok(s->via_tokens
               ? cr_attend_tokens_raw(m, layer, s->nseq, s->slots, q, out)
               : tst_attend_raw(m, layer, s->nseq, s->slots, q, out));
    for (i = 0; i < s->nseq; ++i) {
        int *pages[TST_MAX_KVH], counts[TST_MAX_KVH];
        char what[96];
        for (g = 0; g < m->KVH; ++g) {
            cr_head *hd = &s->head[i][layer][g];
            int got[CR_MAXK], ng;
            cr_sim_head(s, layer, i, g, q + i * qs);
            pages[g] = hd->active;
            counts[g] = hd->nactive;
            ng = tst_selected(m, layer, s->slots[i], g, got, CR_MAXK);
            ck_assert_msg(ng == hd->nactive,
                          "layer %d seq %d kv head %d: attended %d pages, "
                          "the simulation %d", layer, i, g, ng, hd->nactive);
            for (j = 0; j < ng; ++j)
                ck_assert_msg(got[j] == hd->active[j],
                              "layer %d seq %d kv head %d: page #%d is %d, "
                              "the simulation has %d", layer, i, g, j,
                              got[j], hd->active[j]);
        }
        memcpy(s->pending_q[i][layer], q + i * qs, sizeof(float) * qs);
        s->pending_len[i][layer] = m->seq[s->slots[i]].len[layer];
        s->pending_at_attend[i][layer] = 1;
        tst_ref_output(m, layer, s->slots[i], q + i * qs, pages, counts, ref);
        snprintf(what, sizeof what, "BOUNDED attend layer %d seq %d", layer,
                 i);
        tst_assert_close(m, out + i * qs, ref, tst_tol(m->dt), what);
    }
    free(out);
    free(ref);
}

/* fkv_select of q: bookkeeping for the same query, a new top-K else. */
static void cr_select(cr_sim *s, int layer, const float *q)
{
    tst_model *m = &s->m;
    size_t qs = (size_t)m->QH * m->D;
    fkv_seq_id ids[2];
    fkv_batch b;
    int i, g;
    void *dq = tst_dev_from_floats(m->dt, q, qs * s->nseq);
    for (i = 0; i < s->nseq; ++i)
        ids[i] = m->seq[s->slots[i]].id;
    b.num_seqs = s->nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    tst_ok(fkv_select(m->c, layer, &b, dq));
    tst_dev_free(dq);
    for (i = 0; i < s->nseq; ++i) {
        if (s->pending_at_attend[i][layer] &&
            s->pending_len[i][layer] == m->seq[s->slots[i]].len[layer] &&
            memcmp(s->pending_q[i][layer], q + i * qs,
                   sizeof(float) * qs) == 0)
            continue;
        s->pending_at_attend[i][layer] = 0;
        for (g = 0; g < m->KVH; ++g) {
            cr_head *hd = &s->head[i][layer][g];
            hd->npending = tst_ref_select(m, layer, s->slots[i], q + i * qs,
                                          g, hd->pending, NULL);
            hd->pending_valid = 1;
        }
    }
}

static void cr_recall(cr_sim *s, int layer)
{
    tst_model *m = &s->m;
    fkv_seq_id ids[2];
    fkv_batch b;
    int i, g, j;
    for (i = 0; i < s->nseq; ++i)
        ids[i] = m->seq[s->slots[i]].id;
    b.num_seqs = s->nseq;
    b.reserved = 0;
    b.seq_ids = ids;
    b.num_tokens = NULL;
    tst_ok(fkv_recall(m->c, layer, &b));
    for (i = 0; i < s->nseq; ++i) {
        for (g = 0; g < m->KVH; ++g) {
            cr_head *hd = &s->head[i][layer][g];
            if (!hd->pending_valid)
                continue;
            for (j = 0; j < hd->npending; ++j)
                if (!has(hd->active, hd->nactive, hd->pending[j]))
                    s->recalled++;
            memcpy(hd->active, hd->pending, sizeof(int) * hd->npending);
            hd->nactive = hd->npending;
            hd->active_valid = 1;
            hd->pending_valid = 0;
        }
        s->pending_at_attend[i][layer] = 0;
    }
}

static void cr_expect_stats(cr_sim *s, const char *when)
{
    fkv_stats st;
    tst_stats(&s->m, &st);
    ck_assert_msg(st.heads_checked == s->checks,
                  "%s: heads_checked %llu, simulated %llu", when,
                  (unsigned long long)st.heads_checked,
                  (unsigned long long)s->checks);
    ck_assert_msg(st.corrections == s->corrections,
                  "%s: corrections %llu, simulated %llu", when,
                  (unsigned long long)st.corrections,
                  (unsigned long long)s->corrections);
    ck_assert_msg(st.pages_recalled == s->recalled,
                  "%s: pages_recalled %llu, simulated %llu", when,
                  (unsigned long long)st.pages_recalled,
                  (unsigned long long)s->recalled);
    ck_assert_msg(st.pages_recalled_critical == s->recalled_attend,
                  "%s: pages_recalled_critical %llu, simulated %llu", when,
                  (unsigned long long)st.pages_recalled_critical,
                  (unsigned long long)s->recalled_attend);
}

/* (min_mass, M, dtype, speculative_min_mass) of the drift cases. */
static const struct {
    float min_mass;
    int M;
    fkv_dtype dt;
    float spec;
} k_params[] = {{0.02f, 2, FKV_DTYPE_F32, 0.0f},
                {0.0f, 1, FKV_DTYPE_F32, 0.0f},
                {0.0f, 64, FKV_DTYPE_F32, 0.0f},
                {0.05f, 4, FKV_DTYPE_F32, 0.0f},
                {0.02f, 0, FKV_DTYPE_F32, 0.0f},
                {0.01f, 3, FKV_DTYPE_BF16, 0.0f},
                {0.01f, 64, FKV_DTYPE_F32, 0.0f},
                /* the speculative set short of T, ahead of the attend */
                {0.1f, 4, FKV_DTYPE_F32, 0.02f},
                {0.05f, 1, FKV_DTYPE_BF16, 0.01f},
                /* beyond m: it goes on only where the cap stopped */
                {0.0f, 1, FKV_DTYPE_F32, 0.1f}};

/* Drifting queries over decode steps (append, attend, select, recall on
 * every layer); every third step selects with another query than the one
 * attended with. Outputs, attended pages and counters follow the
 * simulation. */
static void cr_drift_run(int pi, int layers, int via_tokens)
{
    cr_sim s;
    fkv_options o;
    size_t qs;
    float *q, *prev, *other;
    int step, l;
    cr_options(&o, layers, k_params[pi].min_mass, k_params[pi].M);
    o.dtype = k_params[pi].dt;
    o.speculative_min_mass = k_params[pi].spec;
    cr_init(&s, &o, 0xc0 + (uint64_t)pi + 0x100 * (uint64_t)via_tokens);
    s.via_tokens = via_tokens;
    qs = (size_t)s.m.QH * s.m.D;
    q = (float *)malloc(sizeof(float) * qs * 2 * s.m.L);
    prev = (float *)malloc(sizeof(float) * qs * 2 * s.m.L);
    other = (float *)malloc(sizeof(float) * qs * 2);
    for (step = 0; step < 10; ++step) {
        for (l = 0; l < s.m.L; ++l) {
            float *ql = q + (size_t)l * qs * 2;
            tst_append_rand(&s.m, l, 2, s.slots, NULL);
            tst_next_query(&s.m, l, 2, s.slots,
                           step ? prev + (size_t)l * qs * 2 : NULL, ql);
            cr_attend(&s, l, ql);
            if (step % 3 == 2) {
                tst_next_query(&s.m, l, 2, s.slots, ql, other);
                cr_select(&s, l, other);
            } else {
                cr_select(&s, l, ql);
            }
            cr_recall(&s, l);
        }
        memcpy(prev, q, sizeof(float) * qs * 2 * s.m.L);
        cr_expect_stats(&s, "after a step");
    }
    /* The cases exercise what they are named for. */
    if (k_params[pi].M == 1)
        ck_assert_msg(s.capped > 0, "the cap M never bound");
    if (k_params[pi].min_mass > 0.0f && k_params[pi].M >= 4)
        ck_assert_msg(s.target_met > 0, "the mass target never stopped the fetches early");
    if (k_params[pi].M > 0)
        ck_assert_msg(s.recalled_attend > (uint64_t)10 * 2 * 2 * s.m.L,
                      "no page was fetched inside fkv_attend after the "
                      "first step");
    if (k_params[pi].spec > 0.0f) {
        ck_assert_msg(s.spec_short > 0,
                      "the speculative set always held the whole top-K");
        ck_assert_msg(s.spec_ahead > 0, "the speculative set never held a "
                                        "page the attend had not fetched");
    }
    free(q);
    free(prev);
    free(other);
    cr_free(&s);
}

START_TEST(cr_drift)
{
    cr_drift_run(_i, 2, 0);
}
END_TEST

/* The same through fkv_attend_tokens (one token per sequence), 3 layers:
 * every layer's own state (the CUDA rule kernel once got layer 0's). */
static const int k_tokens_cases[] = {0, 1, 7};

START_TEST(cr_drift_attend_tokens)
{
    cr_drift_run(k_tokens_cases[_i], 3, 1);
}
END_TEST

/* M = K and min_mass 0: every head attends exactly the top-K of the
 * current query (RESIDENT's selection). */
START_TEST(cr_unbounded_is_current_topk)
{
    cr_sim s;
    fkv_options o;
    size_t qs;
    float q[2 * 4 * 64];
    int step, i, g, j;
    cr_options(&o, 1, 0.0f, 10);
    cr_init(&s, &o, 0xd1);
    qs = (size_t)s.m.QH * s.m.D;
    for (step = 0; step < 4; ++step) {
        tst_append_rand(&s.m, 0, 2, s.slots, NULL);
        tst_good_query(&s.m, 0, 2, s.slots, q);
        cr_attend(&s, 0, q);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < s.m.KVH; ++g) {
                int want[CR_MAXK], got[CR_MAXK];
                int nw = tst_ref_select(&s.m, 0, s.slots[i], q + i * qs, g,
                                        want, NULL);
                int ng = tst_selected(&s.m, 0, s.slots[i], g, got, CR_MAXK);
                ck_assert_int_eq(ng, nw);
                for (j = 0; j < nw; ++j)
                    ck_assert_int_eq(got[j], want[j]);
            }
        cr_select(&s, 0, q);
        cr_recall(&s, 0);
    }
    /* Everything the top-K needed came inside fkv_attend: the recalls
     * after it moved nothing. */
    cr_expect_stats(&s, "end");
    ck_assert(s.recalled == s.recalled_attend);
    cr_free(&s);
}
END_TEST

static uint64_t recalled_now(tst_model *m)
{
    fkv_stats st;
    tst_stats(m, &st);
    return st.pages_recalled;
}

/* speculative_min_mass 1 with no cap (M = K): the speculative set is the
 * attended set, so after the first step fkv_recall moves nothing, every
 * page comes inside fkv_attend, and the next attend starts from what this
 * one attended. */
START_TEST(cr_spec_whole_mass_moves_nothing)
{
    cr_sim s;
    fkv_options o;
    float q[2 * 4 * 64], prev[2 * 4 * 64];
    int step, i, g, j;
    uint64_t before;
    cr_options(&o, 1, 0.02f, 10);
    o.speculative_min_mass = 1.0f;
    cr_init(&s, &o, 0xd7);
    for (step = 0; step < 6; ++step) {
        tst_append_rand(&s.m, 0, 2, s.slots, NULL);
        tst_next_query(&s.m, 0, 2, s.slots, step ? prev : NULL, q);
        cr_attend(&s, 0, q);
        for (i = 0; i < 2; ++i)
            for (g = 0; g < s.m.KVH; ++g) {
                cr_head *hd = &s.head[i][0][g];
                ck_assert_int_eq(hd->npending, hd->nactive);
                for (j = 0; j < hd->nactive; ++j)
                    ck_assert_int_eq(hd->pending[j], hd->active[j]);
            }
        before = recalled_now(&s.m);
        cr_select(&s, 0, q);
        cr_recall(&s, 0);
        ck_assert_uint_eq(recalled_now(&s.m), before);
        memcpy(prev, q, sizeof q);
        cr_expect_stats(&s, "speculative mass 1");
    }
    ck_assert(s.recalled == s.recalled_attend);
    ck_assert_msg(s.recalled_attend > (uint64_t)2 * 2 * 10,
                  "no page moved inside fkv_attend after the first step");
    cr_free(&s);
}
END_TEST

/* Select at attend: with M = 0 nothing moves inside fkv_attend, so
 * fkv_recall moves exactly the top-K the attend made (fkv_select with the
 * same query) or the one another query makes. */
START_TEST(cr_select_bookkeeping)
{
    cr_sim s;
    fkv_options o;
    size_t qs;
    float q[2 * 4 * 64], q2[2 * 4 * 64];
    int i, g, j;
    uint64_t before, want;
    cr_options(&o, 1, 0.0f, 0);
    cr_init(&s, &o, 0xe2);
    qs = (size_t)s.m.QH * s.m.D;
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q); /* the first step corrects fully */
    cr_recall(&s, 0);
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q);
    /* The same query: the attend's top-K, which differs from the active
     * set (a fresh query), is what fkv_recall moves. */
    want = 0;
    for (i = 0; i < 2; ++i)
        for (g = 0; g < s.m.KVH; ++g) {
            cr_head *hd = &s.head[i][0][g];
            for (j = 0; j < hd->npending; ++j)
                want += !has(hd->active, hd->nactive, hd->pending[j]);
        }
    ck_assert_msg(want > 0, "a fresh query kept the whole top-K");
    before = recalled_now(&s.m);
    cr_select(&s, 0, q);
    cr_recall(&s, 0);
    ck_assert_uint_eq(recalled_now(&s.m) - before, want);
    cr_expect_stats(&s, "same query");

    /* Another query re-selects: fkv_recall moves that query's top-K. */
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q);
    tst_good_query(&s.m, 0, 2, s.slots, q2);
    cr_select(&s, 0, q2);
    want = 0;
    for (i = 0; i < 2; ++i)
        for (g = 0; g < s.m.KVH; ++g) {
            int top[CR_MAXK];
            cr_head *hd = &s.head[i][0][g];
            int nt = tst_ref_select(&s.m, 0, s.slots[i], q2 + i * qs, g, top,
                                    NULL);
            for (j = 0; j < nt; ++j)
                want += !has(hd->active, hd->nactive, top[j]);
        }
    before = recalled_now(&s.m);
    cr_recall(&s, 0);
    ck_assert_uint_eq(recalled_now(&s.m) - before, want);
    /* The next attend (M = 0: no fetch) uses q2's top-K. */
    tst_append_rand(&s.m, 0, 2, s.slots, NULL);
    cr_attend(&s, 0, q);
    for (i = 0; i < 2; ++i)
        for (g = 0; g < s.m.KVH; ++g) {
            int top[CR_MAXK], got[CR_MAXK];
            int nt = tst_ref_select(&s.m, 0, s.slots[i], q2 + i * qs, g, top,
                                    NULL);
            int ng = tst_selected(&s.m, 0, s.slots[i], g, got, CR_MAXK);
            ck_assert_int_eq(ng, nt);
            for (j = 0; j < nt; ++j)
                ck_assert_int_eq(got[j], top[j]);
        }
    cr_expect_stats(&s, "another query");
    cr_free(&s);
}
END_TEST

/* pages_recalled_critical: SYNC recalls only inside fkv_attend; FREEKV
 * COSINE with correction off only at the first step after prefill. */
START_TEST(cr_attend_counter_other_policies)
{
    fkv_options o;
    tst_model m;
    fkv_stats st;
    int slots[1], ntok[1] = {1000};
    float q[4 * 64];
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 0xf3);
    slots[0] = tst_open(&m);
    tst_prefill(&m, 1, slots, ntok);
    tst_good_query(&m, 0, 1, slots, q);
    tst_attend_check(&m, 0, 1, slots, q, tst_tol(m.dt));
    tst_good_query(&m, 0, 1, slots, q);
    tst_attend_check(&m, 0, 1, slots, q, tst_tol(m.dt));
    tst_stats(&m, &st);
    ck_assert(st.pages_recalled > 20);
    ck_assert_uint_eq(st.pages_recalled_critical, st.pages_recalled);
    tst_model_free(&m);

    if (g_test_backend == FKV_BACKEND_CUDA)
        return; /* FREEKV's attend recalls are not counted apart there */
    o.policy = FKV_POLICY_FREEKV;
    o.correction_threshold = FKV_CORRECTION_OFF;
    tst_model_init(&m, &o, 0xf4);
    slots[0] = tst_open(&m);
    tst_prefill(&m, 1, slots, ntok);
    tst_good_query(&m, 0, 1, slots, q);
    tst_attend_check(&m, 0, 1, slots, q, tst_tol(m.dt));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.pages_recalled_critical, 2 * 10); /* K per head */
    tst_good_query(&m, 0, 1, slots, q);
    tst_select(&m, 0, 1, slots, q);
    tst_recall(&m, 0, 1, slots);
    tst_attend_check(&m, 0, 1, slots, q, tst_tol(m.dt));
    tst_stats(&m, &st);
    ck_assert(st.pages_recalled > 2 * 10);
    ck_assert_uint_eq(st.pages_recalled_critical, 2 * 10);
    tst_model_free(&m);
}
END_TEST

/* Defaults; a caller compiled against 0.1's header (struct_size without
 * the correction fields) gets them and has no bytes beyond written. */
START_TEST(cr_defaults_and_old_struct_size)
{
    const size_t v0 = offsetof(fkv_options, correction_criterion);
    const size_t s0 = offsetof(fkv_stats, pages_recalled_critical);
    fkv_options o, got;
    fkv_stats st;
    fkv_cache *c = NULL;
    size_t i;
    tst_ok(fkv_options_init(&o, sizeof o));
    ck_assert_int_eq(o.correction_criterion, FKV_CRITERION_COSINE);
    ck_assert(o.correction_min_mass == 0.002f);
    ck_assert_int_eq(o.correction_max_pages, 32);

    memset(&o, 0xab, sizeof o);
    tst_ok(fkv_options_init(&o, v0));
    ck_assert_uint_eq(o.struct_size, v0);
    for (i = v0; i < sizeof o; ++i)
        ck_assert_msg(((unsigned char *)&o)[i] == 0xab,
                      "fkv_options_init wrote byte %zu beyond opts_size", i);
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.struct_size = v0;
    o.correction_criterion = 77; /* beyond v0: must not be read */
    o.correction_min_mass = -5.0f;
    o.correction_max_pages = -3;
    tst_ok(fkv_create(&o, &c));
    memset(&got, 0, sizeof got);
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(c, &got));
    ck_assert_int_eq(got.correction_criterion, FKV_CRITERION_COSINE);
    ck_assert(got.correction_min_mass == 0.002f);
    ck_assert_int_eq(got.correction_max_pages, 32);
    /* An old caller's fkv_get_options and fkv_get_stats write only what it
     * knows. */
    memset(&got, 0xcd, sizeof got);
    got.struct_size = v0;
    tst_ok(fkv_get_options(c, &got));
    for (i = v0; i < sizeof got; ++i)
        ck_assert(((unsigned char *)&got)[i] == 0xcd);
    memset(&st, 0xcd, sizeof st);
    st.struct_size = s0;
    tst_ok(fkv_get_stats(c, &st));
    ck_assert_uint_eq(st.steps, 0);
    for (i = s0; i < sizeof st; ++i)
        ck_assert(((unsigned char *)&st)[i] == 0xcd);
    fkv_destroy(c);
}
END_TEST

/* speculative_min_mass defaults to 0; a caller compiled against 0.4's
 * header (struct_size ending before it) gets 0, and what lies beyond its
 * struct is neither read nor written. */
START_TEST(cr_spec_default_and_old_struct_size)
{
    const size_t v4 = offsetof(fkv_options, speculative_min_mass);
    fkv_options o, got;
    fkv_cache *c = NULL;
    size_t i;
    tst_ok(fkv_options_init(&o, sizeof o));
    ck_assert(o.speculative_min_mass == 0.0f);
    memset(&o, 0xab, sizeof o);
    tst_ok(fkv_options_init(&o, v4));
    for (i = v4; i < sizeof o; ++i)
        ck_assert_msg(((unsigned char *)&o)[i] == 0xab,
                      "fkv_options_init wrote byte %zu beyond opts_size", i);
    cr_options(&o, 1, 0.02f, 4);
    o.struct_size = v4;
    o.speculative_min_mass = -5.0f; /* beyond v4: must not be read */
    tst_ok(fkv_create(&o, &c));
    memset(&got, 0xcd, sizeof got);
    got.struct_size = sizeof got;
    tst_ok(fkv_get_options(c, &got));
    ck_assert(got.speculative_min_mass == 0.0f);
    ck_assert_int_eq(got.correction_criterion, FKV_CRITERION_BOUNDED);
    memset(&got, 0xcd, sizeof got);
    got.struct_size = v4;
    tst_ok(fkv_get_options(c, &got));
    for (i = v4; i < sizeof got; ++i)
        ck_assert(((unsigned char *)&got)[i] == 0xcd);
    fkv_destroy(c);
}
END_TEST

/* Bad correction options: FKV_ERR_INVALID_ARGUMENT, no cache, a message. */
START_TEST(cr_bad_options)
{
    fkv_options o;
    fkv_cache *c;
    int k;
    for (k = 0; k < 10; ++k) {
        cr_options(&o, 1, 0.02f, 4);
        switch (k) {
        case 7: o.speculative_min_mass = -0.01f; break;
        case 8: o.speculative_min_mass = 1.01f; break;
        case 9: o.speculative_min_mass = NAN; break;
        case 0: o.correction_criterion = 2; break;
        case 1: o.correction_criterion = -1; break;
        case 2: o.correction_min_mass = -0.01f; break;
        case 3: o.correction_min_mass = 1.5f; break;
        case 4: o.correction_min_mass = NAN; break;
        case 5: o.correction_max_pages = -1; break;
        default: o.correction_min_mass = INFINITY; break;
        }
        c = (fkv_cache *)&o; /* must be reset to NULL */
        tst_expect_error(NULL, fkv_create(&o, &c), FKV_ERR_INVALID_ARGUMENT,
                         "fkv_create(bad correction option)");
        ck_assert_msg(c == NULL, "case %d: a cache was returned", k);
    }
    /* The bounds themselves are valid. */
    cr_options(&o, 1, 1.0f, 0);
    check_bounded_creates(&o);
    o.speculative_min_mass = 1.0f;
    check_bounded_creates(&o);
    cr_options(&o, 1, 0.0f, 1000);
    check_bounded_creates(&o);
}
END_TEST

/* Few candidates growing past K (16 tokens a step: one page leaves the
 * window each step): the "candidates fit but are missing" full corrections,
 * then bounded fetches. */
START_TEST(cr_candidates_grow_past_k)
{
    cr_sim s;
    fkv_options o;
    float q[2 * 4 * 64], prev[2 * 4 * 64];
    int step, ntok[2] = {16, 16};
    cr_options(&o, 1, 0.02f, 2);
    cr_init_len(&s, &o, 0xa7, 250, 200);
    for (step = 0; step < 9; ++step) {
        tst_append_rand(&s.m, 0, 2, s.slots, ntok);
        tst_next_query(&s.m, 0, 2, s.slots, step ? prev : NULL, q);
        cr_attend(&s, 0, q);
        cr_select(&s, 0, q);
        cr_recall(&s, 0);
        memcpy(prev, q, sizeof q);
        cr_expect_stats(&s, "growing candidates");
    }
    /* Each step while the candidates fit corrected every head fully. */
    ck_assert(s.corrections >= 2 * 2 * 4);
    cr_free(&s);
}
END_TEST

/* fkv_recall with no fkv_select after the attend recalls the attend's
 * top-K (design.md section 4, step 6). */
START_TEST(cr_recall_without_select)
{
    cr_sim s;
    fkv_options o;
    float q[2 * 4 * 64], prev[2 * 4 * 64];
    int step, l;
    cr_options(&o, 2, 0.01f, 2);
    cr_init(&s, &o, 0xb8);
    for (step = 0; step < 6; ++step) {
        for (l = 0; l < s.m.L; ++l) {
            tst_append_rand(&s.m, l, 2, s.slots, NULL);
            tst_next_query(&s.m, l, 2, s.slots, step ? prev : NULL, q);
            cr_attend(&s, l, q);
            cr_recall(&s, l);
        }
        memcpy(prev, q, sizeof q);
        cr_expect_stats(&s, "recall without select");
    }
    cr_free(&s);
}
END_TEST

/* A truncate drops the attend's selection with every other (design.md
 * section 11): back at the attend's length, fkv_select with its query
 * selects afresh and fkv_recall moves that set, so the next attend has an
 * active selection to correct from (M = 0: nothing moves inside it). */
START_TEST(cr_truncate_drops_attend_selection)
{
    cr_sim s;
    fkv_options o;
    float q[2 * 4 * 64];
    int g;
    int64_t n0;
    cr_options(&o, 1, 0.0f, 0);
    cr_init(&s, &o, 0x9e);
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q); /* full correction */
    cr_recall(&s, 0);
    tst_append_rand(&s.m, 0, 2, s.slots, NULL);
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q);
    /* Sequence 0 loses its last token and gets one again. */
    n0 = s.m.seq[s.slots[0]].len[0];
    tst_ok(fkv_seq_truncate(s.m.c, s.m.seq[s.slots[0]].id, n0 - 1));
    s.m.seq[s.slots[0]].len[0] = n0 - 1;
    for (g = 0; g < s.m.KVH; ++g) {
        s.m.seq[s.slots[0]].active[0][g].valid = 0;
        s.m.seq[s.slots[0]].pending[0][g].valid = 0;
        s.m.seq[s.slots[0]].used[0][g].valid = 0;
        s.m.seq[s.slots[0]].used[0][g].count = 0;
        /* The CPU backend's recall slots keep their pages (all below the
         * new partial page): the list stays for counting what the recall
         * moves. CUDA's truncate empties the slots (design §11, "The 0.2
         * calls on CUDA"), so there every page is moved again. */
        if (g_test_backend == FKV_BACKEND_CUDA)
            s.head[0][0][g].nactive = 0;
        s.head[0][0][g].active_valid = 0;
        s.head[0][0][g].pending_valid = 0;
    }
    s.pending_at_attend[0][0] = 0;
    tst_append_rand(&s.m, 0, 1, s.slots, NULL);
    ck_assert_int_eq(s.m.seq[s.slots[0]].len[0], n0);
    cr_select(&s, 0, q);
    cr_recall(&s, 0);
    cr_expect_stats(&s, "after the truncate");
    tst_append_rand(&s.m, 0, 2, s.slots, NULL);
    tst_good_query(&s.m, 0, 2, s.slots, q);
    cr_attend(&s, 0, q);
    cr_expect_stats(&s, "the attend after");
    cr_free(&s);
}
END_TEST

Suite *suite_correction(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "correction"));
    TCase *tc = tst_tcase(s, "bounded");
    tcase_add_loop_test(tc, cr_drift, 0,
                        (int)(sizeof k_params / sizeof k_params[0]));
    tcase_add_loop_test(tc, cr_drift_attend_tokens, 0,
                        (int)(sizeof k_tokens_cases / sizeof k_tokens_cases[0]));
    tcase_add_test(tc, cr_spec_whole_mass_moves_nothing);
    tcase_add_test(tc, cr_unbounded_is_current_topk);
    tcase_add_test(tc, cr_candidates_grow_past_k);
    tcase_add_test(tc, cr_select_bookkeeping);
    tcase_add_test(tc, cr_recall_without_select);
    tcase_add_test(tc, cr_truncate_drops_attend_selection);
    tcase_add_test(tc, cr_attend_counter_other_policies);
    tcase_add_test(tc, cr_defaults_and_old_struct_size);
    tcase_add_test(tc, cr_spec_default_and_old_struct_size);
    tcase_add_test(tc, cr_bad_options);
    return s;
}
