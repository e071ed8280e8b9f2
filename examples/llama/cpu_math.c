/* CPU kernels: register-blocked matmul over transposed weights (inner
 * loops over contiguous output columns, so they vectorise without
 * reassociating sums), tiled causal attention with an online softmax. */
#include "cpu_math.h"

#include <math.h>
#include <string.h>

#define MR 8   /* rows of x per micro-tile */
#define NR 32  /* output columns per micro-tile */

static void tile_full(float *y, const float *x, const float *wt, int64_t in,
                      int64_t out, int accumulate)
{
    float acc[MR][NR];
    int r, j;
    int64_t k;
    for (r = 0; r < MR; r++)
        for (j = 0; j < NR; j++)
            acc[r][j] = accumulate ? y[r * out + j] : 0.0f;
    for (k = 0; k < in; k++) {
        const float *w = wt + k * out;
        for (r = 0; r < MR; r++) {
            float xv = x[r * in + k];
#pragma omp simd
            for (j = 0; j < NR; j++)
                acc[r][j] += xv * w[j];
        }
    }
    for (r = 0; r < MR; r++)
        for (j = 0; j < NR; j++)
            y[r * out + j] = acc[r][j];
}

/* Fewer than MR rows (decode: one row per sequence), full NR columns. */
static void tile_rows(float *y, const float *x, const float *wt, int64_t in,
                      int64_t out, int mr, int accumulate)
{
    float acc[MR][NR];
    int r, j;
    int64_t k;
    for (r = 0; r < mr; r++)
        for (j = 0; j < NR; j++)
            acc[r][j] = accumulate ? y[r * out + j] : 0.0f;
    for (k = 0; k < in; k++) {
        const float *w = wt + k * out;
        for (r = 0; r < mr; r++) {
            float xv = x[r * in + k];
#pragma omp simd
            for (j = 0; j < NR; j++)
                acc[r][j] += xv * w[j];
        }
    }
    for (r = 0; r < mr; r++)
        for (j = 0; j < NR; j++)
            y[r * out + j] = acc[r][j];
}

static void tile_edge(float *y, const float *x, const float *wt, int64_t in,
                      int64_t out, int mr, int nr, int accumulate)
{
    float acc[MR][NR];
    int r, j;
    int64_t k;
    for (r = 0; r < mr; r++)
        for (j = 0; j < nr; j++)
            acc[r][j] = accumulate ? y[r * out + j] : 0.0f;
    for (k = 0; k < in; k++) {
        const float *w = wt + k * out;
        for (r = 0; r < mr; r++) {
            float xv = x[r * in + k];
            for (j = 0; j < nr; j++)
                acc[r][j] += xv * w[j];
        }
    }
    for (r = 0; r < mr; r++)
        for (j = 0; j < nr; j++)
            y[r * out + j] = acc[r][j];
}

void cpu_matmul(float *y, const float *x, const float *wt, int64_t n,
                int64_t in, int64_t out, int accumulate)
{
    int64_t rb = (n + MR - 1) / MR, cb = (out + NR - 1) / NR, t;
#pragma omp parallel for schedule(static)
    for (t = 0; t < rb * cb; t++) {
        int64_t r0 = (t / cb) * MR, c0 = (t % cb) * NR;
        int mr = (int)(n - r0 < MR ? n - r0 : MR);
        int nr = (int)(out - c0 < NR ? out - c0 : NR);
        if (mr == MR && nr == NR)
            tile_full(y + r0 * out + c0, x + r0 * in, wt + c0, in, out, accumulate);
        else if (nr == NR)
            tile_rows(y + r0 * out + c0, x + r0 * in, wt + c0, in, out, mr, accumulate);
        else
            tile_edge(y + r0 * out + c0, x + r0 * in, wt + c0, in, out, mr, nr, accumulate);
    }
}

void cpu_rmsnorm(float *y, const float *x, const float *w, int64_t n,
                 int64_t d, float eps)
{
    int64_t i;
#pragma omp parallel for schedule(static) if (n > 16)
    for (i = 0; i < n; i++) {
        const float *xi = x + i * d;
        float *yi = y + i * d;
        double ss = 0.0;
        float r;
        int64_t j;
        for (j = 0; j < d; j++)
            ss += (double)xi[j] * xi[j];
        r = (float)(1.0 / sqrt(ss / (double)d + (double)eps));
        for (j = 0; j < d; j++)
            yi[j] = w[j] * (xi[j] * r);
    }
}

void cpu_rope(float *x, int64_t n, int32_t heads, int32_t head_dim,
              const int64_t *pos, int64_t pos0, const float *inv_freq)
{
    int32_t half = head_dim / 2;
    int64_t t;
#pragma omp parallel for schedule(static) if (n > 16)
    for (t = 0; t < n; t++) {
        float c[512], s[512]; /* head_dim <= 1024, checked at create */
        float p = (float)(pos ? pos[t] : pos0 + t);
        int32_t h, i;
        for (i = 0; i < half; i++) {
            /* The angle in f32 like HF's rotary embedding, which the
             * checkpoints were trained with. */
            float a = p * inv_freq[i];
            c[i] = (float)cos((double)a);
            s[i] = (float)sin((double)a);
        }
        for (h = 0; h < heads; h++) {
            float *v = x + (t * heads + h) * head_dim;
            for (i = 0; i < half; i++) {
                float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* exp(x) for the softmax, in a form the compiler vectorises (libm's expf
 * does not): x = k ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r
 * (relative error ~2e-7), 2^k through the exponent bits. */
static inline float fast_exp(float x)
{
    union { float f; int32_t i; } u;
    float k, r, p;
    x = x < -87.0f ? -87.0f : x;
    k = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
    r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    u.i = ((int32_t)k + 127) << 23;
    return p * u.f;
}

/* y[MR][NR] (+)= x[MR][K] w[K][NR] with leading dimensions: the one micro
 * kernel of the attention tiles. */
static void mk_full(float *y, int64_t ldy, const float *x, int64_t ldx, const float *w,
                    int64_t ldw, int64_t K, int accumulate)
{
    float acc[MR][NR];
    int r, j;
    int64_t k;
    for (r = 0; r < MR; r++)
        for (j = 0; j < NR; j++)
            acc[r][j] = accumulate ? y[r * ldy + j] : 0.0f;
    for (k = 0; k < K; k++) {
        const float *wk = w + k * ldw;
        for (r = 0; r < MR; r++) {
            float xv = x[r * ldx + k];
#pragma omp simd
            for (j = 0; j < NR; j++)
                acc[r][j] += xv * wk[j];
        }
    }
    for (r = 0; r < MR; r++)
        for (j = 0; j < NR; j++)
            y[r * ldy + j] = acc[r][j];
}

#define QB 32   /* query rows per head per task (a multiple of MR) */
#define KB 128  /* keys per tile (a multiple of NR) */
#define MAXG 16
#define MAXD 256

void cpu_causal_attention(float *out, const float *q, const float *k,
                          const float *v, int64_t r0, int64_t r1,
                          int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                          float scale)
{
    int32_t G = q_heads / kv_heads, D = head_dim;
    int64_t nq = r1 - r0, qblocks = (nq + QB - 1) / QB, task;
    int64_t kvd = (int64_t)kv_heads * D, qd = (int64_t)q_heads * D;
#pragma omp parallel for schedule(dynamic, 1)
    for (task = 0; task < qblocks * kv_heads; task++) {
        /* One KV head, QB query rows of each of its G query heads. Thread
         * scratch, sized for the largest shape (checked at create). */
        static _Thread_local float kt[MAXD][KB];        /* K tile, transposed */
        static _Thread_local float vt[KB][MAXD];        /* V tile */
        static _Thread_local float qs[MAXG * QB][MAXD]; /* scaled queries */
        static _Thread_local float sc[MAXG * QB][KB];   /* scores, then P */
        static _Thread_local float acc[MAXG * QB][MAXD];
        float m[MAXG * QB], l[MAXG * QB];
        int32_t h = (int32_t)(kv_heads ? task % kv_heads : 0);
        int64_t qb0 = (task / kv_heads) * QB;
        int64_t nrows = nq - qb0 < QB ? nq - qb0 : QB;
        int64_t last = r0 + qb0 + nrows - 1; /* the last query's position */
        int64_t j0, i, j;
        int32_t g, d, R = G * QB;
        /* Rows beyond nrows (the last block) are zero queries: computed and
         * dropped, which keeps every micro-tile full. */
        for (g = 0; g < G; g++)
            for (i = 0; i < QB; i++) {
                float *dst = qs[g * QB + i];
                if (i < nrows) {
                    const float *src = q + (qb0 + i) * qd + (int64_t)(h * G + g) * D;
                    for (d = 0; d < D; d++)
                        dst[d] = src[d] * scale;
                } else {
                    memset(dst, 0, (size_t)D * sizeof(float));
                }
            }
        for (i = 0; i < R; i++) {
            m[i] = -INFINITY;
            l[i] = 0.0f;
            memset(acc[i], 0, (size_t)D * sizeof(float));
        }
        for (j0 = 0; j0 <= last; j0 += KB) {
            int64_t nk = last + 1 - j0 < KB ? last + 1 - j0 : KB;
            int64_t rr;
            for (j = 0; j < KB; j++) {
                if (j < nk) {
                    const float *kj = k + (j0 + j) * kvd + h * D;
                    const float *vj = v + (j0 + j) * kvd + h * D;
                    for (d = 0; d < D; d++)
                        kt[d][j] = kj[d];
                    memcpy(vt[j], vj, (size_t)D * sizeof(float));
                } else {
                    for (d = 0; d < D; d++)
                        kt[d][j] = 0.0f;
                    memset(vt[j], 0, (size_t)D * sizeof(float));
                }
            }
            /* S = Qs K^T */
            for (rr = 0; rr < R; rr += MR)
                for (j = 0; j < KB; j += NR)
                    mk_full(&sc[rr][j], KB, qs[rr], MAXD, &kt[0][j], KB, D, 0);
            /* Causal mask and online softmax, row by row. */
            for (rr = 0; rr < R; rr++) {
                int64_t row = rr % QB, p = r0 + qb0 + row;
                int64_t lim = p - j0 + 1; /* keys j0..p are visible */
                float *srow = sc[rr], mx, corr, sum = 0.0f;
                if (row >= nrows || lim <= 0) {
                    for (j = 0; j < KB; j++)
                        srow[j] = 0.0f;
                    continue;
                }
                if (lim > nk)
                    lim = nk;
                mx = m[rr];
                for (j = 0; j < lim; j++)
                    mx = srow[j] > mx ? srow[j] : mx;
                corr = fast_exp(m[rr] - mx);
#pragma omp simd reduction(+ : sum)
                for (j = 0; j < KB; j++) {
                    float e = j < lim ? fast_exp(srow[j] - mx) : 0.0f;
                    srow[j] = e;
                    sum += e;
                }
                l[rr] = l[rr] * corr + sum;
                m[rr] = mx;
                if (corr != 1.0f)
                    for (d = 0; d < D; d++)
                        acc[rr][d] *= corr;
            }
            /* acc += P V */
            for (rr = 0; rr < R; rr += MR)
                for (d = 0; d < D; d += NR)
                    mk_full(&acc[rr][d], MAXD, sc[rr], KB, &vt[0][d], MAXD, KB, 1);
        }
        for (g = 0; g < G; g++)
            for (i = 0; i < nrows; i++) {
                int32_t slot = g * QB + (int32_t)i;
                float inv = 1.0f / l[slot];
                float *o = out + (qb0 + i) * qd + (int64_t)(h * G + g) * D;
                for (d = 0; d < D; d++)
                    o[d] = acc[slot][d] * inv;
            }
    }
}

void cpu_swiglu(float *h, const float *g, const float *u, int64_t n)
{
    int64_t i;
#pragma omp parallel for schedule(static) if (n > 4096)
    for (i = 0; i < n; i++)
        h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
