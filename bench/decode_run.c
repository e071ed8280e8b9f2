/*
 * bench/decode's run of one configuration: prefill, warm-up, the timed
 * steps (eager or graph replays), the GEMMs alone and the bounds, the churn.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

#ifdef FKV_WITH_CUDA
#include <cuda_profiler_api.h>

#include "internal.h" /* fkvi_debug_launch_cache: the launch cache's counts */
#endif

/* ------------------------------------------------------------------------ */
/* One configuration                                                        */
/* ------------------------------------------------------------------------ */

typedef struct run_ctx {
    engine *e;
    const args *a;
    workload *w;
    fkv_cache *cache;
    fkv_batch step;
    int batch;
    /* Host time of the last decode_step inside the fkv calls and in the
     * GEMM enqueues (a host clock read around each call). */
    double lib_ms, gemm_host_ms;
    double call_ms[CALL_KINDS]; /* lib_ms by call */
    /* Under capture: an fkv call that fails is recorded here (and the
     * step's later fkv calls skipped) instead of ending the program. */
    int soft;
    fkv_status failed;
    char fail_msg[140];
    /* --graph: the step reads its inputs from w->q_cur, k_cur, v_cur. */
    int staged;
} run_ctx;

static void step_check(run_ctx *rc, fkv_status st, const char *what,
                       const char *file, int line)
{
    if (st == FKV_OK)
        return;
    if (!rc->soft)
        bench_fkv_check(st, rc->cache, what, file, line);
    if (rc->failed == FKV_OK) {
        char msg[112];
        fkv_last_error(rc->cache, msg, sizeof msg);
        rc->failed = st;
        snprintf(rc->fail_msg, sizeof rc->fail_msg, "%s: %s",
                 fkv_status_string(st), msg);
    }
}

/* An fkv call of the step: timed into rc->lib_ms, checked. */
#define STEP_FKV(rc, kind, call)                                             \
    do {                                                                     \
        if ((rc)->failed == FKV_OK) {                                        \
            double t_ = bench_now_ms();                                      \
            fkv_status st_ = (call);                                         \
            t_ = bench_now_ms() - t_;                                        \
            (rc)->lib_ms += t_;                                              \
            (rc)->call_ms[kind] += t_;                                       \
            step_check((rc), st_, #call, __FILE__, __LINE__);                \
        }                                                                    \
    } while (0)

/* One decode step (every layer) at step index t of the trace. */
static void decode_step(run_ctx *rc, int t, int with_fkv)
{
    engine *e = rc->e;
    const args *a = rc->a;
    const int L = a->layers;
#ifdef FKV_WITH_CUDA
    const int use_gemm = e->backend == FKV_BACKEND_CUDA && e->use_gemm;
    const int B = rc->batch, hid = a->hidden, inter = a->intermediate;
#endif
    rc->lib_ms = rc->gemm_host_ms = 0.0;
    for (int k = 0; k < CALL_KINDS; k++)
        rc->call_ms[k] = 0.0;
    for (int l = 0; l < L; l++) {
#ifdef FKV_WITH_CUDA
        const uint16_t *wl = NULL;
        if (use_gemm) {
            double t0 = bench_now_ms();
            wl = (const uint16_t *)e->weights + (size_t)l * e->w_layer;
            gemm_bf16(e, (int)e->n_qkv, B, hid, wl + e->w_qkv, e->x, hid,
                      e->qkv);
            rc->gemm_host_ms += bench_now_ms() - t0;
        }
#endif
        if (with_fkv) {
            workload *w = rc->w;
            const size_t Bz = (size_t)w->batch;
            const void *k, *v, *q;
#ifdef FKV_WITH_CUDA
            if (rc->staged) {
                const size_t kv_off = (size_t)l * Bz * w->HD * 2;
                k = (const char *)w->k_cur + kv_off;
                v = (const char *)w->v_cur + kv_off;
                q = (const char *)w->q_cur +
                    (size_t)l * Bz * w->QH * w->D * 2;
            } else
#endif
            {
                const size_t kv_off =
                    (((size_t)l * w->T + (size_t)t) * Bz) * w->HD * 2;
                const size_t q_off =
                    (((size_t)t * w->L + (size_t)l) * Bz) * w->QH * w->D * 2;
                k = (const char *)w->kdec + kv_off;
                v = (const char *)w->vdec + kv_off;
                q = (const char *)w->q_mem + q_off;
            }
            fkv_cache *c = rc->cache;
            STEP_FKV(rc, CALL_APPEND, fkv_append(c, l, &rc->step, k, v));
            STEP_FKV(rc, CALL_ATTEND, fkv_attend(c, l, &rc->step, q, e->out));
            /* NULL: the attend's query (nothing launched). */
            STEP_FKV(rc, CALL_SELECT,
                     fkv_select(c, l, &rc->step, a->select_q ? q : NULL));
            STEP_FKV(rc, CALL_RECALL, fkv_recall(c, l, &rc->step));
        }
#ifdef FKV_WITH_CUDA
        if (use_gemm) {
            double t0 = bench_now_ms();
            gemm_bf16(e, hid, B, hid, wl + e->w_o, e->out, hid, e->h);
            gemm_bf16(e, 2 * inter, B, hid, wl + e->w_gu, e->h, hid, e->gu);
            gemm_bf16(e, hid, B, inter, wl + e->w_down, e->gu, 2 * inter,
                      e->x);
            rc->gemm_host_ms += bench_now_ms() - t0;
        }
#endif
    }
}

/* Per timed step: device (or host) time, host enqueue time, host time in
 * the fkv calls and in the GEMM enqueues (the last two NAN for a replay). */
typedef struct step_times {
    double *ms, *host, *lib, *gemm;
    double *call[CALL_KINDS]; /* lib by call */
    double graphs; /* launch cache graph launches per timed eager step */
} step_times;

/* The launch cache's graph launches so far (NAN: off, or not CUDA). */
static double cache_graph_launches(const fkv_cache *c)
{
#ifdef FKV_WITH_CUDA
    fkvi_launch_cache_counts n;
    if (c && fkvi_debug_launch_cache(c, &n))
        return (double)n.graph_launches;
#else
    (void)c;
#endif
    return NAN;
}

static void step_times_alloc(step_times *st, int steps)
{
    st->ms = bench_xmalloc((size_t)steps * sizeof *st->ms);
    st->host = bench_xmalloc((size_t)steps * sizeof *st->host);
    st->lib = bench_xmalloc((size_t)steps * sizeof *st->lib);
    st->gemm = bench_xmalloc((size_t)steps * sizeof *st->gemm);
    for (int k = 0; k < CALL_KINDS; k++)
        st->call[k] = bench_xmalloc((size_t)steps * sizeof *st->call[k]);
    st->graphs = NAN; /* replays: the cache is bypassed under capture */
}

static void step_times_free(step_times *st)
{
    free(st->ms);
    free(st->host);
    free(st->lib);
    free(st->gemm);
    for (int k = 0; k < CALL_KINDS; k++)
        free(st->call[k]);
}

#ifdef FKV_WITH_CUDA
/* Copies trace step t's queries and new K/V where the captured step reads
 * them (on the engine's stream, before the replay's start event). */
static void stage_inputs(run_ctx *rc, int t)
{
    engine *e = rc->e;
    workload *w = rc->w;
    const size_t B = (size_t)w->batch, L = (size_t)w->L;
    const size_t qstep = L * B * (size_t)w->QH * w->D * 2;
    const size_t kvrow = B * (size_t)w->HD * 2;
    BENCH_CUDA_CHECK(cudaMemcpyAsync(w->q_cur,
                                     (const char *)w->q_mem + (size_t)t * qstep,
                                     qstep, cudaMemcpyDeviceToDevice,
                                     e->stream));
    /* kdec is [L][T][batch][HD]: one row of batch * HD per layer. */
    BENCH_CUDA_CHECK(cudaMemcpy2DAsync(
        w->k_cur, kvrow, (const char *)w->kdec + (size_t)t * kvrow,
        (size_t)w->T * kvrow, kvrow, L, cudaMemcpyDeviceToDevice, e->stream));
    BENCH_CUDA_CHECK(cudaMemcpy2DAsync(
        w->v_cur, kvrow, (const char *)w->vdec + (size_t)t * kvrow,
        (size_t)w->T * kvrow, kvrow, L, cudaMemcpyDeviceToDevice, e->stream));
}

/* --graph: captures the step at trace index t0 once and replays it `steps`
 * times (inputs of steps t0, t0 + 1, ... staged before each replay).
 * Returns false with the reason in why when the step cannot be captured,
 * instantiated or replayed. */
static bool time_replays(run_ctx *rc, int t0, int steps, int with_fkv,
                         step_times *out, char *why, size_t why_len)
{
    engine *e = rc->e;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t ce;
    bool ok = false;
    bench_timer tm;
    if (with_fkv) {
        /* Pool blocks for every token the replays and the churn run add:
         * none can be allocated under capture (docs/design.md section 6). */
        for (int s = 0; s < rc->batch; s++) {
            fkv_status st = fkv_seq_reserve(rc->cache, rc->step.seq_ids[s],
                                            rc->w->ctx + rc->w->T);
            if (st != FKV_OK) {
                snprintf(why, why_len, "fkv_seq_reserve: %s",
                         fkv_status_string(st));
                return false;
            }
        }
        fkv_status st = fkv_sync(rc->cache);
        if (st != FKV_OK) {
            snprintf(why, why_len, "fkv_sync before capture: %s",
                     fkv_status_string(st));
            return false;
        }
    }
    rc->staged = 1;
    rc->soft = 1;
    rc->failed = FKV_OK;
    BENCH_CUDA_CHECK(cudaStreamBeginCapture(e->stream,
                                            cudaStreamCaptureModeThreadLocal));
    decode_step(rc, t0, with_fkv);
    ce = cudaStreamEndCapture(e->stream, &graph);
    rc->soft = 0;
    if (rc->failed != FKV_OK || ce != cudaSuccess || !graph) {
        snprintf(why, why_len, "not capturable: %s",
                 rc->failed != FKV_OK ? rc->fail_msg : cudaGetErrorString(ce));
        (void)cudaGetLastError(); /* a capture error is not sticky */
        goto done;
    }
    ce = cudaGraphInstantiateWithFlags(&exec, graph,
                                       cudaGraphInstantiateFlagUseNodePriority);
    if (ce == cudaSuccess)
        ce = cudaGraphUpload(exec, e->stream);
    if (ce != cudaSuccess) {
        snprintf(why, why_len, "graph instantiate: %s", cudaGetErrorString(ce));
        (void)cudaGetLastError();
        goto done;
    }
    bench_timer_init(&tm, 1, e->stream);
    for (int i = 0; i < steps; i++) {
        if (with_fkv)
            stage_inputs(rc, t0 + i);
        bench_timer_start(&tm);
        ce = cudaGraphLaunch(exec, e->stream);
        out->host[i] = bench_timer_stop(&tm);
        if (ce != cudaSuccess)
            break;
        out->ms[i] = bench_timer_elapsed_ms(&tm);
        out->lib[i] = out->gemm[i] = NAN;
        for (int k = 0; k < CALL_KINDS; k++)
            out->call[k][i] = NAN;
    }
    bench_timer_free(&tm);
    if (ce != cudaSuccess) {
        snprintf(why, why_len, "graph launch: %s", cudaGetErrorString(ce));
        goto done;
    }
    if (with_fkv) {
        /* Refreshes the host's lengths; reports an append past the
         * reservation. */
        fkv_status st = fkv_sync(rc->cache);
        if (st != FKV_OK) {
            char msg[96];
            fkv_last_error(rc->cache, msg, sizeof msg);
            snprintf(why, why_len, "fkv_sync after replays: %s: %s",
                     fkv_status_string(st), msg);
            goto done;
        }
    }
    ok = true;
done:
    rc->staged = 0;
    if (!ok && with_fkv) {
        /* A capture cut short counted its calls on the host: fkv_sync
         * brings the host's view back to the device's (its status is not
         * the reason reported). */
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
        (void)fkv_sync(rc->cache);
    }
    if (exec)
        BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
    if (graph)
        BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
    return ok;
}
#endif

/* Times `steps` steps after `warmup` ones, from trace step t0: eager, or
 * with --graph (CUDA) replays of the step captured after the warm-up.
 * Returns false (reason in why) when --graph cannot capture or replay. */
static bool time_steps(run_ctx *rc, int t0, int warmup, int steps,
                       int with_fkv, step_times *out, char *why,
                       size_t why_len)
{
    engine *e = rc->e;
    bench_timer tm;
    void *stream = NULL;
#ifdef FKV_WITH_CUDA
    stream = e->stream;
#endif
    /* --fixed-inputs: the eager steps read the staged buffers, as the
     * replays do (an engine's q is its QKV GEMM's output buffer). */
    const bool fixed = rc->a->fixed_inputs && !rc->a->graph && with_fkv &&
                       e->backend == FKV_BACKEND_CUDA;
    rc->staged = fixed;
    for (int i = 0; i < warmup; i++) {
#ifdef FKV_WITH_CUDA
        if (fixed)
            stage_inputs(rc, t0 + i);
#endif
        decode_step(rc, t0 + i, with_fkv);
    }
    if (with_fkv)
        BENCH_FKV_CHECK(rc->cache, fkv_reset_stats(rc->cache)); /* waits */
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
    if (rc->a->graph && e->backend == FKV_BACKEND_CUDA)
        return time_replays(rc, t0 + warmup, steps, with_fkv, out, why,
                            why_len);
#endif
    if (rc->a->graph) {
        snprintf(why, why_len, "--graph needs the CUDA backend");
        return false;
    }
    bench_timer_init(&tm, e->backend == FKV_BACKEND_CUDA, stream);
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA && with_fkv)
        BENCH_CUDA_CHECK(cudaProfilerStart());
#endif
    const double graphs0 = with_fkv ? cache_graph_launches(rc->cache) : NAN;
    for (int i = 0; i < steps; i++) {
#ifdef FKV_WITH_CUDA
        if (fixed)
            stage_inputs(rc, t0 + warmup + i);
#endif
        bench_timer_start(&tm);
        decode_step(rc, t0 + warmup + i, with_fkv);
        out->host[i] = bench_timer_stop(&tm);
        out->lib[i] = rc->lib_ms;
        for (int k = 0; k < CALL_KINDS; k++)
            out->call[k][i] = rc->call_ms[k];
        out->gemm[i] = rc->gemm_host_ms;
        /* Waits for the step, as an engine waits for its sampled token. */
        out->ms[i] = bench_timer_elapsed_ms(&tm);
    }
    out->graphs = with_fkv ? (cache_graph_launches(rc->cache) - graphs0) / steps
                           : NAN;
    rc->staged = 0;
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA && with_fkv)
        BENCH_CUDA_CHECK(cudaProfilerStop());
#endif
    bench_timer_free(&tm);
    return true;
}

/* The GEMMs alone at batch index bi (once per batch). */
static void measure_gemm(engine *e, const args *a, int bi)
{
    if (e->gemm_done[bi])
        return;
    e->gemm_done[bi] = 1;
    e->gemm_ms[bi] = e->gemm_p90[bi] = NAN;
    if (e->backend != FKV_BACKEND_CUDA || !e->use_gemm)
        return;
    run_ctx rc;
    memset(&rc, 0, sizeof rc);
    rc.e = e;
    rc.a = a;
    rc.batch = (int)a->batches[bi];
    step_times tt;
    char why[160];
    step_times_alloc(&tt, a->steps);
    /* Under --graph the GEMMs alone are captured and replayed too, so that
     * the bound is measured the way the steps are. */
    if (time_steps(&rc, 0, a->warmup, a->steps, 0, &tt, why, sizeof why)) {
        e->gemm_ms[bi] = bench_median(tt.ms, (size_t)a->steps);
        e->gemm_p90[bi] = bench_percentile(tt.ms, (size_t)a->steps, 90.0);
    } else
        fprintf(stderr, "GEMMs alone at batch %d: %s\n", rc.batch, why);
    step_times_free(&tt);
}

static uint64_t div_up(uint64_t x, uint64_t y)
{
    return (x + y - 1) / y;
}

/* Host bytes the configuration needs: the library's pool and (CPU backend)
 * its "device" state, plus the benchmark's own trace buffers. */
static double host_bytes_needed(const engine *e, const args *a, int64_t ctx,
                                int batch, fkv_policy p, int T)
{
    const double pages = (double)div_up((uint64_t)(ctx + T), (uint64_t)a->page);
    const double unit = 2.0 * a->page * a->head_dim * 2.0;
    const double per_layer_seq = pages * a->kv_heads * unit;
    const double LB = (double)a->layers * batch;
    double need = 0.0;
    bool cpu = e->backend == FKV_BACKEND_CPU;
    if (cpu || p == FKV_POLICY_FREEKV || p == FKV_POLICY_SYNC)
        need += LB * per_layer_seq + 32.0 * 1048576.0; /* last pool chunk */
    if (cpu && p != FKV_POLICY_DENSE)
        need += LB * a->kv_heads * pages * 2.0 * a->head_dim * 4.0;
    /* benchmark: query trace (+ its host copy), coefficients, staging */
    double q = (double)T * a->layers * batch * a->q_heads * a->head_dim * 2.0;
    need += cpu ? q : 2.0 * q;
    return need;
}

#ifdef FKV_WITH_CUDA
/* Device bytes the library will take for the configuration (CUDA). */
static double device_bytes_needed(const args *a, int64_t ctx, int batch,
                                  fkv_policy p, int T)
{
    const double pages = (double)div_up((uint64_t)(ctx + T), (uint64_t)a->page);
    const double unit = 2.0 * a->page * a->head_dim * 2.0;
    const int S = a->sink / a->page, W = a->window / a->page;
    const int K = selected_pages_k(a);
    double per = 0.0;
    if (p == FKV_POLICY_RESIDENT || p == FKV_POLICY_DENSE)
        per += a->kv_heads * pages * unit;
    else
        per += a->kv_heads * (double)(S + W + 1 + K) * unit;
    if (p != FKV_POLICY_DENSE)
        per += 2.0 * a->kv_heads * pages * a->head_dim * 2.0;
    return per * a->layers * batch + 64.0 * 1048576.0;
}
#endif

/* Warm-up, timed steps, stats and the churn of a prefilled cache. */
static void measure(run_ctx *rc, const fkv_seq_id *seqs, fkv_policy policy,
                    result *res)
{
    const args *a = rc->a;
    fkv_cache *cache = rc->cache;
    const int batch = rc->batch;
    const int K = selected_pages_k(a);
    /* Warm-up and timed steps; stats over the timed steps only. */
    step_times tt;
    char why[160];
    step_times_alloc(&tt, a->steps);
    if (!time_steps(rc, 0, a->warmup, a->steps, 1, &tt, why, sizeof why)) {
        res->status = RUN_NO_GRAPH;
        snprintf(res->note, sizeof res->note, "%s", why);
        step_times_free(&tt);
        return;
    }
    fkv_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    BENCH_FKV_CHECK(cache, fkv_get_stats(cache, &st));
    /* steps counts fkv_attend calls on layer 0 on the host, which a
     * captured step makes once however often it is replayed (the device
     * counters count every replay): checked for eager steps only. */
    if (!a->graph && st.steps != (uint64_t)a->steps)
        bench_die("fkv_get_stats counted %llu steps, %d were timed",
                  (unsigned long long)st.steps, a->steps);
    const double n_steps = (double)a->steps;
    res->ms_median = bench_median(tt.ms, (size_t)a->steps);
    res->ms_p90 = bench_percentile(tt.ms, (size_t)a->steps, 90.0);
    res->host_ms = bench_median(tt.host, (size_t)a->steps);
    res->lib_host_ms = bench_median(tt.lib, (size_t)a->steps);
    for (int k = 0; k < CALL_KINDS; k++)
        res->lib_call_ms[k] = bench_median(tt.call[k], (size_t)a->steps);
    res->lib_graphs = tt.graphs;
    res->gemm_host_ms = bench_median(tt.gemm, (size_t)a->steps);
    res->crit_pages = (double)st.pages_recalled_critical / n_steps;
    if (!rc->e->use_gemm)
        res->gemm_host_ms = NAN;
    res->tokens_per_s = batch / (res->ms_median * 1e-3);
    res->corrections = (double)st.corrections / n_steps;
    res->heads_checked = (double)st.heads_checked / n_steps;
    res->pages = (double)st.pages_recalled / n_steps;
    res->bytes = (double)st.bytes_recalled / n_steps;
    res->recall_frac = K > 0 ? res->pages / ((double)a->layers * a->kv_heads *
                                             batch * K)
                             : 0.0;
    res->device_bytes = st.device_bytes;
    res->host_bytes = st.host_bytes;
    step_times_free(&tt);

    /* Churn: an un-timed run reading the selected pages of a sample of
     * (layer, sequence, KV head) after every step. */
    if (a->churn_steps > 0 && K > 0 && policy != FKV_POLICY_DENSE) {
        int layers[CHURN_LAYERS] = {0, a->layers / 2, a->layers - 1};
        int nl = a->layers >= 3 ? 3 : a->layers;
        if (a->layers == 2)
            layers[1] = 1;
        int ns = batch < CHURN_SEQS ? batch : CHURN_SEQS;
        size_t samples = (size_t)nl * ns * a->kv_heads;
        int32_t *prev = bench_xmalloc(samples * K * sizeof *prev);
        int32_t *cur = bench_xmalloc(samples * K * sizeof *cur);
        int32_t *pn = bench_xmalloc(samples * sizeof *pn);
        int32_t *cn = bench_xmalloc(samples * sizeof *cn);
        double changed = 0.0, total = 0.0;
        for (int i = -1; i < a->churn_steps; i++) {
            if (i >= 0)
                decode_step(rc, a->warmup + a->steps + i, 1);
            size_t k = 0;
            for (int li = 0; li < nl; li++)
                for (int s = 0; s < ns; s++)
                    for (int g = 0; g < a->kv_heads; g++, k++) {
                        int32_t *dst = (i < 0 ? prev : cur) + k * K;
                        int32_t *cnt = (i < 0 ? pn : cn) + k;
                        BENCH_FKV_CHECK(cache, fkv_get_selected_pages(
                                                   cache, layers[li], seqs[s],
                                                   g, dst, K, cnt));
                        if (*cnt > K)
                            bench_die("%d selected pages, the budget "
                                      "allows %d", (int)*cnt, K);
                    }
            if (i < 0)
                continue;
            for (k = 0; k < samples; k++) {
                const int32_t *c = cur + k * K, *p = prev + k * K;
                int same = 0;
                for (int x = 0, y = 0; x < cn[k] && y < pn[k];) {
                    if (c[x] == p[y]) {
                        same++;
                        x++;
                        y++;
                    } else if (c[x] < p[y])
                        x++;
                    else
                        y++;
                }
                changed += cn[k] - same;
                total += cn[k];
            }
            memcpy(prev, cur, samples * K * sizeof *prev);
            memcpy(pn, cn, samples * sizeof *pn);
        }
        res->churn = total > 0 ? changed / total : NAN;
        free(prev);
        free(cur);
        free(pn);
        free(cn);
    }
}

/* A set-up call (create, open, prefill append): out of memory means the
 * configuration does not fit after all (the estimate missed), and
 * FKV_ERR_UNSUPPORTED that the backend lacks the options: recorded in res and returned as true; any
 * other failure ends the program. */
static bool setup_call(fkv_status st, const fkv_cache *cache,
                       const char *what, result *res)
{
    if (st == FKV_OK)
        return false;
    if (st != FKV_ERR_OUT_OF_MEMORY && st != FKV_ERR_UNSUPPORTED)
        bench_fkv_check(st, cache, what, __FILE__, __LINE__);
    char msg[112];
    fkv_last_error(cache, msg, sizeof msg);
    res->status = st == FKV_ERR_UNSUPPORTED ? RUN_UNSUPPORTED : RUN_OOM;
    snprintf(res->note, sizeof res->note, "%s in %s: %s",
             st == FKV_ERR_UNSUPPORTED ? "unsupported" : "out of memory",
             what, msg);
    return true;
}

void run_config(engine *e, const args *a, int ci, int bi,
                fkv_policy policy, double threshold, result *res)
{
    const int64_t ctx = a->contexts[ci];
    const int batch = (int)a->batches[bi];
    const int T = a->warmup + a->steps + a->churn_steps;

    res->status = RUN_OK;
    res->churn = NAN;

    double host_need = host_bytes_needed(e, a, ctx, batch, policy, T);
    if (host_need > a->host_mem_gib * 1073741824.0) {
        res->status = RUN_HOST_MEM;
        snprintf(res->note, sizeof res->note,
                 "does not fit in host memory (%.3g GiB > --host-mem-gib %g)",
                 host_need / 1073741824.0, a->host_mem_gib);
        return;
    }

    measure_gemm(e, a, bi);
    res->gemm_ms = e->gemm_ms[bi];

    workload w;
    workload_build(&w, a, ctx, batch, T, a->warmup, a->steps);
    workload_alloc(e, &w);
    res->cos_mean = w.cos_mean;
    res->topics = w.NT;

#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA) {
        size_t free_b = 0, total_b = 0;
        BENCH_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        double need = device_bytes_needed(a, ctx, batch, policy, T);
        double margin = 512.0 * 1048576.0;
        if (need + margin > (double)free_b) {
            res->status = RUN_DEVICE_MEM;
            snprintf(res->note, sizeof res->note,
                     "does not fit on the device (%.3g GiB > %.3g GiB free)",
                     need / 1073741824.0, (double)free_b / 1073741824.0);
            workload_free(e, &w);
            return;
        }
    }
#endif

    fkv_options o;
    fkv_cache *cache = NULL;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = e->backend;
    o.device = a->device;
    o.num_layers = a->layers;
    o.num_q_heads = a->q_heads;
    o.num_kv_heads = a->kv_heads;
    o.head_dim = a->head_dim;
    o.dtype = FKV_DTYPE_BF16;
    o.page_tokens = a->page;
    o.budget_tokens = a->budget;
    o.sink_tokens = a->sink;
    o.window_tokens = a->window;
    o.correction_threshold = (float)threshold;
    o.correction_criterion = a->criterion;
    o.correction_min_mass = (float)a->min_mass;
    o.correction_max_pages = a->max_pages;
    o.speculative_min_mass = (float)a->spec_mass;
    o.policy = policy;
    o.max_sequences = batch;
    o.max_tokens_per_sequence = ctx + T;
    fkv_seq_id *seqs = bench_xmalloc((size_t)batch * sizeof *seqs);
    int32_t *ntok = bench_xmalloc((size_t)batch * sizeof *ntok);
    int opened = 0;
    bool oom = setup_call(fkv_create(&o, &cache), NULL, "fkv_create", res);
#ifdef FKV_WITH_CUDA
    if (!oom && e->backend == FKV_BACKEND_CUDA)
        BENCH_FKV_CHECK(cache, fkv_set_stream(cache, e->stream));
#endif
    while (!oom && opened < batch) {
        oom = setup_call(fkv_seq_open(cache, &seqs[opened]), cache,
                         "fkv_seq_open", res);
        opened += !oom;
    }

    /* --reserve: the pool's allocations first, so that the prefill below
     * times the appends' writes alone. */
    double t0 = bench_now_ms();
    for (int s = 0; !oom && a->reserve && s < opened; s++)
        oom = setup_call(fkv_seq_reserve(cache, seqs[s], ctx + T), cache,
                         "fkv_seq_reserve", res);
    res->reserve_s = a->reserve ? (bench_now_ms() - t0) * 1e-3 : NAN;

    /* Prefill: chunks of tokens, one bulk append per layer and chunk. */
    t0 = bench_now_ms();
    for (int64_t p0 = 0; !oom && p0 < ctx; p0 += a->prefill_chunk) {
        int64_t n = ctx - p0 < a->prefill_chunk ? ctx - p0 : a->prefill_chunk;
        for (int s = 0; s < batch; s++) {
            fill_coef(&w, s, p0, n, w.coef_host + (size_t)s * n * w.C, 1);
            ntok[s] = (int32_t)n;
        }
        upload_coef(e, &w, (size_t)batch * n);
        fkv_batch pre = {batch, 0, seqs, ntok};
        for (int l = 0; !oom && l < a->layers; l++) {
            basis_gemm(e, &w, l, 0, (size_t)batch * n, w.kstage);
            basis_gemm(e, &w, l, 1, (size_t)batch * n, w.vstage);
            oom = setup_call(fkv_append(cache, l, &pre, w.kstage, w.vstage),
                             cache, "fkv_append (prefill)", res);
        }
    }
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
#endif
    res->prefill_s = (bench_now_ms() - t0) * 1e-3;
    if (!oom) {
        for (int s = 0; s < batch; s++) {
            int64_t len = 0;
            BENCH_FKV_CHECK(cache, fkv_seq_length(cache, seqs[s], &len));
            if (len != ctx)
                bench_die("sequence %d holds %lld tokens after prefill, not "
                          "%lld", s, (long long)len, (long long)ctx);
        }
        run_ctx rc;
        memset(&rc, 0, sizeof rc);
        rc.e = e;
        rc.a = a;
        rc.w = &w;
        rc.cache = cache;
        rc.batch = batch;
        rc.step = (fkv_batch){batch, 0, seqs, NULL};
        measure(&rc, seqs, policy, res);
    }

    for (int s = 0; s < opened; s++)
        BENCH_FKV_CHECK(cache, fkv_seq_close(cache, seqs[s]));
    fkv_destroy(cache);
    free(seqs);
    free(ntok);
    workload_free(e, &w);
    if (oom || res->status != RUN_OK)
        return;

    /* Lower bounds. */
    if (e->backend == FKV_BACKEND_CUDA) {
        double attended = policy == FKV_POLICY_DENSE
                              ? (double)ctx + a->warmup + a->steps / 2.0
                              : (double)(ctx < a->budget ? ctx : a->budget);
        double bytes = attended * a->layers * a->kv_heads * 2.0 *
                       a->head_dim * 2.0 * batch;
        res->attend_bound_ms = bytes / (e->dev_gbs * 1e9) * 1e3;
        res->recall_bound_ms = res->bytes / (e->pcie_gbs * 1e9) * 1e3;
        double b = res->attend_bound_ms;
        if (res->recall_bound_ms > b)
            b = res->recall_bound_ms;
        if (res->gemm_ms == res->gemm_ms && res->gemm_ms > b)
            b = res->gemm_ms;
        res->bound_ms = b;
    } else {
        res->attend_bound_ms = res->recall_bound_ms = res->bound_ms = NAN;
    }
}

