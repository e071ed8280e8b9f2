/* The CUDA backend. Until its kernels land, it reports itself unavailable,
 * so FKV_BACKEND_AUTO picks the CPU and FKV_BACKEND_CUDA fails cleanly. */
#include "internal.h"

const char *fkvi_cuda_unavailable(int device)
{
    (void)device;
    return "the CUDA backend is not implemented in this release";
}

static fkv_status cuda_create(fkv_cache *c)
{
    return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                     "the CUDA backend is not implemented in this release");
}

static void cuda_destroy(fkv_cache *c)
{
    (void)c;
}

const fkvi_backend_ops fkvi_cuda_backend = {
    .name = "cuda",
    .create = cuda_create,
    .destroy = cuda_destroy,
};
