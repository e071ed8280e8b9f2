/*
 * bench_data.c: the benchmarks' statistics, random numbers and element
 * types (declared and documented in bench/bench.h): what the workloads of
 * bench/workload.h build on.
 *
 * SPDX-License-Identifier: MIT
 */
#include "bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_percentile(const double *x, size_t n, double p)
{
    if (n == 0)
        return NAN;
    double *s = (double *)bench_xmalloc(n * sizeof *s);
    memcpy(s, x, n * sizeof *s);
    qsort(s, n, sizeof *s, bench_cmp_double);
    double pos = p / 100.0 * (double)(n - 1);
    if (pos < 0.0)
        pos = 0.0;
    if (pos > (double)(n - 1))
        pos = (double)(n - 1);
    size_t i = (size_t)pos;
    double f = pos - (double)i;
    double v = i + 1 < n ? s[i] + f * (s[i + 1] - s[i]) : s[i];
    free(s);
    return v;
}

double bench_median(const double *x, size_t n)
{
    return bench_percentile(x, n, 50.0);
}

/* ------------------------------------------------------------------------ */
/* Random numbers: splitmix64                                               */
/* ------------------------------------------------------------------------ */

bench_rng bench_rng_seed(uint64_t seed)
{
    bench_rng r = {seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull};
    return r;
}

uint64_t bench_rng_next(bench_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double bench_rng_uniform(bench_rng *r)
{
    return (double)(bench_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

double bench_rng_uniform_in(bench_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * bench_rng_uniform(r);
}

int64_t bench_rng_int(bench_rng *r, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(bench_rng_uniform(r) * (double)(hi - lo + 1));
}

double bench_rng_normal(bench_rng *r)
{
    double u1 = 1.0 - bench_rng_uniform(r); /* (0, 1] */
    double u2 = bench_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ------------------------------------------------------------------------ */
/* Element types                                                            */
/* ------------------------------------------------------------------------ */

uint16_t bench_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float bench_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

uint16_t bench_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (a >= 0x477ff000u) /* rounds to >= 65520: overflow */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* subnormal half: a multiple of 2^-24 */
        float x;
        memcpy(&x, &a, sizeof x);
        return (uint16_t)(sign | (uint16_t)lrintf(x * 16777216.0f));
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
    return (uint16_t)(sign | (uint16_t)(r >> 13));
}

float bench_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0x1f)
        u = sign | 0x7f800000u | (m << 13);
    else if (e == 0) {
        f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    } else
        u = sign | ((e + 112) << 23) | (m << 13);
    memcpy(&f, &u, sizeof f);
    return f;
}

size_t bench_dtype_size(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? 4 : 2;
}

const char *bench_dtype_name(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? "f32" : dt == FKV_DTYPE_F16 ? "f16" : "bf16";
}

void bench_store_elem(fkv_dtype dt, void *base, size_t i,
                                    float v)
{
    if (dt == FKV_DTYPE_F32) {
        memcpy((unsigned char *)base + 4 * i, &v, 4);
    } else {
        uint16_t h =
            dt == FKV_DTYPE_BF16 ? bench_f32_to_bf16(v) : bench_f32_to_f16(v);
        memcpy((unsigned char *)base + 2 * i, &h, 2);
    }
}

float bench_load_elem(fkv_dtype dt, const void *base, size_t i)
{
    if (dt == FKV_DTYPE_F32) {
        float v;
        memcpy(&v, (const unsigned char *)base + 4 * i, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, (const unsigned char *)base + 2 * i, 2);
    return dt == FKV_DTYPE_BF16 ? bench_bf16_to_f32(h) : bench_f16_to_f32(h);
}
