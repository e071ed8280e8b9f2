// Set-up of the kernels, once per cache at fkv_create (no kernel here): the
// device's limits and the function attributes the launches rely on, so
// that nothing on the decode path queries the device or sets an attribute.
#include "freekv.h"
#include "kernels.h"

extern "C" cudaError_t fkv_dev_limits_query(int device, fkv_dev_limits *lim) {
    if (!lim) return cudaErrorInvalidValue;
    int sms = 0, per_sm = 0, reserved = 0, optin = 0, major = 0;
    cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e == cudaSuccess)
        e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (e != cudaSuccess) return e;
    lim->sm_count = sms;
    lim->smem_per_sm = per_sm;
    lim->smem_reserved_per_block = reserved;
    lim->smem_per_block_optin = optin;
    lim->cc_major = major;
    lim->bulk_copy = 0;
    if (major >= 9) return fkv_recall_bulk_built(&lim->bulk_copy);
    return cudaSuccess;
}

extern "C" cudaError_t fkv_kernels_init(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                        const fkv_kernel_use *use) {
    if (!g || !lim || !use) return cudaErrorInvalidValue;
    cudaError_t e = fkv_attend_init(g, lim);
    // Only these policies select on the device (EXTERNAL's engine selects).
    const bool selects = g->policy == FKV_POLICY_FREEKV || g->policy == FKV_POLICY_SYNC ||
                         g->policy == FKV_POLICY_RESIDENT;
    if (e == cudaSuccess && selects)
        e = fkv_select_init(g, lim, use->fuse_plan, use->gather_bulk, use->late_check);
    if (e == cudaSuccess && g->policy == FKV_POLICY_FREEKV &&
        g->criterion == FKV_CRITERION_BOUNDED)
        e = fkv_bounded_init(g);
    if (e == cudaSuccess) e = fkv_recall_plan_init(g, lim);
    if (e == cudaSuccess)
        e = fkv_recall_init(g, use->gather_bulk || use->side_bulk, use->side_fused);
    return e;
}
