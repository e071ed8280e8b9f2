/* Embedding lookup: bf16 table rows to the f32 residual stream.
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

static __global__ void embed_kernel(const int32_t *tokens, int n,
                                    const __nv_bfloat16 *table, int vocab,
                                    int hidden, float *x)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * hidden)
        return;
    int i = (int)(idx / hidden), d = (int)(idx % hidden);
    int t = tokens[i];
    /* Never read outside the table, whatever the device buffer holds. */
    x[idx] = (t >= 0 && t < vocab)
                 ? __bfloat162float(table[(long long)t * hidden + d])
                 : 0.0f;
}

void gpu_embed(const int32_t *tokens, int n, const __nv_bfloat16 *table,
               int vocab, int hidden, float *x, cudaStream_t s)
{
    if (n <= 0)
        return;
    embed_kernel<<<gpu_blocks((long long)n * hidden, 256), 256, 0, s>>>(
        tokens, n, table, vocab, hidden, x);
    GPU_CHECK_LAUNCH();
}
