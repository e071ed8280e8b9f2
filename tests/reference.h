/*
 * An independent float64 reference of libfreekv's semantics, written from
 * docs/design.md (sections 1-4), not from lib/. Used by the unit tests only.
 *
 * Tensor layouts follow the public API: keys and values of one (sequence,
 * layer) are [tokens][kv_heads][head_dim]; a query of one sequence is
 * [q_heads][head_dim] and query head h belongs to KV head h / G.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_TESTS_REFERENCE_H
#define FKV_TESTS_REFERENCE_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------- */
/* Deterministic random numbers (splitmix64).                             */
/* ---------------------------------------------------------------------- */

typedef struct ref_rng {
    uint64_t state;
    int has_spare;
    double spare;
} ref_rng;

void ref_rng_seed(ref_rng *r, uint64_t seed);
uint64_t ref_rng_u64(ref_rng *r);
double ref_rng_uniform(ref_rng *r);  /* [0, 1) */
double ref_rng_normal(ref_rng *r);   /* N(0, 1) */
int ref_rng_below(ref_rng *r, int n); /* [0, n) */

/* ---------------------------------------------------------------------- */
/* Element types (same numbers as fkv_dtype).                             */
/* ---------------------------------------------------------------------- */

enum { REF_F32 = 0, REF_F16 = 1, REF_BF16 = 2 };

/* Round to nearest, ties to even; overflow gives infinity. */
uint16_t ref_to_f16(double x);
double ref_from_f16(uint16_t h);
uint16_t ref_to_bf16(double x);
double ref_from_bf16(uint16_t h);

size_t ref_dtype_bytes(int dtype);
/* x rounded to the dtype (and to float for F32), as a float (exact). */
float ref_round(double x, int dtype);
/* src values are converted (rounded) to the dtype's bits. */
void ref_encode(int dtype, const float *src, void *dst, size_t n);
void ref_decode(int dtype, const void *src, float *dst, size_t n);
/* N(0, stddev^2) values rounded to the dtype. */
void ref_random_tensor(ref_rng *r, int dtype, float *dst, size_t n,
                       double stddev);

/* ||got - want|| / ||want|| (0 when both are 0). */
double ref_rel_err(const float *got, const double *want, size_t n);
double ref_rel_err_dd(const double *got, const double *want, size_t n);
/* cos(a, b) in double; 0 when either is the zero vector. */
double ref_cosine(const float *a, const float *b, int n);
/* Mean over G heads of cos(a[h], b[h]). */
double ref_group_cosine(const float *a, const float *b, int G, int D);

/* ---------------------------------------------------------------------- */
/* Paging (docs/design.md sections 1-2).                                  */
/* ---------------------------------------------------------------------- */

typedef struct ref_layout {
    int P; /* tokens per page */
    int S; /* sink pages */
    int W; /* window pages */
    int K; /* selected pages */
} ref_layout;

int64_t ref_sealed_pages(const ref_layout *L, int64_t n);
/* Candidate pages [*first, *end) for n tokens; returns their number. */
int ref_candidates(const ref_layout *L, int64_t n, int *first, int *end);
/* mask[t] = 1 for the tokens a query attends to: the sink pages, the window
 * pages, the partial page and the pages in selected[] (which must be
 * candidates). */
void ref_attended_mask(const ref_layout *L, int64_t n, const int *selected,
                       int nselected, unsigned char *mask);

/* Causal limit of several query tokens (docs/design.md section 9): the
 * query at position pos attends to no token after it; clears mask[t] for
 * pos < t < n. */
void ref_causal_limit(int64_t n, int64_t pos, unsigned char *mask);

/* ---------------------------------------------------------------------- */
/* Selection (docs/design.md section 3).                                  */
/* ---------------------------------------------------------------------- */

enum { REF_GROUP_MEAN_SOFTMAX = 0, REF_GROUP_MEAN_SCORE = 1 };

/* Channel max and min of the keys of page `page` for KV head kvh. */
void ref_page_minmax(const float *k, int nkvh, int D, int kvh, int P,
                     int page, double *mx, double *mn);
/* sum_i max(q_i*mx_i, q_i*mn_i) */
double ref_page_score(const float *q, const double *mx, const double *mn,
                      int D);
/* scores [G][n] -> agg[n]. */
void ref_group_aggregate(const double *scores, int G, int n, double scale,
                         int mode, double *agg);
/* Top-K of agg[0..n) with ties to the lower index; writes the chosen indices
 * in ascending order, returns min(K, n). */
int ref_topk(const double *agg, int n, int K, int *idx);
/* Relative gap between the K-th and (K+1)-th largest value (INFINITY when
 * n <= K): relative to the K-th value for MEAN_SOFTMAX, to the largest
 * magnitude for MEAN_SCORE. */
double ref_topk_gap(const double *agg, int n, int K, int mode);

/* The pages KV head kvh of one (sequence, layer) holding n tokens selects
 * with its group's queries q_group [G][D]. Returns the count (ascending
 * page indices in pages[], at most K); *gap (may be NULL) as ref_topk_gap. */
int ref_select(const ref_layout *L, const float *k, int64_t n, int nkvh,
               int D, int kvh, const float *q_group, int G, double scale,
               int mode, int *pages, double *gap);

/* ---------------------------------------------------------------------- */
/* Attention.                                                             */
/* ---------------------------------------------------------------------- */

/* out[D] = softmax(scale * q.k_t) . v_t over the tokens t < n with mask[t]
 * (all tokens when mask is NULL), KV head kvh. Zero when no token. */
void ref_attention(const float *k, const float *v, int64_t n, int nkvh,
                   int D, int kvh, const float *q, double scale,
                   const unsigned char *mask, double *out);

#endif /* FKV_TESTS_REFERENCE_H */
