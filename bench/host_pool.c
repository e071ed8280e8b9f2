/*
 * bench/host_pool: what the host pool's pinned memory costs to get. FREEKV
 * and SYNC caches grow their pool in chunks of cudaHostAlloc(mapped,
 * portable) memory while a prompt is appended (lib/pool.c, 32 MiB chunks);
 * on the H200 machine a 32K-token prefill at batch 8 ran at about 2 GB/s
 * where RESIDENT's took 0.1 s (docs/benchmarks.md). This separates the
 * allocation from the appends' writes (which bench/decode --reserve times).
 *
 * In this order, each pass over --total-mib MiB (default 4096):
 *   touch      malloc + memset of fresh memory, freed (what first use of the
 *              machine's memory costs without pinning);
 *   alloc C    cudaHostAlloc(mapped | portable) in chunks of C MiB, as the
 *              pool does, for each C of --chunks-mib (default 32,256,1024),
 *              then cudaFreeHost; each C twice (the second pass finds the
 *              memory the first one gave back);
 *   register   posix_memalign'd chunks of each size, cudaHostRegister(mapped
 *              | portable) untouched (the registration faults the pages
 *              in), then touched first (the touch timed apart), then
 *              unregistered and freed.
 * GB/s is the pass's bytes over its wall time (host clock, one pass each:
 * these are seconds, not microseconds). --smoke: 64 MiB, chunks 4,16 MiB.
 *
 *   make bench && build/bench/host_pool --csv host_pool.csv
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include "bench.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIZES 8

typedef struct config {
    int smoke, device;
    int64_t total_mib;
    int64_t chunks_mib[MAX_SIZES];
    int n_chunks;
    const char *csv;
} config;

static const char k_usage[] =
    "usage: host_pool [--smoke] [--csv FILE] [--device N] [--total-mib N]\n"
    "                 [--chunks-mib 32,256,1024]\n"
    "  --total-mib: MiB per pass, default 4096\n"
    "  --chunks-mib: chunk sizes of the cudaHostAlloc and cudaHostRegister\n"
    "                passes, default 32,256,1024\n"
    "  --smoke: 64 MiB, chunks 4,16\n";

static void parse_args(int argc, char **argv, config *c)
{
    memset(c, 0, sizeof *c);
    c->total_mib = 4096;
    c->chunks_mib[0] = 32;
    c->chunks_mib[1] = 256;
    c->chunks_mib[2] = 1024;
    c->n_chunks = 3;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke")) {
            c->smoke = 1;
            c->total_mib = 64;
            c->chunks_mib[0] = 4;
            c->chunks_mib[1] = 16;
            c->n_chunks = 2;
        }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--smoke"))
            continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(k_usage, stdout);
            exit(0);
        }
        if (!v)
            bench_die("%s needs a value (or unknown flag)\n%s", a, k_usage);
        i++;
        if (!strcmp(a, "--csv"))
            c->csv = v;
        else if (!strcmp(a, "--device"))
            c->device = atoi(v);
        else if (!strcmp(a, "--total-mib")) {
            c->total_mib = atoll(v);
            if (c->total_mib < 1)
                bench_die("--total-mib must be at least 1");
        } else if (!strcmp(a, "--chunks-mib")) {
            c->n_chunks = 0;
            for (const char *p = v; *p;) {
                char *end;
                long long x = strtoll(p, &end, 10);
                if (end == p || x < 1 || c->n_chunks == MAX_SIZES)
                    bench_die("--chunks-mib: a list of up to %d sizes >= 1",
                              MAX_SIZES);
                c->chunks_mib[c->n_chunks++] = x;
                p = *end == ',' ? end + 1 : end;
            }
        } else
            bench_die("unknown flag %s\n%s", a, k_usage);
    }
}

#ifdef FKV_WITH_CUDA
static FILE *g_csv;

static void report(const char *pass, int64_t chunk_mib, int64_t total_mib,
                   double s)
{
    const double gbs = (double)total_mib * 1048576.0 / s * 1e-9;
    char chunk[32] = "-";
    if (chunk_mib > 0)
        snprintf(chunk, sizeof chunk, "%lld", (long long)chunk_mib);
    printf("%-22s %10s %10lld %10.3f %10.2f\n", pass, chunk,
           (long long)total_mib, s, gbs);
    fflush(stdout);
    if (g_csv)
        fprintf(g_csv, "%s,%s,%lld,%.6f,%.4f\n", pass, chunk,
                (long long)total_mib, s, gbs);
}

static void *touched(size_t bytes)
{
    char *p = bench_xmalloc(bytes);
    memset(p, 1, bytes);
    return p;
}

static void pass_touch(const config *c)
{
    const size_t bytes = (size_t)c->total_mib << 20;
    const double t0 = bench_now_s();
    void *p = touched(bytes);
    const double s = bench_now_s() - t0;
    free(p);
    report("touch", 0, c->total_mib, s);
}

static void pass_alloc(const config *c, int64_t chunk_mib, const char *name)
{
    const size_t chunk = (size_t)chunk_mib << 20;
    const int64_t n = (c->total_mib + chunk_mib - 1) / chunk_mib;
    void **chunks = bench_xcalloc((size_t)n, sizeof *chunks);
    const double t0 = bench_now_s();
    for (int64_t i = 0; i < n; i++)
        BENCH_CUDA_CHECK(cudaHostAlloc(&chunks[i], chunk,
                                       cudaHostAllocMapped |
                                           cudaHostAllocPortable));
    const double s = bench_now_s() - t0;
    for (int64_t i = 0; i < n; i++)
        BENCH_CUDA_CHECK(cudaFreeHost(chunks[i]));
    free(chunks);
    report(name, chunk_mib, n * chunk_mib, s);
}

/* cudaHostRegister(mapped | portable) of malloc'd memory in chunks of
 * chunk_mib: touched first (timed apart, "touch" then "register (touched)"),
 * or not ("register" alone, which faults the pages in itself). */
static void pass_register(const config *c, int64_t chunk_mib, int touch)
{
    const size_t chunk = (size_t)chunk_mib << 20;
    const int64_t n = (c->total_mib + chunk_mib - 1) / chunk_mib;
    void **chunks = bench_xcalloc((size_t)n, sizeof *chunks);
    double t0 = bench_now_s();
    for (int64_t i = 0; i < n; i++) {
        if (posix_memalign(&chunks[i], 4096, chunk))
            bench_die("posix_memalign of %zu bytes failed", chunk);
        if (touch)
            memset(chunks[i], 1, chunk);
    }
    if (touch)
        report("touch (again)", chunk_mib, n * chunk_mib, bench_now_s() - t0);
    t0 = bench_now_s();
    for (int64_t i = 0; i < n; i++)
        BENCH_CUDA_CHECK(cudaHostRegister(chunks[i], chunk,
                                          cudaHostRegisterMapped |
                                              cudaHostRegisterPortable));
    const double s = bench_now_s() - t0;
    for (int64_t i = 0; i < n; i++) {
        BENCH_CUDA_CHECK(cudaHostUnregister(chunks[i]));
        free(chunks[i]);
    }
    free(chunks);
    report(touch ? "register (touched)" : "register (untouched)", chunk_mib,
           n * chunk_mib, s);
}
#endif

int main(int argc, char **argv)
{
    config c;
    int rc = 0;
    bench_set_die_prefix("host_pool");
    parse_args(argc, argv, &c);
    if (bench_skip_without_cuda("host_pool", c.device, c.smoke, &rc))
        return rc;
#ifdef FKV_WITH_CUDA
    bench_device dev;
    bench_device_open(c.device, &dev);
    if (c.csv) {
        g_csv = fopen(c.csv, "w");
        if (!g_csv)
            bench_die("cannot write %s", c.csv);
        fputs("pass,chunk_mib,total_mib,seconds,gb_per_s\n", g_csv);
    }
    BENCH_CUDA_CHECK(cudaFree(0)); /* the context, outside the timings */
    printf("host_pool: %s, %lld MiB per pass\n", dev.name,
           (long long)c.total_mib);
    printf("%-22s %10s %10s %10s %10s\n", "pass", "chunk MiB", "MiB",
           "seconds", "GB/s");
    pass_touch(&c);
    for (int i = 0; i < c.n_chunks; i++) {
        char name[32];
        snprintf(name, sizeof name, "alloc (first)");
        pass_alloc(&c, c.chunks_mib[i], name);
        snprintf(name, sizeof name, "alloc (again)");
        pass_alloc(&c, c.chunks_mib[i], name);
    }
    for (int i = 0; i < c.n_chunks; i++) {
        pass_register(&c, c.chunks_mib[i], 0);
        pass_register(&c, c.chunks_mib[i], 1);
    }
    if (g_csv)
        fclose(g_csv);
#endif
    return rc;
}
