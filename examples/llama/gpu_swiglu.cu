/* SwiGLU: silu(gate) * up from the fused gate/up projection.
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

static __global__ void swiglu_kernel(const float *gu, int n, int I,
                                     __nv_bfloat16 *out)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * I)
        return;
    long long i = idx / I, j = idx % I;
    float g = gu[i * 2 * I + j], u = gu[i * 2 * I + I + j];
    /* expf, not __expf: silu must match the CPU path to f32 rounding. */
    out[idx] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
}

void gpu_swiglu(const float *gu, int n, int I, __nv_bfloat16 *out,
                cudaStream_t s)
{
    if (n <= 0)
        return;
    swiglu_kernel<<<gpu_blocks((long long)n * I, 256), 256, 0, s>>>(gu, n, I,
                                                                   out);
    GPU_CHECK_LAUNCH();
}
