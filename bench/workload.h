/*
 * Retrieval-accuracy workloads of libfreekv, shared by the benchmark
 * (bench/accuracy.c) and its unit test (tests/test_accuracy.c).
 * This header declares; the definitions are in bench/workload_gen.c (the
 * generators), bench/workload_session.c (the session and its per-step
 * measurement) and bench/workload_measure.c (the float64 dense reference,
 * attended sets and derived numbers), which every user links with
 * bench/bench.c and bench/bench_data.c.
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

#define WL_MAX_LAYERS 8
#define WL_MAX_VARIANTS 12
#define WL_MAX_NEEDLES 32
#define WL_SINK_TOKENS 4 /* tokens with sink keys */
#define WL_NOUT 4        /* outlier channels per (layer, KV head) */

enum { WL_TOPICS = 1, WL_NEEDLES = 2, WL_DRIFT = 3 };

const char *wl_kind_name(int kind);

/* ---------------------------------------------------------------------- */
/* Random numbers (bench.h's splitmix64, Marsaglia polar normals).         */
/* ---------------------------------------------------------------------- */

typedef struct wl_rng {
    bench_rng core;
    int has_spare;
    double spare;
} wl_rng;

/* ---------------------------------------------------------------------- */
/* Element types (bench.h's conversions: rounding to nearest even, like    */
/* the library's loads).                                                   */
/* ---------------------------------------------------------------------- */

/* n floats to / from an array of dtype dt. */
void wl_encode(fkv_dtype dt, const float *src, void *dst, size_t n);
void wl_decode(fkv_dtype dt, const void *src, float *dst, size_t n);

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
wl_shape wl_default_shape(void);

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

wl_params wl_default_params(void);

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

void wl_gen_free(wl_gen *g);

/* Plans `steps` decode steps after `context` prefill tokens. Returns 0 on
 * success, -1 when out of memory or the shape is unusable. */
int wl_gen_init(wl_gen *g, int kind, const wl_shape *sh,
                      const wl_params *pp, int64_t context, int steps,
                      uint64_t seed);

/* Generates the next decode token (every layer); returns its index. */
int64_t wl_gen_token(wl_gen *g);

/* The needle asked at `step`, or -1. */
int wl_gen_ask(const wl_gen *g, int step);

/* Decode steps a workload needs by default (W2: all its asks). */
int wl_needle_steps(const wl_params *pp);

/* The queries of `layer` at decode `step`: q [QH][D], rounded to the
 * dtype. Call once per (step, layer), steps in order, layers in order. */
void wl_gen_query(wl_gen *g, int step, int layer, float *q);

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

wl_mem wl_host_mem(void);

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
    float spec_mass; /* BOUNDED's speculative_min_mass */
    /* Bit l: layer l attends every token (fkv_options.dense_layers); 0:
     * none. The oracle (the first RESIDENT) and the SYNC check use
     * variants without. */
    uint64_t dense_layers;
} wl_variant;

wl_variant wl_make_variant(const char *name, fkv_policy policy,
                                 float threshold);

/* FREEKV at the library's default threshold (0.9), SYNC, RESIDENT, DENSE,
 * then FREEKV at thresholds 0.7, 0.8, 0.95 and with correction off. */
int wl_default_variants(wl_variant *v);

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

int wl_by_mass(const void *a, const void *b);

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

int wl_check(wl_session *s, int v, fkv_status st, const char *what);

/* Creates one cache per variant on `backend`, opens a sequence in each and
 * appends the prefill. The variants must include RESIDENT (the oracle);
 * output errors are taken against DENSE's output where a DENSE variant is
 * among them, else against the exact dense output. Returns 0, or -1 with
 * s->err. */
int wl_session_open(wl_session *s, wl_gen *g, const wl_variant *var,
                          int nvar, fkv_backend backend, const wl_mem *mem,
                          int warmup);

double wl_cos(const float *a, const float *b, int n);

/* Dense weights of query head h over the n tokens of `layer`: fills
 * s->pm[h][*] (mass per page), s->pv[h][*] (sum of w v per page) and
 * s->dense[h] (exact dense output). Returns the weight of token `probe`
 * (or 0 when probe < 0). */
double wl_dense_head(wl_session *s, int layer, int h, int64_t n,
                           const float *qh, int64_t probe);

/* Whether variant v attends every token at layer l (DENSE, or a dense
 * layer of its cache). */
int wl_layer_dense(const wl_session *s, int v, int l);

/* The pages KV head kvh of variant v attended at layer l (design §2):
 * sink, selected, window, partial; every page at a dense layer. Returns
 * the count in s->att. */
int wl_attended(wl_session *s, int v, int l, int kvh, int64_t n);

/* Candidate pages [*first, *first + *count) for n tokens (design §2). */
void wl_candidates(const wl_session *s, int64_t n, int *first,
                         int *count);

int wl_in_list(const int32_t *list, int n, int32_t x);

/* One decode step on every layer. Returns 0, or -1 with s->err. */
int wl_session_step(wl_session *s);

/* Reads the counters, destroys the caches and frees the session (the
 * metrics and trace numbers stay in *s). Returns 0, or -1 with s->err. */
int wl_session_close(wl_session *s);

void wl_session_release(wl_session *s);

/* ---------------------------------------------------------------------- */
/* Derived numbers.                                                        */
/* ---------------------------------------------------------------------- */

double wl_mass(const wl_metrics *m);
double wl_oracle_ratio(const wl_metrics *m);
double wl_sel_ratio(const wl_metrics *m);
double wl_err(const wl_metrics *m);
double wl_overlap(const wl_metrics *m);
double wl_hit_rate(const wl_metrics *m);
double wl_correction_rate(const wl_metrics *m);
/* Pages recalled per decode step per (layer, KV head). */
double wl_recall_per_step(const wl_metrics *m, const wl_shape *sh);
/* The same, moved inside fkv_attend (correction, SYNC): the critical path. */
double wl_crit_per_step(const wl_metrics *m, const wl_shape *sh);
/* Fraction of query heads whose mean adjacent-step cosine is >= x. */
double wl_heads_above(const wl_trace *tr, const wl_shape *sh, double x);

#endif /* FKV_BENCH_WORKLOAD_H */
