/*
 * Launchers of the llama example's CUDA kernels (one .cu file per concern).
 * Every launcher enqueues on the given stream, never synchronises and
 * checks the launch. Row-major tensors throughout; "dtype" is GPU_F32,
 * GPU_F16 or GPU_BF16 (the cache's element type).
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef LLAMA_GPU_KERNELS_CUH
#define LLAMA_GPU_KERNELS_CUH

#include "gpu_common.cuh"
#include <stdint.h>

/* x[i][:] = table[tokens[i]][:] as f32; table [vocab, hidden] bf16. A token
 * outside [0, vocab) gives a zero row (the host validates tokens first). */
void gpu_embed(const int32_t *tokens, int n, const __nv_bfloat16 *table,
               int vocab, int hidden, float *x, cudaStream_t s);

/* out[i] = bf16(x[i] / rms(x[i]) * w) with f32 accumulation, as HF's
 * LlamaRMSNorm; x [n, hidden] f32, w [hidden] f32. */
void gpu_rmsnorm(const float *x, int n, int hidden, const float *w,
                 float eps, __nv_bfloat16 *out, cudaStream_t s);

/* Splits qkv [n, (nq + 2 nkv) * D] f32 (q heads, then k, then v) into q
 * [n, nq, D], k and v [n, nkv, D] in dtype, rotating q and k by RoPE at
 * pos[i] (HF rotate-half: pairs (j, j + D/2) with inv_freq[j], j < D/2). */
void gpu_rope_split(const float *qkv, int n, const int32_t *pos,
                    const float *inv_freq, int nq, int nkv, int D, int dtype,
                    void *q, void *k, void *v, cudaStream_t s);

/* out[i][j] = bf16(silu(gu[i][j]) * gu[i][I + j]); gu [n, 2I] f32 (the gate
 * rows then the up rows of the fused projection), out [n, I]. */
void gpu_swiglu(const float *gu, int n, int I, __nv_bfloat16 *out,
                cudaStream_t s);

/* out[i] = in[i] converted between dtypes (count elements). */
void gpu_convert(const void *in, int in_dtype, void *out, int out_dtype,
                 long long count, cudaStream_t s);

/* Causal attention of one sequence's prompt (positions 0..n-1): q [n, nq,
 * D], k, v [n, nkv, D] in dtype, GQA (query head h reads KV head h / (nq /
 * nkv)), out [n, nq, D] bf16. f32 accumulation with an online softmax; no
 * n x n matrix is formed and the queries are launched in chunks. D is 64,
 * 128 or 256. */
void gpu_prefill_attention(int dtype, const void *q, const void *k,
                           const void *v, int n, int nq, int nkv, int D,
                           float scale, __nv_bfloat16 *out, cudaStream_t s);

/* count values uniform in [-1, 1) of dtype, a function of (seed, index). */
void gpu_random_fill(void *out, int dtype, long long count,
                     unsigned long long seed, cudaStream_t s);

#endif /* LLAMA_GPU_KERNELS_CUH */
