/*
 * bench.h: small header-only helpers shared by the libfreekv benchmarks
 * (the programs in bench/ and bench/workload.h). Everything is
 * `static inline`, so a program pays only for what it uses and
 * -Wunused-function stays quiet.
 *
 *   errors      bench_die (prefix BENCH_DIE_PREFIX), BENCH_FKV_CHECK,
 *               BENCH_CUDA_CHECK (FKV_WITH_CUDA), BENCH_CUBLAS_CHECK
 *               (FKV_WITH_CUDA and BENCH_WITH_CUBLAS)
 *   memory      bench_xmalloc, bench_xcalloc, bench_grow; bench_dev_alloc /
 *               _free, bench_to_dev, bench_to_host (device memory, or host
 *               memory for the CPU backend)
 *   devices     bench_cuda_unusable, bench_device_open (FKV_WITH_CUDA)
 *   time        bench_now_ms / bench_now_s (host clock), bench_timer (CUDA
 *               events on a stream, or the host clock), bench_event_ms
 *   statistics  bench_median, bench_percentile
 *   random      bench_rng (splitmix64): uniform, uniform_in, int, normal
 *   dtypes      bench_f32_to_bf16 / bench_bf16_to_f32, f16 likewise;
 *               bench_dtype_size, bench_dtype_name, bench_store_elem,
 *               bench_load_elem
 *   names       bench_policy_name
 *   parsing     bench_parse_int, bench_parse_int64, bench_parse_list,
 *               bench_set_list, bench_parse_int_list ("8192,32K,128k")
 *   formatting  bench_fmt (a number, or "-" for NAN)
 *   tables      bench_table: collect cells, print aligned columns
 *
 * A program may define, before it includes this header:
 *   BENCH_DIE_PREFIX   what bench_die and the checks print before a
 *                      message (default "bench: ");
 *   BENCH_WITH_CUBLAS  to get BENCH_CUBLAS_CHECK (includes cublas_v2.h).
 *
 * The names are a contract between the bench programs: add, never rename.
 * Needs C11 (timespec_get) or C++; bench_now_ms reads CLOCK_MONOTONIC where
 * the program asks for POSIX (_POSIX_C_SOURCE before its includes).
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_BENCH_H
#define FKV_BENCH_H

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "freekv.h"

#ifdef FKV_WITH_CUDA
#include <cuda_runtime_api.h>

#include "internal.h" /* fkvi_cuda_unavailable */
#ifdef BENCH_WITH_CUBLAS
#include <cublas_v2.h>
#endif
#endif

#ifndef BENCH_DIE_PREFIX
#define BENCH_DIE_PREFIX "bench: "
#endif

/* ------------------------------------------------------------------------ */
/* Errors and memory                                                        */
/* ------------------------------------------------------------------------ */

/* Prints BENCH_DIE_PREFIX and the formatted message to stderr and exits
 * with status 1. */
static inline void bench_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(BENCH_DIE_PREFIX, stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* Exits with the status, its string and the handle's (NULL: the thread's)
 * last error when st is not FKV_OK. Use through BENCH_FKV_CHECK. */
static inline void bench_fkv_check(fkv_status st, const fkv_cache *cache,
                                   const char *what, const char *file,
                                   int line)
{
    char msg[512];
    if (st == FKV_OK)
        return;
    fkv_last_error(cache, msg, sizeof msg);
    bench_die("%s:%d: %s failed: %s (%d): %s", file, line, what,
              fkv_status_string(st), (int)st, msg);
}
/* BENCH_FKV_CHECK(cache, fkv_call(...)): checks a libfreekv call. */
#define BENCH_FKV_CHECK(cache, call)                                         \
    bench_fkv_check((call), (cache), #call, __FILE__, __LINE__)

#ifdef FKV_WITH_CUDA
/* Exits with the CUDA error's name and string when e is not cudaSuccess. */
static inline void bench_cuda_check(cudaError_t e, const char *what,
                                    const char *file, int line)
{
    if (e == cudaSuccess)
        return;
    bench_die("%s:%d: %s failed: %s (%s)", file, line, what,
              cudaGetErrorString(e), cudaGetErrorName(e));
}
/* BENCH_CUDA_CHECK(cudaCall(...)): checks a CUDA runtime call. */
#define BENCH_CUDA_CHECK(call)                                               \
    bench_cuda_check((call), #call, __FILE__, __LINE__)

/* Milliseconds between two recorded events (not waiting for them). */
static inline double bench_event_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0.0f;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return (double)ms;
}

#ifdef BENCH_WITH_CUBLAS
/* Exits with the cuBLAS status and its string when s is not success. */
static inline void bench_cublas_check(cublasStatus_t s, const char *what,
                                      const char *file, int line)
{
    if (s != CUBLAS_STATUS_SUCCESS)
        bench_die("%s:%d: %s failed: %s (%d)", file, line, what,
                  cublasGetStatusString(s), (int)s);
}
/* BENCH_CUBLAS_CHECK(cublasCall(...)): checks a cuBLAS call. */
#define BENCH_CUBLAS_CHECK(call)                                             \
    bench_cublas_check((call), #call, __FILE__, __LINE__)
#endif
#endif

/* malloc that exits on failure (size 0 allocates 1 byte). */
static inline void *bench_xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        bench_die("out of host memory (%zu bytes)", bytes);
    return p;
}

/* calloc that exits on failure. */
static inline void *bench_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        bench_die("out of host memory (%zu x %zu bytes)", n, size);
    return p;
}

/* Room for element n of a growing array of `size`-byte elements at base,
 * which has room for *cap: base itself, or base reallocated with twice the
 * room (64 elements at first). Exits when out of memory. */
static inline void *bench_grow(void *base, size_t *cap, size_t n, size_t size)
{
    if (n < *cap)
        return base;
    size_t c = *cap ? 2 * *cap : 64;
    void *p = realloc(base, c * size);
    if (!p)
        bench_die("out of host memory");
    *cap = c;
    return p;
}

/* Tensor memory where the library reads it: device memory (cudaMalloc,
 * cudaMemcpy on the legacy stream), or host memory when `host` is set (the
 * CPU backend). Exit on failure; a size of 0 allocates 16 bytes on the
 * device. */
static inline void *bench_dev_alloc(int host, size_t bytes)
{
    if (host)
        return bench_xmalloc(bytes);
#ifdef FKV_WITH_CUDA
    void *p = NULL;
    BENCH_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 16));
    return p;
#else
    bench_die("internal: device memory without CUDA");
    return NULL;
#endif
}

static inline void bench_dev_free(int host, void *p)
{
    if (host) {
        free(p);
        return;
    }
#ifdef FKV_WITH_CUDA
    BENCH_CUDA_CHECK(cudaFree(p));
#endif
}

/* Copies between host memory and tensor memory: host to tensor when
 * to_dev, else back (on the device: after the legacy stream's work; wait
 * for other streams first). */
static inline void bench_dev_copy(int host, void *dst, const void *src,
                                  size_t bytes, int to_dev)
{
    if (host) {
        memcpy(dst, src, bytes);
        return;
    }
#ifdef FKV_WITH_CUDA
    BENCH_CUDA_CHECK(
        cudaMemcpy(dst, src, bytes,
                   to_dev ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost));
#else
    (void)to_dev;
#endif
}

static inline void bench_to_dev(int host, void *dst, const void *src,
                                size_t bytes)
{
    bench_dev_copy(host, dst, src, bytes, 1);
}

static inline void bench_to_host(int host, void *dst, const void *src,
                                 size_t bytes)
{
    bench_dev_copy(host, dst, src, bytes, 0);
}

/* ------------------------------------------------------------------------ */
/* Devices                                                                  */
/* ------------------------------------------------------------------------ */

/* What the benchmarks report of a device. */
typedef struct bench_device {
    char name[256];
    int sms;       /* streaming multiprocessors */
    double l2_mib; /* L2 cache */
} bench_device;

#ifdef FKV_WITH_CUDA
/* Why `device` cannot run the CUDA benchmarks (no device, no such device,
 * compute capability below 8.0), or NULL when it can: the library's own
 * check (lib/internal.h; the benchmarks link libfreekv.a), so that the
 * benchmarks skip exactly where FKV_BACKEND_AUTO would fall back. */
static inline const char *bench_cuda_unusable(int device)
{
    return fkvi_cuda_unavailable(device);
}

/* Makes `device` current and reads its name, SM count and L2 size. */
static inline void bench_device_open(int device, bench_device *d)
{
    struct cudaDeviceProp prop;
    int l2 = 0;
    memset(d, 0, sizeof *d);
    BENCH_CUDA_CHECK(cudaSetDevice(device));
    BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    snprintf(d->name, sizeof d->name, "%s", prop.name);
    BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
        &d->sms, cudaDevAttrMultiProcessorCount, device));
    BENCH_CUDA_CHECK(
        cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    d->l2_mib = (double)l2 / (1 << 20);
}
#endif

/* ------------------------------------------------------------------------ */
/* Time                                                                     */
/* ------------------------------------------------------------------------ */

/* Host clock in milliseconds: CLOCK_MONOTONIC where <time.h> declares it
 * (the program asked for POSIX), else monotonic where the C library offers
 * it through timespec_get, else UTC. */
static inline double bench_now_ms(void)
{
    struct timespec ts;
#if defined(CLOCK_MONOTONIC)
    clock_gettime(CLOCK_MONOTONIC, &ts);
#elif defined(TIME_MONOTONIC)
    if (timespec_get(&ts, TIME_MONOTONIC) == 0)
        timespec_get(&ts, TIME_UTC);
#else
    timespec_get(&ts, TIME_UTC);
#endif
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* The same clock in seconds. */
static inline double bench_now_s(void)
{
    return bench_now_ms() * 1e-3;
}

/* Times an interval of work either with a pair of CUDA events recorded on a
 * stream (device time of what the stream ran between them) or with the host
 * clock. init, then start/stop around the work, then elapsed (which waits
 * for the stop event), reusable; free at the end. */
typedef struct bench_timer {
    int use_cuda;
    void *stream; /* cudaStream_t */
    double t0, t1;
#ifdef FKV_WITH_CUDA
    cudaEvent_t start, stop;
#endif
} bench_timer;

/* use_cuda: time with events on `stream` (a cudaStream_t; requires a CUDA
 * build, else the host clock is used). */
static inline void bench_timer_init(bench_timer *t, int use_cuda, void *stream)
{
    memset(t, 0, sizeof *t);
#ifdef FKV_WITH_CUDA
    t->use_cuda = use_cuda;
    t->stream = stream;
    if (use_cuda) {
        BENCH_CUDA_CHECK(cudaEventCreate(&t->start));
        BENCH_CUDA_CHECK(cudaEventCreate(&t->stop));
    }
#else
    (void)use_cuda;
    (void)stream;
#endif
}

/* Marks the start (records the start event, and reads the host clock). */
static inline void bench_timer_start(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda)
        BENCH_CUDA_CHECK(
            cudaEventRecord(t->start, (cudaStream_t)t->stream));
#endif
    t->t0 = bench_now_ms();
}

/* Marks the end (records the stop event, and reads the host clock). Returns
 * the host milliseconds since start: on the CUDA path, the enqueue time. */
static inline double bench_timer_stop(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda)
        BENCH_CUDA_CHECK(cudaEventRecord(t->stop, (cudaStream_t)t->stream));
#endif
    t->t1 = bench_now_ms();
    return t->t1 - t->t0;
}

/* Milliseconds between start and stop: event time (waits for the stop
 * event) or host time. */
static inline double bench_timer_elapsed_ms(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda) {
        BENCH_CUDA_CHECK(cudaEventSynchronize(t->stop));
        return bench_event_ms(t->start, t->stop);
    }
#endif
    return t->t1 - t->t0;
}

/* Destroys the events. */
static inline void bench_timer_free(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda) {
        BENCH_CUDA_CHECK(cudaEventDestroy(t->start));
        BENCH_CUDA_CHECK(cudaEventDestroy(t->stop));
    }
#endif
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

static inline int bench_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The p-th percentile (0..100) of x[0..n), linear between order statistics;
 * NAN for n == 0. x is left unchanged. */
static inline double bench_percentile(const double *x, size_t n, double p)
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

/* The median of x[0..n); NAN for n == 0. */
static inline double bench_median(const double *x, size_t n)
{
    return bench_percentile(x, n, 50.0);
}

/* ------------------------------------------------------------------------ */
/* Random numbers: splitmix64, deterministic across platforms              */
/* ------------------------------------------------------------------------ */

typedef struct bench_rng {
    uint64_t state;
} bench_rng;

/* A generator from a seed; equal seeds give equal streams. (A bench_rng
 * initialised as {x} continues splitmix64 from the raw state x.) */
static inline bench_rng bench_rng_seed(uint64_t seed)
{
    bench_rng r = {seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull};
    return r;
}

/* The next 64 random bits. */
static inline uint64_t bench_rng_next(bench_rng *r)
{
    uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static inline double bench_rng_uniform(bench_rng *r)
{
    return (double)(bench_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* Uniform in [lo, hi). */
static inline double bench_rng_uniform_in(bench_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * bench_rng_uniform(r);
}

/* Uniform integer in [lo, hi] (hi >= lo). */
static inline int64_t bench_rng_int(bench_rng *r, int64_t lo, int64_t hi)
{
    return lo + (int64_t)(bench_rng_uniform(r) * (double)(hi - lo + 1));
}

/* Standard normal (Box-Muller). */
static inline double bench_rng_normal(bench_rng *r)
{
    double u1 = 1.0 - bench_rng_uniform(r); /* (0, 1] */
    double u2 = bench_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* ------------------------------------------------------------------------ */
/* Element types (round to nearest even, NaN kept quiet)                    */
/* ------------------------------------------------------------------------ */

/* float -> bfloat16 bits. */
static inline uint16_t bench_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* bfloat16 bits -> float (exact). */
static inline float bench_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float -> IEEE binary16 bits. */
static inline uint16_t bench_f32_to_f16(float f)
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

/* IEEE binary16 bits -> float (exact). */
static inline float bench_f16_to_f32(uint16_t h)
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

/* The cache dtypes: element size and name. */
static inline size_t bench_dtype_size(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? 4 : 2;
}

static inline const char *bench_dtype_name(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? "f32" : dt == FKV_DTYPE_F16 ? "f16" : "bf16";
}

/* Element i of an array of dtype dt: v stored into it (rounded), or read
 * out as float. */
static inline void bench_store_elem(fkv_dtype dt, void *base, size_t i,
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

static inline float bench_load_elem(fkv_dtype dt, const void *base, size_t i)
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

/* ------------------------------------------------------------------------ */
/* Names                                                                    */
/* ------------------------------------------------------------------------ */

static inline const char *bench_policy_name(fkv_policy p)
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

/* ------------------------------------------------------------------------ */
/* Parsing                                                                  */
/* ------------------------------------------------------------------------ */

/* Reads a base-10 integer at s (strtoll) and then an optional multiplier
 * suffix: k/K (x1024) when suffixes >= 1, m/M (x1048576) when suffixes >=
 * 2. Returns where it stopped, or NULL when s does not start with a
 * number. */
static inline const char *bench_scan_int(const char *s, int suffixes,
                                         long long *v)
{
    char *end = NULL;
    *v = strtoll(s, &end, 10);
    if (end == s)
        return NULL;
    if (suffixes >= 1 && (*end == 'k' || *end == 'K')) {
        *v *= 1024;
        end++;
    } else if (suffixes >= 2 && (*end == 'm' || *end == 'M')) {
        *v *= 1048576;
        end++;
    }
    return end;
}

/* All of s as an integer in [lo, hi] (no suffix): 0, or -1. */
static inline int bench_parse_int(const char *s, int lo, int hi, int *out)
{
    long long v;
    const char *end = bench_scan_int(s, 0, &v);
    if (!end || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

/* All of s as an integer with an optional k/K (x1024) suffix: 0, or -1
 * (also when it overflows). */
static inline int bench_parse_int64(const char *s, int64_t *out)
{
    long long v;
    const char *end;
    errno = 0;
    end = bench_scan_int(s, 1, &v);
    if (errno || !end || *end)
        return -1;
    *out = (int64_t)v;
    return 0;
}

/* Parses "a,b,c" (empty items skipped, as strtok does) into out[0..max),
 * each item as bench_parse_int in [lo, hi]; sets *n. Returns 0, or -1 on a
 * bad item, more than max items, none at all or a string of 256 bytes or
 * more. */
static inline int bench_parse_list(const char *s, int lo, int hi, int *out,
                                   int *n, int max)
{
    char buf[256];
    if (strlen(s) >= sizeof buf)
        return -1;
    strcpy(buf, s);
    *n = 0;
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) {
        if (*n >= max || bench_parse_int(t, lo, hi, &out[*n]) != 0)
            return -1;
        (*n)++;
    }
    return *n > 0 ? 0 : -1;
}

/* dst[0..count) = src[0..count), *n = count: a list's default. */
static inline void bench_set_list(int *dst, int *n, const int *src, int count)
{
    memcpy(dst, src, (size_t)count * sizeof *src);
    *n = count;
}

/* Parses "a,b,c" into out[0..max) and returns how many; each item is a
 * positive integer with an optional k/K (x1024) or m/M (x1048576) suffix.
 * Returns -1 on a malformed or non-positive item, or more than max items. */
static inline int bench_parse_int_list(const char *s, int64_t *out, int max)
{
    int n = 0;
    while (*s) {
        long long v;
        const char *end = bench_scan_int(s, 2, &v);
        if (!end)
            return -1;
        if (v <= 0 || n == max || (*end != ',' && *end != '\0'))
            return -1;
        out[n++] = (int64_t)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

/* ------------------------------------------------------------------------ */
/* Formatting                                                               */
/* ------------------------------------------------------------------------ */

/* v formatted with fmt (one double conversion), or "-" when v is NAN. */
static inline void bench_fmt(char *buf, size_t n, const char *fmt, double v)
{
    if (isnan(v))
        snprintf(buf, n, "-");
    else
        snprintf(buf, n, fmt, v);
}

/* ------------------------------------------------------------------------ */
/* Tables: add cells row by row, print with aligned columns                */
/* ------------------------------------------------------------------------ */

typedef struct bench_table {
    int cols;
    size_t cells, cap;
    char **cell; /* row-major */
} bench_table;

/* An empty table of `cols` columns. */
static inline void bench_table_init(bench_table *t, int cols)
{
    memset(t, 0, sizeof *t);
    t->cols = cols;
}

/* Appends the next cell (rows fill left to right), printf-formatted. */
static inline void bench_table_add(bench_table *t, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    t->cell = (char **)bench_grow(t->cell, &t->cap, t->cells, sizeof *t->cell);
    size_t len = strlen(buf) + 1;
    t->cell[t->cells] = (char *)bench_xmalloc(len);
    memcpy(t->cell[t->cells++], buf, len);
}

/* Prints the table to f: the first row is the header, followed by a rule;
 * the first column is left-aligned, the others right-aligned; columns are
 * separated by two spaces. A short last row is padded. */
static inline void bench_table_print(const bench_table *t, FILE *f)
{
    if (t->cols <= 0 || t->cells == 0)
        return;
    size_t *w = (size_t *)bench_xcalloc((size_t)t->cols, sizeof *w);
    size_t rows = (t->cells + (size_t)t->cols - 1) / (size_t)t->cols;
    for (size_t i = 0; i < t->cells; i++) {
        size_t l = strlen(t->cell[i]);
        if (l > w[i % (size_t)t->cols])
            w[i % (size_t)t->cols] = l;
    }
    size_t total = 0;
    for (int c = 0; c < t->cols; c++)
        total += w[c] + (c ? 2 : 0);
    for (size_t r = 0; r < rows; r++) {
        for (int c = 0; c < t->cols; c++) {
            size_t i = r * (size_t)t->cols + (size_t)c;
            const char *s = i < t->cells ? t->cell[i] : "";
            if (c == 0)
                fprintf(f, "%-*s", (int)w[c], s);
            else
                fprintf(f, "  %*s", (int)w[c], s);
        }
        fputc('\n', f);
        if (r == 0) {
            for (size_t k = 0; k < total; k++)
                fputc('-', f);
            fputc('\n', f);
        }
    }
    free(w);
}

/* Frees the cells. */
static inline void bench_table_free(bench_table *t)
{
    for (size_t i = 0; i < t->cells; i++)
        free(t->cell[i]);
    free(t->cell);
    memset(t, 0, sizeof *t);
}

#endif /* FKV_BENCH_H */
