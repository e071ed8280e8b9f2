/* Element-type conversion (the cache's dtype to the GEMMs' bf16).
 * SPDX-License-Identifier: MIT */
#include "gpu_kernels.cuh"

template <typename I, typename O>
static __global__ void convert_kernel(const I *in, O *out, long long count)
{
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx < count)
        out[idx] = gpu_from_f32<O>(gpu_to_f32(in[idx]));
}

template <typename I>
static void convert_to(const I *in, void *out, int out_dtype,
                       long long count, cudaStream_t s)
{
    unsigned g = gpu_blocks(count, 256);
    switch (out_dtype) {
    case GPU_F32:
        convert_kernel<<<g, 256, 0, s>>>(in, (float *)out, count);
        break;
    case GPU_F16:
        convert_kernel<<<g, 256, 0, s>>>(in, (__half *)out, count);
        break;
    default:
        convert_kernel<<<g, 256, 0, s>>>(in, (__nv_bfloat16 *)out, count);
        break;
    }
    GPU_CHECK_LAUNCH();
}

void gpu_convert(const void *in, int in_dtype, void *out, int out_dtype,
                 long long count, cudaStream_t s)
{
    if (count <= 0)
        return;
    switch (in_dtype) {
    case GPU_F32:
        convert_to((const float *)in, out, out_dtype, count, s);
        break;
    case GPU_F16:
        convert_to((const __half *)in, out, out_dtype, count, s);
        break;
    default:
        convert_to((const __nv_bfloat16 *)in, out, out_dtype, count, s);
        break;
    }
}
