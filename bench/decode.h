/* bench/decode's parts (decode.c has the program's description and its
 * main): the command line (decode_args.c), the engine that stands in for
 * the model (decode_engine.c), the synthetic workload (decode_workload.c),
 * one configuration's run and measurements (decode_run.c) and the report
 * (decode_report.c). One program: these are not a library's interface.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef BENCH_DECODE_H
#define BENCH_DECODE_H

#define BENCH_WITH_CUBLAS
#include "bench.h"

#include <stdbool.h>

enum {
    MAX_LIST = 16,    /* entries of a list flag (--contexts, --batches, ...) */
    NUM_POLICIES = 4,
    CHURN_LAYERS = 3, /* layers sampled for the churn */
    CHURN_SEQS = 4    /* sequences sampled for the churn */
};

/* ---- the command line (decode_args.c) ---------------------------------- */

typedef struct model_preset {
    const char *name;
    int layers, q_heads, kv_heads, head_dim, intermediate;
} model_preset;

typedef struct args {
    const model_preset *model;
    char model_label[48]; /* the preset's name, or "custom" */
    int layers, q_heads, kv_heads, head_dim, hidden, intermediate;
    int page, budget, sink, window;
    double threshold;                /* thresholds[0] */
    double thresholds[MAX_LIST];     /* FREEKV runs once per threshold */
    int n_thresholds;
    int criterion;                   /* fkv_correction_criterion */
    double min_mass;                 /* BOUNDED */
    int max_pages;                   /* BOUNDED */
    double spec_mass;                /* BOUNDED: speculative_min_mass */
    int graph;                       /* --graph: replay a captured step */
    int reserve;                     /* --reserve: time the pool apart */
    int select_q;                    /* --select-q: fkv_select(q), not NULL */
    int fixed_inputs; /* --fixed-inputs: eager steps read staged buffers */
    int paper_trace; /* --trace paper (else drift) */
    int64_t contexts[MAX_LIST];
    int n_contexts;
    int64_t batches[MAX_LIST];
    int n_batches;
    fkv_policy policies[NUM_POLICIES];
    int n_policies;
    int steps, warmup, churn_steps, prefill_chunk;
    double host_mem_gib, time_limit_s;
    fkv_backend backend;
    int device;
    const char *csv;
    uint64_t seed;
    int smoke, gemm;
} args;

/* Table order: FREEKV, SYNC, RESIDENT, DENSE. */
int policy_rank(fkv_policy p);
void usage(FILE *f);
/* smoke_sizes: start from the --smoke sizes even without the flag (the CPU
 * backend's defaults). */
void parse_args(int argc, char **argv, args *a, int smoke_sizes);

/* ---- the engine (decode_engine.c) --------------------------------------- */

typedef struct engine {
    fkv_backend backend; /* resolved: CPU or CUDA */
    char device_name[256];
    char why_cpu[256];
    int use_gemm;
    double pcie_gbs, dev_gbs; /* measured; 0 on the CPU backend */
    int max_batch;
    void *out; /* attention output [max_batch][q_heads * head_dim] */
    /* GEMMs alone, per batch index */
    int gemm_done[MAX_LIST];
    double gemm_ms[MAX_LIST], gemm_p90[MAX_LIST];
#ifdef FKV_WITH_CUDA
    cudaStream_t stream;
    cublasHandle_t blas;
    void *weights;
    size_t w_qkv, w_o, w_gu, w_down, w_layer; /* element offsets, per layer */
    size_t n_qkv;                              /* (q + 2 kv) * head_dim */
    void *x, *qkv, *h, *gu;
    void *blas_ws; /* --graph: cuBLAS's workspace, set explicitly */
    size_t weight_bytes;
#endif
} engine;

#ifdef FKV_WITH_CUDA
/* y[n][m] = x[n][k] . W, with W stored column-major m x k (lda = m),
 * x with row stride ldx, y with row stride m; bf16, fp32 accumulation. */
void gemm_bf16(engine *e, int m, int n, int k, const void *w, const void *x,
               int ldx, void *y);
/* Host to device on the engine's stream, waited for (set-up only). */
void h2d(engine *e, void *dst, const void *src, size_t bytes);
void engine_cuda_init(engine *e, const args *a);
void engine_cuda_free(engine *e);
#endif
const char *backend_name(fkv_backend b);
/* Resolves --backend with a probe cache (the library's own rule for AUTO). */
void resolve_backend(const args *a, engine *e);

/* ---- the synthetic workload (decode_workload.c) ------------------------- */

typedef struct workload {
    const args *a;
    int64_t ctx;
    int batch, T; /* T: decode steps in all (warm-up, timed, churn) */
    int L, H, D, QH, G, HD;
    int NT, R, C; /* topics, noise rank, coefficient columns >= 1 + NT + R */
    uint64_t seed;
    float *center;             /* [L][H][NT][D] unit topic centres */
    float *head_dir;           /* [L][QH][D] unit */
    float *rho;                /* [L][QH] query noise ratio */
    uint16_t *kbasis, *vbasis; /* [L][C][HD] bf16 */
    int32_t *topic;            /* [batch][ctx + T] */
    uint16_t *q;               /* [T][L][batch][QH][D] bf16 */
    double cos_mean;           /* adjacent-step query cosine, timed steps */
    /* what the fkv calls read: host (CPU) or device (CUDA) memory */
    void *q_mem;               /* [T][L][batch][QH][D] */
    void *kdec, *vdec;         /* [L][T][batch][HD] */
    /* prefill staging */
    uint16_t *coef_host;       /* [max(batch * chunk, T * batch)][C] */
    void *kstage, *vstage;     /* [batch * chunk][HD] */
    size_t coef_rows;
#ifdef FKV_WITH_CUDA
    void *kbasis_dev, *vbasis_dev, *coef_dev;
    /* --graph: one step's inputs, where the captured step reads them
     * (copied from q_mem / kdec / vdec before each replay) */
    void *q_cur;               /* [L][batch][QH][D] */
    void *k_cur, *v_cur;       /* [L][batch][HD] */
#endif
    bool on_device;
} workload;

int selected_pages_k(const args *a);
/* The bases, sequences' topic layout and the query trace. */
void workload_build(workload *w, const args *a, int64_t ctx, int batch, int T,
                    int warmup, int steps);
/* Coefficient rows of tokens [t0, t0 + n) of sequence s: [1, one-hot topic,
 * R normals]. Row i goes to rows + i * stride * C. */
void fill_coef(const workload *w, int s, int64_t t0, int64_t n,
               uint16_t *rows, size_t stride);
/* K or V rows from coefficients on either side: out = coef . basis(l). */
void basis_gemm(engine *e, workload *w, int l, int which, size_t rows,
                void *out);
/* Copies coef_host[0..rows) where the GEMM reads it. */
void upload_coef(engine *e, workload *w, size_t rows);
/* Buffers the fkv calls read (decode K/V and queries), prefill staging. */
void workload_alloc(engine *e, workload *w);
void workload_free(engine *e, workload *w);

/* ---- one configuration (decode_run.c) ----------------------------------- */

typedef enum run_status {
    RUN_OK = 0,
    RUN_HOST_MEM,
    RUN_DEVICE_MEM,
    RUN_TIME_LIMIT,
    RUN_OOM,
    RUN_UNSUPPORTED, /* the library refused the options (FKV_ERR_UNSUPPORTED) */
    RUN_NO_GRAPH     /* --graph: the step could not be captured or replayed */
} run_status;

/* The four fkv calls of a decode step, for the host time by call. */
enum call_kind { CALL_APPEND, CALL_ATTEND, CALL_SELECT, CALL_RECALL, CALL_KINDS };

typedef struct result {
    int64_t ctx;
    int batch, batch_index;
    fkv_policy policy;
    double threshold; /* in the options (FREEKV's; the others ignore it) */
    int threshold_index; /* in args.thresholds: the table keeps that order */
    run_status status;
    char note[160];
    double ms_median, ms_p90, host_ms; /* per step; host: enqueue time */
    /* Host time per step inside the fkv calls, and enqueueing the GEMM
     * stand-ins (medians; NAN under --graph, where a step is one launch) */
    double lib_host_ms, gemm_host_ms;
    /* lib_host_ms by call (medians; call_kind order) */
    double lib_call_ms[CALL_KINDS];
    /* CUDA graph launches per step of the library's launch cache (eager
     * rows); NAN: the cache is off (the CPU backend) */
    double lib_graphs;
    double crit_pages; /* pages_recalled_critical per step */
    double tokens_per_s;
    double corrections, heads_checked; /* per step */
    double pages, bytes;               /* recalled per step */
    double recall_frac;  /* pages / (layers * kv_heads * batch * K) */
    double churn;        /* selected pages changed per step; NAN: none */
    double cos_mean;
    uint64_t device_bytes, host_bytes;
    double gemm_ms, recall_bound_ms, attend_bound_ms, bound_ms;
    double prefill_s;
    double reserve_s; /* --reserve: fkv_seq_reserve before the prefill */
    int topics;
} result;

/* Runs one (context, batch, policy, threshold) of the sweep into *res. */
void run_config(engine *e, const args *a, int ci, int bi, fkv_policy policy,
                double threshold, result *res);

/* ---- the report (decode_report.c) --------------------------------------- */

const char *criterion_name(int c);
/* "0.90", or "off" for a threshold that turns correction off. */
void fmt_threshold(char *buf, size_t n, double t);
void csv_header(FILE *f);
void csv_row(FILE *f, const engine *e, const args *a, const result *r);
/* The tables and the FREEKV ratios on stdout (sorts res). */
void print_tables(const engine *e, const args *a, result *res, int n);

#endif /* BENCH_DECODE_H */
