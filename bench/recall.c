/*
 * bench/recall: bandwidth of the recall path for selected pages, against the
 * host-to-device copy bandwidth measured in the same run, and its cost to the
 * engine's GEMMs when it runs beside them.
 *
 *   (a) one large pinned cudaMemcpyAsync H2D (--big-mib, 256 MiB): the
 *       reference bandwidth;
 *   (b) one cudaMemcpyAsync per (page, KV head) unit (16 KiB: K and V of 32
 *       tokens x 128 dims, bf16): FreeKV's and ArkVale's way; and, where the
 *       runtime has it, one cudaMemcpyBatchAsync of the same units;
 *   (c) our recall, driven directly through kernels/kernels.h: for batch x
 *       8 KV heads, K missing pages per (sequence, KV head) move from a
 *       pinned mapped host pool of 16 KiB units into the device slots with
 *       fkv_launch_recall(FKV_RECALL_PENDING) (plan + gather kernels), for
 *       gather_blocks 8, 16, 32, 64 and the SM count. Each (sequence, KV
 *       head) alternates between two disjoint page sets, so every run finds
 *       all K pages missing and copies them all (checked with the device's
 *       recall counters). Timed with CUDA events around the launch: median
 *       of --reps runs after warm-up;
 *   (c') the small calls of a decode step: (b) and (c) for one sequence and
 *       --small-units units in all (default 8, 16, 32, 64: K = units / KV
 *       heads pages per KV head), the sizes one layer's recall of a few
 *       changed pages moves, where the launch and per-call costs, not the
 *       bandwidth, decide; printed in their own table with the time per
 *       unit;
 *   (d) cuBLAS bf16 GEMMs of Llama-3.1-8B's per-layer shapes (QKV 4096x6144,
 *       O 4096x4096, gate+up 4096x28672, down 14336x4096) for 32 layers on a
 *       highest-priority stream, alone and with a recall variant running
 *       continuously on a lowest-priority stream (our recall with 16 and 32
 *       gather blocks, per-unit cudaMemcpyAsync, cudaMemcpyBatchAsync): GEMM
 *       time, slowdown, and the recall bandwidth achieved meanwhile (bytes of
 *       the recall chunks that completed inside the GEMM window).
 *
 * The host pool comes from cudaHostAlloc (mapped, portable), or with
 * --host-register from aligned_alloc + cudaHostRegister, as the library's
 * CUDA pool does (the gathers read both at the same rate on the H200).
 *
 * Every variant's copied bytes are compared with the host pool (exit 1 on a
 * mismatch). Prints a compact table last; --csv FILE writes its rows.
 *
 * The device region of each sequence is laid out by the CUDA backend's own
 * fkvi_cuda_layout (lib/cuda_layout.c) for a one-layer FREEKV cache without
 * sink and window pages, so recall sees the backend's arrays at the
 * backend's offsets; fkv_dev_state carries only what recall reads and
 * writes.
 *
 * --smoke: the smallest configuration, a few seconds. Without a usable CUDA
 * device (or built with CUDA=0) it prints one "skipped" line and exits 0
 * with --smoke, 1 without.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

#ifndef FKV_WITH_CUDA

int main(int argc, char **argv)
{
    bench_set_die_prefix("recall: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    int rc = 1;
    (void)bench_skip_without_cuda("recall", c.device, c.smoke, &rc);
    return rc;
}

#else /* FKV_WITH_CUDA */

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    bench_set_die_prefix("recall: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    int rc;
    if (bench_skip_without_cuda("recall", c.device, c.smoke, &rc))
        return rc;
    const double t_start = bench_now_s();
    bench_device dev;
    bench_device_open(c.device, &dev);
    const int sm_count = dev.sms;
    const uint64_t unit = 2ull * c.page * c.head_dim * 2;
    printf("recall: %s, %d SMs, libfreekv %s%s\n", dev.name, sm_count,
           fkv_version_string(), c.smoke ? " (smoke)" : "");
    printf("method: direct, through kernels/kernels.h: each sequence's "
           "device region laid out as lib/cuda_create.c does for a FREEKV "
           "layer; fkv_launch_recall(FKV_RECALL_PENDING) = plan + gather; "
           "units of %llu B (K and V of %d tokens x %d dims, bf16), %d KV "
           "heads; pool pages per sequence %d (random block order)\n",
           (unsigned long long)unit, c.page, c.head_dim, c.kv_heads,
           c.pool_pages);

    cudaStream_t s;
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    int max_batch = 1;
    for (int i = 0; i < c.nbatches; i++)
        if (c.batches[i] > max_batch)
            max_batch = c.batches[i];
    if (c.gemm)
        for (int i = 0; i < c.ngemm_batches; i++)
            if (c.gemm_batches[i] > max_batch)
                max_batch = c.gemm_batches[i];
    pool p;
    pool_create(&p, max_batch, c.pool_pages, c.kv_heads, unit,
                c.host_register);
    printf("host pool: %.1f MiB pinned mapped by %s (%d sequences x %d "
           "pages x %d KV heads)\n",
           (double)p.bytes / (1 << 20),
           c.host_register ? "cudaHostRegister" : "cudaHostAlloc", p.seqs,
           p.pages, c.kv_heads);

    const double big = bench_big_copy(&c, s);
    bool batch_ok = true;
    for (int bi = 0; bi < c.nbatches; bi++)
        for (int pi = 0; pi < c.npages; pi++) {
            rctx x;
            rctx_create(&x, &c, &p, c.batches[bi], c.pages[pi],
                        0xABCD00ull + (uint64_t)(bi * 64 + pi));
            batch_ok = bench_unit_copies(&c, &x, s, big, batch_ok);
            bench_recall(&c, &x, &p, s, sm_count, big);
            rctx_destroy(&x);
        }
    /* (c'): the small calls, one sequence. */
    g_h2d_section = "small";
    for (int i = 0; i < c.nsmall_units; i++) {
        rctx x;
        const int K = c.small_units[i] / c.kv_heads;
        printf("(c') %d units in all: one sequence, K %d per KV head\n",
               c.small_units[i], K);
        rctx_create(&x, &c, &p, 1, K, 0x5A11ull + (uint64_t)i);
        batch_ok = bench_unit_copies(&c, &x, s, big, batch_ok);
        bench_recall(&c, &x, &p, s, sm_count, big);
        rctx_destroy(&x);
    }
    g_h2d_section = "h2d";
    if (c.gemm)
        bench_gemm(&c, &p, c.device, sm_count, batch_ok);

    print_table(dev.name, big, c.kv_heads);
    if (c.csv)
        write_csv(c.csv);
    BENCH_CUDA_CHECK(cudaStreamDestroy(s));
    pool_destroy(&p);
    free(g_rows);
    printf("recall: all copies verified; %.1f s\n", bench_now_s() - t_start);
    return 0;
}

#endif /* FKV_WITH_CUDA */
