/*
 * workload_measure.c: the workloads' float64 measurement (dense weights
 * per page, the pages a variant attended, the candidates) and the numbers
 * derived from a variant's metrics (bench/workload.h).
 *
 * SPDX-License-Identifier: MIT
 */
#include "workload.h"

#include <math.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* Dense reference and attended sets.                                     */
/* ---------------------------------------------------------------------- */

int wl_by_mass(const void *a, const void *b)
{
    const wl_ranked *x = (const wl_ranked *)a, *y = (const wl_ranked *)b;
    if (x->mass != y->mass)
        return x->mass > y->mass ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

double wl_cos(const float *a, const float *b, int n)
{
    double ab = 0.0, aa = 0.0, bb = 0.0;
    int i;
    for (i = 0; i < n; ++i) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return aa > 0.0 && bb > 0.0 ? ab / sqrt(aa * bb) : 0.0;
}

double wl_dense_head(wl_session *s, int layer, int h, int64_t n,
                           const float *qh, int64_t probe)
{
    const wl_gen *g = s->g;
    const int D = g->sh.D, KVH = g->sh.KVH, kvh = h / g->G, P = s->P;
    const double scale = 1.0 / sqrt((double)D);
    const float *K = g->k[layer], *V = g->v[layer];
    double top = -INFINITY, sum = 0.0, *pm = s->pm + (size_t)h * s->maxpages;
    double *pv = s->pv + (size_t)h * s->maxpages * D;
    double *out = s->dense + (size_t)h * D;
    int64_t t, npages = (n + P - 1) / P;
    int i;
    for (t = 0; t < n; ++t) {
        const float *k = K + ((size_t)t * KVH + kvh) * D;
        double acc = 0.0;
        for (i = 0; i < D; ++i)
            acc += (double)qh[i] * k[i];
        s->w[t] = acc * scale;
        if (s->w[t] > top)
            top = s->w[t];
    }
    for (t = 0; t < n; ++t) {
        s->w[t] = exp(s->w[t] - top);
        sum += s->w[t];
    }
    memset(pm, 0, sizeof(double) * (size_t)npages);
    memset(pv, 0, sizeof(double) * (size_t)npages * D);
    memset(out, 0, sizeof(double) * (size_t)D);
    for (t = 0; t < n; ++t) {
        const float *vv = V + ((size_t)t * KVH + kvh) * D;
        double w = s->w[t] / sum;
        double *pvp = pv + (size_t)(t / P) * D;
        s->w[t] = w;
        pm[t / P] += w;
        for (i = 0; i < D; ++i)
            pvp[i] += w * vv[i];
    }
    for (t = 0; t < npages; ++t)
        for (i = 0; i < D; ++i)
            out[i] += pv[(size_t)t * D + i];
    return probe >= 0 && probe < n ? s->w[probe] : 0.0;
}

int wl_layer_dense(const wl_session *s, int v, int l)
{
    return s->var[v].policy == FKV_POLICY_DENSE ||
           (l < 64 && ((s->var[v].dense_layers >> l) & 1u));
}

int wl_attended(wl_session *s, int v, int l, int kvh, int64_t n)
{
    const int P = s->P;
    int64_t sealed = n / P, p, sink_end, win_first;
    int cnt = 0, j;
    if (wl_layer_dense(s, v, l)) {
        for (p = 0; p < (n + P - 1) / P; ++p)
            s->att[cnt++] = (int32_t)p;
        return cnt;
    }
    sink_end = sealed < s->S ? sealed : s->S;
    for (p = 0; p < sink_end; ++p)
        s->att[cnt++] = (int32_t)p;
    for (j = 0; j < s->nsel[v * s->g->sh.KVH + kvh]; ++j)
        s->att[cnt++] = s->sel[((size_t)v * s->g->sh.KVH + kvh) * (s->K + 1) + j];
    win_first = sealed - s->W;
    if (win_first < s->S)
        win_first = s->S;
    for (p = win_first; p < sealed; ++p)
        s->att[cnt++] = (int32_t)p;
    if (n % P)
        s->att[cnt++] = (int32_t)sealed;
    return cnt;
}

void wl_candidates(const wl_session *s, int64_t n, int *first,
                         int *count)
{
    int64_t sealed = n / s->P, e = sealed - s->W;
    *first = s->S;
    *count = e > s->S ? (int)(e - s->S) : 0;
}

int wl_in_list(const int32_t *list, int n, int32_t x)
{
    int i;
    for (i = 0; i < n; ++i)
        if (list[i] == x)
            return 1;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Derived numbers.                                                       */
/* ---------------------------------------------------------------------- */

double wl_mass(const wl_metrics *m)
{
    return m->head_steps > 0 ? m->mass / m->head_steps : NAN;
}

double wl_oracle_ratio(const wl_metrics *m)
{
    return m->oracle > 0 ? m->mass / m->oracle : NAN;
}

double wl_sel_ratio(const wl_metrics *m)
{
    return m->sel_oracle > 0 ? m->sel_mass / m->sel_oracle : NAN;
}

double wl_err(const wl_metrics *m)
{
    return m->head_steps > 0 ? m->err / m->head_steps : NAN;
}

double wl_overlap(const wl_metrics *m)
{
    return m->ovl_tot > 0 ? m->ovl_hit / m->ovl_tot : NAN;
}

double wl_hit_rate(const wl_metrics *m)
{
    return m->asks ? (double)m->hits / (double)m->asks : NAN;
}

double wl_correction_rate(const wl_metrics *m)
{
    return m->st.heads_checked
               ? (double)m->st.corrections / (double)m->st.heads_checked : NAN;
}

double wl_recall_per_step(const wl_metrics *m, const wl_shape *sh)
{
    return m->st.steps ? (double)m->st.pages_recalled /
                             ((double)m->st.steps * sh->L * sh->KVH)
                       : NAN;
}

double wl_crit_per_step(const wl_metrics *m, const wl_shape *sh)
{
    return m->st.steps ? (double)m->crit_pages /
                             ((double)m->st.steps * sh->L * sh->KVH)
                       : NAN;
}

double wl_heads_above(const wl_trace *tr, const wl_shape *sh, double x)
{
    int i, n = sh->L * sh->QH, c = 0;
    double steps = tr->cos_n / n;
    if (!tr->head_cos || steps <= 0)
        return NAN;
    for (i = 0; i < n; ++i)
        c += tr->head_cos[i] / steps >= x;
    return (double)c / n;
}

