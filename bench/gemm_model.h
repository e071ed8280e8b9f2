/*
 * gemm_model.h: cuBLAS GEMMs that stand in for a Llama-3.1-8B decode step's
 * matrix products (per layer QKV, O, gate+up and down, bf16 weights of
 * about 436 MB), for the benchmarks that measure what runs beside them
 * (bench/recall section (d), bench/mapped_probe). Definitions in
 * bench/gemm_model.c, which only the bench programs link (it needs cuBLAS).
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FKV_BENCH_GEMM_MODEL_H
#define FKV_BENCH_GEMM_MODEL_H

#ifdef FKV_WITH_CUDA

#include <stdint.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* {in (k), out (n)} of QKV, O, gate+up, down. */
extern const int bench_gemm_shape[4][2];

typedef struct bench_gemm_model {
    cublasHandle_t h;
    cudaStream_t s;
    int layers, max_batch;
    unsigned char *w;     /* layers x 4 weight matrices, bf16 */
    uint64_t layer_bytes; /* one layer's weights, 256-byte aligned */
    uint64_t off[4];      /* each matrix within a layer */
    void *x, *y;          /* activations [max_batch][28672] */
} bench_gemm_model;

/* Weights (small random bf16 values: the GEMMs' speed does not depend on
 * them) for `layers` layers and activations for `max_batch` rows, on
 * stream s. Exits on failure, like every bench helper. */
void bench_gemm_create(bench_gemm_model *m, int layers, int max_batch,
                       cudaStream_t s);
void bench_gemm_destroy(bench_gemm_model *m);

/* Enqueues y[batch][n] = x[batch][k] . W^T (W [n][k] row-major, as
 * nn.Linear) for every layer's four matrices on the model's stream,
 * between events g0 and g1; returns at once. */
void bench_gemm_enqueue(bench_gemm_model *m, int batch, cudaEvent_t g0,
                        cudaEvent_t g1);

#ifdef __cplusplus
}
#endif

#endif /* FKV_WITH_CUDA */
#endif /* FKV_BENCH_GEMM_MODEL_H */
