/*
 * workload_gen.c: the retrieval-accuracy workloads' generators (keys,
 * values and query traces fixed by a seed; bench/workload.h describes
 * them).
 *
 * SPDX-License-Identifier: MIT
 */
#include "workload.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *wl_kind_name(int kind)
{
    switch (kind) {
    case WL_TOPICS: return "topics";
    case WL_NEEDLES: return "needles";
    case WL_DRIFT: return "drift";
    default: return "?";
    }
}

/* ---------------------------------------------------------------------- */
/* Random numbers (bench.h's splitmix64, Marsaglia polar normals).        */
/* ---------------------------------------------------------------------- */

static void wl_rng_seed(wl_rng *r, uint64_t seed)
{
    r->core.state = seed * 0x9e3779b97f4a7c15ULL + 0x2545f4914f6cdd1dULL;
    r->has_spare = 0;
    r->spare = 0.0;
}

static uint64_t wl_rng_u64(wl_rng *r)
{
    return bench_rng_next(&r->core);
}

static double wl_uniform(wl_rng *r)
{
    return bench_rng_uniform(&r->core);
}

static double wl_uniform_in(wl_rng *r, double lo, double hi)
{
    return bench_rng_uniform_in(&r->core, lo, hi);
}

static double wl_normal(wl_rng *r)
{
    double u, v, s;
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    do {
        u = 2.0 * wl_uniform(r) - 1.0;
        v = 2.0 * wl_uniform(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    s = sqrt(-2.0 * log(s) / s);
    r->spare = v * s;
    r->has_spare = 1;
    return u * s;
}

static int wl_below(wl_rng *r, int n)
{
    return n <= 1 ? 0 : (int)(wl_rng_u64(r) % (uint64_t)n);
}

/* ---------------------------------------------------------------------- */
/* Element types (bench.h's conversions: rounding to nearest even, like   */
/* the library's loads).                                              */
/* ---------------------------------------------------------------------- */

/* x rounded to the dtype, as float. */
static float wl_round(fkv_dtype dt, double x)
{
    unsigned char e[4];
    bench_store_elem(dt, e, 0, (float)x);
    return bench_load_elem(dt, e, 0);
}

void wl_encode(fkv_dtype dt, const float *src, void *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        bench_store_elem(dt, dst, i, src[i]);
}

void wl_decode(fkv_dtype dt, const void *src, float *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        dst[i] = bench_load_elem(dt, src, i);
}

/* ---------------------------------------------------------------------- */
/* Shapes and parameters.                                                 */
/* ---------------------------------------------------------------------- */

wl_shape wl_default_shape(void)
{
    wl_shape s;
    s.L = 2;
    s.QH = 8;
    s.KVH = 2;
    s.D = 64;
    s.P = 32;
    s.sink = 128;
    s.window = 128;
    s.budget = 2048;
    s.dtype = FKV_DTYPE_BF16;
    return s;
}

wl_params wl_default_params(void)
{
    wl_params p;
    p.bias = 6.0;
    p.out_sd = 1.0;
    p.noise_sd = 0.3;
    p.sink_norm = 14.0;
    p.topic_norm = 5.0;
    p.salience_sd = 0.35;
    p.needle_norm = 8.0;
    p.seg_min = 256;
    p.seg_max = 2048;
    p.drift_seg_min = 128;
    p.drift_seg_max = 512;
    p.topics = 24;
    p.sink_q = 5.0;
    p.out_q = 2.0;
    p.focus_q = 8.0;
    p.needle_q = 16.0;
    p.qnoise_sd = 0.15;
    p.volatile_frac = 0.25;
    p.stable_rho_lo = 0.85;
    p.stable_rho_hi = 0.97;
    p.stable_eta_lo = 0.05;
    p.stable_eta_hi = 0.2;
    p.vol_rho = 0.3;
    p.vol_eta = 0.6;
    p.p_shift_head = 0.01;
    p.p_shift_group = 0.01;
    p.speed_lo = 0.05;
    p.speed_hi = 0.4;
    p.needles = 10;
    p.ask_gap = 3;
    return p;
}

/* ---------------------------------------------------------------------- */
/* Generator.                                                             */
/* ---------------------------------------------------------------------- */

static void wl_unit(wl_rng *r, const int *outch, int D, float *u)
{
    double nn = 0.0;
    int i, j;
    for (i = 0; i < D; ++i) {
        int skip = 0;
        for (j = 0; j < WL_NOUT && outch; ++j)
            skip |= outch[j] == i;
        u[i] = skip ? 0.0f : (float)wl_normal(r);
        nn += (double)u[i] * u[i];
    }
    nn = sqrt(nn);
    for (i = 0; i < D; ++i)
        u[i] = (float)(u[i] / nn);
}

void wl_gen_free(wl_gen *g)
{
    int l;
    for (l = 0; l < WL_MAX_LAYERS; ++l) {
        free(g->k[l]);
        free(g->v[l]);
    }
    free(g->outch);
    free(g->bias);
    free(g->usink);
    free(g->topic);
    free(g->vcent);
    free(g->seg_start);
    free(g->seg_topic);
    free(g->tok_seg);
    free(g->needle_dir);
    free(g->needle_val);
    free(g->qstatic);
    free(g->focus);
    free(g->alpha);
    free(g->rho);
    free(g->eta);
    free(g->is_volatile);
    free(g->shifted);
    free(g->dpos);
    free(g->dspeed);
    memset(g, 0, sizeof *g);
}

/* Fills token t's keys and values on every layer and KV head. */
static void wl_fill_token(wl_gen *g, int64_t t)
{
    const int D = g->sh.D, KVH = g->sh.KVH;
    const wl_params *p = &g->pp;
    int l, h, i, needle = -1, seg = g->tok_seg[t];
    for (i = 0; i < g->nneedle; ++i)
        if (g->needle_pos[i] == t)
            needle = i;
    for (l = 0; l < g->sh.L; ++l)
        for (h = 0; h < KVH; ++h) {
            int lk = l * KVH + h;
            float *k = g->k[l] + ((size_t)t * KVH + h) * D;
            float *v = g->v[l] + ((size_t)t * KVH + h) * D;
            const int *oc = g->outch + (size_t)lk * WL_NOUT;
            const float *dir, *vc;
            double mag, vsd = 0.5;
            if (t < WL_SINK_TOKENS) {
                dir = g->usink + (size_t)lk * D;
                mag = p->sink_norm;
                vc = NULL;
                vsd = 0.1; /* sinks carry little value */
            } else if (needle >= 0) {
                dir = g->needle_dir + ((size_t)needle * g->sh.L * KVH + lk) * D;
                mag = p->needle_norm;
                vc = g->needle_val + ((size_t)needle * g->sh.L * KVH + lk) * D;
                vsd = 0.1;
            } else {
                int z = g->seg_topic[seg];
                dir = g->topic + ((size_t)lk * g->Z + z) * D;
                mag = p->topic_norm * exp(p->salience_sd * wl_normal(&g->krng));
                vc = g->vcent + ((size_t)lk * g->Z + z) * D;
            }
            for (i = 0; i < D; ++i) {
                double x = g->bias[(size_t)lk * D + i] + mag * dir[i];
                int j, outl = 0;
                for (j = 0; j < WL_NOUT; ++j)
                    outl |= oc[j] == i;
                x += (outl ? p->out_sd : p->noise_sd) * wl_normal(&g->krng);
                k[i] = wl_round(g->sh.dtype, x);
                v[i] = wl_round(g->sh.dtype,
                                (vc ? vc[i] : 0.0) + vsd * wl_normal(&g->krng));
            }
        }
}

/* A focus topic for W1/W2: the topic of a random prefill segment (past
 * the sink's), so that a query asks about something the context holds;
 * topics of long or frequent segments are drawn more often. */
static int wl_pick_focus(wl_gen *g)
{
    int64_t lo = g->seg_start[1 < g->nseg ? 1 : 0], t;
    if (lo >= g->context)
        lo = 0;
    t = lo + (int64_t)(wl_uniform(&g->qrng) * (double)(g->context - lo));
    return g->seg_topic[g->tok_seg[t]];
}

int wl_gen_init(wl_gen *g, int kind, const wl_shape *sh,
                      const wl_params *pp, int64_t context, int steps,
                      uint64_t seed)
{
    const int D = sh->D, KVH = sh->KVH, L = sh->L, QH = sh->QH;
    const int LK = L * KVH, LQ = L * QH;
    int i, j, l, h;
    int64_t t;
    wl_rng srng;
    memset(g, 0, sizeof *g);
    if (L < 1 || L > WL_MAX_LAYERS || KVH < 1 || QH % KVH || D < 2 * WL_NOUT ||
        context < 1 || steps < 0)
        return -1;
    g->kind = kind;
    g->sh = *sh;
    g->pp = *pp;
    g->G = QH / KVH;
    g->context = context;
    g->steps = steps;
    g->cap = context + steps + 1;
    /* Independent streams: keys do not depend on the number of steps. */
    wl_rng_seed(&srng, seed ^ ((uint64_t)kind << 56) ^ (uint64_t)context);
    wl_rng_seed(&g->krng, wl_rng_u64(&srng));
    wl_rng_seed(&g->qrng, wl_rng_u64(&srng));

    /* Segments over the whole capacity. */
    {
        int smin = kind == WL_DRIFT ? pp->drift_seg_min : pp->seg_min;
        int smax = kind == WL_DRIFT ? pp->drift_seg_max : pp->seg_max;
        int capseg = (int)(g->cap / (smin > 0 ? smin : 1)) + 2;
        g->seg_start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(capseg + 1));
        g->seg_topic = (int *)malloc(sizeof(int) * (size_t)capseg);
        g->tok_seg = (int *)malloc(sizeof(int) * (size_t)g->cap);
        if (!g->seg_start || !g->seg_topic || !g->tok_seg)
            goto oom;
        t = 0;
        while (t < g->cap) {
            int len = smin + wl_below(&g->krng, smax - smin + 1);
            g->seg_start[g->nseg] = t;
            if (t < context)
                g->prefill_segs = g->nseg + 1;
            t += len;
            g->nseg++;
        }
        g->seg_start[g->nseg] = g->cap;
        for (i = 0; i < g->nseg; ++i) {
            int64_t e = g->seg_start[i + 1] < g->cap ? g->seg_start[i + 1] : g->cap;
            for (t = g->seg_start[i]; t < e; ++t)
                g->tok_seg[t] = i;
        }
        g->Z = kind == WL_DRIFT ? g->nseg : pp->topics;
        for (i = 0; i < g->nseg; ++i) {
            if (kind == WL_DRIFT) {
                g->seg_topic[i] = i;
            } else {
                int z;
                do
                    z = wl_below(&g->krng, g->Z);
                while (i > 0 && g->Z > 1 && z == g->seg_topic[i - 1]);
                g->seg_topic[i] = z;
            }
        }
    }

    /* Key structure per (layer, KV head). */
    g->outch = (int *)malloc(sizeof(int) * (size_t)LK * WL_NOUT);
    g->bias = (float *)calloc((size_t)LK * D, sizeof(float));
    g->usink = (float *)malloc(sizeof(float) * (size_t)LK * D);
    g->topic = (float *)malloc(sizeof(float) * (size_t)LK * g->Z * D);
    g->vcent = (float *)malloc(sizeof(float) * (size_t)LK * g->Z * D);
    if (!g->outch || !g->bias || !g->usink || !g->topic || !g->vcent)
        goto oom;
    for (i = 0; i < LK; ++i) {
        int *oc = g->outch + (size_t)i * WL_NOUT;
        for (j = 0; j < WL_NOUT; ++j) {
            int c, dup;
            do {
                c = wl_below(&g->krng, D);
                dup = 0;
                for (h = 0; h < j; ++h)
                    dup |= oc[h] == c;
            } while (dup);
            oc[j] = c;
            g->bias[(size_t)i * D + c] =
                (float)((wl_uniform(&g->krng) < 0.5 ? -1.0 : 1.0) * pp->bias);
        }
        wl_unit(&g->krng, oc, D, g->usink + (size_t)i * D);
        for (j = 0; j < g->Z; ++j) {
            wl_unit(&g->krng, oc, D, g->topic + ((size_t)i * g->Z + j) * D);
            for (h = 0; h < D; ++h)
                g->vcent[((size_t)i * g->Z + j) * D + h] =
                    (float)wl_normal(&g->krng);
        }
    }

    /* Needles: spread over the candidate pages of the prefill, from the
     * first to the last one, asked in a random order. */
    if (kind == WL_NEEDLES) {
        int S = sh->sink / sh->P, W = sh->window / sh->P;
        int64_t sealed = context / sh->P;
        int64_t ncand = sealed - W - S;
        int order[WL_MAX_NEEDLES];
        g->nneedle = pp->needles;
        if (g->nneedle > WL_MAX_NEEDLES)
            g->nneedle = WL_MAX_NEEDLES;
        if (ncand < g->nneedle || g->nneedle < 1)
            return wl_gen_free(g), -1;
        for (i = 0; i < g->nneedle; ++i) {
            int64_t page = S + (g->nneedle == 1 ? 0
                                : (int64_t)((double)i * (double)(ncand - 1) /
                                                (g->nneedle - 1) +
                                            0.5));
            g->needle_pos[i] = page * sh->P + wl_below(&g->krng, sh->P);
            if (g->needle_pos[i] < WL_SINK_TOKENS)
                g->needle_pos[i] = WL_SINK_TOKENS;
            order[i] = i;
        }
        for (i = g->nneedle - 1; i > 0; --i) {
            int r = wl_below(&g->krng, i + 1), tmp = order[i];
            order[i] = order[r];
            order[r] = tmp;
        }
        /* Step 0 is the synchronous first step, step 1 a plain trace step:
         * the first ask is step 2, each after a plain step. */
        for (i = 0; i < g->nneedle; ++i)
            g->ask_step[order[i]] = 2 + i * (pp->ask_gap < 2 ? 2 : pp->ask_gap);
        g->needle_dir = (float *)malloc(sizeof(float) * (size_t)g->nneedle * LK * D);
        g->needle_val = (float *)malloc(sizeof(float) * (size_t)g->nneedle * LK * D);
        if (!g->needle_dir || !g->needle_val)
            goto oom;
        for (i = 0; i < g->nneedle * LK; ++i) {
            wl_unit(&g->krng, g->outch + (size_t)(i % LK) * WL_NOUT, D,
                    g->needle_dir + (size_t)i * D);
            for (h = 0; h < D; ++h)
                g->needle_val[(size_t)i * D + h] = (float)wl_normal(&g->krng);
        }
    }

    /* Tokens of the prefill. */
    for (l = 0; l < L; ++l) {
        g->k[l] = (float *)malloc(sizeof(float) * (size_t)g->cap * KVH * D);
        g->v[l] = (float *)malloc(sizeof(float) * (size_t)g->cap * KVH * D);
        if (!g->k[l] || !g->v[l])
            goto oom;
    }
    for (t = 0; t < context; ++t)
        wl_fill_token(g, t);
    g->n = context;

    /* Query state. */
    g->qstatic = (float *)calloc((size_t)LQ * D, sizeof(float));
    g->focus = (int *)malloc(sizeof(int) * (size_t)LQ);
    g->alpha = (double *)malloc(sizeof(double) * (size_t)LQ * g->Z);
    g->rho = (double *)malloc(sizeof(double) * (size_t)LQ);
    g->eta = (double *)malloc(sizeof(double) * (size_t)LQ);
    g->is_volatile = (unsigned char *)calloc((size_t)LQ, 1);
    g->shifted = (unsigned char *)calloc((size_t)LQ, 1);
    g->dpos = (double *)malloc(sizeof(double) * (size_t)LK);
    g->dspeed = (double *)malloc(sizeof(double) * (size_t)LK);
    if (!g->qstatic || !g->focus || !g->alpha || !g->rho || !g->eta ||
        !g->is_volatile || !g->shifted || !g->dpos || !g->dspeed)
        goto oom;
    /* Exactly round(volatile_frac * QH) volatile heads per layer, at
     * random positions (a fixed share, not a lottery per head). */
    for (l = 0; l < L; ++l) {
        int nvol = (int)floor(pp->volatile_frac * QH + 0.5), placed = 0;
        while (placed < nvol && placed < QH) {
            int hh = wl_below(&g->qrng, QH);
            if (!g->is_volatile[l * QH + hh]) {
                g->is_volatile[l * QH + hh] = 1;
                placed++;
            }
        }
    }
    for (l = 0; l < L; ++l)
        for (i = 0; i < KVH; ++i) {
            int lk = l * KVH + i;
            int shared = wl_pick_focus(g);
            for (j = 0; j < g->G; ++j) {
                int lq = l * QH + i * g->G + j;
                float *qs = g->qstatic + (size_t)lq * D;
                double a = pp->sink_q * wl_uniform_in(&g->qrng, 0.7, 1.3);
                const int *oc = g->outch + (size_t)lk * WL_NOUT;
                for (h = 0; h < D; ++h)
                    qs[h] = (float)(a * g->usink[(size_t)lk * D + h]);
                for (h = 0; h < WL_NOUT; ++h)
                    qs[oc[h]] = (float)((wl_uniform(&g->qrng) < 0.5 ? -1 : 1) *
                                        pp->out_q);
                if (g->is_volatile[lq]) {
                    g->rho[lq] = pp->vol_rho;
                    g->eta[lq] = pp->vol_eta;
                } else {
                    g->rho[lq] = wl_uniform_in(&g->qrng, pp->stable_rho_lo,
                                               pp->stable_rho_hi);
                    g->eta[lq] = wl_uniform_in(&g->qrng, pp->stable_eta_lo,
                                               pp->stable_eta_hi);
                }
                g->focus[lq] = wl_uniform(&g->qrng) < 0.5
                                   ? shared : wl_pick_focus(g);
                for (h = 0; h < g->Z; ++h)
                    g->alpha[(size_t)lq * g->Z + h] =
                        g->eta[lq] * wl_normal(&g->qrng);
            }
            /* W3: start somewhere in the first half of the prefill's
             * segments (after the sink's), move forward at this speed. */
            {
                double lo = 1.0, hi = g->prefill_segs - 2.0;
                if (hi < lo + 1.0)
                    hi = lo + 1.0;
                g->dpos[lk] = wl_uniform_in(&g->qrng, lo, lo + 0.5 * (hi - lo));
                g->dspeed[lk] = pp->speed_lo *
                    pow(pp->speed_hi / pp->speed_lo, wl_uniform(&g->qrng));
            }
        }
    return 0;
oom:
    wl_gen_free(g);
    return -1;
}

int64_t wl_gen_token(wl_gen *g)
{
    if (g->n >= g->cap)
        return -1;
    wl_fill_token(g, g->n);
    return g->n++;
}

int wl_gen_ask(const wl_gen *g, int step)
{
    int i;
    for (i = 0; i < g->nneedle; ++i)
        if (g->ask_step[i] == step)
            return i;
    return -1;
}

int wl_needle_steps(const wl_params *pp)
{
    int gap = pp->ask_gap < 2 ? 2 : pp->ask_gap;
    int n = pp->needles > WL_MAX_NEEDLES ? WL_MAX_NEEDLES : pp->needles;
    return 2 + (n - 1) * gap + 2;
}

/* W3 focus position (in segments) of KV group lk at `step`: forward,
 * bouncing between the first and the last prefill segment. */
static double wl_drift_pos(const wl_gen *g, int lk, int step)
{
    double lo = 1.0, hi = g->prefill_segs - 2.0, span, u;
    if (hi < lo + 1.0)
        hi = lo + 1.0;
    span = hi - lo;
    u = g->dpos[lk] - lo + g->dspeed[lk] * step;
    u = fmod(u, 2.0 * span);
    if (u > span)
        u = 2.0 * span - u;
    return lo + u;
}

void wl_gen_query(wl_gen *g, int step, int layer, float *q)
{
    const int D = g->sh.D, QH = g->sh.QH, KVH = g->sh.KVH, G = g->G;
    const wl_params *p = &g->pp;
    const int ask = g->kind == WL_NEEDLES ? wl_gen_ask(g, step) : -1;
    double *f = (double *)malloc(sizeof(double) * (size_t)D);
    int h, i, z;
    if (!f)
        abort();
    /* Trace state (W1, W2): shifts, then one OU step. It evolves at asks
     * too, so the trace resumes where it would have been. */
    for (h = 0; h < QH; ++h)
        g->shifted[layer * QH + h] = 0;
    if (g->kind != WL_DRIFT && step > 0) {
        for (i = 0; i < KVH; ++i)
            if (wl_uniform(&g->qrng) < p->p_shift_group) {
                int nz = wl_pick_focus(g);
                for (h = 0; h < G; ++h) {
                    int lq = layer * QH + i * G + h;
                    g->shifted[lq] |= g->focus[lq] != nz;
                    g->focus[lq] = nz;
                }
            }
        for (h = 0; h < QH; ++h) {
            int lq = layer * QH + h;
            double r = g->rho[lq], e = g->eta[lq] * sqrt(1.0 - r * r);
            if (wl_uniform(&g->qrng) < p->p_shift_head) {
                int nz = wl_pick_focus(g);
                g->shifted[lq] |= g->focus[lq] != nz;
                g->focus[lq] = nz;
            }
            for (z = 0; z < g->Z; ++z) {
                double *a = &g->alpha[(size_t)lq * g->Z + z];
                *a = r * *a + e * wl_normal(&g->qrng);
            }
        }
    }
    for (h = 0; h < QH; ++h) {
        int lq = layer * QH + h, lk = layer * KVH + h / G;
        double nn = 0.0, mag = p->focus_q;
        memset(f, 0, sizeof(double) * (size_t)D);
        if (ask >= 0) {
            const float *nd = g->needle_dir +
                ((size_t)ask * g->sh.L * KVH + lk) * D;
            for (i = 0; i < D; ++i)
                f[i] = nd[i];
            mag = p->needle_q;
        } else if (g->kind == WL_DRIFT) {
            double u = wl_drift_pos(g, lk, step);
            int s0 = (int)floor(u);
            double ph = u - s0;
            const float *a = g->topic + ((size_t)lk * g->Z + s0) * D;
            const float *b = g->topic + ((size_t)lk * g->Z + s0 + 1) * D;
            for (i = 0; i < D; ++i)
                f[i] = (1.0 - ph) * a[i] + ph * b[i];
        } else {
            for (z = 0; z < g->Z; ++z) {
                double w = g->alpha[(size_t)lq * g->Z + z] +
                           (z == g->focus[lq] ? 1.0 : 0.0);
                const float *tz = g->topic + ((size_t)lk * g->Z + z) * D;
                for (i = 0; i < D; ++i)
                    f[i] += w * tz[i];
            }
        }
        for (i = 0; i < D; ++i)
            nn += f[i] * f[i];
        nn = nn > 0.0 ? sqrt(nn) : 1.0;
        for (i = 0; i < D; ++i)
            q[(size_t)h * D + i] = wl_round(
                g->sh.dtype, g->qstatic[(size_t)lq * D + i] + mag * f[i] / nn +
                                 p->qnoise_sd * wl_normal(&g->qrng));
    }
    free(f);
}

