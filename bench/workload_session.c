/*
 * workload_session.c: a generated workload run through one cache per
 * variant (policy, correction threshold or criterion) on one backend, with
 * the per-variant measurement of each decode step (bench/workload.h).
 *
 * SPDX-License-Identifier: MIT
 */
#include "workload.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* Tensor memory of the backend.                                          */
/* ---------------------------------------------------------------------- */

static void *wl_host_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    return malloc(bytes ? bytes : 1);
}

static void wl_host_release(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}

static int wl_host_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    memcpy(dst, src, bytes);
    return 0;
}

wl_mem wl_host_mem(void)
{
    wl_mem m;
    m.alloc = wl_host_alloc;
    m.release = wl_host_release;
    m.put = wl_host_copy;
    m.get = wl_host_copy;
    m.ctx = NULL;
    return m;
}

/* ---------------------------------------------------------------------- */
/* Variants.                                                              */
/* ---------------------------------------------------------------------- */

wl_variant wl_make_variant(const char *name, fkv_policy policy,
                                 float threshold)
{
    wl_variant v;
    memset(&v, 0, sizeof v);
    snprintf(v.name, sizeof v.name, "%s", name);
    v.policy = policy;
    v.threshold = threshold;
    return v;
}

int wl_default_variants(wl_variant *v)
{
    v[0] = wl_make_variant("FREEKV", FKV_POLICY_FREEKV, NAN);
    v[1] = wl_make_variant("SYNC", FKV_POLICY_SYNC, NAN);
    v[2] = wl_make_variant("RESIDENT", FKV_POLICY_RESIDENT, NAN);
    v[3] = wl_make_variant("DENSE", FKV_POLICY_DENSE, NAN);
    v[4] = wl_make_variant("FREEKV tau=0.7", FKV_POLICY_FREEKV, 0.7f);
    v[5] = wl_make_variant("FREEKV tau=0.8", FKV_POLICY_FREEKV, 0.8f);
    v[6] = wl_make_variant("FREEKV tau=0.95", FKV_POLICY_FREEKV, 0.95f);
    v[7] = wl_make_variant("FREEKV off", FKV_POLICY_FREEKV, FKV_CORRECTION_OFF);
    return 8;
}

/* ---------------------------------------------------------------------- */
/* Session: the workload through one cache per variant.                   */
/* ---------------------------------------------------------------------- */

static int wl_fail(wl_session *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof s->err, fmt, ap);
    va_end(ap);
    return -1;
}

int wl_check(wl_session *s, int v, fkv_status st, const char *what)
{
    char msg[384];
    if (st == FKV_OK)
        return 0;
    s->status = st;
    msg[0] = '\0';
    fkv_last_error(v >= 0 ? s->c[v] : NULL, msg, sizeof msg);
    return wl_fail(s, "%s%s%s: %s: %s", what, v >= 0 ? " on " : "",
                   v >= 0 ? s->var[v].name : "", fkv_status_string(st), msg);
}

static void wl_session_free(wl_session *s)
{
    int v;
    for (v = 0; v < s->nvar; ++v) {
        fkv_destroy(s->c[v]);
        s->c[v] = NULL;
    }
    if (s->mem.release) {
        if (s->dk) s->mem.release(s->mem.ctx, s->dk);
        if (s->dv) s->mem.release(s->mem.ctx, s->dv);
        if (s->dq) s->mem.release(s->mem.ctx, s->dq);
        if (s->dout) s->mem.release(s->mem.ctx, s->dout);
    }
    s->dk = s->dv = s->dq = s->dout = NULL;
    free(s->stage);
    free(s->q);
    free(s->qprev);
    free(s->out);
    free(s->sel);
    free(s->nsel);
    free(s->att);
    free(s->w);
    free(s->pm);
    free(s->pv);
    free(s->dense);
    free(s->fixed);
    free(s->rank);
    free(s->tr.head_cos);
    s->stage = NULL;
    s->q = s->qprev = s->out = NULL;
    s->sel = s->nsel = s->att = NULL;
    s->w = s->pm = s->pv = s->dense = s->fixed = s->tr.head_cos = NULL;
    s->rank = NULL;
}

int wl_session_open(wl_session *s, wl_gen *g, const wl_variant *var,
                          int nvar, fkv_backend backend, const wl_mem *mem,
                          int warmup)
{
    const wl_shape *sh = &g->sh;
    const size_t es = bench_dtype_size(sh->dtype);
    const size_t row = (size_t)sh->KVH * sh->D;
    int v, l;
    memset(s, 0, sizeof *s);
    s->g = g;
    s->nvar = nvar;
    s->mem = *mem;
    s->backend = backend;
    s->warmup = warmup < 1 ? 1 : warmup;
    s->idx_dense = s->idx_oracle = s->idx_sync = -1;
    s->P = sh->P;
    s->S = sh->sink / sh->P;
    s->W = sh->window / sh->P;
    s->K = (sh->budget - sh->sink - sh->window) / sh->P;
    s->maxpages = (g->cap + sh->P - 1) / sh->P;
    if (nvar < 1 || nvar > WL_MAX_VARIANTS)
        return wl_fail(s, "bad number of variants %d", nvar);
    for (v = 0; v < nvar; ++v) {
        s->var[v] = var[v];
        if (var[v].policy == FKV_POLICY_DENSE && s->idx_dense < 0)
            s->idx_dense = v;
        if (var[v].policy == FKV_POLICY_RESIDENT && !var[v].dense_layers &&
            s->idx_oracle < 0)
            s->idx_oracle = v;
        if (var[v].policy == FKV_POLICY_SYNC && !var[v].dense_layers &&
            s->idx_sync < 0)
            s->idx_sync = v;
        s->met[v].worst_step = INFINITY;
        s->met[v].worst_head = INFINITY;
    }
    if (s->idx_oracle < 0)
        return wl_fail(s, "the variants need RESIDENT (the oracle)");
    s->dkv_bytes = (size_t)g->context * row * es;
    s->stage = (unsigned char *)malloc(s->dkv_bytes);
    s->q = (float *)calloc((size_t)sh->L * sh->QH * sh->D, sizeof(float));
    s->qprev = (float *)calloc((size_t)sh->L * sh->QH * sh->D, sizeof(float));
    s->out = (float *)calloc((size_t)nvar * sh->QH * sh->D, sizeof(float));
    s->sel = (int32_t *)calloc((size_t)nvar * sh->KVH * (s->K + 1), sizeof(int32_t));
    s->nsel = (int32_t *)calloc((size_t)nvar * sh->KVH, sizeof(int32_t));
    s->att = (int32_t *)calloc((size_t)s->maxpages, sizeof(int32_t));
    s->w = (double *)calloc((size_t)g->cap, sizeof(double));
    s->pm = (double *)calloc((size_t)sh->QH * s->maxpages, sizeof(double));
    s->pv = (double *)calloc((size_t)sh->QH * s->maxpages * sh->D, sizeof(double));
    s->dense = (double *)calloc((size_t)sh->QH * sh->D, sizeof(double));
    s->tr.head_cos = (double *)calloc((size_t)sh->L * sh->QH, sizeof(double));
    s->fixed = (double *)calloc((size_t)sh->QH, sizeof(double));
    s->rank = (wl_ranked *)calloc((size_t)s->maxpages, sizeof(wl_ranked));
    if (!s->stage || !s->q || !s->qprev || !s->out || !s->sel || !s->nsel ||
        !s->att || !s->w || !s->pm || !s->pv || !s->dense || !s->tr.head_cos ||
        !s->fixed || !s->rank) {
        wl_session_free(s);
        return wl_fail(s, "out of host memory");
    }
    s->dk = mem->alloc(mem->ctx, s->dkv_bytes);
    s->dv = mem->alloc(mem->ctx, s->dkv_bytes);
    s->dq = mem->alloc(mem->ctx, (size_t)sh->QH * sh->D * es);
    s->dout = mem->alloc(mem->ctx, (size_t)sh->QH * sh->D * es);
    if (!s->dk || !s->dv || !s->dq || !s->dout) {
        wl_session_free(s);
        return wl_fail(s, "out of tensor memory");
    }
    for (v = 0; v < nvar; ++v) {
        fkv_options o;
        fkv_status st = fkv_options_init(&o, sizeof o);
        if (wl_check(s, -1, st, "fkv_options_init"))
            return wl_session_free(s), -1;
        o.backend = backend;
        o.num_layers = sh->L;
        o.num_q_heads = sh->QH;
        o.num_kv_heads = sh->KVH;
        o.head_dim = sh->D;
        o.dtype = sh->dtype;
        o.page_tokens = sh->P;
        o.sink_tokens = sh->sink;
        o.window_tokens = sh->window;
        o.budget_tokens = sh->budget;
        o.policy = var[v].policy;
        if (!isnan(var[v].threshold))
            o.correction_threshold = var[v].threshold;
        if (var[v].criterion != FKV_CRITERION_COSINE) {
            o.correction_criterion = var[v].criterion;
            o.correction_min_mass = var[v].min_mass;
            o.correction_max_pages = var[v].max_pages;
            o.speculative_min_mass = var[v].spec_mass;
        }
        o.max_sequences = 1;
        o.max_tokens_per_sequence = g->cap;
        uint8_t dense[64] = {0}; /* fkv_create copies it */
        if (var[v].dense_layers) {
            for (l = 0; l < sh->L && l < 64; ++l)
                dense[l] = (uint8_t)((var[v].dense_layers >> l) & 1u);
            o.dense_layers = dense;
        }
        st = fkv_create(&o, &s->c[v]);
        if (st != FKV_OK) {
            wl_check(s, -1, st, "fkv_create");
            wl_session_free(s);
            return -1;
        }
        s->met[v].threshold = o.correction_threshold;
        st = fkv_seq_open(s->c[v], &s->seq[v]);
        if (wl_check(s, v, st, "fkv_seq_open"))
            return wl_session_free(s), -1;
    }
    /* Prefill: one bulk append per layer. */
    for (l = 0; l < sh->L; ++l) {
        int32_t ntok = (int32_t)g->context;
        wl_encode(sh->dtype, g->k[l], s->stage, (size_t)g->context * row);
        if (mem->put(mem->ctx, s->dk, s->stage, s->dkv_bytes))
            return wl_session_free(s), wl_fail(s, "tensor copy failed");
        wl_encode(sh->dtype, g->v[l], s->stage, (size_t)g->context * row);
        if (mem->put(mem->ctx, s->dv, s->stage, s->dkv_bytes))
            return wl_session_free(s), wl_fail(s, "tensor copy failed");
        for (v = 0; v < nvar; ++v) {
            fkv_batch b;
            b.num_seqs = 1;
            b.reserved = 0;
            b.seq_ids = &s->seq[v];
            b.num_tokens = &ntok;
            if (wl_check(s, v, fkv_append(s->c[v], l, &b, s->dk, s->dv),
                         "prefill fkv_append"))
                return wl_session_free(s), -1;
        }
    }
    return 0;
}

int wl_session_step(wl_session *s)
{
    wl_gen *g = s->g;
    const wl_shape *sh = &g->sh;
    const int D = sh->D, QH = sh->QH, KVH = sh->KVH, G = g->G;
    const size_t es = bench_dtype_size(sh->dtype);
    const size_t row = (size_t)KVH * D;
    const int step = s->step;
    const int measure = step >= s->warmup;
    const int ask = g->kind == WL_NEEDLES ? wl_gen_ask(g, step) : -1;
    unsigned char qbytes[4 * 8 * 256];
    unsigned char *qb = (size_t)QH * D * es <= sizeof qbytes
                            ? qbytes : (unsigned char *)malloc((size_t)QH * D * es);
    int64_t t = wl_gen_token(g), n;
    int l, v, h, j;
    if (!qb)
        return wl_fail(s, "out of host memory");
    if (t < 0) {
        if (qb != qbytes)
            free(qb);
        return wl_fail(s, "more steps than planned");
    }
    n = t + 1;
    for (v = 0; v < s->nvar; ++v)
        s->step_mass[v] = s->step_oracle[v] = 0.0;
    for (l = 0; l < sh->L; ++l) {
        float *ql = s->q + (size_t)l * QH * D;
        float *qp = s->qprev + (size_t)l * QH * D;
        fkv_batch b;
        int rc = 0;
        b.num_seqs = 1;
        b.reserved = 0;
        b.num_tokens = NULL;
        /* Append the new token. */
        wl_encode(sh->dtype, g->k[l] + (size_t)t * row, s->stage, row);
        wl_encode(sh->dtype, g->v[l] + (size_t)t * row, s->stage + row * es, row);
        if (s->mem.put(s->mem.ctx, s->dk, s->stage, row * es) ||
            s->mem.put(s->mem.ctx, s->dv, s->stage + row * es, row * es)) {
            rc = wl_fail(s, "tensor copy failed");
            goto done;
        }
        for (v = 0; v < s->nvar && !rc; ++v) {
            b.seq_ids = &s->seq[v];
            rc = wl_check(s, v, fkv_append(s->c[v], l, &b, s->dk, s->dv),
                          "fkv_append");
        }
        if (rc)
            goto done;
        /* The query, then every variant's attend / select / recall. */
        wl_gen_query(g, step, l, ql);
        wl_encode(sh->dtype, ql, qb, (size_t)QH * D);
        if (s->mem.put(s->mem.ctx, s->dq, qb, (size_t)QH * D * es)) {
            rc = wl_fail(s, "tensor copy failed");
            goto done;
        }
        for (v = 0; v < s->nvar && !rc; ++v) {
            fkv_stats st0, st1;
            memset(&st0, 0, sizeof st0);
            memset(&st1, 0, sizeof st1);
            st0.struct_size = st1.struct_size = sizeof st0;
            b.seq_ids = &s->seq[v];
            rc = wl_check(s, v, fkv_get_stats(s->c[v], &st0), "fkv_get_stats");
            if (!rc)
                rc = wl_check(s, v, fkv_attend(s->c[v], l, &b, s->dq, s->dout),
                              "fkv_attend");
            if (!rc)
                rc = wl_check(s, v, fkv_get_stats(s->c[v], &st1),
                              "fkv_get_stats");
            if (!rc && measure)
                s->met[v].crit_pages += st1.pages_recalled - st0.pages_recalled;
            if (!rc && s->mem.get(s->mem.ctx, s->stage, s->dout,
                                  (size_t)QH * D * es))
                rc = wl_fail(s, "tensor copy failed");
            if (rc)
                break;
            wl_decode(sh->dtype, s->stage, s->out + (size_t)v * QH * D,
                      (size_t)QH * D);
            for (h = 0; h < KVH && !rc; ++h) {
                int32_t cnt = 0;
                rc = wl_check(s, v,
                              fkv_get_selected_pages(
                                  s->c[v], l, s->seq[v], h,
                                  s->sel + ((size_t)v * KVH + h) * (s->K + 1),
                                  s->K + 1, &cnt),
                              "fkv_get_selected_pages");
                if (!rc && cnt > s->K)
                    rc = wl_fail(s, "%s: %d selected pages > K = %d",
                                 s->var[v].name, (int)cnt, s->K);
                s->nsel[v * KVH + h] = cnt;
            }
            if (!rc)
                rc = wl_check(s, v, fkv_select(s->c[v], l, &b, s->dq),
                              "fkv_select");
            if (!rc)
                rc = wl_check(s, v, fkv_recall(s->c[v], l, &b), "fkv_recall");
        }
        if (rc)
            goto done;
        /* Trace statistics. */
        if (measure && step >= 1) {
            for (h = 0; h < KVH; ++h) {
                static const double taus[4] = {0.7, 0.8, 0.9, 0.95};
                double gc = 0.0;
                int k;
                for (j = 0; j < G; ++j) {
                    int qh = h * G + j;
                    double c = wl_cos(ql + (size_t)qh * D, qp + (size_t)qh * D, D);
                    gc += c;
                    s->tr.cos_sum += c;
                    s->tr.cos_n += 1.0;
                    s->tr.cos_below05 += c < 0.5;
                    s->tr.head_cos[l * QH + qh] += c;
                }
                gc /= G;
                s->tr.gcos_n += 1.0;
                for (k = 0; k < 4; ++k)
                    s->tr.gcos_below[k] += gc < taus[k];
            }
        }
        if (measure) {
            /* SYNC must select exactly what RESIDENT selects. */
            if (s->idx_sync >= 0)
                for (h = 0; h < KVH; ++h) {
                    const int32_t *a = s->sel + ((size_t)s->idx_sync * KVH + h) * (s->K + 1);
                    const int32_t *o = s->sel + ((size_t)s->idx_oracle * KVH + h) * (s->K + 1);
                    int na = s->nsel[s->idx_sync * KVH + h];
                    if (na != s->nsel[s->idx_oracle * KVH + h] ||
                        memcmp(a, o, sizeof(int32_t) * (size_t)na))
                        s->sync_mismatch++;
                }
            /* Dense weights of every head; the fixed part (sink, window,
             * partial page) of its mass. */
            for (h = 0; h < QH; ++h) {
                const double *pm = s->pm + (size_t)h * s->maxpages;
                int64_t sealed = n / s->P, p;
                int64_t wf = sealed - s->W < s->S ? s->S : sealed - s->W;
                double sm = 0.0, wm = 0.0;
                double probe = wl_dense_head(s, l, h, n, ql + (size_t)h * D,
                                             ask >= 0 ? g->needle_pos[ask] : -1);
                if (ask >= 0) {
                    s->tr.needle_mass += probe;
                    s->tr.needle_n += 1.0;
                }
                for (p = 0; p < s->S && p < sealed; ++p)
                    sm += pm[p];
                for (p = wf; p < (n + s->P - 1) / s->P; ++p)
                    wm += pm[p];
                s->tr.sink_mass += sm;
                s->tr.window_mass += wm;
                s->tr.mass_n += 1.0;
                s->fixed[h] = sm + wm;
            }
            /* The best any selection of K pages per KV head could keep:
             * the top-K candidates by the group's summed dense mass. */
            for (h = 0; h < KVH; ++h) {
                int first, nc, i;
                wl_ranked *r = s->rank;
                wl_candidates(s, n, &first, &nc);
                for (i = 0; i < nc; ++i) {
                    r[i].page = first + i;
                    r[i].mass = 0.0;
                    for (j = 0; j < G; ++j)
                        r[i].mass += s->pm[(size_t)(h * G + j) * s->maxpages + first + i];
                }
                if (nc > s->K)
                    qsort(r, (size_t)nc, sizeof *r, wl_by_mass);
                for (j = 0; j < G; ++j) {
                    const double *pm = s->pm + (size_t)(h * G + j) * s->maxpages;
                    double m = s->fixed[h * G + j];
                    for (i = 0; i < nc && i < s->K; ++i)
                        m += pm[r[i].page];
                    s->tr.ideal_mass += m;
                }
            }
            for (h = 0; h < QH; ++h) {
                int kvh = h / G, cnt_o, cnt, lq = l * QH + h;
                double oracle_mass, fixed = s->fixed[h];
                /* Reference output: DENSE's, or without a DENSE variant
                 * the exact dense output. */
                const float *dout = s->idx_dense >= 0
                    ? s->out + ((size_t)s->idx_dense * QH + h) * D : NULL;
                const double *dexact = s->dense + (size_t)h * D;
                double dn = 0.0;
                const double *pm = s->pm + (size_t)h * s->maxpages;
                const double *pv = s->pv + (size_t)h * s->maxpages * D;
                /* Loss category: needle ask or the step after (W2), a
                 * volatile head, a focus shift, anything else. */
                int cat;
                if (g->kind == WL_DRIFT) /* 1: the faster half of speeds */
                    cat = g->dspeed[l * KVH + kvh] >=
                                  sqrt(g->pp.speed_lo * g->pp.speed_hi)
                              ? 1 : 2;
                else if (g->kind == WL_NEEDLES &&
                         (ask >= 0 || wl_gen_ask(g, step - 1) >= 0))
                    cat = 3;
                else
                    cat = g->is_volatile[lq] ? 0 : g->shifted[lq] ? 1 : 2;
                for (j = 0; j < D; ++j)
                    dn += dout ? (double)dout[j] * dout[j] : dexact[j] * dexact[j];
                dn = sqrt(dn);
                cnt_o = wl_attended(s, s->idx_oracle, l, kvh, n);
                oracle_mass = 0.0;
                for (j = 0; j < cnt_o; ++j)
                    oracle_mass += pm[s->att[j]];
                for (v = 0; v < s->nvar; ++v) {
                    wl_metrics *m = &s->met[v];
                    const float *o = s->out + ((size_t)v * QH + h) * D;
                    double mass = 0.0, e = 0.0, se = 0.0, xn = 0.0;
                    int i;
                    double *ex = s->w; /* scratch [D] */
                    cnt = wl_attended(s, v, l, kvh, n);
                    memset(ex, 0, sizeof(double) * (size_t)D);
                    for (j = 0; j < cnt; ++j) {
                        mass += pm[s->att[j]];
                        for (i = 0; i < D; ++i)
                            ex[i] += pv[(size_t)s->att[j] * D + i];
                    }
                    for (i = 0; i < D; ++i) {
                        double x = mass > 0.0 ? ex[i] / mass : 0.0;
                        double d1 = (double)o[i] - (dout ? (double)dout[i] : dexact[i]);
                        double d2 = (double)o[i] - x;
                        e += d1 * d1;
                        se += d2 * d2;
                        xn += x * x;
                    }
                    m->head_steps += 1.0;
                    m->mass += mass;
                    m->oracle += oracle_mass;
                    m->loss[cat] += oracle_mass - mass;
                    m->err += dn > 0.0 ? sqrt(e) / dn : 0.0;
                    if (xn > 0.0 && sqrt(se / xn) > m->self_err)
                        m->self_err = sqrt(se / xn);
                    if (oracle_mass > 0.0 && mass / oracle_mass < m->worst_head)
                        m->worst_head = mass / oracle_mass;
                    if (!wl_layer_dense(s, v, l)) {
                        m->sel_mass += mass - fixed;
                        m->sel_oracle += oracle_mass - fixed;
                    }
                    s->step_mass[v] += mass;
                    s->step_oracle[v] += oracle_mass;
                    if (ask >= 0) {
                        m->ask_mass += mass;
                        m->ask_oracle += oracle_mass;
                    }
                }
                s->tr.cat_n[cat] += 1.0;
            }
            /* Oracle overlap and needle hits per (variant, KV head). */
            for (v = 0; v < s->nvar; ++v)
                for (h = 0; h < KVH; ++h) {
                    const int32_t *o = s->sel + ((size_t)s->idx_oracle * KVH + h) * (s->K + 1);
                    const int32_t *a = s->sel + ((size_t)v * KVH + h) * (s->K + 1);
                    int no = s->nsel[s->idx_oracle * KVH + h];
                    int na = s->nsel[v * KVH + h];
                    if (!wl_layer_dense(s, v, l)) {
                        for (j = 0; j < no; ++j)
                            s->met[v].ovl_hit += wl_in_list(a, na, o[j]);
                        s->met[v].ovl_tot += no;
                    }
                    if (ask >= 0) {
                        int cnt = wl_attended(s, v, l, h, n);
                        s->met[v].asks++;
                        s->met[v].hits += wl_in_list(
                            s->att, cnt, (int32_t)(g->needle_pos[ask] / s->P));
                    }
                }
        }
        memcpy(qp, ql, sizeof(float) * (size_t)QH * D);
    done:
        if (rc) {
            if (qb != qbytes)
                free(qb);
            return -1;
        }
    }
    if (qb != qbytes)
        free(qb);
    if (measure)
        for (v = 0; v < s->nvar; ++v)
            if (s->step_oracle[v] > 0.0 &&
                s->step_mass[v] / s->step_oracle[v] < s->met[v].worst_step)
                s->met[v].worst_step = s->step_mass[v] / s->step_oracle[v];
    s->step++;
    if (s->step == s->warmup)
        for (v = 0; v < s->nvar; ++v)
            if (wl_check(s, v, fkv_reset_stats(s->c[v]), "fkv_reset_stats"))
                return -1;
    return 0;
}

int wl_session_close(wl_session *s)
{
    int v, rc = 0;
    for (v = 0; v < s->nvar; ++v) {
        memset(&s->met[v].st, 0, sizeof s->met[v].st);
        s->met[v].st.struct_size = sizeof s->met[v].st;
        if (!rc)
            rc = wl_check(s, v, fkv_get_stats(s->c[v], &s->met[v].st),
                          "fkv_get_stats");
    }
    {
        /* Keep the per-head cosine sums: copy them out of the session. */
        double *hc = s->tr.head_cos;
        s->tr.head_cos = NULL;
        wl_session_free(s);
        s->tr.head_cos = hc;
    }
    return rc;
}

void wl_session_release(wl_session *s)
{
    wl_session_free(s);
}

