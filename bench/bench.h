/*
 * bench.h: helpers shared by the libfreekv benchmarks (the programs in
 * bench/ and the workloads of bench/workload.h). Declarations only, with a
 * few one-line inline wrappers; the definitions are in bench/bench.c
 * (errors, memory, devices, time, names, parsing, formatting, tables) and
 * bench/bench_data.c (statistics, random numbers, element types). Every
 * bench program, and the unit tests that use bench/workload.h, link both.
 *
 *   errors      bench_die (prefix: bench_set_die_prefix, default
 *               "bench: "), BENCH_FKV_CHECK, BENCH_CUDA_CHECK
 *               (FKV_WITH_CUDA), BENCH_CUBLAS_CHECK (FKV_WITH_CUDA and
 *               BENCH_WITH_CUBLAS)
 *   memory      bench_xmalloc, bench_xcalloc, bench_grow; bench_dev_alloc /
 *               _free, bench_to_dev, bench_to_host (device memory, or host
 *               memory for the CPU backend)
 *   devices     bench_skip_without_cuda; bench_cuda_unusable,
 *               bench_device_open (FKV_WITH_CUDA)
 *   time        bench_now_ms / bench_now_s (monotonic host clock),
 *               bench_timer (CUDA events on a stream, or the host clock),
 *               bench_event_ms
 *   statistics  bench_median, bench_percentile
 *   random      bench_rng (splitmix64): uniform, uniform_in, int, normal
 *   dtypes      bench_f32_to_bf16 / bench_bf16_to_f32, f16 likewise;
 *               bench_dtype_size, bench_dtype_name, bench_store_elem,
 *               bench_load_elem
 *   names       bench_policy_name
 *   parsing     bench_parse_int, bench_parse_int64, bench_parse_list,
 *               bench_set_list, bench_parse_int_list ("8192,32K,128k"),
 *               bench_parse_policies, bench_parse_double
 *   formatting  bench_fmt (a number, or "-" for NAN)
 *   tables      bench_table: collect cells, print aligned columns
 *
 * A program may define, before it includes this header, BENCH_WITH_CUBLAS
 * to get BENCH_CUBLAS_CHECK (includes cublas_v2.h).
 *
 * The names are a contract between the bench programs: add, never rename.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_BENCH_H
#define FKV_BENCH_H

/* The C headers the bench programs have always had from here. */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "freekv.h"

#ifdef FKV_WITH_CUDA
#include <cuda_runtime_api.h>
#ifdef BENCH_WITH_CUBLAS
#include <cublas_v2.h>
#endif
#endif

/* ------------------------------------------------------------------------ */
/* Errors and memory                                                        */
/* ------------------------------------------------------------------------ */

/* What bench_die and the checks print before a message (default
 * "bench: "); the string must outlive the program's last bench_die. */
void bench_set_die_prefix(const char *prefix);

/* Prints the prefix and the formatted message to stderr and exits with
 * status 1. */
#if defined(__GNUC__)
__attribute__((noreturn, format(printf, 1, 2)))
#endif
void bench_die(const char *fmt, ...);

/* Exits with the status, its string and the handle's (NULL: the thread's)
 * last error when st is not FKV_OK. Use through BENCH_FKV_CHECK. */
void bench_fkv_check(fkv_status st, const fkv_cache *cache, const char *what,
                     const char *file, int line);
/* BENCH_FKV_CHECK(cache, fkv_call(...)): checks a libfreekv call. */
#define BENCH_FKV_CHECK(cache, call)                                         \
    bench_fkv_check((call), (cache), #call, __FILE__, __LINE__)

#ifdef FKV_WITH_CUDA
/* Exits with the CUDA error's name and string when e is not cudaSuccess. */
void bench_cuda_check(cudaError_t e, const char *what, const char *file,
                      int line);
/* BENCH_CUDA_CHECK(cudaCall(...)): checks a CUDA runtime call. */
#define BENCH_CUDA_CHECK(call)                                               \
    bench_cuda_check((call), #call, __FILE__, __LINE__)

/* Milliseconds between two recorded events (not waiting for them). */
double bench_event_ms(cudaEvent_t a, cudaEvent_t b);

#ifdef BENCH_WITH_CUBLAS
/* Exits with the cuBLAS status and its string when s is not success
 * (inline: only the programs that link cuBLAS see it). */
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
void *bench_xmalloc(size_t bytes);
/* calloc that exits on failure. */
void *bench_xcalloc(size_t n, size_t size);
/* Room for element n of a growing array of `size`-byte elements at base,
 * which has room for *cap: base itself, or base reallocated with twice the
 * room (64 elements at first). Exits when out of memory. */
void *bench_grow(void *base, size_t *cap, size_t n, size_t size);

/* Tensor memory where the library reads it: device memory (cudaMalloc,
 * cudaMemcpy on the legacy stream), or host memory when `host` is set (the
 * CPU backend). Exit on failure; a size of 0 allocates 16 bytes on the
 * device. */
void *bench_dev_alloc(int host, size_t bytes);
void bench_dev_free(int host, void *p);
/* Copies between host memory and tensor memory: host to tensor when
 * to_dev, else back (on the device: after the legacy stream's work; wait
 * for other streams first). */
void bench_dev_copy(int host, void *dst, const void *src, size_t bytes,
                    int to_dev);

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

/* Whether program `prog` cannot run on CUDA `device` (no device, too old,
 * or built with CUDA=0): then prints "PROG: skipped (no CUDA device:
 * why)", sets *rc to the exit code (0 with --smoke, which CI runs without
 * a GPU, else 1) and returns 1; else returns 0. */
int bench_skip_without_cuda(const char *prog, int device, int smoke, int *rc);

#ifdef FKV_WITH_CUDA
/* Why `device` cannot run the CUDA benchmarks (no device, no such device,
 * compute capability below 8.0), or NULL when it can: the library's own
 * check (lib/internal.h; the benchmarks link libfreekv.a), so that the
 * benchmarks skip exactly where FKV_BACKEND_AUTO would fall back. */
const char *bench_cuda_unusable(int device);
/* Makes `device` current and reads its name, SM count and L2 size. */
void bench_device_open(int device, bench_device *d);
#endif

/* ------------------------------------------------------------------------ */
/* Time                                                                     */
/* ------------------------------------------------------------------------ */

/* Host clock in milliseconds (CLOCK_MONOTONIC). */
double bench_now_ms(void);
/* The same clock in seconds. */
double bench_now_s(void);

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
void bench_timer_init(bench_timer *t, int use_cuda, void *stream);
/* Marks the start (records the start event, and reads the host clock). */
void bench_timer_start(bench_timer *t);
/* Marks the end (records the stop event, and reads the host clock). Returns
 * the host milliseconds since start: on the CUDA path, the enqueue time. */
double bench_timer_stop(bench_timer *t);
/* Milliseconds between start and stop: event time (waits for the stop
 * event) or host time. */
double bench_timer_elapsed_ms(bench_timer *t);
/* Destroys the events. */
void bench_timer_free(bench_timer *t);

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

/* qsort comparison of doubles, ascending. */
int bench_cmp_double(const void *a, const void *b);
/* The p-th percentile (0..100) of x[0..n), linear between order statistics;
 * NAN for n == 0. x is left unchanged. */
double bench_percentile(const double *x, size_t n, double p);
/* The median of x[0..n); NAN for n == 0. */
double bench_median(const double *x, size_t n);

/* ------------------------------------------------------------------------ */
/* Random numbers: splitmix64, deterministic across platforms              */
/* ------------------------------------------------------------------------ */

typedef struct bench_rng {
    uint64_t state;
} bench_rng;

/* A generator from a seed; equal seeds give equal streams. (A bench_rng
 * initialised as {x} continues splitmix64 from the raw state x.) */
bench_rng bench_rng_seed(uint64_t seed);
/* The next 64 random bits. */
uint64_t bench_rng_next(bench_rng *r);
/* Uniform in [0, 1). */
double bench_rng_uniform(bench_rng *r);
/* Uniform in [lo, hi). */
double bench_rng_uniform_in(bench_rng *r, double lo, double hi);
/* Uniform integer in [lo, hi] (hi >= lo). */
int64_t bench_rng_int(bench_rng *r, int64_t lo, int64_t hi);
/* Standard normal (Box-Muller). */
double bench_rng_normal(bench_rng *r);

/* ------------------------------------------------------------------------ */
/* Element types (round to nearest even, NaN kept quiet)                    */
/* ------------------------------------------------------------------------ */

uint16_t bench_f32_to_bf16(float f);  /* float -> bfloat16 bits */
float bench_bf16_to_f32(uint16_t h);  /* bfloat16 bits -> float (exact) */
uint16_t bench_f32_to_f16(float f);   /* float -> IEEE binary16 bits */
float bench_f16_to_f32(uint16_t h);   /* IEEE binary16 bits -> float */

/* The cache dtypes: element size and name. */
size_t bench_dtype_size(fkv_dtype dt);
const char *bench_dtype_name(fkv_dtype dt);
/* Element i of an array of dtype dt: v stored into it (rounded), or read
 * out as float. */
void bench_store_elem(fkv_dtype dt, void *base, size_t i, float v);
float bench_load_elem(fkv_dtype dt, const void *base, size_t i);

/* ------------------------------------------------------------------------ */
/* Names and parsing                                                        */
/* ------------------------------------------------------------------------ */

const char *bench_policy_name(fkv_policy p);

/* Reads a base-10 integer at s (strtoll) and then an optional multiplier
 * suffix: k/K (x1024) when suffixes >= 1, m/M (x1048576) when suffixes >=
 * 2. Returns where it stopped, or NULL when s does not start with a
 * number. */
const char *bench_scan_int(const char *s, int suffixes, long long *v);
/* All of s as an integer in [lo, hi] (no suffix): 0, or -1. */
int bench_parse_int(const char *s, int lo, int hi, int *out);
/* All of s as an integer with an optional k/K (x1024) suffix: 0, or -1
 * (also when it overflows). */
int bench_parse_int64(const char *s, int64_t *out);
/* All of s as a finite-or-infinite number (strtod, no NaN): 0, or -1. */
int bench_parse_double(const char *s, double *out);
/* Parses "a,b,c" (empty items skipped, as strtok does) into out[0..max),
 * each item as bench_parse_int in [lo, hi]; sets *n. Returns 0, or -1 on a
 * bad item, more than max items, none at all or a string of 256 bytes or
 * more. */
int bench_parse_list(const char *s, int lo, int hi, int *out, int *n,
                     int max);
/* dst[0..count) = src[0..count), *n = count: a list's default. */
void bench_set_list(int *dst, int *n, const int *src, int count);
/* Parses "a,b,c" into out[0..max) and returns how many; each item is a
 * positive integer with an optional k/K (x1024) or m/M (x1048576) suffix.
 * Returns -1 on a malformed or non-positive item, or more than max items. */
int bench_parse_int_list(const char *s, int64_t *out, int max);
/* Parses "FREEKV,sync,..." (any case; FREEKV, SYNC, RESIDENT, DENSE, each
 * at most once) into out[0..max) and returns how many, or -1. */
int bench_parse_policies(const char *s, fkv_policy *out, int max);

/* ------------------------------------------------------------------------ */
/* Formatting and tables                                                    */
/* ------------------------------------------------------------------------ */

/* v formatted with fmt (one double conversion), or "-" when v is NAN. */
void bench_fmt(char *buf, size_t n, const char *fmt, double v);

typedef struct bench_table {
    int cols;
    size_t cells, cap;
    char **cell; /* row-major */
} bench_table;

/* An empty table of `cols` columns. */
void bench_table_init(bench_table *t, int cols);
/* Appends the next cell (rows fill left to right), printf-formatted. */
#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
void bench_table_add(bench_table *t, const char *fmt, ...);
/* Prints the table to f: the first row is the header, followed by a rule;
 * the first column is left-aligned, the others right-aligned; columns are
 * separated by two spaces. A short last row is padded. */
void bench_table_print(const bench_table *t, FILE *f);
/* Frees the cells. */
void bench_table_free(bench_table *t);

#endif /* FKV_BENCH_H */
