/*
 * bench/recall's result rows, their table and their CSV.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

#ifdef FKV_WITH_CUDA

row *g_rows;
int g_nrows;
static size_t g_cap;
const char *g_h2d_section = "h2d";

row *add_row(const char *section, const char *variant, int batch,
             int pages, int blocks)
{
    g_rows = bench_grow(g_rows, &g_cap, (size_t)g_nrows, sizeof *g_rows);
    row *r = &g_rows[g_nrows++];
    memset(r, 0, sizeof *r);
    snprintf(r->section, sizeof r->section, "%s", section);
    snprintf(r->variant, sizeof r->variant, "%s", variant);
    r->batch = batch;
    r->pages = pages;
    r->blocks = blocks;
    r->mib = r->us = r->gbps = r->pct = NAN;
    r->gemm_ms = r->alone_ms = r->slow_pct = r->rec_gbps = NAN;
    r->rec_alone_gbps = NAN;
    return r;
}


/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static void fmt_int(char *buf, size_t n, int v)
{
    if (v < 0)
        snprintf(buf, n, "-");
    else
        snprintf(buf, n, "%d", v);
}

void print_table(const char *device_name, double big_gbps,
                 int kv_heads)
{
    printf("\n== recall: host -> device, %s (one large pinned copy: %.2f "
           "GB/s; target: recall >= 90%%) ==\n",
           device_name, big_gbps);
    printf("%-30s %5s %6s %6s %8s %10s %8s %7s\n", "variant", "batch",
           "K/head", "blocks", "MiB", "time_us", "GB/s", "%big");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        if (strcmp(r->section, "h2d"))
            continue;
        char b[16], k[16], g[16], mib[24], us[24], gb[24], pct[24];
        fmt_int(b, sizeof b, r->batch);
        fmt_int(k, sizeof k, r->pages);
        fmt_int(g, sizeof g, r->blocks);
        bench_fmt(mib, sizeof mib, "%.1f", r->mib);
        bench_fmt(us, sizeof us, "%.1f", r->us);
        bench_fmt(gb, sizeof gb, "%.2f", r->gbps);
        bench_fmt(pct, sizeof pct, "%.1f", r->pct);
        printf("%-30s %5s %6s %6s %8s %10s %8s %7s\n", r->variant, b, k, g,
               mib, us, gb, pct);
    }
    bool small = false;
    for (int i = 0; i < g_nrows; i++)
        small = small || !strcmp(g_rows[i].section, "small");
    if (small) {
        printf("\n== the small calls of a decode step: one sequence, a few "
               "units (launch and per-call cost) ==\n");
        printf("%-30s %6s %6s %6s %10s %9s %8s %7s\n", "variant", "units",
               "K/head", "blocks", "time_us", "us/unit", "GB/s", "%big");
        for (int i = 0; i < g_nrows; i++) {
            const row *r = &g_rows[i];
            if (strcmp(r->section, "small"))
                continue;
            const int units = r->batch * kv_heads * r->pages;
            char u[16], k[16], g[16], us[24], per[24], gb[24], pct[24];
            fmt_int(u, sizeof u, units);
            fmt_int(k, sizeof k, r->pages);
            fmt_int(g, sizeof g, r->blocks);
            bench_fmt(us, sizeof us, "%.1f", r->us);
            bench_fmt(per, sizeof per, "%.2f", r->us / units);
            bench_fmt(gb, sizeof gb, "%.2f", r->gbps);
            bench_fmt(pct, sizeof pct, "%.1f", r->pct);
            printf("%-30s %6s %6s %6s %10s %9s %8s %7s\n", r->variant, u, k,
                   g, us, per, gb, pct);
        }
    }
    bool any = false;
    for (int i = 0; i < g_nrows; i++)
        any = any || !strcmp(g_rows[i].section, "gemm");
    if (!any)
        return;
    printf("\n== recall beside the GEMMs of a Llama-3.1-8B decode step "
           "(continuous recall on a lower-priority stream) ==\n");
    printf("%-30s %5s %9s %9s %9s %13s %11s\n", "variant", "batch", "gemm_ms",
           "alone_ms", "slowdown%", "recall_GB/s*", "alone_GB/s");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        if (strcmp(r->section, "gemm"))
            continue;
        char b[16], gm[24], am[24], sl[24], rb[24], ab[24];
        fmt_int(b, sizeof b, r->batch);
        bench_fmt(gm, sizeof gm, "%.3f", r->gemm_ms);
        bench_fmt(am, sizeof am, "%.3f", r->alone_ms);
        bench_fmt(sl, sizeof sl, "%.1f", r->slow_pct);
        bench_fmt(rb, sizeof rb, "%.2f", r->rec_gbps);
        bench_fmt(ab, sizeof ab, "%.2f", r->rec_alone_gbps);
        printf("%-30s %5s %9s %9s %9s %13s %11s\n", r->variant, b, gm, am, sl,
               rb, ab);
    }
    printf("* recall bandwidth achieved while the GEMMs ran\n");
}

static void csv_num(FILE *f, double v)
{
    if (!isnan(v))
        fprintf(f, "%.4f", v);
}

static void csv_int(FILE *f, int v)
{
    if (v >= 0)
        fprintf(f, "%d", v);
}

void write_csv(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        bench_die("cannot open %s for writing", path);
    fprintf(f, "section,variant,batch,pages_per_head,gather_blocks,mib,"
               "time_us,gbps,pct_of_big_copy,gemm_ms,gemm_alone_ms,"
               "slowdown_pct,recall_gbps_meanwhile,recall_gbps_alone\n");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        fprintf(f, "%s,%s,", r->section, r->variant);
        csv_int(f, r->batch);
        fputc(',', f);
        csv_int(f, r->pages);
        fputc(',', f);
        csv_int(f, r->blocks);
        const double v[] = {r->mib,     r->us,       r->gbps,
                            r->pct,     r->gemm_ms,  r->alone_ms,
                            r->slow_pct, r->rec_gbps, r->rec_alone_gbps};
        for (size_t j = 0; j < sizeof v / sizeof v[0]; j++) {
            fputc(',', f);
            csv_num(f, v[j]);
        }
        fputc('\n', f);
    }
    if (fclose(f) != 0)
        bench_die("writing %s failed", path);
    printf("wrote %s (%d rows)\n", path, g_nrows);
}


#endif /* FKV_WITH_CUDA */
