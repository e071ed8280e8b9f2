/*
 * bench/recall's command line: the flags, their defaults and checks.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

static const char k_usage[] =
    "usage: recall [--smoke] [--csv FILE] [--device N]\n"
    "              [--batches 1,8] [--pages 32,64,128] [--blocks 2,4,8,16,32,0]\n"
    "              [--reps N] [--unit-reps N] [--big-mib N] [--pool-pages N]\n"
    "              [--kv-heads N] [--group N] [--head-dim N] [--page N]\n"
    "              [--no-gemm] [--gemm-batches 1,8] [--gemm-layers N]\n"
    "              [--gemm-reps N] [--conc-pages N] [--conc-blocks 2,4,8,16,32]\n"
    "              [--small-units 8,16,32,64|none] [--bulk-gather]\n"
    "              [--fused-plan]\n"
    "              [--host-register]\n"
    "  --blocks: gather blocks of fkv_launch_recall; 0 = the SM count\n"
    "  --bulk-gather: the gather by TMA bulk copies from one-warp blocks\n"
    "               (sm_90; FREEKV's speculative recall there)\n"
    "  --fused-plan: with --bulk-gather, every recall is one FKV_PLAN_FUSED\n"
    "               launch (each plan block copies its own head's units;\n"
    "               FKV_CUDA_EXPERIMENTAL's small speculative recalls);\n"
    "               the gather-block lists then do not apply\n"
    "  --host-register: the host pool is page-aligned memory pinned with\n"
    "               cudaHostRegister (mapped, portable), as the library's\n"
    "               CUDA pool is since 0.3, instead of cudaHostAlloc\n"
    "  --pages: K, missing pages per (sequence, KV head) per recall\n"
    "  --conc-pages: pages per (sequence, KV head) of each recall that runs\n"
    "               beside the GEMMs (one layer's worth)\n"
    "  --small-units: units (page x KV head) in all of the small calls\n"
    "               a decode step makes (one sequence; multiples of\n"
    "               --kv-heads), timed as (b) and (c); none: skip them\n";

int parse_args(int argc, char **argv, config *c)
{
    memset(c, 0, sizeof *c);
    bool smoke = false;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke"))
            smoke = true;
    c->smoke = smoke;
    {
        const int b[] = {1, 8}, p[] = {32, 64, 128}, g[] = {2, 4, 8, 16, 32, 0};
        const int gb[] = {1, 8}, cb[] = {2, 4, 8, 16, 32};
        const int sb[] = {1}, sp[] = {32}, sg[] = {16, 0}, scb[] = {16};
        const int su[] = {8, 16, 32, 64}, ssu[] = {8, 64};
        if (smoke) {
            bench_set_list(c->batches, &c->nbatches, sb, 1);
            bench_set_list(c->pages, &c->npages, sp, 1);
            bench_set_list(c->blocks, &c->nblocks, sg, 2);
            bench_set_list(c->gemm_batches, &c->ngemm_batches, sb, 1);
            bench_set_list(c->conc_blocks, &c->nconc_blocks, scb, 1);
            bench_set_list(c->small_units, &c->nsmall_units, ssu, 2);
        } else {
            bench_set_list(c->batches, &c->nbatches, b, 2);
            bench_set_list(c->pages, &c->npages, p, 3);
            bench_set_list(c->blocks, &c->nblocks, g, 6);
            bench_set_list(c->gemm_batches, &c->ngemm_batches, gb, 2);
            bench_set_list(c->conc_blocks, &c->nconc_blocks, cb, 5);
            bench_set_list(c->small_units, &c->nsmall_units, su, 4);
        }
    }
    c->reps = smoke ? 5 : 50;
    c->warmup = smoke ? 2 : 5;
    c->unit_reps = smoke ? 2 : 10;
    c->big_mib = smoke ? 16 : 256;
    c->pool_pages = smoke ? 128 : 1024;
    c->kv_heads = 8;
    c->group = 4;
    c->head_dim = 128;
    c->page = 32;
    c->gemm = true;
    c->gemm_layers = smoke ? 2 : 32;
    c->gemm_reps = smoke ? 2 : 10;
    c->conc_pages = 16;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
#define NEEDV                                                                \
    do {                                                                     \
        if (!v) {                                                            \
            fprintf(stderr, "recall: %s needs a value\n%s", a, k_usage);     \
            return -1;                                                       \
        }                                                                    \
        i++;                                                                 \
    } while (0)
        if (!strcmp(a, "--smoke")) {
            continue;
        } else if (!strcmp(a, "--no-gemm")) {
            c->gemm = false;
        } else if (!strcmp(a, "--bulk-gather")) {
            c->bulk_gather = true;
        } else if (!strcmp(a, "--fused-plan")) {
            c->fused_plan = true;
        } else if (!strcmp(a, "--host-register")) {
            c->host_register = true;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(k_usage, stdout);
            exit(0);
        } else if (!strcmp(a, "--csv")) {
            NEEDV;
            c->csv = v;
        } else if (!strcmp(a, "--device")) {
            NEEDV;
            bad = bench_parse_int(v, 0, 1024, &c->device);
        } else if (!strcmp(a, "--batches")) {
            NEEDV;
            bad = bench_parse_list(v, 1, MAX_BATCH, c->batches, &c->nbatches,
                                   MAX_LIST);
        } else if (!strcmp(a, "--pages")) {
            NEEDV;
            bad = bench_parse_list(v, 1, 4096, c->pages, &c->npages, MAX_LIST);
        } else if (!strcmp(a, "--blocks")) {
            NEEDV;
            bad = bench_parse_list(v, 0, 65535, c->blocks, &c->nblocks,
                                   MAX_LIST);
        } else if (!strcmp(a, "--reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->reps);
        } else if (!strcmp(a, "--unit-reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->unit_reps);
        } else if (!strcmp(a, "--big-mib")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 65536, &c->big_mib);
        } else if (!strcmp(a, "--pool-pages")) {
            NEEDV;
            bad = bench_parse_int(v, 2, 1 << 20, &c->pool_pages);
        } else if (!strcmp(a, "--kv-heads")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 256, &c->kv_heads);
        } else if (!strcmp(a, "--group")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 64, &c->group);
        } else if (!strcmp(a, "--head-dim")) {
            NEEDV;
            bad = bench_parse_int(v, 64, 256, &c->head_dim) ||
                  (c->head_dim != 64 && c->head_dim != 128 &&
                   c->head_dim != 256);
        } else if (!strcmp(a, "--page")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 1024, &c->page);
        } else if (!strcmp(a, "--gemm-batches")) {
            NEEDV;
            bad = bench_parse_list(v, 1, MAX_BATCH, c->gemm_batches,
                                   &c->ngemm_batches, MAX_LIST);
        } else if (!strcmp(a, "--gemm-layers")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 128, &c->gemm_layers);
        } else if (!strcmp(a, "--gemm-reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 10000, &c->gemm_reps);
        } else if (!strcmp(a, "--conc-pages")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 4096, &c->conc_pages);
        } else if (!strcmp(a, "--conc-blocks")) {
            NEEDV;
            bad = bench_parse_list(v, 0, 65535, c->conc_blocks,
                                   &c->nconc_blocks, MAX_LIST);
        } else if (!strcmp(a, "--small-units")) {
            NEEDV;
            if (!strcmp(v, "none"))
                c->nsmall_units = 0;
            else
                bad = bench_parse_list(v, 1, 1 << 16, c->small_units,
                                       &c->nsmall_units, MAX_LIST);
        } else {
            fprintf(stderr, "recall: unknown argument '%s'\n%s", a, k_usage);
            return -1;
        }
#undef NEEDV
        if (bad) {
            fprintf(stderr, "recall: bad value '%s' for %s\n%s", v, a,
                    k_usage);
            return -1;
        }
    }
    int maxk = c->conc_pages;
    for (int i = 0; i < c->npages; i++)
        if (c->pages[i] > maxk)
            maxk = c->pages[i];
    for (int i = 0; i < c->nsmall_units; i++) {
        if (c->small_units[i] % c->kv_heads != 0) {
            fprintf(stderr,
                    "recall: --small-units %d is not a multiple of "
                    "--kv-heads %d (one sequence, K pages per KV head)\n",
                    c->small_units[i], c->kv_heads);
            return -1;
        }
        if (c->small_units[i] / c->kv_heads > maxk)
            maxk = c->small_units[i] / c->kv_heads;
    }
    if (c->pool_pages < 2 * maxk) {
        fprintf(stderr,
                "recall: --pool-pages (%d) must be at least twice the largest "
                "K (%d): each (sequence, KV head) alternates between two "
                "disjoint sets of K pages\n",
                c->pool_pages, maxk);
        return -1;
    }
    if ((2ull * c->page * c->head_dim * 2) % 16 != 0) {
        fprintf(stderr, "recall: a unit must be a multiple of 16 bytes\n");
        return -1;
    }
    return 0;
}

