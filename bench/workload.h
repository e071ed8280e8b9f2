/*
 * Retrieval-accuracy workloads of libfreekv, shared by the benchmark
 * (bench/accuracy.c) and its unit test (tests/test_accuracy.c).
 * Header-only: every function is static inline, so a file that includes it
 * and uses part of it compiles cleanly under -Wall -Wextra -Werror.
 *
 * Two halves:
 *
 *  1. Generators (wl_gen): keys, values and query traces fixed by a seed.
 *     Keys have the structure of real models' keys: a few high-magnitude
 *     outlier channels (a large per-channel mean), attention sinks (the
 *     first WL_SINK_TOKENS tokens, which every query head attends to
 *     strongly), and topic segments (runs of tokens whose keys share a
 *     direction, scaled by a log-normal per-token salience; a topic recurs
 *     in several segments). Three workloads:
 *       WL_TOPICS  (W1) each query head follows a topic-mixture trace: a
 *                  focus topic plus Ornstein-Uhlenbeck weights over all
 *                  topics. Most heads are stable (adjacent-step cosine
 *                  above 0.9), a minority volatile; focus topics jump
 *                  now and then, per head and per KV group.
 *       WL_NEEDLES (W2) W1's trace plus planted needles: single tokens
 *                  whose keys are strong along a needle's own direction,
 *                  at positions spanning the candidate range; at the step
 *                  a needle is asked every query head jumps from its trace
 *                  to its KV head's needle direction (and returns after).
 *       WL_DRIFT   (W3) every topic is used by one segment only; each KV
 *                  group's query focus moves through consecutive segments
 *                  at its own speed (blending one segment's direction into
 *                  the next), so the relevant region moves through the
 *                  context over time.
 *
 *  2. A session (wl_session) that runs one generated workload through a
 *     set of caches (one per policy / correction threshold) on one backend,
 *     and measures, per variant, in double from the host copies of K/V/q:
 *     the dense softmax mass of the attended tokens (sink, window, partial
 *     page and the pages fkv_get_selected_pages reports, docs/design.md
 *     section 2), the same relative to the oracle (the pages selected with
 *     the current query: RESIDENT's), the output error against DENSE's
 *     output, needle hits, and the library's recall/correction counters.
 *     It also checks that each output equals exact attention over the
 *     attended set it measured (self_err), so the metric and the library
 *     agree on what was attended.
 *
 * Tensors go through wl_mem (host memory on the CPU backend; the caller
 * supplies device memory operations on the CUDA backend).
 *
 * Use: wl_gen_init (generates the prefill), wl_session_open (caches,
 * prefill appended), wl_session_step per decode step (as many as planned
 * in wl_gen_init), wl_session_close (reads the counters, frees the caches;
 * s->met and s->tr stay), then wl_session_release and wl_gen_free.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_BENCH_WORKLOAD_H
#define FKV_BENCH_WORKLOAD_H

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h" /* random numbers and element types */
#include "freekv.h"

#define WL_FN static inline

#define WL_MAX_LAYERS 8
#define WL_MAX_VARIANTS 12
#define WL_MAX_NEEDLES 32
#define WL_SINK_TOKENS 4 /* tokens with sink keys */
#define WL_NOUT 4        /* outlier channels per (layer, KV head) */

enum { WL_TOPICS = 1, WL_NEEDLES = 2, WL_DRIFT = 3 };

WL_FN const char *wl_kind_name(int kind)
{
    switch (kind) {
    case WL_TOPICS: return "topics";
    case WL_NEEDLES: return "needles";
    case WL_DRIFT: return "drift";
    default: return "?";
    }
}

/* ---------------------------------------------------------------------- */
/* Random numbers (bench.h's splitmix64, Marsaglia polar normals).         */
/* ---------------------------------------------------------------------- */

typedef struct wl_rng {
    bench_rng core;
    int has_spare;
    double spare;
} wl_rng;

WL_FN void wl_rng_seed(wl_rng *r, uint64_t seed)
{
    r->core.state = seed * 0x9e3779b97f4a7c15ULL + 0x2545f4914f6cdd1dULL;
    r->has_spare = 0;
    r->spare = 0.0;
}

WL_FN uint64_t wl_rng_u64(wl_rng *r)
{
    return bench_rng_next(&r->core);
}

WL_FN double wl_uniform(wl_rng *r)
{
    return bench_rng_uniform(&r->core);
}

WL_FN double wl_uniform_in(wl_rng *r, double lo, double hi)
{
    return bench_rng_uniform_in(&r->core, lo, hi);
}

WL_FN double wl_normal(wl_rng *r)
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

WL_FN int wl_below(wl_rng *r, int n)
{
    return n <= 1 ? 0 : (int)(wl_rng_u64(r) % (uint64_t)n);
}

/* ---------------------------------------------------------------------- */
/* Element types (bench.h's conversions: rounding to nearest even, like    */
/* the library's loads).                                                   */
/* ---------------------------------------------------------------------- */

/* x rounded to the dtype, as float. */
WL_FN float wl_round(fkv_dtype dt, double x)
{
    unsigned char e[4];
    bench_store_elem(dt, e, 0, (float)x);
    return bench_load_elem(dt, e, 0);
}

WL_FN void wl_encode(fkv_dtype dt, const float *src, void *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        bench_store_elem(dt, dst, i, src[i]);
}

WL_FN void wl_decode(fkv_dtype dt, const void *src, float *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        dst[i] = bench_load_elem(dt, src, i);
}

/* ---------------------------------------------------------------------- */
/* Shapes and parameters.                                                  */
/* ---------------------------------------------------------------------- */

typedef struct wl_shape {
    int L, QH, KVH, D;
    int P, sink, window, budget; /* tokens */
    fkv_dtype dtype;
} wl_shape;

/* The benchmark's default shape: the paper's small model's heads (8 query,
 * 2 KV heads, head_dim 64, page 32, sink 128, window 128) with 2 layers and
 * the library's default budget of 2048 tokens (K = 56 selected pages). */
WL_FN wl_shape wl_default_shape(void)
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

/* Magnitudes. A logit is scale * q.k with scale = 1/sqrt(D) (1/8 at D 64).
 * The defaults were set from the statistics the workloads must show (the
 * paper's adjacent-step query similarity, sinks taking a large share of
 * the attention, a sparse focus), not from the results of any policy. */
typedef struct wl_params {
    /* keys */
    double bias;        /* |mean| of an outlier channel */
    double out_sd;      /* sd of an outlier channel */
    double noise_sd;    /* sd of every other channel */
    double sink_norm;   /* sink keys: norm along the sink direction */
    double topic_norm;  /* topic keys: norm along the topic at salience 1 */
    double salience_sd; /* salience = exp(salience_sd * N(0,1)) */
    double needle_norm; /* needle key: norm along the needle direction */
    int seg_min, seg_max; /* segment lengths, tokens */
    int drift_seg_min, drift_seg_max; /* same for W3 */
    int topics;           /* distinct topics (W1, W2) */
    /* queries */
    double sink_q;   /* along the sink direction, x U(0.7, 1.3) per head */
    double out_q;    /* on each outlier channel, random sign per head */
    double focus_q;  /* along the (unit) focus mixture */
    double needle_q; /* along the needle direction at an ask */
    double qnoise_sd; /* fresh per step, per channel */
    /* W1 trace: per head, OU weights alpha_z over the topics:
     * alpha' = rho alpha + sqrt(1 - rho^2) eta N(0,1). */
    double volatile_frac;
    double stable_rho_lo, stable_rho_hi, stable_eta_lo, stable_eta_hi;
    double vol_rho, vol_eta;
    double p_shift_head;  /* per (step, query head): new focus topic */
    double p_shift_group; /* per (step, KV group): one new focus for all */
    /* W3: each KV group's speed through the segments, segments per step */
    double speed_lo, speed_hi;
    /* W2 */
    int needles;
    int ask_gap; /* steps from one ask to the next (>= 2) */
} wl_params;

WL_FN wl_params wl_default_params(void)
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
/* Generator.                                                              */
/* ---------------------------------------------------------------------- */

typedef struct wl_gen {
    int kind;
    wl_shape sh;
    wl_params pp;
    int G;             /* query heads per KV head */
    int64_t context;   /* prefill tokens */
    int64_t cap;       /* context + decode tokens */
    int64_t n;         /* tokens generated so far */
    int steps;         /* decode steps planned */
    wl_rng krng, qrng;
    /* Host copies, values exactly representable in the dtype. */
    float *k[WL_MAX_LAYERS], *v[WL_MAX_LAYERS]; /* [cap][KVH][D] */
    /* Structure per (layer, KV head) lk = l * KVH + g. */
    int *outch;     /* [LK][WL_NOUT] */
    float *bias;    /* [LK][D] zero but on the outlier channels */
    float *usink;   /* [LK][D] unit */
    int Z;          /* topics */
    float *topic;   /* [LK][Z][D] unit */
    float *vcent;   /* [LK][Z][D] value centres */
    /* Segments (shared by layers and heads: they are the text). */
    int nseg;
    int64_t *seg_start; /* [nseg + 1] */
    int *seg_topic;     /* [nseg] */
    int *tok_seg;       /* [cap] */
    int prefill_segs;   /* segments that start before `context` */
    /* Needles (W2). */
    int nneedle;
    int64_t needle_pos[WL_MAX_NEEDLES];
    int ask_step[WL_MAX_NEEDLES];
    float *needle_dir; /* [nneedle][LK][D] unit */
    float *needle_val; /* [nneedle][LK][D] */
    /* Query state per (layer, query head) lq = l * QH + h. */
    float *qstatic;   /* [LQ][D] sink + outlier parts */
    int *focus;       /* [LQ] */
    double *alpha;    /* [LQ][Z] */
    double *rho, *eta; /* [LQ] */
    unsigned char *is_volatile; /* [LQ] */
    unsigned char *shifted;     /* [LQ] focus jumped at the last query */
    /* W3: per lk, start and speed through the segments. */
    double *dpos, *dspeed;
} wl_gen;

WL_FN void wl_unit(wl_rng *r, const int *outch, int D, float *u)
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

WL_FN void wl_gen_free(wl_gen *g)
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
WL_FN void wl_fill_token(wl_gen *g, int64_t t)
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
WL_FN int wl_pick_focus(wl_gen *g)
{
    int64_t lo = g->seg_start[1 < g->nseg ? 1 : 0], t;
    if (lo >= g->context)
        lo = 0;
    t = lo + (int64_t)(wl_uniform(&g->qrng) * (double)(g->context - lo));
    return g->seg_topic[g->tok_seg[t]];
}

/* Plans `steps` decode steps after `context` prefill tokens. Returns 0 on
 * success, -1 when out of memory or the shape is unusable. */
WL_FN int wl_gen_init(wl_gen *g, int kind, const wl_shape *sh,
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

/* Generates the next decode token (every layer); returns its index. */
WL_FN int64_t wl_gen_token(wl_gen *g)
{
    if (g->n >= g->cap)
        return -1;
    wl_fill_token(g, g->n);
    return g->n++;
}

/* The needle asked at `step`, or -1. */
WL_FN int wl_gen_ask(const wl_gen *g, int step)
{
    int i;
    for (i = 0; i < g->nneedle; ++i)
        if (g->ask_step[i] == step)
            return i;
    return -1;
}

/* Decode steps a workload needs by default (W2: all its asks). */
WL_FN int wl_needle_steps(const wl_params *pp)
{
    int gap = pp->ask_gap < 2 ? 2 : pp->ask_gap;
    int n = pp->needles > WL_MAX_NEEDLES ? WL_MAX_NEEDLES : pp->needles;
    return 2 + (n - 1) * gap + 2;
}

/* W3 focus position (in segments) of KV group lk at `step`: forward,
 * bouncing between the first and the last prefill segment. */
WL_FN double wl_drift_pos(const wl_gen *g, int lk, int step)
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

/* The queries of `layer` at decode `step`: q [QH][D], rounded to the
 * dtype. Call once per (step, layer), steps in order, layers in order. */
WL_FN void wl_gen_query(wl_gen *g, int step, int layer, float *q)
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

/* ---------------------------------------------------------------------- */
/* Tensor memory of the backend.                                           */
/* ---------------------------------------------------------------------- */

typedef struct wl_mem {
    void *(*alloc)(void *ctx, size_t bytes);
    void (*release)(void *ctx, void *p);
    int (*put)(void *ctx, void *dst, const void *src, size_t bytes); /* 0 ok */
    int (*get)(void *ctx, void *dst, const void *src, size_t bytes);
    void *ctx;
} wl_mem;

WL_FN void *wl_host_alloc(void *ctx, size_t bytes)
{
    (void)ctx;
    return malloc(bytes ? bytes : 1);
}
WL_FN void wl_host_release(void *ctx, void *p)
{
    (void)ctx;
    free(p);
}
WL_FN int wl_host_copy(void *ctx, void *dst, const void *src, size_t bytes)
{
    (void)ctx;
    memcpy(dst, src, bytes);
    return 0;
}
WL_FN wl_mem wl_host_mem(void)
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
/* Session: the workload through one cache per variant.                    */
/* ---------------------------------------------------------------------- */

typedef struct wl_variant {
    char name[40];
    fkv_policy policy;
    float threshold; /* NAN: the library's default */
    /* FREEKV's correction criterion; 0 (COSINE) leaves the options as
     * fkv_options_init made them. */
    int32_t criterion;
    float min_mass;
    int32_t max_pages;
} wl_variant;

WL_FN wl_variant wl_make_variant(const char *name, fkv_policy policy,
                                 float threshold)
{
    wl_variant v;
    memset(&v, 0, sizeof v);
    snprintf(v.name, sizeof v.name, "%s", name);
    v.policy = policy;
    v.threshold = threshold;
    return v;
}

/* FREEKV at the library's default threshold (0.9), SYNC, RESIDENT, DENSE,
 * then FREEKV at thresholds 0.7, 0.8, 0.95 and with correction off. */
WL_FN int wl_default_variants(wl_variant *v)
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

typedef struct wl_metrics {
    double head_steps;   /* (step, layer, query head) measured */
    double mass;         /* sum of the dense mass kept */
    double oracle;       /* sum of the oracle's mass at the same head-steps */
    double err;          /* sum of ||out - out_dense|| / ||out_dense|| */
    double worst_step;   /* min over steps of sum mass / sum oracle */
    double worst_head;   /* min over head-steps of mass / oracle mass */
    double ovl_hit, ovl_tot; /* oracle pages also selected / oracle pages */
    double self_err;     /* max ||out - exact(attended)|| / ||exact|| */
    double ask_mass, ask_oracle; /* mass sums at needle asks */
    /* The same sums less the sink, window and partial page (attended by
     * every policy): the mass of the selected pages alone. */
    double sel_mass, sel_oracle;
    /* oracle - kept mass summed by head-step category: 0 volatile head,
     * 1 stable head whose focus jumped, 2 other, 3 a needle ask or the
     * step after it (W2). W3: 1 the KV groups moving faster than the
     * geometric mean of the speeds, 2 the slower ones. */
    double loss[4];
    uint64_t asks, hits; /* (ask, layer, KV head) */
    fkv_stats st;        /* after the warm-up steps */
    uint64_t crit_pages; /* of st.pages_recalled, those moved inside
                          * fkv_attend (on the critical path) */
    float threshold;     /* in force (FREEKV) */
} wl_metrics;

typedef struct wl_trace {
    double cos_sum, cos_n;   /* adjacent-step cosine per (step, layer, q head) */
    double cos_below05;      /* head-steps with cosine < 0.5 */
    double *head_cos;        /* [LQ] sum per head */
    double gcos_n;           /* (step, layer, KV head) */
    double gcos_below[4];    /* group-mean cosine < 0.7, 0.8, 0.9, 0.95 */
    double sink_mass, window_mass, mass_n; /* dense mass in sink, window */
    double needle_mass, needle_n; /* dense mass of the needle token */
    double ideal_mass;       /* best K pages per KV head (sum per head-step) */
    double cat_n[4];         /* head-steps per loss category */
} wl_trace;

typedef struct wl_ranked {
    double mass;
    int32_t page;
} wl_ranked;

WL_FN int wl_by_mass(const void *a, const void *b)
{
    const wl_ranked *x = (const wl_ranked *)a, *y = (const wl_ranked *)b;
    if (x->mass != y->mass)
        return x->mass > y->mass ? -1 : 1;
    return (x->page > y->page) - (x->page < y->page);
}

typedef struct wl_session {
    wl_gen *g;
    int nvar;
    wl_variant var[WL_MAX_VARIANTS];
    fkv_cache *c[WL_MAX_VARIANTS];
    fkv_seq_id seq[WL_MAX_VARIANTS];
    wl_metrics met[WL_MAX_VARIANTS];
    wl_trace tr;
    wl_mem mem;
    fkv_backend backend;
    int warmup;  /* steps before the measurement (>= 1) */
    int step;    /* next decode step */
    int idx_dense, idx_oracle, idx_sync;
    int S, W, K, P;
    int64_t maxpages;
    void *dk, *dv, *dq, *dout;
    size_t dkv_bytes;
    unsigned char *stage;
    float *q, *qprev;  /* [L][QH][D] */
    float *out;        /* [nvar][QH][D] this layer's outputs */
    int32_t *sel;      /* [nvar][KVH][K] this layer's selected pages */
    int32_t *nsel;     /* [nvar][KVH] */
    int32_t *att;      /* attended page list scratch [maxpages] */
    double *w;         /* [cap] dense weights of one head */
    double *pm;        /* [QH][maxpages] dense mass per page */
    double *pv;        /* [QH][maxpages][D] sum of w * v per page */
    double *dense;     /* [QH][D] exact dense output */
    double *fixed;     /* [QH] dense mass of sink, window, partial page */
    struct wl_ranked *rank; /* [maxpages] */
    double step_mass[WL_MAX_VARIANTS], step_oracle[WL_MAX_VARIANTS];
    uint64_t sync_mismatch; /* (step, layer, KV head): SYNC != RESIDENT */
    fkv_status status;      /* of the last failed library call */
    char err[512];
} wl_session;

WL_FN int wl_fail(wl_session *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s->err, sizeof s->err, fmt, ap);
    va_end(ap);
    return -1;
}

WL_FN int wl_check(wl_session *s, int v, fkv_status st, const char *what)
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

WL_FN void wl_session_free(wl_session *s)
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

/* Creates one cache per variant on `backend`, opens a sequence in each and
 * appends the prefill. The variants must include RESIDENT (the oracle);
 * output errors are taken against DENSE's output where a DENSE variant is
 * among them, else against the exact dense output. Returns 0, or -1 with
 * s->err. */
WL_FN int wl_session_open(wl_session *s, wl_gen *g, const wl_variant *var,
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
        if (var[v].policy == FKV_POLICY_RESIDENT && s->idx_oracle < 0)
            s->idx_oracle = v;
        if (var[v].policy == FKV_POLICY_SYNC && s->idx_sync < 0)
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
        }
        o.max_sequences = 1;
        o.max_tokens_per_sequence = g->cap;
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

WL_FN double wl_cos(const float *a, const float *b, int n)
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

/* Dense weights of query head h over the n tokens of `layer`: fills
 * s->pm[h][*] (mass per page), s->pv[h][*] (sum of w v per page) and
 * s->dense[h] (exact dense output). Returns the weight of token `probe`
 * (or 0 when probe < 0). */
WL_FN double wl_dense_head(wl_session *s, int layer, int h, int64_t n,
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

/* The pages KV head kvh of variant v attended at this layer (design §2):
 * sink, selected, window, partial. Returns the count in s->att. */
WL_FN int wl_attended(wl_session *s, int v, int kvh, int64_t n)
{
    const int P = s->P;
    int64_t sealed = n / P, p, sink_end, win_first;
    int cnt = 0, j;
    if (s->var[v].policy == FKV_POLICY_DENSE) {
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

/* Candidate pages [*first, *first + *count) for n tokens (design §2). */
WL_FN void wl_candidates(const wl_session *s, int64_t n, int *first,
                         int *count)
{
    int64_t sealed = n / s->P, e = sealed - s->W;
    *first = s->S;
    *count = e > s->S ? (int)(e - s->S) : 0;
}

WL_FN int wl_in_list(const int32_t *list, int n, int32_t x)
{
    int i;
    for (i = 0; i < n; ++i)
        if (list[i] == x)
            return 1;
    return 0;
}

/* One decode step on every layer. Returns 0, or -1 with s->err. */
WL_FN int wl_session_step(wl_session *s)
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
                cnt_o = wl_attended(s, s->idx_oracle, kvh, n);
                oracle_mass = 0.0;
                for (j = 0; j < cnt_o; ++j)
                    oracle_mass += pm[s->att[j]];
                for (v = 0; v < s->nvar; ++v) {
                    wl_metrics *m = &s->met[v];
                    const float *o = s->out + ((size_t)v * QH + h) * D;
                    double mass = 0.0, e = 0.0, se = 0.0, xn = 0.0;
                    int i;
                    double *ex = s->w; /* scratch [D] */
                    cnt = wl_attended(s, v, kvh, n);
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
                    if (s->var[v].policy != FKV_POLICY_DENSE) {
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
                    if (s->var[v].policy != FKV_POLICY_DENSE) {
                        for (j = 0; j < no; ++j)
                            s->met[v].ovl_hit += wl_in_list(a, na, o[j]);
                        s->met[v].ovl_tot += no;
                    }
                    if (ask >= 0) {
                        int cnt = wl_attended(s, v, h, n);
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

/* Reads the counters, destroys the caches and frees the session (the
 * metrics and trace numbers stay in *s). Returns 0, or -1 with s->err. */
WL_FN int wl_session_close(wl_session *s)
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

WL_FN void wl_session_release(wl_session *s)
{
    wl_session_free(s);
}

/* ---------------------------------------------------------------------- */
/* Derived numbers.                                                        */
/* ---------------------------------------------------------------------- */

WL_FN double wl_mass(const wl_metrics *m)
{
    return m->head_steps > 0 ? m->mass / m->head_steps : NAN;
}
WL_FN double wl_oracle_ratio(const wl_metrics *m)
{
    return m->oracle > 0 ? m->mass / m->oracle : NAN;
}
WL_FN double wl_sel_ratio(const wl_metrics *m)
{
    return m->sel_oracle > 0 ? m->sel_mass / m->sel_oracle : NAN;
}
WL_FN double wl_err(const wl_metrics *m)
{
    return m->head_steps > 0 ? m->err / m->head_steps : NAN;
}
WL_FN double wl_overlap(const wl_metrics *m)
{
    return m->ovl_tot > 0 ? m->ovl_hit / m->ovl_tot : NAN;
}
WL_FN double wl_hit_rate(const wl_metrics *m)
{
    return m->asks ? (double)m->hits / (double)m->asks : NAN;
}
WL_FN double wl_correction_rate(const wl_metrics *m)
{
    return m->st.heads_checked
               ? (double)m->st.corrections / (double)m->st.heads_checked : NAN;
}
/* Pages recalled per decode step per (layer, KV head). */
WL_FN double wl_recall_per_step(const wl_metrics *m, const wl_shape *sh)
{
    return m->st.steps ? (double)m->st.pages_recalled /
                             ((double)m->st.steps * sh->L * sh->KVH)
                       : NAN;
}
/* The same, moved inside fkv_attend (correction, SYNC): the critical path. */
WL_FN double wl_crit_per_step(const wl_metrics *m, const wl_shape *sh)
{
    return m->st.steps ? (double)m->crit_pages /
                             ((double)m->st.steps * sh->L * sh->KVH)
                       : NAN;
}
/* Fraction of query heads whose mean adjacent-step cosine is >= x. */
WL_FN double wl_heads_above(const wl_trace *tr, const wl_shape *sh, double x)
{
    int i, n = sh->L * sh->QH, c = 0;
    double steps = tr->cos_n / n;
    if (!tr->head_cos || steps <= 0)
        return NAN;
    for (i = 0; i < n; ++i)
        c += tr->head_cos[i] / steps >= x;
    return (double)c / n;
}

#endif /* FKV_BENCH_WORKLOAD_H */
