/*
 * Independent float64 reference for the libfreekv tests (see reference.h).
 * Written from docs/design.md; shares no code with lib/.
 *
 * SPDX-License-Identifier: MIT
 */
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------- */
/* RNG                                                                    */
/* ---------------------------------------------------------------------- */

void ref_rng_seed(ref_rng *r, uint64_t seed)
{
    r->state = seed ^ 0x6a09e667f3bcc909ULL;
    r->has_spare = 0;
    r->spare = 0.0;
}

uint64_t ref_rng_u64(ref_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

double ref_rng_uniform(ref_rng *r)
{
    return (double)(ref_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

double ref_rng_normal(ref_rng *r)
{
    double u, v, s;
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    /* Marsaglia polar method. */
    do {
        u = 2.0 * ref_rng_uniform(r) - 1.0;
        v = 2.0 * ref_rng_uniform(r) - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    s = sqrt(-2.0 * log(s) / s);
    r->spare = v * s;
    r->has_spare = 1;
    return u * s;
}

int ref_rng_below(ref_rng *r, int n)
{
    if (n <= 1)
        return 0;
    return (int)(ref_rng_u64(r) % (uint64_t)n);
}

/* ---------------------------------------------------------------------- */
/* f16 / bf16                                                             */
/* ---------------------------------------------------------------------- */

/* Rounds |x| to an integer with ties to even (independent of the FP
 * rounding mode). x >= 0 and small enough to be exact in double steps. */
static double round_half_even(double x)
{
    double f = floor(x);
    double d = x - f;
    if (d > 0.5)
        return f + 1.0;
    if (d < 0.5)
        return f;
    return fmod(f, 2.0) == 0.0 ? f : f + 1.0;
}

uint16_t ref_to_f16(double x)
{
    uint16_t sign = 0;
    double a;
    int e;
    if (isnan(x))
        return 0x7e00;
    if (signbit(x)) {
        sign = 0x8000;
        x = -x;
    }
    a = x;
    if (isinf(a))
        return (uint16_t)(sign | 0x7c00);
    if (a < ldexp(1.0, -14)) {
        /* Subnormal (or rounds up to the smallest normal): units of 2^-24. */
        double m = round_half_even(a * ldexp(1.0, 24));
        return (uint16_t)(sign | (uint16_t)m); /* m == 1024 is 0x0400 */
    }
    {
        double fr = frexp(a, &e); /* a = fr * 2^e, fr in [0.5, 1) */
        double mant = fr * 2.0;   /* [1, 2) */
        double m;
        e -= 1;
        m = round_half_even((mant - 1.0) * 1024.0);
        if (m >= 1024.0) {
            m = 0.0;
            e += 1;
        }
        if (e + 15 >= 31)
            return (uint16_t)(sign | 0x7c00);
        return (uint16_t)(sign | (uint16_t)((e + 15) << 10) | (uint16_t)m);
    }
}

double ref_from_f16(uint16_t h)
{
    int s = (h >> 15) & 1;
    int e = (h >> 10) & 0x1f;
    int m = h & 0x3ff;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexp(1.0 + (double)m / 1024.0, e - 15);
    return s ? -v : v;
}

uint16_t ref_to_bf16(double x)
{
    /* Round to float first (the value is a float in every use here), then
     * to the upper 16 bits with ties to even. */
    float f = (float)x;
    uint32_t u;
    uint32_t lower, upper;
    memcpy(&u, &f, sizeof u);
    if (isnan(f))
        return (uint16_t)((u >> 16) | 0x0040);
    upper = u >> 16;
    lower = u & 0xffffu;
    if (lower > 0x8000u || (lower == 0x8000u && (upper & 1u)))
        upper += 1; /* may carry into the exponent: correct, incl. to inf */
    return (uint16_t)upper;
}

double ref_from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return (double)f;
}

size_t ref_dtype_bytes(int dtype)
{
    return dtype == REF_F32 ? 4u : 2u;
}

float ref_round(double x, int dtype)
{
    switch (dtype) {
    case REF_F16:
        return (float)ref_from_f16(ref_to_f16(x));
    case REF_BF16:
        return (float)ref_from_bf16(ref_to_bf16(x));
    default:
        return (float)x;
    }
}

void ref_encode(int dtype, const float *src, void *dst, size_t n)
{
    size_t i;
    if (dtype == REF_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (i = 0; i < n; ++i) {
        uint16_t h = dtype == REF_F16 ? ref_to_f16(src[i])
                                      : ref_to_bf16(src[i]);
        memcpy((unsigned char *)dst + 2 * i, &h, 2);
    }
}

void ref_decode(int dtype, const void *src, float *dst, size_t n)
{
    size_t i;
    if (dtype == REF_F32) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    for (i = 0; i < n; ++i) {
        uint16_t h;
        memcpy(&h, (const unsigned char *)src + 2 * i, 2);
        dst[i] = (float)(dtype == REF_F16 ? ref_from_f16(h)
                                          : ref_from_bf16(h));
    }
}

void ref_random_tensor(ref_rng *r, int dtype, float *dst, size_t n,
                       double stddev)
{
    size_t i;
    for (i = 0; i < n; ++i)
        dst[i] = ref_round(stddev * ref_rng_normal(r), dtype);
}

double ref_rel_err(const float *got, const double *want, size_t n)
{
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = (double)got[i] - want[i];
        num += d * d;
        den += want[i] * want[i];
    }
    if (isnan(num))
        return INFINITY;
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

double ref_rel_err_dd(const double *got, const double *want, size_t n)
{
    double num = 0.0, den = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = got[i] - want[i];
        num += d * d;
        den += want[i] * want[i];
    }
    if (den == 0.0)
        return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

double ref_cosine(const float *a, const float *b, int n)
{
    double ab = 0.0, aa = 0.0, bb = 0.0;
    int i;
    for (i = 0; i < n; ++i) {
        ab += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    if (aa == 0.0 || bb == 0.0)
        return 0.0;
    return ab / (sqrt(aa) * sqrt(bb));
}

double ref_group_cosine(const float *a, const float *b, int G, int D)
{
    double s = 0.0;
    int h;
    for (h = 0; h < G; ++h)
        s += ref_cosine(a + (size_t)h * D, b + (size_t)h * D, D);
    return s / G;
}

/* ---------------------------------------------------------------------- */
/* Paging                                                                 */
/* ---------------------------------------------------------------------- */

int64_t ref_sealed_pages(const ref_layout *L, int64_t n)
{
    return n / L->P;
}

int ref_candidates(const ref_layout *L, int64_t n, int *first, int *end)
{
    int64_t sealed = ref_sealed_pages(L, n);
    int64_t f = L->S, e = sealed - L->W;
    if (e < f)
        e = f;
    if (first)
        *first = (int)f;
    if (end)
        *end = (int)e;
    return (int)(e - f);
}

static void mark_page(const ref_layout *L, int64_t n, int64_t page,
                      unsigned char *mask)
{
    int64_t t0 = page * L->P, t1 = t0 + L->P, t;
    if (t1 > n)
        t1 = n;
    for (t = t0; t < t1; ++t)
        mask[t] = 1;
}

void ref_attended_mask(const ref_layout *L, int64_t n, const int *selected,
                       int nselected, unsigned char *mask)
{
    int64_t sealed = ref_sealed_pages(L, n);
    int64_t p, sink_end, win_first;
    int i;
    memset(mask, 0, (size_t)n);
    /* sink pages [0, min(S, sealed)) */
    sink_end = sealed < L->S ? sealed : L->S;
    for (p = 0; p < sink_end; ++p)
        mark_page(L, n, p, mask);
    /* window pages [max(S, sealed - W), sealed) */
    win_first = sealed - L->W;
    if (win_first < L->S)
        win_first = L->S;
    for (p = win_first; p < sealed; ++p)
        mark_page(L, n, p, mask);
    /* partial page */
    if (n % L->P)
        mark_page(L, n, sealed, mask);
    for (i = 0; i < nselected; ++i)
        mark_page(L, n, selected[i], mask);
}

void ref_causal_limit(int64_t n, int64_t pos, unsigned char *mask)
{
    int64_t t;
    for (t = pos + 1; t < n; ++t)
        mask[t] = 0;
}

/* ---------------------------------------------------------------------- */
/* Selection                                                              */
/* ---------------------------------------------------------------------- */

void ref_page_minmax(const float *k, int nkvh, int D, int kvh, int P,
                     int page, double *mx, double *mn)
{
    int i, t;
    for (i = 0; i < D; ++i) {
        mx[i] = -INFINITY;
        mn[i] = INFINITY;
    }
    for (t = page * P; t < (page + 1) * P; ++t) {
        const float *row = k + ((size_t)t * nkvh + kvh) * D;
        for (i = 0; i < D; ++i) {
            if (row[i] > mx[i])
                mx[i] = row[i];
            if (row[i] < mn[i])
                mn[i] = row[i];
        }
    }
}

double ref_page_score(const float *q, const double *mx, const double *mn,
                      int D)
{
    double s = 0.0;
    int i;
    for (i = 0; i < D; ++i) {
        double a = (double)q[i] * mx[i], b = (double)q[i] * mn[i];
        s += a > b ? a : b;
    }
    return s;
}

void ref_group_aggregate(const double *scores, int G, int n, double scale,
                         int mode, double *agg)
{
    int h, p;
    for (p = 0; p < n; ++p)
        agg[p] = 0.0;
    for (h = 0; h < G; ++h) {
        const double *s = scores + (size_t)h * n;
        if (mode == REF_GROUP_MEAN_SCORE) {
            for (p = 0; p < n; ++p)
                agg[p] += s[p] / G;
        } else {
            double m = -INFINITY, z = 0.0;
            for (p = 0; p < n; ++p)
                if (scale * s[p] > m)
                    m = scale * s[p];
            for (p = 0; p < n; ++p)
                z += exp(scale * s[p] - m);
            for (p = 0; p < n; ++p)
                agg[p] += exp(scale * s[p] - m) / z / G;
        }
    }
}

typedef struct ranked {
    double a;
    int i;
} ranked;

static int cmp_ranked(const void *x, const void *y)
{
    const ranked *a = (const ranked *)x, *b = (const ranked *)y;
    if (a->a > b->a)
        return -1;
    if (a->a < b->a)
        return 1;
    return (a->i > b->i) - (a->i < b->i);
}

static int cmp_int(const void *x, const void *y)
{
    int a = *(const int *)x, b = *(const int *)y;
    return (a > b) - (a < b);
}

static ranked *rank_all(const double *agg, int n)
{
    ranked *r = (ranked *)malloc(sizeof(ranked) * (size_t)(n > 0 ? n : 1));
    int i;
    if (!r)
        abort();
    for (i = 0; i < n; ++i) {
        r[i].a = agg[i];
        r[i].i = i;
    }
    qsort(r, (size_t)n, sizeof *r, cmp_ranked);
    return r;
}

int ref_topk(const double *agg, int n, int K, int *idx)
{
    ranked *r = rank_all(agg, n);
    int c = n < K ? n : K, i;
    for (i = 0; i < c; ++i)
        idx[i] = r[i].i;
    qsort(idx, (size_t)c, sizeof *idx, cmp_int);
    free(r);
    return c;
}

double ref_topk_gap(const double *agg, int n, int K, int mode)
{
    ranked *r;
    double gap, den = 0.0;
    int i;
    if (n <= K || K <= 0)
        return INFINITY;
    r = rank_all(agg, n);
    gap = r[K - 1].a - r[K].a;
    if (mode == REF_GROUP_MEAN_SCORE) {
        for (i = 0; i < n; ++i)
            if (fabs(agg[i]) > den)
                den = fabs(agg[i]);
    } else {
        den = fabs(r[K - 1].a);
    }
    free(r);
    if (den == 0.0)
        return gap == 0.0 ? 0.0 : INFINITY;
    return gap / den;
}

int ref_select(const ref_layout *L, const float *k, int64_t n, int nkvh,
               int D, int kvh, const float *q_group, int G, double scale,
               int mode, int *pages, double *gap)
{
    int first, end, nc, c, h, p;
    double *scores, *agg, *mx, *mn;
    nc = ref_candidates(L, n, &first, &end);
    if (nc <= L->K) {
        for (p = 0; p < nc; ++p)
            pages[p] = first + p;
        if (gap)
            *gap = INFINITY;
        return nc;
    }
    scores = (double *)malloc(sizeof(double) * (size_t)G * nc);
    agg = (double *)malloc(sizeof(double) * (size_t)nc);
    mx = (double *)malloc(sizeof(double) * (size_t)D);
    mn = (double *)malloc(sizeof(double) * (size_t)D);
    if (!scores || !agg || !mx || !mn)
        abort();
    for (p = 0; p < nc; ++p) {
        ref_page_minmax(k, nkvh, D, kvh, L->P, first + p, mx, mn);
        for (h = 0; h < G; ++h)
            scores[(size_t)h * nc + p] =
                ref_page_score(q_group + (size_t)h * D, mx, mn, D);
    }
    ref_group_aggregate(scores, G, nc, scale, mode, agg);
    c = ref_topk(agg, nc, L->K, pages);
    for (p = 0; p < c; ++p)
        pages[p] += first;
    if (gap)
        *gap = ref_topk_gap(agg, nc, L->K, mode);
    free(scores);
    free(agg);
    free(mx);
    free(mn);
    return c;
}

/* ---------------------------------------------------------------------- */
/* Attention                                                              */
/* ---------------------------------------------------------------------- */

void ref_attention(const float *k, const float *v, int64_t n, int nkvh,
                   int D, int kvh, const float *q, double scale,
                   const unsigned char *mask, double *out)
{
    double m = -INFINITY, z = 0.0;
    double *s = (double *)malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    int64_t t;
    int i;
    if (!s)
        abort();
    for (i = 0; i < D; ++i)
        out[i] = 0.0;
    for (t = 0; t < n; ++t) {
        const float *kr = k + ((size_t)t * nkvh + kvh) * D;
        double dot = 0.0;
        if (mask && !mask[t])
            continue;
        for (i = 0; i < D; ++i)
            dot += (double)q[i] * kr[i];
        s[t] = scale * dot;
        if (s[t] > m)
            m = s[t];
    }
    for (t = 0; t < n; ++t) {
        const float *vr = v + ((size_t)t * nkvh + kvh) * D;
        double w;
        if (mask && !mask[t])
            continue;
        w = exp(s[t] - m);
        z += w;
        for (i = 0; i < D; ++i)
            out[i] += w * vr[i];
    }
    if (z > 0.0)
        for (i = 0; i < D; ++i)
            out[i] /= z;
    free(s);
}
