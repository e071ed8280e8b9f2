/*
 * bench/mapped_probe: probes the recall redesign depends on (issue 14, item
 * 5). Can SM-driven copies read pinned mapped host memory
 * (cudaHostAllocMapped) correctly, how many GB/s do they reach with 1 to 32
 * blocks, and how much do they slow the engine's GEMMs running beside them?
 *
 * The source is a mapped host buffer of --mib MiB (default 64) in 16 KiB
 * chunks, filled with splitmix64 of the 64-bit word index. The destination
 * is device memory. Each copy is a gather, the way a recall of pages is:
 * destination chunk c comes from source chunk perm[c], perm a random
 * permutation in device memory. Variants, one kernel each (grid-stride over
 * the chunks by block):
 *
 *   ld        512 threads, each with eight 16-byte loads in flight (64 KiB
 *             per block), then the eight stores;
 *   cp.async  512 threads, 16-byte cp.async.cg into an 8-stage ring of 8 KiB
 *             stages in shared memory (64 KiB), each thread storing the
 *             slots it filled itself;
 *   bulk4,    TMA 1D bulk copies (sm_90): one warp per block whose lane 0
 *   bulk8     copies a whole chunk into one of 4 or 8 stages of shared
 *             memory (64 or 128 KiB; one mbarrier per stage) and writes it
 *             out with a bulk store. "unsupported" before sm_90.
 *
 * and two reference rows, which run first: one cudaMemcpyAsync of the
 * whole (contiguous) source, and one cudaMemcpyAsync per 16 KiB chunk of
 * the gather. --variants picks some (a bulk copy that faults loses the CUDA
 * context and ends the run; one whose mbarrier never completes gives up
 * after 2 s and is reported as a failed check).
 *
 *   alone    every variant and block count (--blocks, default
 *            1,2,4,8,16,32): one run checked byte for byte against the
 *            expected gather (ok/FAIL), then 3 warm-ups and the median of
 *            15 runs timed with CUDA events; GB/s = bytes / time, 1e9 bytes;
 *   gemm     cuBLAS bf16 GEMMs of --layers (default 8) Llama-3.1-8B layers
 *            (QKV 4096x6144, O 4096x4096, gate+up 4096x28672, down
 *            14336x4096; bench/recall (d)'s model) at batch 1 and 8 on a
 *            highest-priority stream: median of 10 passes alone, then for
 *            every variant a gather of enough passes over the source to last
 *            at least twice the GEMM pass (from its time alone) launched on a
 *            lowest-priority stream just before the GEMM pass: GEMM time
 *            beside it, slowdown (beside / alone) and the gather's own GB/s
 *            over its whole run (its events), median of 5 such pairs. The
 *            per-chunk cudaMemcpyAsync row is not run here: enqueuing it
 *            takes longer than it runs, so it would not overlap the GEMMs
 *            (bench/recall (d) runs it beside them from a feeder thread);
 *   summary  per variant: the fewest blocks that reach 45 GB/s alone, and
 *            their GEMM slowdown at batch 1 and 8.
 *
 * Rows print as they finish. Exits 1 when a check failed. --csv FILE writes
 * every row (section,variant,blocks,batch,gbps,us,gemm_ms,slowdown,ok; in
 * the gemm section gbps and us are the gather's while beside the GEMMs, us
 * its whole run). --smoke: 4 MiB, blocks 1 and 4, one GEMM layer, few
 * repetitions. Without a usable CUDA device it prints one "skipped" line and
 * exits 0 with --smoke, 1 without.
 *
 *   make bench && build/bench/mapped_probe --csv probe.csv
 *
 * SPDX-License-Identifier: MIT
 */
#define BENCH_WITH_CUBLAS

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* bench.h's C headers are included above, outside the C linkage block */
extern "C" {
#include "bench.h" /* C declarations; bench.c is compiled as C */
}
#include "bulk_copy.cuh"  /* the library's TMA bulk-copy wrappers */
#include "gemm_model.h"   /* the GEMM stand-ins bench/recall uses too */

#define CHUNK 16384                /* bytes: one page unit of the recall */
#define CHUNK_U4 (CHUNK / 16)      /* uint4 per chunk */
#define LD_THREADS 512
#define LD_INFLIGHT 8              /* 16-byte loads in flight per thread */
#define LD_GROUP (LD_INFLIGHT * LD_THREADS / CHUNK_U4) /* chunks per round */
#define CPA_THREADS 512
#define CPA_NSTAGE 8
#define CPA_SMEM (CPA_NSTAGE * CPA_THREADS * 16) /* 64 KiB */
#define MAX_BLOCKS 16              /* entries of --blocks */

static_assert(LD_THREADS * 2 == CHUNK_U4, "ld: two loads cover a chunk");
static_assert(CPA_THREADS * 2 == CHUNK_U4, "cp.async: two stages per chunk");

/* ------------------------------------------------------------------------ */
/* Kernels                                                                  */
/* ------------------------------------------------------------------------ */

/* Global state-space address of a generic pointer (cp.async and the bulk
 * copies take .global operands; a mapped host pointer is one too). */
__device__ __forceinline__ uint64_t gaddr(const void *p)
{
    uint64_t g;
    asm("cvta.to.global.u64 %0, %1;" : "=l"(g) : "l"(p));
    return g;
}

__device__ __forceinline__ uint32_t saddr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* Source chunk of gather item j (items run over `passes` passes of the
 * nchunks destination chunks). */
__device__ __forceinline__ int src_chunk(const int *__restrict__ perm,
                                         int64_t j, int64_t nchunks)
{
    return __ldg(perm + j % nchunks);
}

/* ld: a block takes LD_GROUP consecutive items per round; thread t's load u
 * is uint4 (u & 1) * 512 + t of item u / 2, so every load is coalesced and
 * all eight are issued before the first store needs its data. The perm
 * entries of the block's next round are read one round ahead, so their
 * latency hides behind this round's host reads. */
__global__ void __launch_bounds__(LD_THREADS)
    k_ld(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
         const int *__restrict__ perm, int64_t nchunks, int64_t total)
{
    const int t = threadIdx.x;
    const int64_t groups = (total + LD_GROUP - 1) / LD_GROUP;
    int64_t g = blockIdx.x;
    int pn[LD_GROUP];
#pragma unroll
    for (int q = 0; q < LD_GROUP; q++) {
        const int64_t j = g * LD_GROUP + q;
        pn[q] = j < total ? src_chunk(perm, j, nchunks) : 0;
    }
    for (; g < groups; g += gridDim.x) {
        int pc[LD_GROUP];
        const int64_t gn = g + gridDim.x;
#pragma unroll
        for (int q = 0; q < LD_GROUP; q++) {
            pc[q] = pn[q];
            const int64_t j = gn * LD_GROUP + q;
            pn[q] = j < total ? src_chunk(perm, j, nchunks) : 0;
        }
        uint4 r[LD_INFLIGHT];
#pragma unroll
        for (int u = 0; u < LD_INFLIGHT; u++) {
            const int64_t j = g * LD_GROUP + (u >> 1);
            r[u] = make_uint4(0, 0, 0, 0);
            /* streaming: each source byte is read once per pass */
            if (j < total)
                r[u] = __ldcs(src + (int64_t)pc[u >> 1] * CHUNK_U4 +
                              (u & 1) * LD_THREADS + t);
        }
#pragma unroll
        for (int u = 0; u < LD_INFLIGHT; u++) {
            const int64_t j = g * LD_GROUP + (u >> 1);
            if (j < total)
                dst[(j % nchunks) * CHUNK_U4 + (u & 1) * LD_THREADS + t] =
                    r[u];
        }
    }
}

__device__ __forceinline__ void cp_async16(uint32_t s, const void *g)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s),
                 "l"(gaddr(g))
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;" ::: "memory");
}

/* Waits until at most N of this thread's groups are pending. */
template <int N> __device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* cp.async: the block's items are b, b + G, ...; each is two units (halves
 * of 8 KiB, one stage each), unit i of the block = half i & 1 of its item
 * i >> 1. Thread t copies uint4 t of every unit into slot t of the unit's
 * stage and later stores that slot itself, so the ring needs no
 * __syncthreads: cp.async.wait_group makes a thread's own copies visible to
 * it. One group is committed per unit (empty ones too), so waiting for all
 * but NSTAGE - 1 groups always means unit i has landed. */
__global__ void __launch_bounds__(CPA_THREADS)
    k_cpasync(const uint4 *__restrict__ src, uint4 *__restrict__ dst,
              const int *__restrict__ perm, int64_t nchunks, int64_t total)
{
    extern __shared__ uint4 ring[]; /* CPA_NSTAGE x CPA_THREADS */
    const int t = threadIdx.x;
    const int64_t b = blockIdx.x, G = gridDim.x;
    const int64_t items = b < total ? (total - 1 - b) / G + 1 : 0;
    const int64_t n = 2 * items;
    const uint32_t ring_s = saddr(ring + t);
#define CPA_PERM(i)                                                          \
    ((i) < n ? src_chunk(perm, b + ((i) >> 1) * G, nchunks) : 0)
#define CPA_SRC(i, p)                                                        \
    (src + (int64_t)(p) * CHUNK_U4 + ((i) & 1) * CPA_THREADS + t)
#pragma unroll
    for (int s = 0; s < CPA_NSTAGE; s++) {
        if (s < n)
            cp_async16(ring_s + s * CPA_THREADS * 16, CPA_SRC(s, CPA_PERM(s)));
        cp_async_commit();
    }
    /* the perm entry of the next refill, read one unit ahead */
    int pnext = CPA_PERM((int64_t)CPA_NSTAGE);
    for (int64_t i = 0; i < n; i++) {
        const int p = pnext;
        pnext = CPA_PERM(i + CPA_NSTAGE + 1);
        cp_async_wait<CPA_NSTAGE - 1>();
        const int s = (int)(i % CPA_NSTAGE);
        const uint4 v = ring[s * CPA_THREADS + t];
        const int64_t j = b + (i >> 1) * G;
        dst[(j % nchunks) * CHUNK_U4 + (i & 1) * CPA_THREADS + t] = v;
        /* The refill of slot s comes after the store that needs the slot's
         * old value (in-order issue; the asm's memory clobber keeps the
         * compiler from hoisting it). */
        if (i + CPA_NSTAGE < n)
            cp_async16(ring_s + s * CPA_THREADS * 16,
                       CPA_SRC(i + CPA_NSTAGE, p));
        cp_async_commit();
    }
#undef CPA_PERM
#undef CPA_SRC
}

/* Shared memory of the bulk kernel: NS stages of a chunk, then NS
 * mbarriers. */
static constexpr size_t bulk_smem(int ns)
{
    return (size_t)ns * CHUNK + (size_t)ns * 8;
}

/* Set by a bulk block that gave up waiting for a chunk (see k_bulk). */
__device__ int g_bulk_timeout;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint64_t globaltimer_ns()
{
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* Arms the stage's mbarrier and starts the TMA read of the chunk at src. */
__device__ __forceinline__ void bulk_load(uint32_t stage, uint32_t bar,
                                          const unsigned char *src)
{
    fkv::bulk::load(stage, src, CHUNK, bar);
}
#endif

/* bulk: lane 0 of the block's one warp runs an NS-deep pipeline over the
 * block's items b, b + G, ...: item i lands in stage i % NS (its mbarrier
 * completes with the chunk's bytes; a phase bit per stage tracks which
 * completion is next), is bulk-stored to the destination, and once that
 * store has read the stage (wait_group.read) the stage takes item i + NS.
 * So NS reads from the host stay in flight, less one for the short time a
 * store takes to read its stage. */
template <int NS>
__global__ void __launch_bounds__(32)
    k_bulk(const unsigned char *__restrict__ src,
           unsigned char *__restrict__ dst, const int *__restrict__ perm,
           int64_t nchunks, int64_t total)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) unsigned char smem[];
    if (threadIdx.x != 0)
        return; /* one issuing thread is all TMA needs */
    const uint32_t stage0 = saddr(smem);
    const uint32_t bar0 = stage0 + NS * CHUNK;
    for (int s = 0; s < NS; s++)
        fkv::bulk::barrier_init(bar0 + 8 * s);
    fkv::bulk::fence_proxy_async();
    const int64_t b = blockIdx.x, G = gridDim.x;
    const int64_t n = b < total ? (total - 1 - b) / G + 1 : 0;
#define BULK_PERM(i) ((i) < n ? src_chunk(perm, b + (i) * G, nchunks) : 0)
    for (int s = 0; s < NS && s < n; s++)
        bulk_load(stage0 + s * CHUNK, bar0 + 8 * s,
                  src + (int64_t)BULK_PERM(s) * CHUNK);
    uint32_t phase = 0; /* bit s: parity of stage s's next completion */
    int pnext = BULK_PERM((int64_t)NS);
    for (int64_t i = 0; i < n; i++) {
        const int p = pnext;
        pnext = BULK_PERM(i + NS + 1); /* latency hidden behind the wait */
        const int s = (int)(i % NS);
        const uint32_t stage = stage0 + s * CHUNK, bar = bar0 + 8 * s;
        if (!fkv::bulk::barrier_try_wait(bar, (phase >> s) & 1u)) {
            /* Should TMA never complete a read of host memory, give up
             * after 2 s instead of hanging: the host reports it. */
            const uint64_t t0 = globaltimer_ns();
            while (!fkv::bulk::barrier_try_wait(bar, (phase >> s) & 1u))
                if (globaltimer_ns() - t0 > 2000000000ull) {
                    atomicExch(&g_bulk_timeout, 1);
                    fkv::bulk::wait_stores_done();
                    return;
                }
        }
        phase ^= 1u << s;
        const int64_t j = b + i * G;
        fkv::bulk::store(dst + (j % nchunks) * CHUNK, stage, CHUNK);
        if (i + NS < n) {
            /* the stage is free once the store has read it */
            fkv::bulk::wait_stores_read();
            bulk_load(stage, bar, src + (int64_t)p * CHUNK);
        }
    }
#undef BULK_PERM
    /* the stores' writes complete before the block (and its shared memory)
     * goes */
    fkv::bulk::wait_stores_done();
#else
    (void)src;
    (void)dst;
    (void)perm;
    (void)nchunks;
    (void)total;
#endif
}
/* ------------------------------------------------------------------------ */
/* Configuration                                                            */
/* ------------------------------------------------------------------------ */

/* The references first: they run (and print) first, so that a variant that
 * loses the CUDA context still leaves them behind. */
enum { V_MEMCPY, V_CHUNKS, V_LD, V_CPA, V_BULK4, V_BULK8, NVAR };

static const char *const k_vname[NVAR] = {"memcpy", "memcpy/chunk", "ld",
                                          "cp.async", "bulk4", "bulk8"};

static bool is_kernel(int v) { return v >= V_LD; }
static bool is_bulk(int v) { return v == V_BULK4 || v == V_BULK8; }

typedef struct config {
    bool smoke;
    const char *csv;
    int device;
    int mib;
    int blocks[MAX_BLOCKS], nblocks;
    bool want[NVAR];
    int layers;
    int warm, reps;       /* alone: warm-ups, timed runs */
    int gemm_reps, pairs; /* gemm: passes alone, pairs beside */
} config;

static const char k_usage[] =
    "usage: mapped_probe [--smoke] [--csv FILE] [--device N] [--mib N]\n"
    "                    [--blocks 1,2,4,8,16,32] [--layers N]\n"
    "                    [--variants memcpy,memcpy/chunk,ld,cp.async,bulk4,"
    "bulk8]\n"
    "  --mib: size of the mapped host source (16 KiB chunks), default 64\n"
    "  --blocks: block counts of every kernel variant\n"
    "  --layers: Llama-3.1-8B layers of GEMMs per pass (436 MB of weights "
    "each),\n"
    "            default 8\n"
    "  --variants: which to run, default all\n"
    "  --smoke: 4 MiB, blocks 1,4, 1 layer, few repetitions\n";

/* "a,b,c" of variant names into want[]: 0, or -1. */
static int parse_variants(const char *s, bool *want)
{
    for (int v = 0; v < NVAR; v++)
        want[v] = false;
    int n = 0;
    while (*s) {
        const char *e = strchr(s, ',');
        const size_t len = e ? (size_t)(e - s) : strlen(s);
        int v = 0;
        while (v < NVAR && !(strlen(k_vname[v]) == len &&
                             !strncmp(k_vname[v], s, len)))
            v++;
        if (v == NVAR)
            return -1;
        want[v] = true;
        n++;
        s += len + (e ? 1 : 0);
    }
    return n ? 0 : -1;
}

static int parse_args(int argc, char **argv, config *c)
{
    memset(c, 0, sizeof *c);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke"))
            c->smoke = true;
    const int def[] = {1, 2, 4, 8, 16, 32}, sdef[] = {1, 4};
    if (c->smoke)
        bench_set_list(c->blocks, &c->nblocks, sdef, 2);
    else
        bench_set_list(c->blocks, &c->nblocks, def, 6);
    for (int v = 0; v < NVAR; v++)
        c->want[v] = true;
    c->mib = c->smoke ? 4 : 64;
    c->layers = c->smoke ? 1 : 8;
    c->warm = c->smoke ? 1 : 3;
    c->reps = c->smoke ? 3 : 15;
    c->gemm_reps = c->smoke ? 3 : 10;
    c->pairs = c->smoke ? 2 : 5;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--smoke"))
            continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(k_usage, stdout);
            exit(0);
        }
        const bool takes = !strcmp(a, "--csv") || !strcmp(a, "--device") ||
                           !strcmp(a, "--mib") || !strcmp(a, "--blocks") ||
                           !strcmp(a, "--layers") || !strcmp(a, "--variants");
        if (!takes) {
            fprintf(stderr, "mapped_probe: unknown option %s\n%s", a, k_usage);
            return -1;
        }
        if (!v) {
            fprintf(stderr, "mapped_probe: %s needs a value\n%s", a, k_usage);
            return -1;
        }
        i++;
        if (!strcmp(a, "--csv"))
            c->csv = v;
        else if (!strcmp(a, "--device"))
            bad = bench_parse_int(v, 0, 1024, &c->device);
        else if (!strcmp(a, "--mib"))
            bad = bench_parse_int(v, 1, 65536, &c->mib);
        else if (!strcmp(a, "--blocks"))
            bad = bench_parse_list(v, 1, 65535, c->blocks, &c->nblocks,
                                   MAX_BLOCKS);
        else if (!strcmp(a, "--variants"))
            bad = parse_variants(v, c->want);
        else
            bad = bench_parse_int(v, 1, 128, &c->layers);
        if (bad) {
            fprintf(stderr, "mapped_probe: bad value for %s: %s\n%s", a, v,
                    k_usage);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Source, destination, variants                                            */
/* ------------------------------------------------------------------------ */

typedef struct probe {
    size_t bytes;
    int64_t nchunks;
    unsigned char *h_src;       /* mapped pinned host memory */
    const unsigned char *d_src; /* its device pointer */
    unsigned char *d_dst;
    int *perm, *d_perm;
    unsigned char *expect, *back; /* host: the expected gather, a read-back */
    bool supported[NVAR];
    const char *why[NVAR]; /* why not, where not supported */
} probe;

static uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void probe_create(probe *p, const config *c, int device)
{
    memset(p, 0, sizeof *p);
    p->bytes = (size_t)c->mib << 20;
    p->nchunks = (int64_t)(p->bytes / CHUNK);
    BENCH_CUDA_CHECK(
        cudaHostAlloc((void **)&p->h_src, p->bytes,
                      cudaHostAllocMapped | cudaHostAllocPortable));
    void *d = NULL;
    BENCH_CUDA_CHECK(cudaHostGetDevicePointer(&d, p->h_src, 0));
    p->d_src = (const unsigned char *)d;
    uint64_t *w = (uint64_t *)p->h_src;
    for (size_t i = 0; i < p->bytes / 8; i++)
        w[i] = splitmix64(i);
    BENCH_CUDA_CHECK(cudaMalloc((void **)&p->d_dst, p->bytes));
    p->perm = (int *)bench_xmalloc((size_t)p->nchunks * sizeof *p->perm);
    for (int64_t i = 0; i < p->nchunks; i++)
        p->perm[i] = (int)i;
    bench_rng r = bench_rng_seed(0x5EEDull);
    for (int64_t i = p->nchunks - 1; i > 0; i--) { /* Fisher-Yates */
        const int64_t k = bench_rng_int(&r, 0, i);
        const int tmp = p->perm[i];
        p->perm[i] = p->perm[k];
        p->perm[k] = tmp;
    }
    BENCH_CUDA_CHECK(cudaMalloc((void **)&p->d_perm,
                                (size_t)p->nchunks * sizeof *p->d_perm));
    BENCH_CUDA_CHECK(cudaMemcpy(p->d_perm, p->perm,
                                (size_t)p->nchunks * sizeof *p->perm,
                                cudaMemcpyHostToDevice));
    p->expect = (unsigned char *)bench_xmalloc(p->bytes);
    p->back = (unsigned char *)bench_xmalloc(p->bytes);
    for (int64_t ch = 0; ch < p->nchunks; ch++)
        memcpy(p->expect + ch * CHUNK, p->h_src + (size_t)p->perm[ch] * CHUNK,
               CHUNK);

    int major = 0, optin = 0;
    BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
        &major, cudaDevAttrComputeCapabilityMajor, device));
    BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
        &optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    for (int v = 0; v < NVAR; v++)
        p->supported[v] = true;
    if ((size_t)optin < (size_t)CPA_SMEM) {
        p->supported[V_CPA] = false;
        p->why[V_CPA] = "needs 64 KiB of shared memory per block";
    } else {
        BENCH_CUDA_CHECK(cudaFuncSetAttribute(
            k_cpasync, cudaFuncAttributeMaxDynamicSharedMemorySize, CPA_SMEM));
    }
    const int ns[2] = {4, 8};
    for (int q = 0; q < 2; q++) {
        const int v = q ? V_BULK8 : V_BULK4;
        if (major < 9) {
            p->supported[v] = false;
            p->why[v] = "needs sm_90";
        } else if ((size_t)optin < bulk_smem(ns[q])) {
            p->supported[v] = false;
            p->why[v] = "not enough shared memory per block";
        } else {
            BENCH_CUDA_CHECK(cudaFuncSetAttribute(
                q ? k_bulk<8> : k_bulk<4>,
                cudaFuncAttributeMaxDynamicSharedMemorySize,
                (int)bulk_smem(ns[q])));
        }
    }
}

static void probe_destroy(probe *p)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaFreeHost(p->h_src));
    BENCH_CUDA_CHECK(cudaFree(p->d_dst));
    BENCH_CUDA_CHECK(cudaFree(p->d_perm));
    free(p->perm);
    free(p->expect);
    free(p->back);
    memset(p, 0, sizeof *p);
}

/* Enqueues `passes` passes of variant v (blocks: kernels only) on s. */
static void gather(const probe *p, int v, int blocks, int64_t passes,
                   cudaStream_t s)
{
    const int64_t total = passes * p->nchunks;
    switch (v) {
    case V_LD:
        k_ld<<<blocks, LD_THREADS, 0, s>>>((const uint4 *)p->d_src,
                                           (uint4 *)p->d_dst, p->d_perm,
                                           p->nchunks, total);
        break;
    case V_CPA:
        k_cpasync<<<blocks, CPA_THREADS, CPA_SMEM, s>>>(
            (const uint4 *)p->d_src, (uint4 *)p->d_dst, p->d_perm, p->nchunks,
            total);
        break;
    case V_BULK4:
        k_bulk<4><<<blocks, 32, bulk_smem(4), s>>>(
            p->d_src, p->d_dst, p->d_perm, p->nchunks, total);
        break;
    case V_BULK8:
        k_bulk<8><<<blocks, 32, bulk_smem(8), s>>>(
            p->d_src, p->d_dst, p->d_perm, p->nchunks, total);
        break;
    case V_MEMCPY:
        for (int64_t r = 0; r < passes; r++)
            BENCH_CUDA_CHECK(cudaMemcpyAsync(p->d_dst, p->h_src, p->bytes,
                                             cudaMemcpyHostToDevice, s));
        break;
    default: /* V_CHUNKS */
        for (int64_t r = 0; r < passes; r++)
            for (int64_t ch = 0; ch < p->nchunks; ch++)
                BENCH_CUDA_CHECK(cudaMemcpyAsync(
                    p->d_dst + ch * CHUNK,
                    p->h_src + (size_t)p->perm[ch] * CHUNK, CHUNK,
                    cudaMemcpyHostToDevice, s));
        break;
    }
    BENCH_CUDA_CHECK(cudaGetLastError());
}

enum { CHECK_OK, CHECK_FAIL, CHECK_TIMEOUT };

/* "ld with 4 blocks", or the reference's name, for messages. */
static const char *label(char *buf, size_t n, int v, int blocks)
{
    if (is_kernel(v))
        snprintf(buf, n, "%s with %d blocks", k_vname[v], blocks);
    else
        snprintf(buf, n, "%s", k_vname[v]);
    return buf;
}

/* One checked run: the destination, preset to 0xA5 bytes, must equal the
 * expected gather (the source itself for the contiguous copy). */
static int check(probe *p, int v, int blocks, cudaStream_t s)
{
    BENCH_CUDA_CHECK(cudaMemsetAsync(p->d_dst, 0xA5, p->bytes, s));
    gather(p, v, blocks, 1, s);
    char what[64];
    label(what, sizeof what, v, blocks);
    const cudaError_t e = cudaStreamSynchronize(s);
    if (e != cudaSuccess)
        bench_die("%s: %s (%s)%s", what, cudaGetErrorString(e),
                  cudaGetErrorName(e),
                  is_bulk(v) ? "; the CUDA context is lost: rerun without "
                               "the bulk variants (--variants "
                               "memcpy,memcpy/chunk,ld,cp.async)"
                             : "");
    if (is_bulk(v)) {
        int timeout = 0;
        BENCH_CUDA_CHECK(
            cudaMemcpyFromSymbol(&timeout, g_bulk_timeout, sizeof timeout));
        if (timeout) {
            fprintf(stderr,
                    "mapped_probe: %s: a chunk's mbarrier did not complete "
                    "within 2 s (the TMA read of mapped host memory never "
                    "finished)\n",
                    what);
            timeout = 0;
            BENCH_CUDA_CHECK(
                cudaMemcpyToSymbol(g_bulk_timeout, &timeout, sizeof timeout));
            return CHECK_TIMEOUT;
        }
    }
    BENCH_CUDA_CHECK(
        cudaMemcpy(p->back, p->d_dst, p->bytes, cudaMemcpyDeviceToHost));
    const unsigned char *want = v == V_MEMCPY ? p->h_src : p->expect;
    for (int64_t ch = 0; ch < p->nchunks; ch++) {
        const size_t at = (size_t)ch * CHUNK;
        if (memcmp(p->back + at, want + at, CHUNK) == 0)
            continue;
        size_t k = 0;
        while (p->back[at + k] == want[at + k])
            k++;
        fprintf(stderr,
                "mapped_probe: %s: first mismatch in destination chunk "
                "%lld byte %zu (got 0x%02x, want 0x%02x)\n",
                what, (long long)ch, k, p->back[at + k], want[at + k]);
        return CHECK_FAIL;
    }
    return CHECK_OK;
}

/* ------------------------------------------------------------------------ */
/* Results                                                                  */
/* ------------------------------------------------------------------------ */

#define NBATCH 2
static const int k_batches[NBATCH] = {1, 8};

typedef struct result {
    bool run, ok;           /* run: timed alone (and so run beside) */
    double ms, gbps;        /* alone */
    int64_t passes[NBATCH]; /* beside the GEMMs */
    double gemm_ms[NBATCH], slowdown[NBATCH], o_ms[NBATCH], o_gbps[NBATCH];
} result;

static FILE *g_csv;

/* One CSV row; blocks/batch <= 0 and NAN numbers are left empty. */
static void csv_row(const char *section, const char *variant, int blocks,
                    int batch, double gbps, double us, double gemm_ms,
                    double slowdown, const char *ok)
{
    if (!g_csv)
        return;
    fprintf(g_csv, "%s,%s,", section, variant);
    if (blocks > 0)
        fprintf(g_csv, "%d", blocks);
    fputc(',', g_csv);
    if (batch > 0)
        fprintf(g_csv, "%d", batch);
    const double v[4] = {gbps, us, gemm_ms, slowdown};
    for (int i = 0; i < 4; i++) {
        fputc(',', g_csv);
        if (!isnan(v[i]))
            fprintf(g_csv, "%.6g", v[i]);
    }
    fprintf(g_csv, ",%s\n", ok);
}

/* Block counts of variant v: the list for kernels, one row (0) for the
 * references. */
static int nblocks_of(const config *c, int v)
{
    return is_kernel(v) ? c->nblocks : 1;
}

static int blocks_of(const config *c, int v, int bi)
{
    return is_kernel(v) ? c->blocks[bi] : 0;
}

static const char *fmt_blocks(char *buf, size_t n, int blocks)
{
    if (blocks > 0)
        snprintf(buf, n, "%d", blocks);
    else
        snprintf(buf, n, "-");
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Sections (rows print as they finish: a failure leaves the rows before)   */
/* ------------------------------------------------------------------------ */

static bool run_alone(const config *c, probe *p, cudaStream_t s,
                      result (*res)[MAX_BLOCKS])
{
    const int n = c->warm + c->reps;
    cudaEvent_t *e0 = (cudaEvent_t *)bench_xmalloc(n * sizeof *e0);
    cudaEvent_t *e1 = (cudaEvent_t *)bench_xmalloc(n * sizeof *e1);
    double *ms = (double *)bench_xmalloc(c->reps * sizeof *ms);
    for (int r = 0; r < n; r++) {
        BENCH_CUDA_CHECK(cudaEventCreate(&e0[r]));
        BENCH_CUDA_CHECK(cudaEventCreate(&e1[r]));
    }
    bool all_ok = true;
    printf("\nalone: gather of %d MiB (%lld chunks of 16 KiB) from mapped "
           "host memory; median of %d runs\n",
           c->mib, (long long)p->nchunks, c->reps);
    printf("%-13s %6s %10s %8s  %s\n", "variant", "blocks", "us", "GB/s",
           "check");
    for (int v = 0; v < NVAR; v++)
        for (int bi = 0; c->want[v] && bi < nblocks_of(c, v); bi++) {
            const int blocks = blocks_of(c, v, bi);
            result *rs = &res[v][bi];
            char bb[16];
            fmt_blocks(bb, sizeof bb, blocks);
            if (!p->supported[v]) {
                printf("%-13s %6s %10s %8s  unsupported (%s)\n", k_vname[v],
                       bb, "-", "-", p->why[v]);
                csv_row("alone", k_vname[v], blocks, 0, NAN, NAN, NAN, NAN,
                        "unsupported");
                continue;
            }
            const int ck = check(p, v, blocks, s);
            rs->ok = ck == CHECK_OK;
            all_ok = all_ok && rs->ok;
            if (ck == CHECK_TIMEOUT) {
                printf("%-13s %6s %10s %8s  FAIL (timeout)\n", k_vname[v], bb,
                       "-", "-");
                csv_row("alone", k_vname[v], blocks, 0, NAN, NAN, NAN, NAN,
                        "FAIL");
                fflush(stdout);
                continue;
            }
            rs->run = true;
            for (int r = 0; r < n; r++) {
                BENCH_CUDA_CHECK(cudaEventRecord(e0[r], s));
                gather(p, v, blocks, 1, s);
                BENCH_CUDA_CHECK(cudaEventRecord(e1[r], s));
            }
            BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
            for (int r = 0; r < c->reps; r++)
                ms[r] = bench_event_ms(e0[c->warm + r], e1[c->warm + r]);
            rs->ms = bench_median(ms, (size_t)c->reps);
            rs->gbps = (double)p->bytes / (rs->ms * 1e6);
            printf("%-13s %6s %10.1f %8.2f  %s\n", k_vname[v], bb,
                   rs->ms * 1e3, rs->gbps, rs->ok ? "ok" : "FAIL");
            fflush(stdout);
            csv_row("alone", k_vname[v], blocks, 0, rs->gbps, rs->ms * 1e3,
                    NAN, NAN, rs->ok ? "ok" : "FAIL");
        }
    for (int r = 0; r < n; r++) {
        BENCH_CUDA_CHECK(cudaEventDestroy(e0[r]));
        BENCH_CUDA_CHECK(cudaEventDestroy(e1[r]));
    }
    free(e0);
    free(e1);
    free(ms);
    return all_ok;
}

static void run_gemm(const config *c, probe *p, cudaStream_t gs,
                     cudaStream_t rs, result (*res)[MAX_BLOCKS])
{
    bench_gemm_model m;
    bench_gemm_create(&m, c->layers, k_batches[NBATCH - 1], gs);
    cudaEvent_t g0, g1, r0, r1;
    BENCH_CUDA_CHECK(cudaEventCreate(&g0));
    BENCH_CUDA_CHECK(cudaEventCreate(&g1));
    BENCH_CUDA_CHECK(cudaEventCreate(&r0));
    BENCH_CUDA_CHECK(cudaEventCreate(&r1));
    const int nr = c->gemm_reps > c->pairs ? c->gemm_reps : c->pairs;
    double *ms = (double *)bench_xmalloc(nr * sizeof *ms);
    double *oms = (double *)bench_xmalloc(nr * sizeof *oms);
    printf("\ngemm: %d Llama-3.1-8B layers of bf16 cuBLAS GEMMs (%.2f GB of "
           "weights) on the highest-priority stream, the gather on the "
           "lowest, lasting >= 2 GEMM passes; median of %d pairs; gather "
           "GB/s over its whole run\n",
           c->layers, (double)m.layer_bytes * c->layers / 1e9, c->pairs);
    for (int bt = 0; bt < NBATCH; bt++) {
        const int batch = k_batches[bt];
        for (int r = 0; r < 2; r++) /* warm-up (cuBLAS picks its kernels) */
            bench_gemm_enqueue(&m, batch, g0, g1);
        BENCH_CUDA_CHECK(cudaStreamSynchronize(gs));
        for (int r = 0; r < c->gemm_reps; r++) {
            bench_gemm_enqueue(&m, batch, g0, g1);
            BENCH_CUDA_CHECK(cudaEventSynchronize(g1));
            ms[r] = bench_event_ms(g0, g1);
        }
        const double alone = bench_median(ms, (size_t)c->gemm_reps);
        csv_row("gemm", "none", 0, batch, NAN, NAN, alone, 1.0, "");
        printf("batch %d:\n%-13s %6s %7s %9s %9s %12s\n", batch, "variant",
               "blocks", "passes", "GEMM ms", "slowdown", "gather GB/s");
        printf("%-13s %6s %7s %9.3f %9.3f %12s\n", "none", "-", "-", alone,
               1.0, "-");
        for (int v = 0; v < NVAR; v++) {
            if (v == V_CHUNKS)
                continue; /* see the header: it would not overlap */
            for (int bi = 0; bi < nblocks_of(c, v); bi++) {
                result *rr = &res[v][bi];
                if (!rr->run)
                    continue;
                const int blocks = blocks_of(c, v, bi);
                double want = ceil(2.0 * alone / rr->ms);
                want = want < 1.0 ? 1.0 : want > 1e6 ? 1e6 : want;
                const int64_t passes = (int64_t)want;
                for (int q = 0; q <= c->pairs; q++) { /* q 0: warm-up */
                    BENCH_CUDA_CHECK(cudaEventRecord(r0, rs));
                    gather(p, v, blocks, passes, rs);
                    BENCH_CUDA_CHECK(cudaEventRecord(r1, rs));
                    bench_gemm_enqueue(&m, batch, g0, g1);
                    BENCH_CUDA_CHECK(cudaStreamSynchronize(rs));
                    BENCH_CUDA_CHECK(cudaStreamSynchronize(gs));
                    if (q > 0) {
                        ms[q - 1] = bench_event_ms(g0, g1);
                        oms[q - 1] = bench_event_ms(r0, r1);
                    }
                }
                rr->passes[bt] = passes;
                rr->gemm_ms[bt] = bench_median(ms, (size_t)c->pairs);
                rr->slowdown[bt] = rr->gemm_ms[bt] / alone;
                rr->o_ms[bt] = bench_median(oms, (size_t)c->pairs);
                rr->o_gbps[bt] =
                    (double)p->bytes * (double)passes / (rr->o_ms[bt] * 1e6);
                char bb[16];
                printf("%-13s %6s %7lld %9.3f %9.3f %12.2f\n", k_vname[v],
                       fmt_blocks(bb, sizeof bb, blocks), (long long)passes,
                       rr->gemm_ms[bt], rr->slowdown[bt], rr->o_gbps[bt]);
                fflush(stdout);
                csv_row("gemm", k_vname[v], blocks, batch, rr->o_gbps[bt],
                        rr->o_ms[bt] * 1e3, rr->gemm_ms[bt], rr->slowdown[bt],
                        rr->ok ? "ok" : "FAIL");
            }
        }
    }
    BENCH_CUDA_CHECK(cudaEventDestroy(g0));
    BENCH_CUDA_CHECK(cudaEventDestroy(g1));
    BENCH_CUDA_CHECK(cudaEventDestroy(r0));
    BENCH_CUDA_CHECK(cudaEventDestroy(r1));
    free(ms);
    free(oms);
    bench_gemm_destroy(&m);
}

static void summary(const config *c, const probe *p,
                    result (*res)[MAX_BLOCKS])
{
    const double target = 45.0;
    printf("\nsummary (fewest blocks reaching %.0f GB/s alone):\n", target);
    for (int v = V_LD; v < NVAR; v++) {
        if (!c->want[v])
            continue;
        if (!p->supported[v]) {
            printf("%-9s unsupported (%s)\n", k_vname[v], p->why[v]);
            continue;
        }
        int best = -1, hit = -1;
        for (int bi = 0; bi < c->nblocks; bi++) {
            const result *r = &res[v][bi];
            if (!r->run || !r->ok)
                continue;
            if (best < 0 || r->gbps > res[v][best].gbps)
                best = bi;
            if (r->gbps >= target &&
                (hit < 0 || c->blocks[bi] < c->blocks[hit]))
                hit = bi;
        }
        if (hit < 0) {
            if (best < 0)
                printf("%-9s no run passed its check\n", k_vname[v]);
            else
                printf("%-9s below %.0f GB/s (best %.2f GB/s with %d "
                       "blocks)\n",
                       k_vname[v], target, res[v][best].gbps,
                       c->blocks[best]);
            continue;
        }
        const result *r = &res[v][hit];
        printf("%-9s %d blocks: %.2f GB/s; GEMM slowdown %.3fx at batch 1, "
               "%.3fx at batch 8\n",
               k_vname[v], c->blocks[hit], r->gbps, r->slowdown[0],
               r->slowdown[1]);
    }
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    bench_set_die_prefix("mapped_probe: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    int rc;
    if (bench_skip_without_cuda("mapped_probe", c.device, c.smoke, &rc))
        return rc;
    bench_device d;
    bench_device_open(c.device, &d);
    int can_map = 0;
    BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
        &can_map, cudaDevAttrCanMapHostMemory, c.device));
    if (!can_map)
        bench_die("device %d cannot map host memory", c.device);
    if (c.csv) {
        g_csv = fopen(c.csv, "w");
        if (!g_csv)
            bench_die("cannot open %s for writing", c.csv);
        fprintf(g_csv,
                "section,variant,blocks,batch,gbps,us,gemm_ms,slowdown,ok\n");
    }
    printf("mapped_probe: %s, %d SMs, %.0f MiB L2; source %d MiB of mapped "
           "host memory\n",
           d.name, d.sms, d.l2_mib, c.mib);

    probe p;
    probe_create(&p, &c, c.device);
    int least = 0, greatest = 0;
    BENCH_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t gs, rs;
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&gs, cudaStreamNonBlocking, greatest));
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&rs, cudaStreamNonBlocking, least));

    static result res[NVAR][MAX_BLOCKS];
    const bool ok = run_alone(&c, &p, rs, res);
    run_gemm(&c, &p, gs, rs, res);
    summary(&c, &p, res);

    BENCH_CUDA_CHECK(cudaStreamDestroy(gs));
    BENCH_CUDA_CHECK(cudaStreamDestroy(rs));
    probe_destroy(&p);
    if (g_csv) {
        if (fclose(g_csv) != 0)
            bench_die("writing %s failed", c.csv);
        printf("wrote %s\n", c.csv);
    }
    if (!ok) {
        printf("mapped_probe: FAILED: a copy check failed (see stderr)\n");
        return 1;
    }
    return 0;
}
