/* Random K/V (uniform in [-1, 1)) generated on the device for bench's long
 * contexts, in place of a real prefill.
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

static __device__ __forceinline__ unsigned long long mix64(unsigned long long z)
{
    /* splitmix64's finaliser: a counter-based generator needs no state. */
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename T>
static __global__ void random_kernel(T *out, long long count,
                                     unsigned long long seed)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= count)
        return;
    unsigned long long r = mix64(seed ^ mix64((unsigned long long)idx));
    float u = (float)(r >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
    out[idx] = gpu_from_f32<T>(2.0f * u - 1.0f);
}

void gpu_random_fill(void *out, int dtype, long long count,
                     unsigned long long seed, cudaStream_t s)
{
    if (count <= 0)
        return;
    unsigned g = gpu_blocks(count, 256);
    if (dtype == GPU_F32)
        random_kernel<<<g, 256, 0, s>>>((float *)out, count, seed);
    else if (dtype == GPU_F16)
        random_kernel<<<g, 256, 0, s>>>((__half *)out, count, seed);
    else
        random_kernel<<<g, 256, 0, s>>>((__nv_bfloat16 *)out, count, seed);
    GPU_CHECK_LAUNCH();
}
