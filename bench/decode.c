/*
 * bench/decode: decode-step latency of libfreekv's policies on a synthetic
 * model shaped like Llama-3.1-8B (or Qwen2.5-7B, or any shape by flag).
 *
 * Per decode step and layer, in the documented order:
 *   QKV GEMM, fkv_append, fkv_attend, fkv_select, fkv_recall, O GEMM,
 *   gate+up GEMM, down GEMM
 * on the engine's stream (fkv_set_stream). The GEMMs (cuBLAS, bf16 with fp32
 * accumulation, random weights of the real shapes) stand in for the model's
 * own work; they run on the CUDA backend only.
 *
 * For each (context, batch, policy) of the sweep: prefill by bulk appends
 * (chunks of --prefill-chunk tokens per layer), warm-up steps, timed steps
 * (CUDA events on the engine's stream around each whole step; the host clock
 * on the CPU backend), the stats' deltas over the timed steps, then a short
 * un-timed run that reads fkv_get_selected_pages on a sample of (layer,
 * sequence, KV head) to measure the churn of the selection. The same run
 * measures the step's lower bounds: the GEMMs alone (the same loop without
 * fkv calls), the recalled bytes over the PCIe bandwidth (one 256 MiB pinned
 * host-to-device copy) and the attended bytes over the device bandwidth (a
 * 1 GiB device-to-device copy, read + write counted).
 *
 * Synthetic data (the same for every policy of one context and batch):
 * keys are clustered by "topic" (the text is segments of 32-112 tokens of
 * one topic each; each (layer, KV head) has its own centre per topic, plus
 * low-rank noise and a few outlier channels), and each KV group's query
 * rotates slowly from one topic present in its sequence towards another,
 * with a per-head component, per-head noise and occasional jumps. Tuned so
 * that the adjacent-step query cosine averages 0.7-0.85 and 10-25% of the
 * selected pages change per step (DESIGN section 7); both are measured and
 * reported with every latency. --trace drift (the default) gives every head
 * the same spread of noise (cosine about 0.77, so about half of the KV
 * groups' mean cosine falls below 0.8); --trace paper makes most heads
 * stable (cosine above 0.9) and 15% volatile, the spread the FreeKV paper
 * reports, on the same keys.
 *
 * Also per row: the host time inside the fkv calls and, separately, in the
 * GEMM enqueues; the pages moved inside fkv_attend (critical path). FREEKV
 * runs once per --thresholds entry, with --criterion's rule. --graph (CUDA)
 * captures one whole step once per configuration and replays it for the
 * timed steps (docs/benchmarks.md, "Method"). The eager timed steps run
 * between cudaProfilerStart and cudaProfilerStop (no-ops without a
 * profiler), so `ncu --profile-from-start off` sees those steps only.
 *
 * Output: progress on stderr, the table (and the FREEKV ratios) on stdout
 * at the end, a CSV with one row per configuration with --csv FILE (written
 * as each configuration finishes). --help lists the flags.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

/* ------------------------------------------------------------------------ */
/* Main                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct plan_item {
    int ci, bi, ti; /* ti: index in thresholds (FREEKV; else 0) */
    fkv_policy policy;
    int tier;
} plan_item;

static int cmp_plan(const void *x, const void *y)
{
    const plan_item *a = x, *b = y;
    if (a->tier != b->tier)
        return a->tier - b->tier;
    if (a->ci != b->ci)
        return a->ci - b->ci;
    if (a->bi != b->bi)
        return a->bi - b->bi;
    if (a->policy != b->policy)
        return policy_rank(a->policy) - policy_rank(b->policy);
    return a->ti - b->ti;
}

int main(int argc, char **argv)
{
    args a;
    parse_args(argc, argv, &a, 0);

    if (fkv_version_number() / 10000 != FKV_VERSION_MAJOR ||
        fkv_version_number() < FKV_VERSION_NUMBER)
        bench_die("built against libfreekv %d.%d.%d, linked with %s",
                  FKV_VERSION_MAJOR, FKV_VERSION_MINOR, FKV_VERSION_PATCH,
                  fkv_version_string());

    const double t_start = bench_now_ms();
    engine e;
    memset(&e, 0, sizeof e);
    resolve_backend(&a, &e);
    /* The CPU backend runs the --smoke sizes unless flags say otherwise:
     * the model's sizes would take hours there. */
    int cpu_sizes = e.backend == FKV_BACKEND_CPU && !a.smoke;
    if (cpu_sizes)
        parse_args(argc, argv, &a, 1);
    e.use_gemm = a.gemm && e.backend == FKV_BACKEND_CUDA;
    for (int b = 0; b < a.n_batches; b++)
        if (a.batches[b] > e.max_batch)
            e.max_batch = (int)a.batches[b];
    snprintf(e.device_name, sizeof e.device_name, "host");
#ifdef FKV_WITH_CUDA
    if (e.backend == FKV_BACKEND_CUDA)
        engine_cuda_init(&e, &a);
#endif
    if (e.backend == FKV_BACKEND_CPU)
        e.out = bench_xcalloc((size_t)e.max_batch * a.hidden, 2);

    /* Header (stderr: progress; the table goes to stdout at the end). */
    const int K = selected_pages_k(&a);
    fprintf(stderr, "libfreekv %s decode benchmark\n", fkv_version_string());
    fprintf(stderr, "backend: %s (%s)%s%s\n", backend_name(e.backend),
            e.device_name, e.why_cpu[0] ? ": " : "", e.why_cpu);
    fprintf(stderr, "model: %s, %d layers, %d query heads, %d KV heads, "
            "head_dim %d, hidden %d, intermediate %d, bf16\n", a.model_label,
            a.layers, a.q_heads, a.kv_heads, a.head_dim, a.hidden,
            a.intermediate);
    char taus[MAX_LIST * 8 + 1] = "";
    for (int i = 0; i < a.n_thresholds; i++) {
        char one[16];
        fmt_threshold(one, sizeof one, a.thresholds[i]);
        snprintf(taus + strlen(taus), sizeof taus - strlen(taus), "%s%s",
                 i ? "," : "", one);
    }
    fprintf(stderr, "cache: page %d, budget %d (sink %d, window %d, %d "
            "selected pages), threshold %s, criterion %s", a.page, a.budget,
            a.sink, a.window, K, taus, criterion_name(a.criterion));
    if (a.criterion == FKV_CRITERION_BOUNDED)
        fprintf(stderr, " (min mass %g, max pages %d, speculative mass %g)",
                a.min_mass, a.max_pages, a.spec_mass);
    fprintf(stderr, "%s%s\n", a.graph ? "; timed steps replay a CUDA graph"
                                       : "",
            a.select_q ? "; fkv_select given the query" : "");
    fprintf(stderr, "steps: %d warm-up, %d timed, %d for the churn\n",
            a.warmup, a.steps, a.churn_steps);
    if (cpu_sizes)
        fprintf(stderr, "sizes: --smoke's (the CPU backend's default); "
                "flags override them\n");
    if (e.backend == FKV_BACKEND_CUDA) {
#ifdef FKV_WITH_CUDA
        fprintf(stderr, "measured: H2D pinned %.1f GB/s, device %.0f GB/s "
                "(read + write); GEMM weights %.2f GiB%s\n", e.pcie_gbs,
                e.dev_gbs, e.weight_bytes / 1073741824.0,
                e.use_gemm ? "" : " (--no-gemm)");
#endif
    } else {
        fprintf(stderr, "CPU backend: no GEMMs, host clock\n");
    }
    if (K <= 0)
        bench_die("budget %d leaves no selected pages after sink %d and "
                  "window %d", a.budget, a.sink, a.window);

    /* The sweep, most important first (see usage). */
    int per_cb = 0; /* runs per (context, batch) */
    for (int p = 0; p < a.n_policies; p++)
        per_cb += a.policies[p] == FKV_POLICY_FREEKV ? a.n_thresholds : 1;
    const int n_items = a.n_contexts * a.n_batches * per_cb;
    plan_item *plan = bench_xmalloc((size_t)n_items * sizeof *plan);
    int64_t long_ctx = 32768;
    int64_t max_ctx = 0;
    for (int c = 0; c < a.n_contexts; c++)
        if (a.contexts[c] > max_ctx)
            max_ctx = a.contexts[c];
    if (max_ctx < long_ctx)
        long_ctx = max_ctx;
    int k = 0;
    for (int c = 0; c < a.n_contexts; c++)
        for (int b = 0; b < a.n_batches; b++)
            for (int p = 0; p < a.n_policies; p++)
            for (int ti = 0; ti < (a.policies[p] == FKV_POLICY_FREEKV
                                       ? a.n_thresholds : 1); ti++) {
                plan_item *it = &plan[k++];
                it->ci = c;
                it->bi = b;
                it->ti = ti;
                it->policy = a.policies[p];
                bool lng = a.contexts[c] >= long_ctx;
                int tier = it->policy == FKV_POLICY_FREEKV ||
                                   it->policy == FKV_POLICY_RESIDENT
                               ? 0
                               : it->policy == FKV_POLICY_SYNC ? 1 : 2;
                it->tier = lng ? tier : 3 + tier;
            }
    qsort(plan, (size_t)n_items, sizeof *plan, cmp_plan);

    FILE *csv = NULL;
    if (a.csv) {
        csv = fopen(a.csv, "w");
        if (!csv)
            bench_die("cannot write %s", a.csv);
        csv_header(csv);
        fflush(csv);
    }

    result *res = bench_xcalloc((size_t)n_items, sizeof *res);
    for (int i = 0; i < n_items; i++) {
        const plan_item *it = &plan[i];
        result *r = &res[i];
        r->ctx = a.contexts[it->ci];
        r->batch = (int)a.batches[it->bi];
        r->batch_index = it->bi;
        r->policy = it->policy;
        r->threshold = a.thresholds[it->ti];
        r->threshold_index = it->ti;
        double elapsed = (bench_now_ms() - t_start) * 1e-3;
        if (a.time_limit_s > 0 && elapsed > a.time_limit_s) {
            r->status = RUN_TIME_LIMIT;
            r->churn = NAN;
            snprintf(r->note, sizeof r->note, "not run: --time-limit %g s",
                     a.time_limit_s);
        } else {
            double t0 = bench_now_ms();
            run_config(&e, &a, it->ci, it->bi, it->policy, r->threshold, r);
            char tau[24] = "";
            if (r->policy == FKV_POLICY_FREEKV && a.n_thresholds > 1) {
                char one[16];
                fmt_threshold(one, sizeof one, r->threshold);
                snprintf(tau, sizeof tau, " tau %s", one);
            }
            fprintf(stderr, "[%d/%d %5.0f s] %-8s%s context %7lld batch %3d: ",
                    i + 1, n_items, elapsed, bench_policy_name(r->policy),
                    tau, (long long)r->ctx, r->batch);
            if (r->status == RUN_OK) {
                char churn[32];
                bench_fmt(churn, sizeof churn, "%.1f%%", 100.0 * r->churn);
                char reserve[48] = "";
                if (r->reserve_s == r->reserve_s)
                    snprintf(reserve, sizeof reserve, "reserve %.1f s, ",
                             r->reserve_s);
                fprintf(stderr, "%.3f ms (p90 %.3f), %.1f pages/step, "
                        "%.1f corrections/step, churn %s, cos %.3f, %sprefill "
                        "%.1f s, %.1f s in all\n", r->ms_median, r->ms_p90,
                        r->pages, r->corrections, churn, r->cos_mean, reserve,
                        r->prefill_s, (bench_now_ms() - t0) * 1e-3);
            } else
                fprintf(stderr, "%s\n", r->note);
        }
        if (csv)
            csv_row(csv, &e, &a, r);
    }
    if (csv && fclose(csv) != 0)
        bench_die("cannot write %s", a.csv);

    fflush(stderr);
    printf("libfreekv %s decode: backend %s (%s), %s (%d layers, %d/%d "
           "heads, head_dim %d), budget %d, threshold %s, criterion %s, "
           "trace %s, %d timed steps%s; %.0f s\n",
           fkv_version_string(), backend_name(e.backend), e.device_name,
           a.model_label, a.layers, a.q_heads, a.kv_heads, a.head_dim,
           a.budget, taus, criterion_name(a.criterion),
           a.paper_trace ? "paper" : "drift", a.steps,
           a.graph ? " (CUDA graph replays)" : "", (bench_now_ms() - t_start) * 1e-3);
    if (e.backend == FKV_BACKEND_CUDA)
        printf("H2D pinned %.1f GB/s, device %.0f GB/s (read + write)\n",
               e.pcie_gbs, e.dev_gbs);
    print_tables(&e, &a, res, n_items);

    free(res);
    free(plan);
#ifdef FKV_WITH_CUDA
    if (e.backend == FKV_BACKEND_CUDA)
        engine_cuda_free(&e);
#endif
    if (e.backend == FKV_BACKEND_CPU)
        free(e.out);
    return 0;
}
