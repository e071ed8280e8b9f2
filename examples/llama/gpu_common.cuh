/*
 * Shared definitions of the llama example's CUDA kernels and backend:
 * error checks (the example may exit; the library never does), element
 * load/store for the three KV dtypes, and a warp reduction.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef LLAMA_GPU_COMMON_CUH
#define LLAMA_GPU_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdio.h>
#include <stdlib.h>

/* Every CUDA call of the example is checked: on failure the example names the
 * call and the error and exits non-zero (an example may; libfreekv never). */
#define GPU_CHECK(call)                                                        \
    do {                                                                       \
        cudaError_t gpu_e_ = (call);                                           \
        if (gpu_e_ != cudaSuccess) {                                           \
            fprintf(stderr, "llama: CUDA error at %s:%d: %s: %s (%s)\n",       \
                    __FILE__, __LINE__, #call, cudaGetErrorString(gpu_e_),     \
                    cudaGetErrorName(gpu_e_));                                 \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

/* After a kernel launch: a bad configuration is reported at once; faults
 * inside the kernel surface at the next checked call. */
#define GPU_CHECK_LAUNCH() GPU_CHECK(cudaGetLastError())

/* The element types the kernels are instantiated for, as the cache's dtype
 * codes (FKV_DTYPE_F32/F16/BF16 are 0/1/2; kept numeric here so that .cu
 * files need not include the C header's enum for templates). */
enum { GPU_F32 = 0, GPU_F16 = 1, GPU_BF16 = 2 };

static __device__ __forceinline__ float gpu_to_f32(float x) { return x; }
static __device__ __forceinline__ float gpu_to_f32(__half x)
{
    return __half2float(x);
}
static __device__ __forceinline__ float gpu_to_f32(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T gpu_from_f32(float x);
template <> __device__ __forceinline__ float gpu_from_f32<float>(float x)
{
    return x;
}
template <> __device__ __forceinline__ __half gpu_from_f32<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 gpu_from_f32<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

static __device__ __forceinline__ float gpu_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float gpu_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

static inline unsigned gpu_blocks(long long n, int threads)
{
    return (unsigned)((n + threads - 1) / threads);
}

#endif /* LLAMA_GPU_COMMON_CUH */
