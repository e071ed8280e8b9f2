/*
 * bench.c: the benchmarks' errors, memory, devices, time, names, parsing,
 * formatting and tables (declared and documented in bench/bench.h).
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L /* CLOCK_MONOTONIC */
#include "bench.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef FKV_WITH_CUDA
#include "internal.h" /* fkvi_cuda_unavailable */
#endif

/* ------------------------------------------------------------------------ */
/* Errors and memory                                                        */
/* ------------------------------------------------------------------------ */

static const char *die_prefix = "bench: ";

void bench_set_die_prefix(const char *prefix)
{
    die_prefix = prefix ? prefix : "";
}

void bench_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(die_prefix, stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

void bench_fkv_check(fkv_status st, const fkv_cache *cache,
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

#ifdef FKV_WITH_CUDA
void bench_cuda_check(cudaError_t e, const char *what,
                                    const char *file, int line)
{
    if (e == cudaSuccess)
        return;
    bench_die("%s:%d: %s failed: %s (%s)", file, line, what,
              cudaGetErrorString(e), cudaGetErrorName(e));
}

double bench_event_ms(cudaEvent_t a, cudaEvent_t b)
{
    float ms = 0.0f;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return (double)ms;
}
#endif

void *bench_xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        bench_die("out of host memory (%zu bytes)", bytes);
    return p;
}

void *bench_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        bench_die("out of host memory (%zu x %zu bytes)", n, size);
    return p;
}

void *bench_grow(void *base, size_t *cap, size_t n, size_t size)
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

void *bench_dev_alloc(int host, size_t bytes)
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

void bench_dev_free(int host, void *p)
{
    if (host) {
        free(p);
        return;
    }
#ifdef FKV_WITH_CUDA
    BENCH_CUDA_CHECK(cudaFree(p));
#endif
}

void bench_dev_copy(int host, void *dst, const void *src,
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

/* ------------------------------------------------------------------------ */
/* Devices                                                                  */
/* ------------------------------------------------------------------------ */

int bench_skip_without_cuda(const char *prog, int device, int smoke, int *rc)
{
#ifdef FKV_WITH_CUDA
    const char *why = bench_cuda_unusable(device);
#else
    const char *why = "built without CUDA, CUDA=0";
    (void)device;
#endif
    if (!why)
        return 0;
    printf("%s: skipped (no CUDA device: %s)\n", prog, why);
    *rc = smoke ? 0 : 1;
    return 1;
}

#ifdef FKV_WITH_CUDA
const char *bench_cuda_unusable(int device)
{
    return fkvi_cuda_unavailable(device);
}

void bench_device_open(int device, bench_device *d)
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

double bench_now_ms(void)
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

double bench_now_s(void)
{
    return bench_now_ms() * 1e-3;
}

void bench_timer_init(bench_timer *t, int use_cuda, void *stream)
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

void bench_timer_start(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda)
        BENCH_CUDA_CHECK(
            cudaEventRecord(t->start, (cudaStream_t)t->stream));
#endif
    t->t0 = bench_now_ms();
}

double bench_timer_stop(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda)
        BENCH_CUDA_CHECK(cudaEventRecord(t->stop, (cudaStream_t)t->stream));
#endif
    t->t1 = bench_now_ms();
    return t->t1 - t->t0;
}

double bench_timer_elapsed_ms(bench_timer *t)
{
#ifdef FKV_WITH_CUDA
    if (t->use_cuda) {
        BENCH_CUDA_CHECK(cudaEventSynchronize(t->stop));
        return bench_event_ms(t->start, t->stop);
    }
#endif
    return t->t1 - t->t0;
}

void bench_timer_free(bench_timer *t)
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
/* Names and parsing                                                        */
/* ------------------------------------------------------------------------ */

const char *bench_policy_name(fkv_policy p)
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

const char *bench_scan_int(const char *s, int suffixes,
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

int bench_parse_int(const char *s, int lo, int hi, int *out)
{
    long long v;
    const char *end = bench_scan_int(s, 0, &v);
    if (!end || *end || v < lo || v > hi)
        return -1;
    *out = (int)v;
    return 0;
}

int bench_parse_int64(const char *s, int64_t *out)
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

int bench_parse_double(const char *s, double *out)
{
    char *end = NULL;
    double x = strtod(s, &end);
    if (end == s || *end != '\0' || x != x)
        return -1;
    *out = x;
    return 0;
}

int bench_parse_list(const char *s, int lo, int hi, int *out,
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

void bench_set_list(int *dst, int *n, const int *src, int count)
{
    memcpy(dst, src, (size_t)count * sizeof *src);
    *n = count;
}

int bench_parse_int_list(const char *s, int64_t *out, int max)
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

int bench_parse_policies(const char *s, fkv_policy *out, int max)
{
    static const fkv_policy known[] = {FKV_POLICY_FREEKV, FKV_POLICY_SYNC,
                                       FKV_POLICY_RESIDENT, FKV_POLICY_DENSE};
    int n = 0;
    while (*s) {
        char word[32];
        size_t len = strcspn(s, ",");
        if (len == 0 || len >= sizeof word)
            return -1;
        for (size_t i = 0; i < len; i++)
            word[i] = (char)toupper((unsigned char)s[i]);
        word[len] = '\0';
        int found = -1;
        for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
            if (!strcmp(word, bench_policy_name(known[k])))
                found = (int)k;
        if (found < 0)
            return -1;
        for (int i = 0; i < n; i++)
            if (out[i] == known[found])
                return -1;
        if (n == max)
            return -1;
        out[n++] = known[found];
        s += len;
        if (*s == ',')
            s++;
    }
    return n > 0 ? n : -1;
}

/* ------------------------------------------------------------------------ */
/* Formatting and tables                                                    */
/* ------------------------------------------------------------------------ */

void bench_fmt(char *buf, size_t n, const char *fmt, double v)
{
    if (isnan(v))
        snprintf(buf, n, "-");
    else
        snprintf(buf, n, fmt, v);
}

void bench_table_init(bench_table *t, int cols)
{
    memset(t, 0, sizeof *t);
    t->cols = cols;
}

void bench_table_add(bench_table *t, const char *fmt, ...)
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

void bench_table_print(const bench_table *t, FILE *f)
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

void bench_table_free(bench_table *t)
{
    for (size_t i = 0; i < t->cells; i++)
        free(t->cell[i]);
    free(t->cell);
    memset(t, 0, sizeof *t);
}
