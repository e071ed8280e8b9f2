/*
 * libfreekv demo: a synthetic multi-layer model driven through the public API.
 *
 * For each policy (FREEKV, SYNC, RESIDENT, DENSE) the demo builds a cache,
 * prefills a batch of two sequences of different prompt lengths with one
 * fkv_append per layer, then runs decode steps in the documented order per
 * layer (fkv_append, fkv_attend, fkv_select, fkv_recall). All policies see
 * exactly the same keys, values and queries; each policy's attention output
 * is compared with the DENSE policy's, and the demo's own float64 attention
 * checks the DENSE output.
 *
 * The synthetic data has the structure retrieval relies on: keys form topic
 * clusters laid out in contiguous segments of the text, a few key channels
 * carry large outliers, the first tokens are attention sinks, and each
 * group's query follows a slowly rotating mix of topics plus noise, with an
 * occasional abrupt shift (adjacent-step cosine about 0.7-0.9).
 *
 * Uses only include/freekv.h. Build: make demo (or
 *   cc -std=c11 -O2 -Iinclude examples/demo.c build/libfreekv.a -lm).
 *
 * SPDX-License-Identifier: MIT
 */
#include "freekv.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* Shape of the synthetic model and of the run                              */
/* ------------------------------------------------------------------------ */

enum {
    NUM_LAYERS = 4,
    NUM_Q_HEADS = 8,
    NUM_KV_HEADS = 2,
    GROUP = NUM_Q_HEADS / NUM_KV_HEADS,
    HEAD_DIM = 64,
    PAGE_TOKENS = 32,
    SINK_TOKENS = 64,
    WINDOW_TOKENS = 128,
    BUDGET_TOKENS = 512,
    SELECTED_PAGES = (BUDGET_TOKENS - SINK_TOKENS - WINDOW_TOKENS) / PAGE_TOKENS,
    NUM_SEQS = 2,
    DECODE_STEPS = 32,
    MAX_PAGES_OUT = 256, /* capacity passed to fkv_get_selected_pages */

    /* data model */
    NUM_TOPICS = 48,     /* key clusters per (layer, KV head), < HEAD_DIM */
    NUM_OUTLIERS = 3,    /* high-magnitude key channels per (layer, KV head) */
    HOT_SINK = 4,        /* the first tokens draw heavy attention */
    SEGMENT_MIN = 32,    /* tokens of one topic in a row */
    SEGMENT_MAX = 112
};

static const int32_t PROMPT_LEN[NUM_SEQS] = {4096, 3000};

_Static_assert(NUM_TOPICS + 1 <= HEAD_DIM, "topics and sink must be orthogonal");
_Static_assert(NUM_Q_HEADS % NUM_KV_HEADS == 0, "GQA group");

/* Amplitudes (softmax scale is 1/sqrt(64) = 1/8). */
#define KEY_AMP 5.0f        /* norm of a key's topic component */
#define KEY_NOISE 0.3f      /* per channel */
#define SINK_AMP 8.0f       /* norm of the sink tokens' keys */
#define OUTLIER_MIN 6.0f    /* |offset| of an outlier channel */
#define OUTLIER_MAX 10.0f
#define VALUE_NOISE 0.5f
#define Q_AMP 16.0f         /* norm of a query's topic component */
#define Q_SINK 10.0f        /* query component along the sink direction */
#define Q_HEAD_MIX 0.35f    /* weight of a head's own direction in its group */
#define Q_NOISE_MIN 0.5f    /* per channel; each head draws its own level */
#define Q_NOISE_MAX 1.4f
#define Q_ROTATE 0.08f      /* radians per step */
#define Q_JUMP_PROB 0.06    /* chance per step and group of an abrupt shift */

#define NUM_POLICIES 4

/* ------------------------------------------------------------------------ */
/* Small helpers: errors, allocation, time, RNG                             */
/* ------------------------------------------------------------------------ */

/* Every libfreekv call goes through CHECK: on failure print the status and
 * the handle's (or, for a NULL handle, the thread's) last error and exit. */
static void check(fkv_status st, const fkv_cache *cache, const char *what)
{
    char msg[512];
    if (st == FKV_OK)
        return;
    fkv_last_error(cache, msg, sizeof msg);
    fprintf(stderr, "demo: %s failed: %s (%d): %s\n", what,
            fkv_status_string(st), (int)st, msg);
    exit(1);
}
#define CHECK(cache, call) check((call), (cache), #call)

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (p == NULL) {
        fprintf(stderr, "demo: out of memory (%zu x %zu bytes)\n", n, size);
        exit(1);
    }
    return p;
}

static double now_ms(void)
{
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* The demo's own deterministic RNG: splitmix64 and Box-Muller. */
typedef struct rng {
    uint64_t state;
} rng;

static uint64_t rng_next(rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_uniform(rng *r) /* [0, 1) */
{
    return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

static int rng_int(rng *r, int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(rng_uniform(r) * (double)(hi - lo + 1));
}

static float rng_normal(rng *r)
{
    double u1 = 1.0 - rng_uniform(r); /* (0, 1] */
    double u2 = rng_uniform(r);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void random_unit(rng *r, float *x)
{
    double n = 0.0;
    for (int i = 0; i < HEAD_DIM; i++) {
        x[i] = rng_normal(r);
        n += (double)x[i] * x[i];
    }
    n = 1.0 / sqrt(n);
    for (int i = 0; i < HEAD_DIM; i++)
        x[i] = (float)(x[i] * n);
}

static void normalize(float *x)
{
    double n = 0.0;
    for (int i = 0; i < HEAD_DIM; i++)
        n += (double)x[i] * x[i];
    if (n > 0.0) {
        n = 1.0 / sqrt(n);
        for (int i = 0; i < HEAD_DIM; i++)
            x[i] = (float)(x[i] * n);
    }
}

/* Makes x orthogonal to the n unit vectors in basis, then a unit vector. */
static void orthonormalize(float *x, const float *const *basis, int n)
{
    for (int j = 0; j < n; j++) {
        double d = 0.0;
        for (int i = 0; i < HEAD_DIM; i++)
            d += (double)x[i] * basis[j][i];
        for (int i = 0; i < HEAD_DIM; i++)
            x[i] = (float)(x[i] - d * basis[j][i]);
    }
    normalize(x);
}

static double cosine(const float *a, const float *b)
{
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int i = 0; i < HEAD_DIM; i++) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return (aa > 0.0 && bb > 0.0) ? ab / sqrt(aa * bb) : 0.0;
}

/* ------------------------------------------------------------------------ */
/* Synthetic model: the same inputs for every policy                        */
/* ------------------------------------------------------------------------ */

typedef struct world {
    /* per (layer, KV head) */
    float center[NUM_LAYERS][NUM_KV_HEADS][NUM_TOPICS][HEAD_DIM];
    float value_mean[NUM_LAYERS][NUM_KV_HEADS][NUM_TOPICS][HEAD_DIM];
    float sink_dir[NUM_LAYERS][NUM_KV_HEADS][HEAD_DIM];
    int outlier_ch[NUM_LAYERS][NUM_KV_HEADS][NUM_OUTLIERS];
    float outlier_val[NUM_LAYERS][NUM_KV_HEADS][NUM_OUTLIERS];
    /* per (layer, query head): the head's own direction within its group */
    float head_dir[NUM_LAYERS][NUM_Q_HEADS][HEAD_DIM];
    float head_noise[NUM_LAYERS][NUM_Q_HEADS];
} world;

typedef struct inputs {
    int64_t prompt_total;                 /* sum of PROMPT_LEN */
    int64_t prompt_off[NUM_SEQS];         /* first token of each sequence */
    /* prefill, per layer: [prompt_total, NUM_KV_HEADS, HEAD_DIM] */
    float *pre_k[NUM_LAYERS], *pre_v[NUM_LAYERS];
    /* decode, per (step, layer): k, v [NUM_SEQS, NUM_KV_HEADS, HEAD_DIM],
     * q [NUM_SEQS, NUM_Q_HEADS, HEAD_DIM] */
    float *dec_k, *dec_v, *dec_q;
    double cos_mean, cos_min; /* adjacent-step query cosine */
    double jumps;             /* abrupt shifts per step, over the groups */
} inputs;

static size_t dec_kv_index(int step, int layer)
{
    return ((size_t)step * NUM_LAYERS + (size_t)layer) *
           (NUM_SEQS * NUM_KV_HEADS * HEAD_DIM);
}

static size_t dec_q_index(int step, int layer)
{
    return ((size_t)step * NUM_LAYERS + (size_t)layer) *
           (NUM_SEQS * NUM_Q_HEADS * HEAD_DIM);
}

/* One token's key and value for (layer, KV head). */
static void gen_kv(const world *w, rng *r, int layer, int g, int topic,
                   int64_t pos, float *k, float *v)
{
    if (pos < HOT_SINK) {
        const float *u = w->sink_dir[layer][g];
        for (int i = 0; i < HEAD_DIM; i++) {
            k[i] = SINK_AMP * u[i] + 0.2f * rng_normal(r);
            v[i] = 0.2f * rng_normal(r);
        }
    } else {
        const float *c = w->center[layer][g][topic];
        const float *m = w->value_mean[layer][g][topic];
        for (int i = 0; i < HEAD_DIM; i++) {
            k[i] = KEY_AMP * c[i] + KEY_NOISE * rng_normal(r);
            v[i] = m[i] + VALUE_NOISE * rng_normal(r);
        }
    }
    for (int j = 0; j < NUM_OUTLIERS; j++)
        k[w->outlier_ch[layer][g][j]] +=
            w->outlier_val[layer][g][j] + 0.5f * rng_normal(r);
}

/* A group's query state: a direction rotating from topic a towards b. */
typedef struct qstate {
    int a, b;
    float phi; /* in [0, pi/2) */
} qstate;

static int topic_in_prompt(rng *r, const int *topics, int32_t len)
{
    return topics[rng_int(r, HOT_SINK, len - 1)];
}

static void build_inputs(inputs *in)
{
    world *w = xcalloc(1, sizeof *w);
    rng r = {20250519u};

    for (int l = 0; l < NUM_LAYERS; l++) {
        for (int g = 0; g < NUM_KV_HEADS; g++) {
            /* topic centres and the sink direction: orthonormal */
            const float *basis[NUM_TOPICS + 1];
            for (int t = 0; t <= NUM_TOPICS; t++) {
                float *x = t < NUM_TOPICS ? w->center[l][g][t]
                                          : w->sink_dir[l][g];
                random_unit(&r, x);
                orthonormalize(x, basis, t);
                basis[t] = x;
            }
            for (int t = 0; t < NUM_TOPICS; t++)
                for (int i = 0; i < HEAD_DIM; i++)
                    w->value_mean[l][g][t][i] = rng_normal(&r);
            for (int j = 0; j < NUM_OUTLIERS; j++) {
                int ch, dup;
                do { /* distinct channels */
                    ch = rng_int(&r, 0, HEAD_DIM - 1);
                    dup = 0;
                    for (int i = 0; i < j; i++)
                        dup |= w->outlier_ch[l][g][i] == ch;
                } while (dup);
                w->outlier_ch[l][g][j] = ch;
                w->outlier_val[l][g][j] =
                    (float)((rng_uniform(&r) < 0.5 ? -1.0 : 1.0) *
                            (OUTLIER_MIN + (OUTLIER_MAX - OUTLIER_MIN) *
                                               rng_uniform(&r)));
            }
        }
        for (int h = 0; h < NUM_Q_HEADS; h++) {
            random_unit(&r, w->head_dir[l][h]);
            w->head_noise[l][h] =
                (float)(Q_NOISE_MIN +
                        (Q_NOISE_MAX - Q_NOISE_MIN) * rng_uniform(&r));
        }
    }

    /* The text: segments of one topic each, shared by all layers and heads
     * (each (layer, KV head) has its own key cluster per topic). */
    int *topics[NUM_SEQS];
    for (int s = 0; s < NUM_SEQS; s++) {
        int32_t total = PROMPT_LEN[s] + DECODE_STEPS;
        topics[s] = xcalloc((size_t)total, sizeof(int));
        for (int32_t t = 0; t < total;) {
            int len = rng_int(&r, SEGMENT_MIN, SEGMENT_MAX);
            int topic = rng_int(&r, 0, NUM_TOPICS - 1);
            for (int i = 0; i < len && t < total; i++, t++)
                topics[s][t] = topic;
        }
    }

    /* Prefill K and V: [tokens, kv_heads, head_dim], sequence after
     * sequence. */
    in->prompt_total = 0;
    for (int s = 0; s < NUM_SEQS; s++) {
        in->prompt_off[s] = in->prompt_total;
        in->prompt_total += PROMPT_LEN[s];
    }
    size_t row = (size_t)NUM_KV_HEADS * HEAD_DIM;
    for (int l = 0; l < NUM_LAYERS; l++) {
        in->pre_k[l] = xcalloc((size_t)in->prompt_total * row, sizeof(float));
        in->pre_v[l] = xcalloc((size_t)in->prompt_total * row, sizeof(float));
        for (int s = 0; s < NUM_SEQS; s++)
            for (int32_t t = 0; t < PROMPT_LEN[s]; t++)
                for (int g = 0; g < NUM_KV_HEADS; g++) {
                    size_t o = ((size_t)(in->prompt_off[s] + t)) * row +
                               (size_t)g * HEAD_DIM;
                    gen_kv(w, &r, l, g, topics[s][t], t, in->pre_k[l] + o,
                           in->pre_v[l] + o);
                }
    }

    /* Decode: one new token per sequence and a query per step and layer. */
    size_t nkv = (size_t)DECODE_STEPS * NUM_LAYERS * NUM_SEQS * row;
    size_t nq = (size_t)DECODE_STEPS * NUM_LAYERS * NUM_SEQS * NUM_Q_HEADS *
                HEAD_DIM;
    in->dec_k = xcalloc(nkv, sizeof(float));
    in->dec_v = xcalloc(nkv, sizeof(float));
    in->dec_q = xcalloc(nq, sizeof(float));

    qstate qs[NUM_LAYERS][NUM_SEQS][NUM_KV_HEADS];
    for (int l = 0; l < NUM_LAYERS; l++)
        for (int s = 0; s < NUM_SEQS; s++)
            for (int g = 0; g < NUM_KV_HEADS; g++) {
                qs[l][s][g].a = topic_in_prompt(&r, topics[s], PROMPT_LEN[s]);
                qs[l][s][g].b = topic_in_prompt(&r, topics[s], PROMPT_LEN[s]);
                qs[l][s][g].phi = (float)(1.5 * rng_uniform(&r));
            }

    double cos_sum = 0.0, cos_min = 1.0;
    long cos_n = 0, jumps = 0;
    for (int step = 0; step < DECODE_STEPS; step++) {
        for (int l = 0; l < NUM_LAYERS; l++) {
            float *k = in->dec_k + dec_kv_index(step, l);
            float *v = in->dec_v + dec_kv_index(step, l);
            float *q = in->dec_q + dec_q_index(step, l);
            for (int s = 0; s < NUM_SEQS; s++) {
                int32_t pos = PROMPT_LEN[s] + step;
                for (int g = 0; g < NUM_KV_HEADS; g++) {
                    size_t o = ((size_t)s * NUM_KV_HEADS + (size_t)g) * HEAD_DIM;
                    gen_kv(w, &r, l, g, topics[s][pos], pos, k + o, v + o);

                    /* advance the group's query direction */
                    qstate *st = &qs[l][s][g];
                    if (step > 0) {
                        if (rng_uniform(&r) < Q_JUMP_PROB) {
                            st->a = topic_in_prompt(&r, topics[s], PROMPT_LEN[s]);
                            st->b = topic_in_prompt(&r, topics[s], PROMPT_LEN[s]);
                            st->phi = (float)(1.5 * rng_uniform(&r));
                            jumps++;
                        } else {
                            st->phi += Q_ROTATE;
                            if (st->phi >= 1.5707963f) {
                                st->phi -= 1.5707963f;
                                st->a = st->b;
                                st->b = topic_in_prompt(&r, topics[s],
                                                        PROMPT_LEN[s]);
                            }
                        }
                    }
                    float dir[HEAD_DIM];
                    const float *ca = w->center[l][g][st->a];
                    const float *cb = w->center[l][g][st->b];
                    for (int i = 0; i < HEAD_DIM; i++)
                        dir[i] = cosf(st->phi) * ca[i] + sinf(st->phi) * cb[i];
                    normalize(dir);

                    for (int j = 0; j < GROUP; j++) {
                        int h = g * GROUP + j;
                        float hd[HEAD_DIM];
                        for (int i = 0; i < HEAD_DIM; i++)
                            hd[i] = dir[i] + Q_HEAD_MIX * w->head_dir[l][h][i];
                        normalize(hd);
                        float *qh = q + ((size_t)s * NUM_Q_HEADS + (size_t)h) *
                                            HEAD_DIM;
                        for (int i = 0; i < HEAD_DIM; i++)
                            qh[i] = Q_AMP * hd[i] +
                                    Q_SINK * w->sink_dir[l][g][i] +
                                    w->head_noise[l][h] * rng_normal(&r);
                        if (step > 0) {
                            const float *prev =
                                in->dec_q + dec_q_index(step - 1, l) +
                                ((size_t)s * NUM_Q_HEADS + (size_t)h) * HEAD_DIM;
                            double c = cosine(qh, prev);
                            cos_sum += c;
                            cos_n++;
                            if (c < cos_min)
                                cos_min = c;
                        }
                    }
                }
            }
        }
    }
    in->cos_mean = cos_n ? cos_sum / (double)cos_n : 0.0;
    in->cos_min = cos_min;
    in->jumps = (double)jumps / (double)(DECODE_STEPS - 1) /
                (double)(NUM_LAYERS * NUM_SEQS * NUM_KV_HEADS);

    for (int s = 0; s < NUM_SEQS; s++)
        free(topics[s]);
    free(w);
}

static void free_inputs(inputs *in)
{
    for (int l = 0; l < NUM_LAYERS; l++) {
        free(in->pre_k[l]);
        free(in->pre_v[l]);
    }
    free(in->dec_k);
    free(in->dec_v);
    free(in->dec_q);
}

/* ------------------------------------------------------------------------ */
/* Backend choice: THE ONE PLACE that knows where the demo's tensors live.  */
/*                                                                          */
/* The demo keeps every tensor in host memory. The CPU backend takes host   */
/* pointers; the CUDA backend takes device pointers. So when AUTO resolves  */
/* to CUDA, this function recreates the cache on the CPU backend. To run    */
/* the demo on the GPU, copy the inputs to device buffers instead (and the  */
/* outputs back) and return the CUDA cache unchanged.                       */
/* ------------------------------------------------------------------------ */

static fkv_cache *create_cache_for_host_tensors(fkv_options *opts,
                                                fkv_backend *chosen)
{
    static int told = 0;
    fkv_cache *cache = NULL;
    fkv_options got;

    CHECK(cache, fkv_create(opts, &cache));
    CHECK(cache, fkv_options_init(&got, sizeof got));
    CHECK(cache, fkv_get_options(cache, &got));
    *chosen = got.backend; /* what AUTO (or the caller) asked for resolved to */
    if (got.backend == FKV_BACKEND_CUDA) {
        if (!told)
            printf("note: the CUDA backend is available, but this demo "
                   "supports only host tensors for now; using the CPU "
                   "backend\n");
        told = 1;
        fkv_destroy(cache);
        cache = NULL;
        opts->backend = FKV_BACKEND_CPU;
        CHECK(cache, fkv_create(opts, &cache));
        CHECK(cache, fkv_get_options(cache, &got));
    }
    *opts = got; /* the options in force, backend and scale resolved */
    return cache;
}

/* ------------------------------------------------------------------------ */
/* One policy's run                                                         */
/* ------------------------------------------------------------------------ */

typedef struct result {
    fkv_policy policy;
    fkv_backend backend, chosen;
    float softmax_scale, correction_threshold;
    double err_mean, err_max;
    double overlap;      /* selected pages shared with RESIDENT's, mean */
    int have_overlap;
    fkv_stats stats;
    uint64_t critical_pages; /* recalled inside fkv_attend */
    double prefill_ms, decode_ms;
} result;

static const char *policy_name(fkv_policy p)
{
    switch (p) {
    case FKV_POLICY_FREEKV: return "FREEKV";
    case FKV_POLICY_SYNC: return "SYNC";
    case FKV_POLICY_RESIDENT: return "RESIDENT";
    case FKV_POLICY_DENSE: return "DENSE";
    case FKV_POLICY_EXTERNAL: return "EXTERNAL";
    }
    return "?";
}

static size_t out_index(int step, int layer)
{
    return dec_q_index(step, layer);
}

static size_t sel_index(int step, int layer, int s, int g)
{
    return ((((size_t)step * NUM_LAYERS + (size_t)layer) * NUM_SEQS +
             (size_t)s) * NUM_KV_HEADS + (size_t)g) * (MAX_PAGES_OUT + 1);
}

/* Runs the whole workload under one policy. out receives every attention
 * output [step][layer][seq][q_head][head_dim]; sel every selection
 * ([count, pages...] per (step, layer, seq, KV head)). */
static void run_policy(fkv_policy policy, const inputs *in, float *out,
                       int32_t *sel, result *res)
{
    fkv_options opts;
    fkv_cache *cache = NULL;
    fkv_seq_id seqs[NUM_SEQS];

    memset(res, 0, sizeof *res);
    res->policy = policy;

    CHECK(NULL, fkv_options_init(&opts, sizeof opts));
    opts.backend = FKV_BACKEND_AUTO;
    opts.num_layers = NUM_LAYERS;
    opts.num_q_heads = NUM_Q_HEADS;
    opts.num_kv_heads = NUM_KV_HEADS;
    opts.head_dim = HEAD_DIM;
    opts.dtype = FKV_DTYPE_F32;
    opts.page_tokens = PAGE_TOKENS;
    opts.sink_tokens = SINK_TOKENS;
    opts.window_tokens = WINDOW_TOKENS;
    opts.budget_tokens = BUDGET_TOKENS;
    opts.policy = policy;
    opts.max_sequences = NUM_SEQS;
    opts.max_tokens_per_sequence = PROMPT_LEN[0] + DECODE_STEPS;

    cache = create_cache_for_host_tensors(&opts, &res->chosen);
    res->backend = opts.backend;
    res->softmax_scale = opts.softmax_scale;
    res->correction_threshold = opts.correction_threshold;

    for (int s = 0; s < NUM_SEQS; s++)
        CHECK(cache, fkv_seq_open(cache, &seqs[s]));

    /* Prefill: one append per layer with every sequence's whole prompt. */
    fkv_batch prefill = {NUM_SEQS, 0, seqs, PROMPT_LEN};
    double t0 = now_ms();
    for (int l = 0; l < NUM_LAYERS; l++)
        CHECK(cache, fkv_append(cache, l, &prefill, in->pre_k[l], in->pre_v[l]));
    res->prefill_ms = now_ms() - t0;

    for (int s = 0; s < NUM_SEQS; s++) {
        int64_t len = 0;
        CHECK(cache, fkv_seq_length(cache, seqs[s], &len));
        if (len != PROMPT_LEN[s]) {
            fprintf(stderr, "demo: sequence %d holds %lld tokens, expected %d\n",
                    s, (long long)len, (int)PROMPT_LEN[s]);
            exit(1);
        }
    }
    CHECK(cache, fkv_reset_stats(cache));

    /* Decode: per layer append (1 token each), attend, select, recall. */
    fkv_batch decode = {NUM_SEQS, 0, seqs, NULL};
    fkv_stats now;
    uint64_t recalled = 0; /* pages_recalled before the layer's attend */
    now.struct_size = sizeof now;
    for (int step = 0; step < DECODE_STEPS; step++) {
        for (int l = 0; l < NUM_LAYERS; l++) {
            const float *k = in->dec_k + dec_kv_index(step, l);
            const float *v = in->dec_v + dec_kv_index(step, l);
            const float *q = in->dec_q + dec_q_index(step, l);
            float *o = out + out_index(step, l);

            t0 = now_ms();
            CHECK(cache, fkv_append(cache, l, &decode, k, v));
            CHECK(cache, fkv_attend(cache, l, &decode, q, o));
            res->decode_ms += now_ms() - t0;

            /* Introspection, off the timed path (an engine would not do
             * this while decoding): pages recalled on the critical path
             * (inside fkv_attend), and the pages each KV head just attended
             * to besides sink, window and partial page. */
            CHECK(cache, fkv_get_stats(cache, &now));
            res->critical_pages += now.pages_recalled - recalled;
            for (int s = 0; s < NUM_SEQS; s++)
                for (int g = 0; g < NUM_KV_HEADS; g++) {
                    int32_t *e = sel + sel_index(step, l, s, g);
                    CHECK(cache, fkv_get_selected_pages(cache, l, seqs[s], g,
                                                        e + 1, MAX_PAGES_OUT,
                                                        &e[0]));
                    if (e[0] > MAX_PAGES_OUT ||
                        (policy != FKV_POLICY_DENSE && e[0] > SELECTED_PAGES)) {
                        fprintf(stderr, "demo: %d selected pages for one KV "
                                "head, the budget allows %d\n", (int)e[0],
                                SELECTED_PAGES);
                        exit(1);
                    }
                }

            t0 = now_ms();
            /* NULL: the attend's query (its selection is kept). */
            CHECK(cache, fkv_select(cache, l, &decode, NULL));
            CHECK(cache, fkv_recall(cache, l, &decode));
            res->decode_ms += now_ms() - t0;

            CHECK(cache, fkv_get_stats(cache, &now));
            recalled = now.pages_recalled;
        }
    }

    res->stats.struct_size = sizeof res->stats;
    CHECK(cache, fkv_get_stats(cache, &res->stats));

    for (int s = 0; s < NUM_SEQS; s++) {
        int64_t len = 0;
        CHECK(cache, fkv_seq_length(cache, seqs[s], &len));
        if (len != PROMPT_LEN[s] + DECODE_STEPS) {
            fprintf(stderr, "demo: sequence %d holds %lld tokens, expected %d\n",
                    s, (long long)len, (int)(PROMPT_LEN[s] + DECODE_STEPS));
            exit(1);
        }
        CHECK(cache, fkv_seq_close(cache, seqs[s]));
    }
    fkv_destroy(cache);
}

/* Relative error ||o - r|| / ||r|| per (step, layer, sequence, query head). */
static void compare(const float *out, const float *ref, result *res)
{
    size_t vecs = (size_t)DECODE_STEPS * NUM_LAYERS * NUM_SEQS * NUM_Q_HEADS;
    double sum = 0.0, max = 0.0;
    for (size_t i = 0; i < vecs; i++) {
        const float *o = out + i * HEAD_DIM, *r = ref + i * HEAD_DIM;
        double d = 0.0, n = 0.0;
        for (int j = 0; j < HEAD_DIM; j++) {
            d += ((double)o[j] - r[j]) * ((double)o[j] - r[j]);
            n += (double)r[j] * r[j];
        }
        double e = n > 0.0 ? sqrt(d / n) : sqrt(d);
        if (e != e) /* NaN */
            e = INFINITY;
        sum += e;
        if (e > max)
            max = e;
    }
    res->err_mean = sum / (double)vecs;
    res->err_max = max;
}

/* Mean share of the reference selection (RESIDENT: the current query's
 * top pages) that the policy's selection also holds. */
static void compare_selection(const int32_t *sel, const int32_t *ref,
                              result *res)
{
    double sum = 0.0;
    long n = 0;
    for (int step = 0; step < DECODE_STEPS; step++)
        for (int l = 0; l < NUM_LAYERS; l++)
            for (int s = 0; s < NUM_SEQS; s++)
                for (int g = 0; g < NUM_KV_HEADS; g++) {
                    const int32_t *a = sel + sel_index(step, l, s, g);
                    const int32_t *b = ref + sel_index(step, l, s, g);
                    if (b[0] == 0)
                        continue;
                    int shared = 0;
                    for (int i = 0; i < b[0]; i++)
                        for (int j = 0; j < a[0]; j++)
                            shared += a[1 + j] == b[1 + i];
                    sum += (double)shared / (double)b[0];
                    n++;
                }
    res->have_overlap = n > 0;
    res->overlap = n > 0 ? sum / (double)n : 0.0;
}

/* The demo's own float64 dense attention at the last decode step, against
 * the DENSE policy's output: checks the library, not just the policies. */
static double check_dense(const inputs *in, const float *dense, double scale)
{
    int step = DECODE_STEPS - 1;
    double worst = 0.0;
    size_t row = (size_t)NUM_KV_HEADS * HEAD_DIM;
    int32_t nmax = PROMPT_LEN[0] + DECODE_STEPS;
    double *w = xcalloc((size_t)nmax, sizeof(double));

    for (int l = 0; l < NUM_LAYERS; l++)
        for (int s = 0; s < NUM_SEQS; s++) {
            int32_t n = PROMPT_LEN[s] + step + 1;
            for (int h = 0; h < NUM_Q_HEADS; h++) {
                int g = h / GROUP;
                const float *q = in->dec_q + dec_q_index(step, l) +
                                 ((size_t)s * NUM_Q_HEADS + (size_t)h) * HEAD_DIM;
                const float *o = dense + out_index(step, l) +
                                 ((size_t)s * NUM_Q_HEADS + (size_t)h) * HEAD_DIM;
                double mx = -INFINITY, z = 0.0, acc[HEAD_DIM] = {0};
                for (int32_t t = 0; t < n; t++) {
                    const float *k =
                        t < PROMPT_LEN[s]
                            ? in->pre_k[l] + (size_t)(in->prompt_off[s] + t) * row
                            : in->dec_k + dec_kv_index(t - PROMPT_LEN[s], l) +
                                  (size_t)s * row;
                    k += (size_t)g * HEAD_DIM;
                    double d = 0.0;
                    for (int i = 0; i < HEAD_DIM; i++)
                        d += (double)q[i] * k[i];
                    w[t] = d * scale;
                    if (w[t] > mx)
                        mx = w[t];
                }
                for (int32_t t = 0; t < n; t++) {
                    const float *v =
                        t < PROMPT_LEN[s]
                            ? in->pre_v[l] + (size_t)(in->prompt_off[s] + t) * row
                            : in->dec_v + dec_kv_index(t - PROMPT_LEN[s], l) +
                                  (size_t)s * row;
                    v += (size_t)g * HEAD_DIM;
                    double p = exp(w[t] - mx);
                    z += p;
                    for (int i = 0; i < HEAD_DIM; i++)
                        acc[i] += p * v[i];
                }
                double d = 0.0, nn = 0.0;
                for (int i = 0; i < HEAD_DIM; i++) {
                    double r = acc[i] / z;
                    d += (o[i] - r) * (o[i] - r);
                    nn += r * r;
                }
                double e = sqrt(d / nn);
                if (!(e <= worst))
                    worst = e; /* also catches NaN */
            }
        }
    free(w);
    return worst;
}

static const char *backend_name(fkv_backend b)
{
    switch (b) {
    case FKV_BACKEND_AUTO: return "AUTO";
    case FKV_BACKEND_CPU: return "CPU";
    case FKV_BACKEND_CUDA: return "CUDA";
    }
    return "?";
}

int main(void)
{
    static const fkv_policy run_order[NUM_POLICIES] = {
        FKV_POLICY_DENSE, FKV_POLICY_RESIDENT, FKV_POLICY_SYNC,
        FKV_POLICY_FREEKV}; /* reference first */
    static const fkv_policy table_order[NUM_POLICIES] = {
        FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT,
        FKV_POLICY_DENSE};

    /* Same major version, and at least the header's minor and patch. */
    if (fkv_version_number() / 10000 != FKV_VERSION_MAJOR ||
        fkv_version_number() < FKV_VERSION_NUMBER) {
        fprintf(stderr, "demo: built against libfreekv %d.%d.%d, linked with "
                "%s\n", FKV_VERSION_MAJOR, FKV_VERSION_MINOR,
                FKV_VERSION_PATCH, fkv_version_string());
        return 1;
    }

    inputs in;
    memset(&in, 0, sizeof in);
    build_inputs(&in);

    size_t nout = (size_t)DECODE_STEPS * NUM_LAYERS * NUM_SEQS * NUM_Q_HEADS *
                  HEAD_DIM;
    size_t nsel = sel_index(DECODE_STEPS, 0, 0, 0);
    float *out[NUM_POLICIES];
    int32_t *sel[NUM_POLICIES];
    result res[NUM_POLICIES];
    for (int p = 0; p < NUM_POLICIES; p++) {
        out[p] = xcalloc(nout, sizeof(float));
        sel[p] = xcalloc(nsel, sizeof(int32_t));
    }

    printf("libfreekv %s demo\n", fkv_version_string());
    printf("model : %d layers, %d query heads, %d KV heads (GQA group %d), "
           "head_dim %d, f32\n", NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, GROUP,
           HEAD_DIM);
    printf("cache : page %d, sink %d, window %d, budget %d tokens "
           "(%d selected pages per KV head)\n", PAGE_TOKENS, SINK_TOKENS,
           WINDOW_TOKENS, BUDGET_TOKENS, SELECTED_PAGES);
    printf("batch : %d sequences, prompts of %d and %d tokens, then %d decode "
           "steps\n", NUM_SEQS, (int)PROMPT_LEN[0], (int)PROMPT_LEN[1],
           DECODE_STEPS);
    printf("query : adjacent-step cosine mean %.2f (min %.2f), abrupt shifts "
           "on %.1f%% of (step, group)\n", in.cos_mean, in.cos_min,
           100.0 * in.jumps);
    fflush(stdout);

    /* policy p is stored at index p (the enum values are 0..3) */
    for (int i = 0; i < NUM_POLICIES; i++) {
        fkv_policy p = run_order[i];
        run_policy(p, &in, out[p], sel[p], &res[p]);
        if (i == 0)
            printf("backend: %s%s, softmax scale %.4f, correction threshold "
                   "%.2f\n\n", backend_name(res[p].backend),
                   res[p].chosen != res[p].backend
                       ? " (AUTO chose CUDA; host tensors need CPU)"
                       : " (AUTO)",
                   (double)res[p].softmax_scale,
                   (double)res[p].correction_threshold);
        compare(out[p], out[FKV_POLICY_DENSE], &res[p]);
        compare_selection(sel[p], sel[FKV_POLICY_RESIDENT], &res[p]);
        fflush(stdout);
    }
    double dense_err = check_dense(&in, out[FKV_POLICY_DENSE],
                                   (double)res[FKV_POLICY_DENSE].softmax_scale);

    printf("%-9s %9s %9s %9s %6s %10s %9s %8s %8s %8s %8s\n", "policy",
           "err mean", "err max", "corr/step", "corr%", "pages/step",
           "crit/step", "MiB/step", "sel=RES%", "prefill", "decode");
    printf("%-9s %9s %9s %9s %6s %10s %9s %8s %8s %8s %8s\n", "", "", "", "",
           "", "", "", "", "", "ms", "ms/step");
    for (int i = 0; i < NUM_POLICIES; i++) {
        const result *r = &res[table_order[i]];
        double steps = r->stats.steps ? (double)r->stats.steps : 1.0;
        char corr_pct[16] = "-", overlap[16] = "-";
        if (r->stats.heads_checked)
            snprintf(corr_pct, sizeof corr_pct, "%.1f",
                     100.0 * (double)r->stats.corrections /
                         (double)r->stats.heads_checked);
        if (r->have_overlap && r->policy != FKV_POLICY_DENSE)
            snprintf(overlap, sizeof overlap, "%.1f", 100.0 * r->overlap);
        printf("%-9s %9.2e %9.2e %9.2f %6s %10.1f %9.1f %8.3f %8s %8.1f "
               "%8.3f\n", policy_name(r->policy), r->err_mean, r->err_max,
               (double)r->stats.corrections / steps, corr_pct,
               (double)r->stats.pages_recalled / steps,
               (double)r->critical_pages / steps,
               (double)r->stats.bytes_recalled / steps / 1048576.0, overlap,
               r->prefill_ms, r->decode_ms / DECODE_STEPS);
    }
    printf("\nerr       ||out - dense|| / ||dense|| per (step, layer, sequence, "
           "query head): %d steps x %d layers x %d x %d\n",
           DECODE_STEPS, NUM_LAYERS, NUM_SEQS, NUM_Q_HEADS);
    printf("corr      corrections per step (of %d (sequence, layer, KV head)) "
           "and as %% of heads_checked\n", NUM_SEQS * NUM_LAYERS * NUM_KV_HEADS);
    printf("pages     (page, KV head) units recalled per step; crit: of those, "
           "inside fkv_attend (on the critical path)\n");
    printf("sel=RES%%  share of RESIDENT's pages (current-query selection) "
           "that the policy attended (fkv_get_selected_pages)\n");
    printf("DENSE vs the demo's float64 attention at the last step: max rel "
           "err %.2e\n", dense_err);

    int bad = !(dense_err < 1e-4) || res[FKV_POLICY_DENSE].err_max != 0.0;
    for (int p = 0; p < NUM_POLICIES; p++) {
        free(out[p]);
        free(sel[p]);
    }
    free_inputs(&in);
    if (bad) {
        fprintf(stderr, "demo: DENSE does not match dense attention\n");
        return 1;
    }
    return 0;
}
