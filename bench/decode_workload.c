/*
 * bench/decode's synthetic workload of one (context, batch): topic-clustered
 * keys and a query trace (drift or paper), built on the host or the device.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

enum {
    KEY_NOISE_RANK = 16, /* R: rank of the per-token key noise */
    NUM_OUTLIERS = 3,    /* outlier key channels per (layer, KV head) */
    SEG_MIN = 32,        /* tokens of one topic in a row */
    SEG_MAX = 112
};

#define KEY_AMP 4.0f      /* norm of a key's topic component */
#define KEY_NOISE 0.45f   /* norm of each of the R noise directions */
#define OUTLIER_MIN 3.0f  /* |offset| of an outlier channel */
#define OUTLIER_MAX 6.0f
#define VALUE_NOISE 0.5f
#define Q_AMP 8.0f        /* norm of a query's direction component */
#define Q_HEAD_MIX 0.35f  /* weight of a head's own direction in its group */
#define Q_RHO_MIN 0.30    /* |noise| / |signal| per head, uniform in range */
#define Q_RHO_MAX 0.70
/* --trace paper: most heads stable, a minority volatile (the FreeKV paper's
 * spread of adjacent-step cosines: mean about 0.84, most heads above 0.9). */
#define Q_PAPER_VOLATILE 0.15 /* fraction of (layer, head) that is volatile */
#define Q_PAPER_STABLE_RHO_MIN 0.15
#define Q_PAPER_STABLE_RHO_MAX 0.40
#define Q_PAPER_VOLATILE_RHO_MIN 1.00
#define Q_PAPER_VOLATILE_RHO_MAX 1.40
#define Q_PAPER_JUMP_PROB 0.02
#define Q_ROTATE 0.07     /* radians per step from topic a towards b */
#define Q_JUMP_PROB 0.04  /* per step and group: an abrupt topic shift */
/* Topics are as many as make each one's pages about this share of the
 * selected pages K, so that a query's two topics fill about the budget. */
#define TOPIC_PAGES_FRAC 0.45

/* ------------------------------------------------------------------------ */
/* Synthetic workload of one (context, batch)                               */
/* ------------------------------------------------------------------------ */

static uint64_t mix64(uint64_t a, uint64_t b)
{
    bench_rng r = bench_rng_seed(a * 0x100000001b3ull ^ (b + 0x9e37ull));
    return bench_rng_next(&r);
}

/* Approximately standard normal (Irwin-Hall of four 16-bit uniforms): for
 * the bulk query noise, where Box-Muller would dominate the set-up time. */
static float fast_normal(bench_rng *r)
{
    uint64_t x = bench_rng_next(r);
    double s = (double)(x & 0xffff) + (double)((x >> 16) & 0xffff) +
               (double)((x >> 32) & 0xffff) + (double)(x >> 48);
    return (float)((s * (1.0 / 65536.0) - 2.0) * 1.7320508075688772);
}

static void random_unit(bench_rng *r, float *x, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = (float)bench_rng_normal(r);
        s += (double)x[i] * x[i];
    }
    s = 1.0 / sqrt(s);
    for (int i = 0; i < n; i++)
        x[i] = (float)(x[i] * s);
}

static void normalize(float *x, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    if (s > 0.0) {
        s = 1.0 / sqrt(s);
        for (int i = 0; i < n; i++)
            x[i] = (float)(x[i] * s);
    }
}

int selected_pages_k(const args *a)
{
    return (a->budget - a->sink - a->window) / a->page;
}

/* Topics: enough that each covers about TOPIC_PAGES_FRAC * K pages. */
static int topics_for(const args *a, int64_t ctx)
{
    int K = selected_pages_k(a);
    double pages = (double)ctx / a->page;
    double touches = pages * (1.0 + (double)a->page /
                                        (0.5 * (SEG_MIN + SEG_MAX)));
    double per = TOPIC_PAGES_FRAC * (K > 1 ? K : 1);
    int nt = (int)(touches / per + 0.5);
    return nt < 4 ? 4 : nt;
}

void workload_build(workload *w, const args *a, int64_t ctx,
                    int batch, int T, int warmup, int steps)
{
    memset(w, 0, sizeof *w);
    w->a = a;
    w->ctx = ctx;
    w->batch = batch;
    w->T = T;
    w->L = a->layers;
    w->H = a->kv_heads;
    w->D = a->head_dim;
    w->QH = a->q_heads;
    w->G = a->q_heads / a->kv_heads;
    w->HD = w->H * w->D;
    w->NT = topics_for(a, ctx);
    w->R = KEY_NOISE_RANK;
    /* Padded with zero columns to a multiple of 8 (aligned GEMM rows). */
    w->C = (1 + w->NT + w->R + 7) / 8 * 8;
    w->seed = mix64(a->seed, (uint64_t)ctx);

    const int L = w->L, H = w->H, D = w->D, QH = w->QH, G = w->G;
    const int HD = w->HD, NT = w->NT, R = w->R, C = w->C;
    bench_rng r = bench_rng_seed(w->seed);

    w->center = bench_xmalloc((size_t)L * H * NT * D * sizeof(float));
    w->head_dir = bench_xmalloc((size_t)L * QH * D * sizeof(float));
    w->rho = bench_xmalloc((size_t)L * QH * sizeof(float));
    w->kbasis = bench_xcalloc((size_t)L * C * HD, sizeof(uint16_t));
    w->vbasis = bench_xcalloc((size_t)L * C * HD, sizeof(uint16_t));
    float *tmp = bench_xmalloc((size_t)D * sizeof(float));
    for (int l = 0; l < L; l++) {
        uint16_t *kb = w->kbasis + (size_t)l * C * HD;
        uint16_t *vb = w->vbasis + (size_t)l * C * HD;
        for (int g = 0; g < H; g++) {
            /* row 0: outlier channels (a constant offset of every key) */
            for (int j = 0; j < NUM_OUTLIERS; j++) {
                int ch = (int)bench_rng_int(&r, 0, D - 1);
                double v = OUTLIER_MIN + (OUTLIER_MAX - OUTLIER_MIN) *
                                             bench_rng_uniform(&r);
                if (bench_rng_uniform(&r) < 0.5)
                    v = -v;
                kb[(size_t)g * D + ch] = bench_f32_to_bf16((float)v);
            }
            /* rows 1..NT: topic centres; values: a mean per topic */
            for (int t = 0; t < NT; t++) {
                float *c = w->center + (((size_t)l * H + g) * NT + t) * D;
                random_unit(&r, c, D);
                size_t row = (size_t)(1 + t) * HD + (size_t)g * D;
                for (int i = 0; i < D; i++) {
                    kb[row + i] = bench_f32_to_bf16(KEY_AMP * c[i]);
                    vb[row + i] =
                        bench_f32_to_bf16((float)bench_rng_normal(&r));
                }
            }
            /* rows 1+NT..: noise directions */
            for (int n = 0; n < R; n++) {
                random_unit(&r, tmp, D);
                size_t row = (size_t)(1 + NT + n) * HD + (size_t)g * D;
                for (int i = 0; i < D; i++) {
                    kb[row + i] = bench_f32_to_bf16(KEY_NOISE * tmp[i]);
                    vb[row + i] = bench_f32_to_bf16(
                        (float)(VALUE_NOISE * bench_rng_normal(&r) /
                                sqrt((double)R)));
                }
            }
        }
        for (int h = 0; h < QH; h++) {
            random_unit(&r, w->head_dir + ((size_t)l * QH + h) * D, D);
            /* Drawn in both traces, so that they share their keys. */
            const bool vol = bench_rng_uniform(&r) < Q_PAPER_VOLATILE;
            double lo = Q_RHO_MIN, hi = Q_RHO_MAX;
            if (a->paper_trace) {
                lo = vol ? Q_PAPER_VOLATILE_RHO_MIN : Q_PAPER_STABLE_RHO_MIN;
                hi = vol ? Q_PAPER_VOLATILE_RHO_MAX : Q_PAPER_STABLE_RHO_MAX;
            }
            w->rho[(size_t)l * QH + h] =
                (float)(lo + (hi - lo) * bench_rng_uniform(&r));
        }
    }
    free(tmp);

    /* Each sequence's text: segments of one topic each. */
    const int64_t len = ctx + T;
    w->topic = bench_xmalloc((size_t)batch * (size_t)len * sizeof(int32_t));
    for (int s = 0; s < batch; s++) {
        bench_rng rs = bench_rng_seed(mix64(w->seed, 1000 + (uint64_t)s));
        int32_t *tp = w->topic + (size_t)s * (size_t)len;
        for (int64_t t = 0; t < len;) {
            int64_t n = bench_rng_int(&rs, SEG_MIN, SEG_MAX);
            int32_t topic = (int32_t)bench_rng_int(&rs, 0, NT - 1);
            for (int64_t i = 0; i < n && t < len; i++, t++)
                tp[t] = topic;
        }
    }

    /* Queries: per (layer, sequence, KV group) a direction rotating from
     * topic a towards topic b (both from the prompt), an occasional jump;
     * per head its own direction mixed in, and noise. */
    const size_t qrow = (size_t)QH * D;
    w->q = bench_xmalloc((size_t)T * L * batch * qrow * sizeof(uint16_t));
    float *dir = bench_xmalloc((size_t)D * sizeof(float));
    float *hd = bench_xmalloc((size_t)D * sizeof(float));
    int *qa = bench_xmalloc((size_t)H * sizeof(int));
    int *qb = bench_xmalloc((size_t)H * sizeof(int));
    double *phi = bench_xmalloc((size_t)H * sizeof(double));
    const double jump_prob = a->paper_trace ? Q_PAPER_JUMP_PROB : Q_JUMP_PROB;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < batch; s++) {
            bench_rng rq = bench_rng_seed(
                mix64(w->seed, 1000000 + (uint64_t)l * 4096 + (uint64_t)s));
            const int32_t *tp = w->topic + (size_t)s * (size_t)len;
#define PROMPT_TOPIC() tp[bench_rng_int(&rq, 0, ctx - 1)]
            for (int g = 0; g < H; g++) {
                qa[g] = PROMPT_TOPIC();
                qb[g] = PROMPT_TOPIC();
                phi[g] = 1.4 * bench_rng_uniform(&rq);
            }
            for (int t = 0; t < T; t++) {
                for (int g = 0; g < H; g++) {
                    if (t > 0) {
                        if (bench_rng_uniform(&rq) < jump_prob) {
                            qa[g] = PROMPT_TOPIC();
                            qb[g] = PROMPT_TOPIC();
                            phi[g] = 1.4 * bench_rng_uniform(&rq);
                        } else if ((phi[g] += Q_ROTATE) >= 1.5707963) {
                            phi[g] -= 1.5707963;
                            qa[g] = qb[g];
                            qb[g] = PROMPT_TOPIC();
                        }
                    }
                    const float *ca =
                        w->center + (((size_t)l * H + g) * NT + qa[g]) * D;
                    const float *cb =
                        w->center + (((size_t)l * H + g) * NT + qb[g]) * D;
                    float cs = (float)cos(phi[g]), sn = (float)sin(phi[g]);
                    for (int i = 0; i < D; i++)
                        dir[i] = cs * ca[i] + sn * cb[i];
                    normalize(dir, D);
                    for (int j = 0; j < G; j++) {
                        int h = g * G + j;
                        const float *own = w->head_dir + ((size_t)l * QH + h) * D;
                        for (int i = 0; i < D; i++)
                            hd[i] = dir[i] + Q_HEAD_MIX * own[i];
                        normalize(hd, D);
                        float sigma = w->rho[(size_t)l * QH + h] * Q_AMP /
                                      (float)sqrt((double)D);
                        uint16_t *qo = w->q + (((size_t)t * L + l) * batch + s) *
                                                  qrow + (size_t)h * D;
                        for (int i = 0; i < D; i++)
                            qo[i] = bench_f32_to_bf16(Q_AMP * hd[i] +
                                                      sigma * fast_normal(&rq));
                    }
                }
            }
#undef PROMPT_TOPIC
        }
    free(dir);
    free(hd);
    free(qa);
    free(qb);
    free(phi);

    /* Mean adjacent-step cosine over the timed steps, as the library sees
     * the queries (bf16). */
    double sum = 0.0;
    long n = 0;
    for (int t = warmup + 1; t < warmup + steps && t < T; t++)
        for (size_t v = 0; v < (size_t)L * batch * QH; v++) {
            const uint16_t *x = w->q + ((size_t)t * L * batch * QH + v) * D;
            const uint16_t *y = x - (size_t)L * batch * qrow;
            double xy = 0.0, xx = 0.0, yy = 0.0;
            for (int i = 0; i < D; i++) {
                double p = bench_bf16_to_f32(x[i]), q = bench_bf16_to_f32(y[i]);
                xy += p * q;
                xx += p * p;
                yy += q * q;
            }
            sum += xy / sqrt(xx * yy);
            n++;
        }
    w->cos_mean = n ? sum / (double)n : NAN;
}

void fill_coef(const workload *w, int s, int64_t t0, int64_t n,
               uint16_t *rows, size_t stride)
{
    const int C = w->C;
    const int32_t *tp = w->topic + (size_t)s * (size_t)(w->ctx + w->T);
    bench_rng r = bench_rng_seed(
        mix64(w->seed, ((uint64_t)s << 40) ^ (uint64_t)t0 ^ 0x5eedull));
    const uint16_t one = bench_f32_to_bf16(1.0f);
    for (int64_t i = 0; i < n; i++) {
        uint16_t *row = rows + (size_t)i * stride * (size_t)C;
        memset(row, 0, (size_t)C * sizeof *row);
        row[0] = one;
        row[1 + tp[t0 + i]] = one;
        for (int k = 0; k < w->R; k++)
            row[1 + w->NT + k] = bench_f32_to_bf16(fast_normal(&r));
    }
}

/* out[rows][HD] = coef[rows][C] . basis[C][HD] on the host (sparse coef). */
static void host_basis_gemm(const workload *w, const uint16_t *coef,
                            size_t rows, const uint16_t *basis, uint16_t *out)
{
    const int C = w->C, HD = w->HD;
    float *bf = bench_xmalloc((size_t)C * HD * sizeof(float));
    float *acc = bench_xmalloc((size_t)HD * sizeof(float));
    for (size_t i = 0; i < (size_t)C * HD; i++)
        bf[i] = bench_bf16_to_f32(basis[i]);
    for (size_t r = 0; r < rows; r++) {
        memset(acc, 0, (size_t)HD * sizeof *acc);
        for (int c = 0; c < C; c++) {
            float v = bench_bf16_to_f32(coef[r * C + c]);
            if (v == 0.0f)
                continue;
            const float *b = bf + (size_t)c * HD;
            for (int j = 0; j < HD; j++)
                acc[j] += v * b[j];
        }
        for (int j = 0; j < HD; j++)
            out[r * HD + j] = bench_f32_to_bf16(acc[j]);
    }
    free(bf);
    free(acc);
}

void basis_gemm(engine *e, workload *w, int l, int which, size_t rows,
                void *out)
{
    const size_t layer = (size_t)l * w->C * w->HD;
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        const uint16_t *b = which ? w->vbasis_dev : w->kbasis_dev;
        gemm_bf16(e, w->HD, (int)rows, w->C, b + layer, w->coef_dev, w->C,
                  out);
        return;
    }
#endif
    (void)e;
    host_basis_gemm(w, w->coef_host, rows,
                    (which ? w->vbasis : w->kbasis) + layer, out);
}

void upload_coef(engine *e, workload *w, size_t rows)
{
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        /* On the engine's stream, after the GEMMs that read the previous
         * rows; waited for, so that coef_host may be refilled at once (set-up
         * only, never in a timed step). */
        h2d(e, w->coef_dev, w->coef_host, rows * w->C * sizeof(uint16_t));
    }
#endif
    (void)e;
    (void)w;
    (void)rows;
}

void workload_alloc(engine *e, workload *w)
{
    const size_t B = (size_t)w->batch, T = (size_t)w->T, L = (size_t)w->L;
    const size_t HD = (size_t)w->HD, C = (size_t)w->C;
    const size_t chunk = (size_t)(w->a->prefill_chunk < w->ctx
                                      ? w->a->prefill_chunk
                                      : w->ctx);
    const size_t decbytes = L * T * B * HD * 2;
    const size_t stage = B * chunk * HD * 2;
    w->coef_rows = B * chunk > T * B ? B * chunk : T * B;
    w->coef_host = bench_xmalloc(w->coef_rows * C * sizeof(uint16_t));
    w->on_device = e->backend == FKV_BACKEND_CUDA;
    const int host = !w->on_device;
    w->q_mem = w->q;
    w->kdec = bench_dev_alloc(host, decbytes);
    w->vdec = bench_dev_alloc(host, decbytes);
    w->kstage = bench_dev_alloc(host, stage);
    w->vstage = bench_dev_alloc(host, stage);
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        const size_t qbytes = T * L * B * (size_t)w->QH * w->D * 2;
        w->q_mem = bench_dev_alloc(0, qbytes);
        h2d(e, w->q_mem, w->q, qbytes);
        w->coef_dev = bench_dev_alloc(0, w->coef_rows * C * 2);
        size_t basis = L * C * HD * 2;
        w->kbasis_dev = bench_dev_alloc(0, basis);
        w->vbasis_dev = bench_dev_alloc(0, basis);
        h2d(e, w->kbasis_dev, w->kbasis, basis);
        h2d(e, w->vbasis_dev, w->vbasis, basis);
        if (w->a->graph || w->a->fixed_inputs) {
            w->q_cur = bench_dev_alloc(0, L * B * (size_t)w->QH * w->D * 2);
            w->k_cur = bench_dev_alloc(0, L * B * HD * 2);
            w->v_cur = bench_dev_alloc(0, L * B * HD * 2);
        }
    }
#endif

    /* Decode tokens' K and V, rows (step, sequence), for every layer. */
    for (int t = 0; t < w->T; t++)
        for (int s = 0; s < w->batch; s++)
            fill_coef(w, s, w->ctx + t, 1,
                      w->coef_host + ((size_t)t * B + (size_t)s) * C, 1);
    upload_coef(e, w, T * B);
    for (int l = 0; l < w->L; l++) {
        size_t off = (size_t)l * T * B * HD * 2;
        basis_gemm(e, w, l, 0, T * B, (char *)w->kdec + off);
        basis_gemm(e, w, l, 1, T * B, (char *)w->vdec + off);
    }
#ifdef FKV_WITH_CUDA
    if (w->on_device)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
#endif
}

void workload_free(engine *e, workload *w)
{
    (void)e;
    const int host = !w->on_device;
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
        bench_dev_free(0, w->q_mem);
        bench_dev_free(0, w->coef_dev);
        bench_dev_free(0, w->kbasis_dev);
        bench_dev_free(0, w->vbasis_dev);
        if (w->q_cur) {
            bench_dev_free(0, w->q_cur);
            bench_dev_free(0, w->k_cur);
            bench_dev_free(0, w->v_cur);
        }
    }
#endif
    bench_dev_free(host, w->kdec);
    bench_dev_free(host, w->vdec);
    bench_dev_free(host, w->kstage);
    bench_dev_free(host, w->vstage);
    free(w->coef_host);
    free(w->center);
    free(w->head_dir);
    free(w->rho);
    free(w->kbasis);
    free(w->vbasis);
    free(w->topic);
    free(w->q);
    memset(w, 0, sizeof *w);
}

