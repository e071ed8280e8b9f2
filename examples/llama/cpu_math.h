/* CPU kernels of the engine (cpu_math.c): f32, OpenMP-parallel. */
#ifndef LLAMA_CPU_MATH_H
#define LLAMA_CPU_MATH_H

#include <stdint.h>

/* y[n][out] (+)= x[n][in] * wt[in][out]; wt is the transposed nn.Linear
 * weight. accumulate: add into y instead of overwriting it. */
void cpu_matmul(float *y, const float *x, const float *wt, int64_t n,
                int64_t in, int64_t out, int accumulate);

/* y[n][d] = x / rms(x) * w */
void cpu_rmsnorm(float *y, const float *x, const float *w, int64_t n,
                 int64_t d, float eps);

/* HF rotate-half RoPE in place on x[n][heads][head_dim], token t at
 * positions pos0 + t (pos != NULL: pos[t]). inv_freq[head_dim/2]. */
void cpu_rope(float *x, int64_t n, int32_t heads, int32_t head_dim,
              const int64_t *pos, int64_t pos0, const float *inv_freq);

/* Causal attention of the prompt rows [r0, r1) (positions r0..r1-1) over
 * keys/values [0, r1): q[r1-r0][q_heads][D], k, v [r1][kv_heads][D] (the
 * whole prompt so far), out[r1-r0][q_heads][D]. Tiled with an online
 * softmax, so memory is O(tile), not O(n^2). */
void cpu_causal_attention(float *out, const float *q, const float *k,
                          const float *v, int64_t r0, int64_t r1,
                          int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                          float scale);

/* h[n][i] = silu(g) * u */
void cpu_swiglu(float *h, const float *g, const float *u, int64_t n);

#endif
