/* RMSNorm of the f32 residual stream into the bf16 input of a GEMM.
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

#define RMS_THREADS 256

/* One block per row: a strided sum of squares, a block reduction through
 * shared memory (one partial per warp), then the scaled write. */
static __global__ void rmsnorm_kernel(const float *x, int hidden,
                                      const float *w, float eps,
                                      __nv_bfloat16 *out)
{
    __shared__ float part[RMS_THREADS / 32];
    __shared__ float inv_rms;
    const float *row = x + (long long)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int d = threadIdx.x; d < hidden; d += blockDim.x)
        ss += row[d] * row[d];
    ss = gpu_warp_sum(ss);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int i = 0; i < RMS_THREADS / 32; i++)
            t += part[i];
        inv_rms = rsqrtf(t / (float)hidden + eps);
    }
    __syncthreads();
    __nv_bfloat16 *o = out + (long long)blockIdx.x * hidden;
    for (int d = threadIdx.x; d < hidden; d += blockDim.x)
        o[d] = __float2bfloat16_rn(row[d] * inv_rms * w[d]);
}

void gpu_rmsnorm(const float *x, int n, int hidden, const float *w,
                 float eps, __nv_bfloat16 *out, cudaStream_t s)
{
    if (n <= 0)
        return;
    rmsnorm_kernel<<<n, RMS_THREADS, 0, s>>>(x, hidden, w, eps, out);
    GPU_CHECK_LAUNCH();
}
