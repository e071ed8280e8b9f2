/*
 * Shared declarations of the libfreekv unit tests (Check).
 *
 * Every case builds its caches with tst_options(), so that tests/main.c can
 * run the same suites on the CPU backend and, where a GPU exists, on the
 * CUDA backend (g_test_backend). Tensors go through tst_dev_*: host memory
 * on the CPU backend, device memory on CUDA.
 *
 * tst_model holds the caller's own copy of every K/V row appended per
 * (sequence, layer) and a simulation of the policy state (FREEKV pending and
 * active selections), so that the float64 reference (reference.h) can
 * recompute what each fkv_attend must return.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_TESTS_H
#define FKV_TESTS_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "freekv.h"
#include "reference.h"

/* Backend every case creates its caches on. */
extern fkv_backend g_test_backend;

/* Relative tolerances of attention outputs against the reference. */
#define TST_TOL_F32 1e-5
#define TST_TOL_F16 2e-3
#define TST_TOL_BF16 1.6e-2
/* Smallest relative gap between the K-th and (K+1)-th aggregated score a
 * case accepts, so that float rounding cannot flip a selection. */
#define TST_MIN_GAP 1e-4
/* Smallest |mean cosine - threshold| a case accepts. */
#define TST_MIN_COS_MARGIN 2e-3

#define TST_MAX_SEQS 16
#define TST_MAX_LAYERS 4
#define TST_MAX_KVH 8

double tst_tol(fkv_dtype dt);

/* fkv_options_init + the given shape + small test defaults on
 * g_test_backend: page 16, sink 32, window 64, budget 256 (K = 10),
 * max_sequences 8, max_tokens_per_sequence 16384, FREEKV, MEAN_SOFTMAX. */
void tst_options(fkv_options *o, int num_layers, int num_q_heads,
                 int num_kv_heads, int head_dim, fkv_dtype dtype);
/* Sets page/sink/window/budget in tokens. */
void tst_geometry(fkv_options *o, int page, int sink, int window, int budget);

/* A TCase with a timeout suited to sanitizers. */
TCase *tst_tcase(Suite *s, const char *name);
/* 1 when FKV_CUDA_EXPERIMENTAL is "1": the CUDA backend's 0.2 calls are
 * enabled and their CPU suites run on CUDA too. */
int tst_cuda_experimental(void);

/* Suite name with the run's prefix ("" or "gpu:"). */
const char *tst_suite_name(const char *prefix, const char *name);

/* ------------------------------------------------------------------ */
/* Tensor memory in the backend's space.                              */
/* ------------------------------------------------------------------ */

/* Loads what the CUDA backend's tests need; 0 and a reason on failure. */
int tst_dev_init(char *why, size_t len);
void *tst_dev_alloc(size_t bytes);
void tst_dev_free(void *p);
void tst_dev_put(void *dev, const void *host, size_t bytes);
void tst_dev_get(void *host, const void *dev, size_t bytes);
/* Host values (floats exactly representable in dt) to a new device buffer
 * in dt. */
void *tst_dev_from_floats(fkv_dtype dt, const float *src, size_t n);
void tst_dev_to_floats(fkv_dtype dt, const void *dev, float *dst, size_t n);

/* ------------------------------------------------------------------ */
/* Errors                                                             */
/* ------------------------------------------------------------------ */

/* Asserts got == want and that fkv_last_error(c) (c may be NULL) is not
 * empty. */
void tst_expect_error_at(fkv_cache *c, fkv_status got, fkv_status want,
                         const char *what, const char *file, int line);
#define tst_expect_error(c, got, want, what)                                 \
    tst_expect_error_at((c), (got), (want), (what), __FILE__, __LINE__)
#define tst_ok(expr)                                                         \
    do {                                                                     \
        fkv_status tst_st_ = (expr);                                         \
        ck_assert_msg(tst_st_ == FKV_OK, "%s returned %d (%s)", #expr,      \
                      (int)tst_st_, fkv_status_string(tst_st_));             \
    } while (0)

/* ------------------------------------------------------------------ */
/* Model: a cache plus the caller's copy of everything in it.          */
/* ------------------------------------------------------------------ */

typedef struct tst_sel {
    int valid;
    int count;
    int *pages; /* [K] ascending */
    float *q;   /* [G*D]: the query that made it */
} tst_sel;

typedef struct tst_seq {
    int open;
    fkv_seq_id id;
    int64_t len[TST_MAX_LAYERS];
    int64_t cap[TST_MAX_LAYERS];
    float *k[TST_MAX_LAYERS]; /* [len][KVH][D] */
    float *v[TST_MAX_LAYERS];
    /* Simulated policy state per (layer, KV head). */
    tst_sel active[TST_MAX_LAYERS][TST_MAX_KVH];
    tst_sel pending[TST_MAX_LAYERS][TST_MAX_KVH];
    /* The pages the last attend used besides sink, window, partial page
     * (valid = 0: dense attention). */
    tst_sel used[TST_MAX_LAYERS][TST_MAX_KVH];
    int ncand_at_attend[TST_MAX_LAYERS];
    int64_t n_at_attend[TST_MAX_LAYERS];
} tst_seq;

typedef struct tst_model {
    fkv_options o;
    fkv_cache *c;
    int L, QH, KVH, D, G;
    fkv_dtype dt;
    ref_layout lay;
    double scale;
    int nslots;
    tst_seq seq[TST_MAX_SEQS];
    ref_rng rng;
    /* Reference simulation counters (exact where docs/design.md is). */
    uint64_t sim_corrections, sim_checks, sim_recalled;
} tst_model;

/* Creates the cache (asserting FKV_OK). */
void tst_model_init(tst_model *m, const fkv_options *o, uint64_t seed);
void tst_model_free(tst_model *m);
/* Opens a sequence; returns its slot in m->seq. */
int tst_open(tst_model *m);
void tst_close(tst_model *m, int slot);

/* fkv_seq_fork of parent; the child's model copies the parent's rows and
 * has no selection (docs/design.md section 9). Returns its slot. */
int tst_fork(tst_model *m, int parent);

/* Appends (k, v: host floats, packed sequence after sequence) to the cache
 * and, on success, to the model's copy. ntok NULL: 1 token each. */
fkv_status tst_append(tst_model *m, int layer, int nseq, const int *slots,
                      const int *ntok, const float *k, const float *v);
/* The model's side of tst_append only: records the rows (packed like
 * fkv_append's k, v) without calling the library. */
void tst_model_add(tst_model *m, int layer, int nseq, const int *slots,
                   const int *ntok, const float *k, const float *v);
/* Random K and V (N(0,1) in the dtype); asserts FKV_OK. */
void tst_append_rand(tst_model *m, int layer, int nseq, const int *slots,
                     const int *ntok);
/* tst_append_rand on every layer. */
void tst_prefill(tst_model *m, int nseq, const int *slots, const int *ntok);

/* The library call only: q and out host floats [nseq][QH][D]. */
fkv_status tst_attend_raw(tst_model *m, int layer, int nseq,
                          const int *slots, const float *q, float *out);
/* The library call with raw dtype bytes of out (for bit-exact checks). */
fkv_status tst_attend_bytes(tst_model *m, int layer, int nseq,
                            const int *slots, const float *q, void *out);

/* Simulates the policy for an attend of q on (layer, slots) and writes the
 * reference output [nseq][QH][D] (double). Updates the simulated state. */
void tst_sim_attend(tst_model *m, int layer, int nseq, const int *slots,
                    const float *q, double *ref_out);
/* fkv_attend + tst_sim_attend, asserting FKV_OK, the per-head relative
 * error <= tol and that fkv_get_selected_pages matches the simulation. */
void tst_attend_check(tst_model *m, int layer, int nseq, const int *slots,
                      const float *q, double tol);
/* Compares fkv_get_selected_pages with the simulated last attend. */
void tst_check_selected(tst_model *m, int layer, int slot);

/* fkv_select (q NULL: the attend's query) / fkv_recall (asserting FKV_OK)
 * plus the simulation. */
void tst_select(tst_model *m, int layer, int nseq, const int *slots,
                const float *q);
void tst_recall(tst_model *m, int layer, int nseq, const int *slots);
/* One decode step on every layer: append 1 random token to each sequence,
 * attend_check with q[layer] (q: [L][nseq][QH][D]), select, recall. */
void tst_decode_step(tst_model *m, int nseq, const int *slots, const float *q,
                     double tol);
/* n decode steps on every layer with queries of tst_next_query (each layer
 * drifting from its previous step's query), checked as tst_attend_check
 * does at the dtype's tolerance. */
void tst_decode_steps(tst_model *m, int nseq, const int *slots, int n);
/* The simulation of fkv_seq_truncate: the sequence holds `length` tokens on
 * every layer and forgets every selection (docs/design.md section 11). */
void tst_model_truncate(tst_model *m, int slot, int64_t length);

/* ------------------------------------------------------------------ */
/* Queries and reference helpers.                                     */
/* ------------------------------------------------------------------ */

/* N(0, 1) queries [nseq][QH][D] in the dtype. */
void tst_rand_query(tst_model *m, int nseq, float *q);
/* Smallest top-K gap (ref_topk_gap) over the sequences and KV heads for
 * selecting with q on (layer, slots) now. INFINITY when nothing to choose. */
double tst_query_gap(tst_model *m, int layer, int nseq, const int *slots,
                     const float *q);
/* Redraws q until tst_query_gap >= TST_MIN_GAP (asserts it succeeds). */
void tst_good_query(tst_model *m, int layer, int nseq, const int *slots,
                    float *q);
/* The next decode query: prev == NULL: a fresh random query; otherwise
 * each (sequence, KV head) group drifts from prev by a random amount
 * (noise 0.15, 0.5, 1 or 3: some groups cross the correction threshold,
 * some do not). Redrawn until the top-K is well separated and every mean
 * cosine against the active selection's query is clear of the threshold. */
void tst_next_query(tst_model *m, int layer, int nseq, const int *slots,
                    const float *prev, float *q);
/* q_out = q_in + noise * N(0,1), rounded, per query head (G heads). */
void tst_perturb(tst_model *m, const float *q_in, float *q_out, size_t n,
                 double noise);

/* Reference selection of (layer, slot, kv head) with the sequence's
 * query q_seq [QH][D]; returns the count. */
int tst_ref_select(tst_model *m, int layer, int slot, const float *q_seq,
                   int kvh, int *pages, double *gap);
/* Reference output [QH][D] of q_seq over sink + window + partial page +
 * pages[kvh][0..counts[kvh]); pages == NULL: all tokens. */
void tst_ref_output(tst_model *m, int layer, int slot, const float *q_seq,
                    int *const *pages, const int *counts, double *out);
/* Reference output over the tokens with mask[t] (same for every head). */
void tst_ref_output_mask(tst_model *m, int layer, int slot,
                         const float *q_seq, const unsigned char *mask,
                         double *out);
/* Asserts the per-head relative error of got [QH][D] against want. */
void tst_assert_close_at(tst_model *m, const float *got, const double *want,
                         double tol, const char *what, const char *file,
                         int line);
#define tst_assert_close(m, got, want, tol, what)                            \
    tst_assert_close_at((m), (got), (want), (tol), (what), __FILE__, __LINE__)

/* fkv_get_selected_pages into pages[cap]; returns the count. */
int tst_selected(tst_model *m, int layer, int slot, int kvh, int *pages,
                 int cap);
void tst_stats(tst_model *m, fkv_stats *st);

/* ------------------------------------------------------------------ */
/* Snapshot: everything observable of a cache, to check a failed call  */
/* changed nothing.                                                    */
/* ------------------------------------------------------------------ */

typedef struct tst_snapshot {
    int n;
    int slots[TST_MAX_SEQS];
    int64_t len[TST_MAX_SEQS];
    unsigned char *out; /* [n][L][QH*D*esize] */
    size_t row_bytes;
    float *q;
} tst_snapshot;

/* Lengths and the attend output (fixed query) of every open sequence that
 * has tokens on every layer. */
void tst_snapshot_take(tst_model *m, tst_snapshot *s);
void tst_snapshot_check_at(tst_model *m, tst_snapshot *s, const char *file,
                           int line);
#define tst_snapshot_check(m, s) tst_snapshot_check_at((m), (s), __FILE__, __LINE__)
void tst_snapshot_free(tst_snapshot *s);

/* ------------------------------------------------------------------ */
/* Suites.                                                            */
/* ------------------------------------------------------------------ */

Suite *suite_reference(const char *prefix);
Suite *suite_api(const char *prefix);
Suite *suite_dense(const char *prefix);
Suite *suite_selection(const char *prefix);
Suite *suite_freekv(const char *prefix);
Suite *suite_policies(const char *prefix);
Suite *suite_dtypes(const char *prefix);
Suite *suite_sequences(const char *prefix);
Suite *suite_always(const char *prefix);
Suite *suite_badinput(const char *prefix);
Suite *suite_stats(const char *prefix);
/* Every host allocation failed in turn (test_faults.c); defects of the
 * reliability review (test_defects.c). */
Suite *suite_faults(const char *prefix);
Suite *suite_defects(const char *prefix);
/* FREEKV's BOUNDED correction criterion (test_correction.c). */
Suite *suite_correction(const char *prefix);
/* The llama example engine's loader and CPU path (test_llama.c). */
Suite *suite_llama(const char *prefix);
/* Its speculative decoding (test_llama_spec.c). */
Suite *suite_llama_spec(const char *prefix);
/* Retrieval accuracy on bench/workload.h's generators (test_accuracy.c). */
Suite *suite_accuracy(const char *prefix);
/* Serving-engine calls added in 0.2. */
Suite *suite_truncate(const char *prefix);
Suite *suite_multitoken(const char *prefix);
Suite *suite_fork(const char *prefix);
Suite *suite_external(const char *prefix);
Suite *suite_critical(const char *prefix);
Suite *suite_strided(const char *prefix);
/* Per-layer dense attention (fkv_options.dense_layers). */
Suite *suite_dense_layers(const char *prefix);

/* GPU-only cases (test_cuda.c): added to the "gpu:" run only. */
Suite *suite_cuda(const char *prefix);
/* Its cuda_recall_plan case (test_recall_plan.c; CUDA build only). */
void tst_add_recall_plan(Suite *s);
/* The CUDA attention's split-grid arithmetic, host only (test_attend_grid.c;
 * CUDA build only): added to the CPU run's dense suite. */
void tst_add_attend_grid(Suite *s);
/* GPU-only, added when two CUDA devices exist (test_multidevice.c). */
Suite *suite_multidevice(const char *prefix);
/* CUDA devices visible (0 without CUDA or on error). */
int tst_cuda_device_count(void);

#endif /* FKV_TESTS_H */
