/*
 * bench/host_costs: the host time of the CUDA runtime calls a decode step
 * makes (issue 11, item 5: the library's host enqueue per 32-layer step),
 * so that the library's own time can be told from the runtime's floor.
 *
 * Each row is the median over --reps repetitions of the mean host time of
 * --calls back-to-back calls (host clock; the stream is drained between
 * repetitions, so launches never wait for queue space):
 *
 *   launch 8 B        an empty kernel taking one pointer
 *   launch N B        an empty kernel taking __grid_constant__ structs of
 *                     the sizes the library's launches pass (geometry,
 *                     state, batch: kernels/kernels.h), and of 4 KiB
 *   event record      cudaEventRecord (events without timing)
 *   stream wait       cudaStreamWaitEvent on a recorded event
 *   record + wait     the pair, the way FREEKV orders its two streams
 *   get device        cudaGetDevice (the library's device guard)
 *   is capturing      cudaStreamIsCapturing
 *   get last error    cudaGetLastError (after every launch)
 *   4 launches        four library-sized launches back to back (an
 *                     attend's score, selection, split and combine)
 *   record 4 + compare  the launch cache's own work for an attend: four
 *                     library-sized launches recorded (fkv::enqueue into a
 *                     launch record) and the record compared with the
 *                     last one, byte for byte (no CUDA call; measured
 *                     first, also where there is no device)
 *   graph of N        cudaGraphLaunch of a graph of N library-sized
 *                     kernels in a chain (N = 1, 2, 4): what the launch
 *                     cache (FKV_CUDA_EXPERIMENTAL, lib/cuda_launch_cache.c)
 *                     pays for a repeated attend or recall
 *
 * The last lines print the floor of a FREEKV and a RESIDENT layer-step
 * (launches and event operations, from docs/design.md section 6) times 32
 * layers, with direct launches and with the launch cache's graphs. --smoke: few repetitions. Without a usable CUDA device it prints
 * one "skipped" line and exits 0 with --smoke, 1 without.
 *
 *   make bench && build/bench/host_costs
 *
 * SPDX-License-Identifier: MIT
 */
#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "bench.h"
#include "kernels.h" /* the launch argument structs, for their sizes */
}
#include "launch.cuh" /* fkv::enqueue: the launch cache's recording */

namespace {

template <size_t N> struct blob {
    unsigned char b[N];
};

__global__ void empty_ptr(int *p)
{
    if (p && threadIdx.x == 1024) *p = 0; /* never: keeps the argument */
}

/* The library's launches pass these three by value (select, attend, ...). */
__global__ void empty_lib(const __grid_constant__ fkv_dev_geometry g,
                          const __grid_constant__ fkv_dev_state st,
                          const __grid_constant__ fkv_dev_batch b, int32_t layer)
{
    if (layer < 0 && threadIdx.x == 0) st.counters[0] = g.layers + b.n;
}

template <size_t N>
__global__ void empty_blob(const __grid_constant__ blob<N> x, int *p)
{
    if (p && threadIdx.x == 1024) *p = x.b[0];
}

/* The argument lists of an attend's four launches (kernels/select.cu,
 * attend.cu): geometry, state, batch, scalars, and the by-value region
 * table. Never launched: only recorded. */
typedef blob<FKV_DEV_MAX_BATCH * sizeof(void *)> regions;
__global__ void rec_score(fkv_dev_geometry, fkv_dev_state, fkv_dev_batch, int32_t,
                          const void *, int32_t, int32_t) {}
__global__ void rec_select(fkv_dev_geometry, fkv_dev_state, fkv_dev_batch, int32_t,
                           const void *, int32_t, int32_t, int32_t, int32_t, regions) {}
__global__ void rec_split(fkv_dev_geometry, fkv_dev_state, fkv_dev_batch, int32_t,
                          const void *, void *, int32_t, int32_t, int32_t, regions) {}
__global__ void rec_combine(fkv_dev_state, fkv_dev_batch, int32_t, int32_t, void *) {}

/* Host time of recording an attend's four launches and comparing the
 * record with the previous call's (fkv_record_same, as fkvi_launch_cache_end),
 * median over reps of calls x the mean; CUDA is not called. */
double record_compare_us(int reps, int calls)
{
    static fkv_launch_record r, seen;
    fkv_dev_geometry g{};
    fkv_dev_state st{};
    fkv_dev_batch b{};
    regions rt{};
    b.n = 1;
    double *x = (double *)calloc((size_t)reps, sizeof(double));
    int same = 0;
    for (int k = 0; k < reps; k++) {
        const double t0 = bench_now_ms();
        for (int i = 0; i < calls; i++) {
            fkv_record_begin(&r, nullptr);
            (void)fkv::enqueue(rec_score, dim3(8, 8), 256, 4096, nullptr, g, st, b, 3,
                               (const void *)nullptr, 1, 64);
            (void)fkv::enqueue(rec_select, dim3(8), 256, 8192, nullptr, g, st, b, 3,
                               (const void *)nullptr, 1, 100, 1, 0, rt);
            (void)fkv::enqueue(rec_split, dim3(16, 8), 128, 0, nullptr, g, st, b, 3,
                               (const void *)nullptr, (void *)nullptr, 4, 16, 1, rt);
            (void)fkv::enqueue(rec_combine, dim3(32), 128, 128, nullptr, st, b, 32, 16,
                               (void *)nullptr);
            fkv_record_end();
            if (k == 0 && i == 0) fkv_record_copy(&seen, &r);
            same += fkv_record_same(&r, &seen);
        }
        x[k] = (bench_now_ms() - t0) * 1000.0 / calls;
    }
    const double m = bench_median(x, (size_t)reps);
    free(x);
    return same == reps * calls ? m : -1.0;
}

struct args {
    int reps = 51, calls = 200, smoke = 0;
};

template <class F> double per_call_us(const args &a, cudaStream_t s, F call)
{
    double *x = (double *)calloc((size_t)a.reps, sizeof(double));
    for (int w = 0; w < 3; w++) /* warm-up */
        for (int i = 0; i < a.calls; i++) call();
    BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
    for (int r = 0; r < a.reps; r++) {
        const double t0 = bench_now_ms();
        for (int i = 0; i < a.calls; i++) call();
        x[r] = (bench_now_ms() - t0) * 1000.0 / a.calls;
        BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
    }
    const double m = bench_median(x, (size_t)a.reps);
    free(x);
    return m;
}

void usage(void)
{
    printf("usage: host_costs [--reps N] [--calls N] [--smoke]\n");
}

} // namespace

int main(int argc, char **argv)
{
    args a;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--smoke")) {
            a.smoke = 1;
            a.reps = 5;
            a.calls = 20;
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            a.reps = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--calls") && i + 1 < argc) {
            a.calls = atoi(argv[++i]);
        } else if (!strcmp(argv[i], "--help")) {
            usage();
            return 0;
        } else {
            usage();
            return 2;
        }
    }
    if (a.reps < 1 || a.calls < 1) {
        usage();
        return 2;
    }
    /* No device needed: recording calls no CUDA function. */
    const double record_us = record_compare_us(a.reps, a.calls * 10);
    printf("record 4 + compare: %.3f us per call (the launch cache's own "
           "host time for an attend's four launches)\n", record_us);
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
        printf("host_costs: skipped (no usable CUDA device)\n");
        return a.smoke ? 0 : 1;
    }
    cudaStream_t s, side;
    cudaEvent_t ev;
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
    BENCH_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    fkv_dev_geometry g{};
    fkv_dev_state st{};
    fkv_dev_batch b{};
    const size_t lib_bytes = sizeof g + sizeof st + sizeof b + sizeof(int32_t);

    bench_table t;
    bench_table_init(&t, 2);
    bench_table_add(&t, "%s", "call");
    bench_table_add(&t, "%s", "us per call");
    auto row = [&](const char *name, double us) {
        bench_table_add(&t, "%s", name);
        bench_table_add(&t, "%.2f", us);
    };
    const double l8 = per_call_us(a, s, [&] {
        empty_ptr<<<1, 32, 0, s>>>(nullptr);
        (void)cudaGetLastError();
    });
    row("launch 8 B", l8);
    char name[64];
    const double llib = per_call_us(a, s, [&] {
        empty_lib<<<1, 32, 0, s>>>(g, st, b, 0);
        (void)cudaGetLastError();
    });
    snprintf(name, sizeof name, "launch %zu B (library structs)", lib_bytes);
    row(name, llib);
    const blob<4096> big = {};
    row("launch 4104 B", per_call_us(a, s, [&] {
            empty_blob<4096><<<1, 32, 0, s>>>(big, nullptr);
            (void)cudaGetLastError();
        }));
    const double rec = per_call_us(a, s, [&] { BENCH_CUDA_CHECK(cudaEventRecord(ev, s)); });
    row("event record", rec);
    BENCH_CUDA_CHECK(cudaEventRecord(ev, s));
    const double wait = per_call_us(a, s, [&] {
        BENCH_CUDA_CHECK(cudaStreamWaitEvent(side, ev, 0));
    });
    row("stream wait", wait);
    const double pair = per_call_us(a, s, [&] {
        BENCH_CUDA_CHECK(cudaEventRecord(ev, s));
        BENCH_CUDA_CHECK(cudaStreamWaitEvent(side, ev, 0));
    });
    row("record + wait", pair);
    int dev = 0;
    const double gd = per_call_us(a, s, [&] { BENCH_CUDA_CHECK(cudaGetDevice(&dev)); });
    row("get device", gd);
    const double cap = per_call_us(a, s, [&] {
        cudaStreamCaptureStatus cs;
        BENCH_CUDA_CHECK(cudaStreamIsCapturing(s, &cs));
    });
    row("is capturing", cap);
    row("get last error", per_call_us(a, s, [&] { (void)cudaGetLastError(); }));
    row("4 launches (library structs)", per_call_us(a, s, [&] {
            for (int k = 0; k < 4; k++) {
                empty_lib<<<1, 32, 0, s>>>(g, st, b, 0);
                (void)cudaGetLastError();
            }
        }));
    double graph_us[5] = {0};
    for (int n = 1; n <= 4; n *= 2) {
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        BENCH_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
        for (int k = 0; k < n; k++) empty_lib<<<1, 32, 0, s>>>(g, st, b, 0);
        BENCH_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
        BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
        graph_us[n] = per_call_us(a, s, [&] { BENCH_CUDA_CHECK(cudaGraphLaunch(exec, s)); });
        snprintf(name, sizeof name, "graph of %d kernel%s", n, n > 1 ? "s" : "");
        row(name, graph_us[n]);
        BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
        BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
        BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
    }
    bench_table_print(&t, stdout);
    bench_table_free(&t);
    BENCH_CUDA_CHECK(cudaStreamSynchronize(side));
    /* Per layer (docs/design.md section 6): FREEKV 7 launches, two
     * record + wait pairs; RESIDENT 5 launches; every policy 4 calls, each
     * with a device guard and up to 3 capture checks. */
    const double guard = 4 * (gd + cap);
    printf("floor per 32-layer step (library-sized launches): FREEKV %.3f ms, "
           "RESIDENT %.3f ms (launch %.2f us, record + wait %.2f us, guard "
           "and capture checks %.2f us per layer)\n",
           32 * (7 * llib + 2 * pair + guard) / 1000.0,
           32 * (5 * llib + guard) / 1000.0, llib, pair, guard);
    /* With the launch cache: the append as it is; FREEKV's attend (4
     * kernels) and recall (2) as one graph launch each, RESIDENT's attend
     * (4) as one. */
    printf("floor with the launch cache: FREEKV %.3f ms, RESIDENT %.3f ms "
           "(graph of 4 %.2f us, of 2 %.2f us)\n",
           32 * (llib + graph_us[4] + graph_us[2] + 2 * pair + guard) / 1000.0,
           32 * (llib + graph_us[4] + guard) / 1000.0, graph_us[4], graph_us[2]);
    BENCH_CUDA_CHECK(cudaEventDestroy(ev));
    BENCH_CUDA_CHECK(cudaStreamDestroy(side));
    BENCH_CUDA_CHECK(cudaStreamDestroy(s));
    return 0;
}
