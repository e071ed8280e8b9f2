/*
 * bench/decode's report: the CSV rows and the tables on stdout.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

static const char *const call_names[CALL_KINDS] = {"append", "attend", "select",
                                                   "recall"};

/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static const char *status_name(run_status s)
{
    switch (s) {
    case RUN_OK: return "ok";
    case RUN_HOST_MEM: return "host-mem";
    case RUN_DEVICE_MEM: return "device-mem";
    case RUN_TIME_LIMIT: return "time-limit";
    case RUN_OOM: return "out-of-memory";
    case RUN_UNSUPPORTED: return "unsupported";
    case RUN_NO_GRAPH: return "no-graph";
    }
    return "?";
}

const char *criterion_name(int c)
{
    return c == FKV_CRITERION_BOUNDED ? "bounded" : "cosine";
}

void fmt_threshold(char *buf, size_t n, double t)
{
    if (t <= FKV_CORRECTION_OFF)
        snprintf(buf, n, "off");
    else
        snprintf(buf, n, "%.2f", t);
}

void csv_header(FILE *f)
{
    fprintf(f, "backend,device,model,layers,q_heads,kv_heads,head_dim,hidden,"
               "intermediate,page,budget,sink,window,threshold,trace,policy,context,"
               "batch,status,note,warmup,steps,step_ms_median,step_ms_p90,"
               "host_enqueue_ms,tokens_per_s,corrections_per_step,"
               "heads_checked_per_step,correction_rate,pages_recalled_per_step,"
               "bytes_recalled_per_step,recall_fraction,churn,adjacent_cos,"
               "topics,device_bytes,host_bytes,gemm_ms,pcie_gbs,device_gbs,"
               "recall_bound_ms,attend_bound_ms,lower_bound_ms,prefill_s,"
               "criterion,min_mass,max_pages,graph,lib_host_ms,gemm_host_ms,"
               "pages_critical_per_step,bound_ratio,reserve_s,lib_append_ms,"
               "lib_attend_ms,lib_select_ms,lib_recall_ms,lib_graphs_per_step,"
               "spec_mass\n");
}

/* A number, or nothing for NAN. */
static void csv_num(FILE *f, double v)
{
    if (v == v)
        fprintf(f, ",%.6g", v);
    else
        fputs(",", f);
}

void csv_row(FILE *f, const engine *e, const args *a, const result *r)
{
    bool ok = r->status == RUN_OK;
    fprintf(f, "%s,\"%s\",%s,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%g,%s,%s,%lld,%d,%s,"
               "\"%s\",%d,%d",
            backend_name(e->backend), e->device_name, a->model_label,
            a->layers, a->q_heads, a->kv_heads, a->head_dim, a->hidden,
            a->intermediate, a->page, a->budget, a->sink, a->window,
            r->threshold, a->paper_trace ? "paper" : "drift",
            bench_policy_name(r->policy), (long long)r->ctx,
            r->batch, status_name(r->status), r->note, a->warmup, a->steps);
    double rate = r->heads_checked > 0 ? r->corrections / r->heads_checked
                                       : NAN;
    double vals[] = {
        ok ? r->ms_median : NAN, ok ? r->ms_p90 : NAN, ok ? r->host_ms : NAN,
        ok ? r->tokens_per_s : NAN, ok ? r->corrections : NAN,
        ok ? r->heads_checked : NAN, ok ? rate : NAN, ok ? r->pages : NAN,
        ok ? r->bytes : NAN, ok ? r->recall_frac : NAN, ok ? r->churn : NAN,
        ok ? r->cos_mean : NAN, ok ? (double)r->topics : NAN,
        ok ? (double)r->device_bytes : NAN, ok ? (double)r->host_bytes : NAN,
        r->gemm_ms == 0.0 ? NAN : r->gemm_ms,
        e->pcie_gbs > 0 ? e->pcie_gbs : NAN, e->dev_gbs > 0 ? e->dev_gbs : NAN,
        ok ? r->recall_bound_ms : NAN, ok ? r->attend_bound_ms : NAN,
        ok ? r->bound_ms : NAN, ok ? r->prefill_s : NAN};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
        csv_num(f, vals[i]);
    fprintf(f, ",%s,%g,%d,%d", criterion_name(a->criterion), a->min_mass,
            a->max_pages, a->graph);
    double more[] = {ok ? r->lib_host_ms : NAN, ok ? r->gemm_host_ms : NAN,
                     ok ? r->crit_pages : NAN,
                     ok && r->bound_ms > 0 ? r->ms_median / r->bound_ms : NAN,
                     ok ? r->reserve_s : NAN, ok ? r->lib_call_ms[CALL_APPEND] : NAN,
                     ok ? r->lib_call_ms[CALL_ATTEND] : NAN,
                     ok ? r->lib_call_ms[CALL_SELECT] : NAN,
                     ok ? r->lib_call_ms[CALL_RECALL] : NAN,
                     ok ? r->lib_graphs : NAN};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++)
        csv_num(f, more[i]);
    fprintf(f, ",%g\n", a->spec_mass);
    fflush(f);
}

static int cmp_result(const void *x, const void *y)
{
    const result *a = x, *b = y;
    if (a->ctx != b->ctx)
        return a->ctx < b->ctx ? -1 : 1;
    if (a->batch != b->batch)
        return a->batch < b->batch ? -1 : 1;
    if (a->policy != b->policy)
        return policy_rank(a->policy) - policy_rank(b->policy);
    return a->threshold_index - b->threshold_index;
}

/* Eager rows: the host time inside each fkv call per step (the decode
 * path's enqueue cost by call; none under --graph). */
static void print_call_table(const result *res, int n)
{
    int rows = 0, graphs = 0;
    for (int i = 0; i < n; i++) {
        rows += res[i].status == RUN_OK && res[i].lib_call_ms[0] == res[i].lib_call_ms[0];
        graphs |= res[i].status == RUN_OK && res[i].lib_graphs == res[i].lib_graphs;
    }
    if (rows == 0)
        return;
    bench_table t;
    bench_table_init(&t, 4 + CALL_KINDS + graphs);
    bench_table_add(&t, "%s", "context");
    bench_table_add(&t, "%s", "batch");
    bench_table_add(&t, "%s", "policy");
    bench_table_add(&t, "%s", "lib ms");
    for (int k = 0; k < CALL_KINDS; k++)
        bench_table_add(&t, "%s ms", call_names[k]);
    if (graphs)
        bench_table_add(&t, "%s", "graphs/st");
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        if (r->status != RUN_OK || r->lib_call_ms[0] != r->lib_call_ms[0])
            continue;
        bench_table_add(&t, "%lld", (long long)r->ctx);
        bench_table_add(&t, "%d", r->batch);
        bench_table_add(&t, "%s", bench_policy_name(r->policy));
        bench_table_add(&t, "%.3f", r->lib_host_ms);
        for (int k = 0; k < CALL_KINDS; k++)
            bench_table_add(&t, "%.3f", r->lib_call_ms[k]);
        if (graphs)
            bench_table_add(&t, "%.1f", r->lib_graphs);
    }
    printf("host time inside each fkv call per step (eager rows, medians)%s:\n",
           graphs ? "; graphs/st: the launch cache's graph launches per step"
                  : "");
    bench_table_print(&t, stdout);
    bench_table_free(&t);
}

void print_tables(const engine *e, const args *a, result *res, int n)
{
    qsort(res, (size_t)n, sizeof *res, cmp_result);
    bench_table t;
    enum { NCOL = 25 };
    bench_table_init(&t, NCOL);
    const char *head[NCOL] = {"context", "batch", "policy", "tau", "ms med",
                              "ms p90", "host ms", "lib ms", "GEMM host",
                              "tok/s", "corr/st", "chk/st", "pages/st",
                              "crit/st", "MiB/st", "churn%", "cos", "dev GiB",
                              "host GiB", "GEMM ms", "PCIe ms", "attn ms",
                              "bound", "x bnd", "note"};
    for (size_t i = 0; i < sizeof head / sizeof head[0]; i++)
        bench_table_add(&t, "%s", head[i]);
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        char b[NCOL - 1][48];
        bool ok = r->status == RUN_OK;
        snprintf(b[0], 48, "%lld", (long long)r->ctx);
        snprintf(b[1], 48, "%d", r->batch);
        snprintf(b[2], 48, "%s", bench_policy_name(r->policy));
        if (r->policy == FKV_POLICY_FREEKV)
            fmt_threshold(b[3], 48, r->threshold);
        else
            snprintf(b[3], 48, "-");
        bench_fmt(b[4], 48, "%.3f", ok ? r->ms_median : NAN);
        bench_fmt(b[5], 48, "%.3f", ok ? r->ms_p90 : NAN);
        bench_fmt(b[6], 48, "%.3f", ok ? r->host_ms : NAN);
        bench_fmt(b[7], 48, "%.3f", ok ? r->lib_host_ms : NAN);
        bench_fmt(b[8], 48, "%.3f", ok ? r->gemm_host_ms : NAN);
        bench_fmt(b[9], 48, "%.0f", ok ? r->tokens_per_s : NAN);
        bench_fmt(b[10], 48, "%.1f",
                  ok && r->heads_checked > 0 ? r->corrections : NAN);
        bench_fmt(b[11], 48, "%.0f",
                  ok && r->heads_checked > 0 ? r->heads_checked : NAN);
        bench_fmt(b[12], 48, "%.1f", ok ? r->pages : NAN);
        bench_fmt(b[13], 48, "%.1f", ok ? r->crit_pages : NAN);
        bench_fmt(b[14], 48, "%.2f", ok ? r->bytes / 1048576.0 : NAN);
        bench_fmt(b[15], 48, "%.1f", ok ? 100.0 * r->churn : NAN);
        bench_fmt(b[16], 48, "%.3f", ok ? r->cos_mean : NAN);
        bench_fmt(b[17], 48, "%.2f",
                  ok ? r->device_bytes / 1073741824.0 : NAN);
        bench_fmt(b[18], 48, "%.2f", ok ? r->host_bytes / 1073741824.0 : NAN);
        bench_fmt(b[19], 48, "%.3f", r->gemm_ms == 0.0 ? NAN : r->gemm_ms);
        bench_fmt(b[20], 48, "%.3f", ok ? r->recall_bound_ms : NAN);
        bench_fmt(b[21], 48, "%.3f", ok ? r->attend_bound_ms : NAN);
        bench_fmt(b[22], 48, "%.3f", ok ? r->bound_ms : NAN);
        bench_fmt(b[23], 48, "%.2f",
                  ok && r->bound_ms > 0 ? r->ms_median / r->bound_ms : NAN);
        for (int c = 0; c < NCOL - 1; c++)
            bench_table_add(&t, "%s", b[c]);
        bench_table_add(&t, "%s", r->note);
    }
    bench_table_print(&t, stdout);
    bench_table_free(&t);
    print_call_table(res, n);
    printf("ms med/p90: step latency over the timed steps (%s%s); host ms: "
           "host time to enqueue a step\n",
           e->backend == FKV_BACKEND_CUDA ? "CUDA events on the engine's "
                                            "stream"
                                          : "host clock",
           a->graph && e->backend == FKV_BACKEND_CUDA
               ? ", one graph replay per step" : "");
    printf("lib ms: host time inside the fkv calls per step; GEMM host: "
           "host time enqueueing the GEMM stand-ins (medians; - under "
           "--graph)\n");
    printf("tau: FREEKV's correction threshold (criterion %s); crit/st: "
           "pages moved inside fkv_attend per step (of pages/st)\n",
           criterion_name(a->criterion));
    printf("corr/st, chk/st: corrections and heads checked per step "
           "(FREEKV); pages/st, MiB/st: recalled per step\n");
    printf("churn%%: selected pages that changed per step (sampled, un-timed "
           "run); cos: mean adjacent-step query cosine\n");
    printf("bound: max(GEMM ms, PCIe ms = recalled bytes / H2D bandwidth, "
           "attn ms = attended bytes / device bandwidth); x bnd = ms med / "
           "bound\n");

    /* FREEKV against RESIDENT and SYNC, per (context, batch). */
    bench_table r;
    bench_table_init(&r, 9);
    const char *rh[] = {"context", "batch", "tau", "FREEKV ms", "RESIDENT ms",
                        "SYNC ms", "FREEKV/RESIDENT", "FREEKV/SYNC", "target"};
    for (size_t i = 0; i < sizeof rh / sizeof rh[0]; i++)
        bench_table_add(&r, "%s", rh[i]);
    int rows = 0;
    for (int i = 0; i < n; i++) {
        if (res[i].policy != FKV_POLICY_FREEKV || res[i].status != RUN_OK)
            continue;
        double fk = res[i].ms_median, rs = NAN, sy = NAN;
        for (int j = 0; j < n; j++) {
            if (res[j].ctx != res[i].ctx || res[j].batch != res[i].batch ||
                res[j].status != RUN_OK)
                continue;
            if (res[j].policy == FKV_POLICY_RESIDENT)
                rs = res[j].ms_median;
            if (res[j].policy == FKV_POLICY_SYNC)
                sy = res[j].ms_median;
        }
        char c[5][48];
        bench_fmt(c[0], 48, "%.3f", fk);
        bench_fmt(c[1], 48, "%.3f", rs);
        bench_fmt(c[2], 48, "%.3f", sy);
        bench_fmt(c[3], 48, "%.3f", fk / rs);
        bench_fmt(c[4], 48, "%.3f", fk / sy);
        char tau[16];
        fmt_threshold(tau, sizeof tau, res[i].threshold);
        bench_table_add(&r, "%lld", (long long)res[i].ctx);
        bench_table_add(&r, "%d", res[i].batch);
        bench_table_add(&r, "%s", tau);
        for (int k = 0; k < 5; k++)
            bench_table_add(&r, "%s", c[k]);
        bench_table_add(&r, "%s", "<= 1.10 / <= 0.50");
        rows++;
    }
    if (rows) {
        printf("\n");
        bench_table_print(&r, stdout);
    }
    bench_table_free(&r);
}

